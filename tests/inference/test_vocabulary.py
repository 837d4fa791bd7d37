import re
from collections import Counter

import pytest

from inference.vocabulary import VOCAB_DIR, Vocabulary

CJK = re.compile(r"[\u4e00-\u9fff]")
# Latin letters that Chinese writing really keeps: 'CD机', 'T恤', 'iPod'.
LATIN_IN_ZH = {"cd_player", "t_shirt", "ipod", "ford_model_t"}


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.load()


def coco_keys() -> list[str]:
    lines = (VOCAB_DIR / "coco.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t")))["key"] for line in lines[1:]]


def test_every_model_class_has_a_tag(vocabulary):
    assert len(vocabulary.imagenet) == 1000
    assert len(coco_keys()) == 80
    assert all(key in vocabulary.tags for key in vocabulary.imagenet + tuple(coco_keys()))


def test_chinese_names_are_chinese_and_distinct(vocabulary):
    for tag in vocabulary.tags.values():
        assert CJK.search(tag.zh), tag
        if tag.key not in LATIN_IN_ZH:
            assert not re.search("[A-Za-z]", tag.zh), tag
    repeated = [name for name, n in Counter(t.zh for t in vocabulary.tags.values()).items() if n > 1]
    assert repeated == []
    repeated = [name for name, n in Counter(t.en for t in vocabulary.tags.values()).items() if n > 1]
    assert repeated == []


def test_same_thing_in_both_models_is_one_tag(vocabulary):
    for key in ("banana", "laptop", "zebra", "pizza", "umbrella"):
        assert key in vocabulary.imagenet and key in coco_keys()


def test_parents_chain_up_to_general_concepts(vocabulary):
    egyptian_cat = vocabulary.imagenet[285]
    assert vocabulary.ancestors[egyptian_cat][:3] == ("cat", "mammal", "animal")
    assert "dog" in vocabulary.ancestors[vocabulary.imagenet[207]]  # golden retriever
    assert "vehicle" in vocabulary.ancestors["bus"]
    assert vocabulary.tags["bus"].zh == "公交车"
    assert vocabulary.tags[vocabulary.imagenet[967]].zh == "浓缩咖啡"


@pytest.mark.parametrize("index", [978, 624, 979, 762, 975, 970])  # seashore, library, valley, restaurant, lakeside, alp
def test_places_are_scenes(vocabulary, index):
    tag = vocabulary.tags[vocabulary.imagenet[index]]
    assert tag.type == "scene", tag


def test_categories_read_as_i18n_types(vocabulary):
    assert vocabulary.tags["person"].category.en == "Human"
    assert vocabulary.tags["person"].category.zh == "人类"
    assert vocabulary.tags["cat"].category.zh == "动物"
    assert vocabulary.tags["pizza"].category.en == "Food"


def test_conflicting_rows_are_refused(tmp_path):
    from shutil import copytree

    from inference.vocabulary import VOCAB_DIR, VocabularyError

    copy = copytree(VOCAB_DIR, tmp_path / "vocab")
    imagenet = (copy / "imagenet.tsv").read_text(encoding="utf-8")
    # ImageNet 954 shares the key `banana` with COCO; give it another Chinese name.
    (copy / "imagenet.tsv").write_text(imagenet.replace("\t香蕉\t", "\t芭蕉\t"), encoding="utf-8")
    with pytest.raises(VocabularyError, match="banana"):
        Vocabulary.load(copy)
