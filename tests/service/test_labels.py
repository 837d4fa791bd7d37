"""label_structure: each tag's parents, aliases and category ids on request, the contract's bytes otherwise."""

from __future__ import annotations

import json

import pytest
import requests

from inference.vocabulary import Vocabulary
from service.labels import LabelStructure
from tests.conftest import photo_base64
from tests.service.fakes import gateway
from tests.service.labels_fixture import BODIES, RECORDED, FixedTags

CAT = photo_base64("cat_chelsea.jpg")


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    with gateway(tmp_path_factory.mktemp("labels"), FixedTags()) as server:
        yield server


def post(server, body: dict, path: str = "/v1.0/image/tagging") -> requests.Response:
    response = requests.post(server.url(path), json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("name", BODIES)
def test_without_the_field_the_response_is_the_recorded_contract_response_byte_for_byte(fixed, name):
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))[name]
    body = BODIES[name] | {"image": CAT}
    assert post(fixed, body).content.decode() == recorded
    assert post(fixed, body | {"label_structure": False}).content.decode() == recorded


def test_with_the_field_each_tag_has_its_parents_aliases_and_categories(fixed):
    plain = post(fixed, {"image": CAT, "language": "en", "threshold": 0}).json()["result"]["tags"]
    tags = post(fixed, {"image": CAT, "language": "en", "threshold": 0, "label_structure": True}).json()["result"]["tags"]
    # The contract's fields are untouched; the three extension fields are added to every tag.
    assert [{k: v for k, v in t.items() if k not in ("parents", "aliases", "category_ids")} for t in tags] == plain
    by_name = {t["tag"]: t for t in tags}
    assert by_name["tabby cat"]["parents"] == [
        {"name": "cat", "i18n": {"zh": "猫", "en": "cat"}},
        {"name": "mammal", "i18n": {"zh": "哺乳动物", "en": "mammal"}},
        {"name": "animal", "i18n": {"zh": "动物", "en": "animal"}},
    ]
    assert by_name["animal"]["parents"] == []
    assert by_name["cow"]["aliases"] == ["Cattle"]  # Open Images' class name for the tag
    assert by_name["cat"]["aliases"] == []  # COCO "cat" and Open Images "Cat" are its own name
    assert {t["tag"]: t["category_ids"] for t in tags} == {name: ["animal"] for name in by_name}


def test_parents_follow_the_language_and_batches_take_the_field(fixed):
    body = {"images": [{"image": CAT}], "threshold": 0, "label_structure": True}
    (result,) = post(fixed, body, "/v2.0/image/tagging/batch").json()["results"]
    cat = next(t for t in result["result"]["tags"] if t["tag"] == "猫")
    assert [p["name"] for p in cat["parents"]] == ["哺乳动物", "动物"]


def test_the_field_is_a_boolean(fixed):
    response = requests.post(fixed.url("/v1.0/image/tagging"), json={"image": CAT, "label_structure": "yes"}, timeout=30)
    assert response.status_code == 400 and response.json()["error_code"] == "AIS.0501"


def test_every_vocabulary_tag_has_a_structure_from_its_tables():
    vocabulary = Vocabulary.load()
    labels = LabelStructure.of(vocabulary)
    assert labels.aliases["cell_phone"] == ("cell phone",)  # COCO's name; Open Images' is the tag's own
    for tag in vocabulary.tags.values():
        parents = [p.i18n.en for p in labels.parents(tag, "en")]
        assert parents == [vocabulary.tags[key].en for key in vocabulary.ancestors[tag.key]]
        assert tag.en.casefold() not in map(str.casefold, labels.aliases.get(tag.key, ()))


def test_real_models_give_cat_with_mammal_and_animal_as_parents(server):
    """The real models on a real photo, over HTTP."""
    response = requests.post(server.url("/v1.0/image/tagging"), timeout=60,
                             json={"image": CAT, "language": "en", "label_structure": True})
    assert response.status_code == 200, response.text
    cat = next(t for t in response.json()["result"]["tags"] if t["tag"] == "cat")
    assert [p["name"] for p in cat["parents"]] == ["mammal", "animal"]
    assert cat["category_ids"] == ["animal"] and cat["instances"]
