"""The bilingual tag vocabulary, loaded from the TSV tables in `vocab/` (see its README)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

VOCAB_DIR = Path(__file__).parent / "vocab"
TAG_TYPES = frozenset({"object", "scene", "concept"})
_TAG_COLUMNS = ("en", "zh", "type", "category", "parents")


class VocabularyError(ValueError):
    """The tables are inconsistent; raised at start-up, never per request."""


@dataclass(frozen=True)
class Category:
    key: str
    en: str
    zh: str


@dataclass(frozen=True)
class Tag:
    key: str
    en: str
    zh: str
    type: str
    category: Category
    parents: tuple[str, ...]


@dataclass(frozen=True)
class Vocabulary:
    tags: dict[str, Tag]
    imagenet: tuple[str, ...]
    """Tag key of each ImageNet-1k class index."""
    ancestors: dict[str, tuple[str, ...]]
    """Every more general tag of a key (parents, their parents, ...), without repeats."""

    @classmethod
    def load(cls, directory: Path = VOCAB_DIR) -> Vocabulary:
        categories = {
            row["key"]: Category(row["key"], row["en"], row["zh"])
            for row in _read(directory / "categories.tsv")
        }
        rows_by_key: dict[str, dict[str, str]] = {}
        indexed: dict[str, list[str]] = {}
        for table in ("concepts", "coco", "imagenet"):
            keys = []
            for row in _read(directory / f"{table}.tsv"):
                _merge_row(rows_by_key, row, table)
                keys.append(row["key"])
                if "index" in row and int(row["index"]) != len(keys) - 1:
                    raise VocabularyError(f"{table}.tsv: index {row['index']} out of order")
            indexed[table] = keys

        tags = {key: _make_tag(row, categories) for key, row in rows_by_key.items()}
        for tag in tags.values():
            for parent in tag.parents:
                if parent not in tags:
                    raise VocabularyError(f"tag {tag.key!r} has unknown parent {parent!r}")
        ancestors = {key: _ancestors(key, tags) for key in tags}
        return cls(tags, tuple(indexed["imagenet"]), ancestors)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _merge_row(rows_by_key: dict[str, dict[str, str]], row: dict[str, str], table: str) -> None:
    key = row["key"]
    known = rows_by_key.get(key)
    if known is None:
        rows_by_key[key] = row
        return
    for column in _TAG_COLUMNS:
        if known[column] != row[column]:
            raise VocabularyError(
                f"{table}.tsv: tag {key!r} disagrees on {column}: {known[column]!r} vs {row[column]!r}"
            )


def _make_tag(row: dict[str, str], categories: dict[str, Category]) -> Tag:
    if row["type"] not in TAG_TYPES:
        raise VocabularyError(f"tag {row['key']!r} has unknown type {row['type']!r}")
    if row["category"] not in categories:
        raise VocabularyError(f"tag {row['key']!r} has unknown category {row['category']!r}")
    if not row["en"] or not row["zh"]:
        raise VocabularyError(f"tag {row['key']!r} lacks a name")
    parents = tuple(p for p in row["parents"].split(",") if p)
    return Tag(row["key"], row["en"], row["zh"], row["type"], categories[row["category"]], parents)


def _ancestors(key: str, tags: dict[str, Tag]) -> tuple[str, ...]:
    found: list[str] = []
    stack = list(tags[key].parents)
    while stack:
        parent = stack.pop(0)
        if parent == key:
            raise VocabularyError(f"tag {key!r} is its own ancestor")
        if parent not in found:
            found.append(parent)
            stack.extend(tags[parent].parents)
    return tuple(found)
