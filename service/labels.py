"""Where a tag sits in the vocabulary, for clients that ask (`label_structure`), Rekognition-style:
its parents (every more general tag, nearest first, so "cat" comes with "mammal" and "animal"),
its aliases (the models' own class names for it, where they differ from its name: Open Images
"Cattle" is the tag "cow") and its category ids (the key of `i18n_type`)."""

from __future__ import annotations

from dataclasses import dataclass

from inference.vocabulary import Tag, Vocabulary
from service.protocol.tagging import I18nText, TagParent


@dataclass(frozen=True)
class LabelStructure:
    vocabulary: Vocabulary
    aliases: dict[str, tuple[str, ...]]

    @classmethod
    def of(cls, vocabulary: Vocabulary) -> LabelStructure:
        aliases: dict[str, list[str]] = {}
        for classes in vocabulary.detector_classes.values():
            for name, key in classes.items():
                known = aliases.setdefault(key, [])
                if name.casefold() not in {vocabulary.tags[key].en.casefold(), *map(str.casefold, known)}:
                    known.append(name)
        return cls(vocabulary, {key: tuple(names) for key, names in aliases.items() if names})

    def parents(self, tag: Tag, language: str) -> list[TagParent]:
        parents = (self.vocabulary.tags[key] for key in self.vocabulary.ancestors.get(tag.key, ()))
        return [
            TagParent(name=parent.zh if language == "zh" else parent.en, i18n=I18nText(zh=parent.zh, en=parent.en))
            for parent in parents
        ]
