import re
from collections import Counter
from pathlib import Path

import pytest

from inference.vocabulary import Vocabulary

CJK = re.compile(r"[\u4e00-\u9fff]")
# Latin letters that Chinese writing really keeps: 'CD机', 'T恤', 'iPod'.
LATIN_IN_ZH = {"cd_player", "t_shirt", "ipod", "ford_model_t"}


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.load()


def test_every_model_class_has_a_tag(vocabulary):
    assert len(vocabulary.imagenet) == 1000
    assert {name: len(classes) for name, classes in vocabulary.detector_classes.items()} == {"coco": 80, "openimages": 601}
    assert all(key in vocabulary.tags for key in vocabulary.imagenet)
    for classes in vocabulary.detector_classes.values():
        assert all(key in vocabulary.tags for key in classes.values())


def test_detector_class_lists_are_the_ones_their_weights_use():
    import ultralytics
    import yaml

    from tests.conftest import SHARED_WEIGHTS

    vocabulary = Vocabulary.load()
    coco = yaml.safe_load((SHARED_WEIGHTS / "yolov8n.metadata.yaml").read_text())["names"]
    assert list(vocabulary.detector_classes["coco"]) == [coco[i] for i in range(80)]
    packaged = Path(ultralytics.__file__).parent / "cfg" / "datasets" / "open-images-v7.yaml"
    open_images = yaml.safe_load(packaged.read_text())["names"]
    assert list(vocabulary.detector_classes["openimages"]) == [open_images[i] for i in range(601)]


@pytest.mark.parametrize(
    ("open_images", "key"),
    [("Cat", "cat"), ("Person", "person"), ("Airplane", "airplane"), ("Animal", "animal"),
     ("Mammal", "mammal"), ("Flower", "flower"), ("Cattle", "cow"), ("Mobile phone", "cell_phone"),
     ("Kite", "kite"), ("Football", "soccer_ball")],
)
def test_an_open_images_class_that_is_a_known_thing_is_that_tag(vocabulary, open_images, key):
    assert vocabulary.detector_classes["openimages"][open_images] == key


def test_open_images_adds_what_the_photos_missed(vocabulary):
    classes = vocabulary.detector_classes["openimages"]
    for name, zh, ancestor in [("Raccoon", "浣熊", "mammal"), ("Rose", "玫瑰", "flower"), ("Tree", "树", "plant"),
                               ("Rocket", "火箭", "vehicle"), ("Skyscraper", "摩天大楼", "building"),
                               ("Common sunflower", "向日葵", "flower")]:
        tag = vocabulary.tags[classes[name]]
        assert tag.zh == zh, tag
        assert ancestor in vocabulary.ancestors[tag.key], (tag, vocabulary.ancestors[tag.key])


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
        assert key in vocabulary.imagenet and key in vocabulary.detector_classes["coco"].values()


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
