"""The counting behind the quality report, on cases small enough to check by hand."""

import numpy as np
import pytest

from inference.evaluation import fit_logistic, load_labels, reliability, returned
from inference.fusion import ScoredTag
from inference.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.load()


def test_reliability_table_and_expected_calibration_error():
    pairs = [(0.95, True)] * 9 + [(0.95, False)] + [(0.15, True)] + [(0.15, False)] * 9
    table = reliability(pairs)
    assert [(round(low, 1), count) for low, _, count, _, _ in table.bins] == [(0.1, 10), (0.9, 10)]
    assert [round(accuracy, 2) for *_, accuracy in table.bins] == [0.1, 0.9]
    # |0.1 - 0.15| and |0.9 - 0.95|, each half of the tags
    assert table.ece == pytest.approx(0.05)
    assert reliability([(1.0, True)]).bins[0][2] == 1  # a confidence of exactly 1 is counted


def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    truth = np.array([-1.0, 2.0, -0.5])
    p = 1 / (1 + np.exp(-(truth[0] + x @ truth[1:])))
    y = (rng.random(len(p)) < p).astype(float)
    assert fit_logistic(x, y) == pytest.approx(truth, abs=0.08)


def test_returned_tags_follow_the_contracts_threshold_on_two_decimals(vocabulary):
    cat = vocabulary.tags["cat"]
    tags = [ScoredTag(cat, 0.60), ScoredTag(cat, 0.599951), ScoredTag(cat, 0.5999)]
    assert [t.confidence for t in returned(tags)] == [0.60, 0.599951]  # 59.995 shows as "60.00"


def test_right_tags_include_what_they_imply_and_unknown_keys_are_refused(tmp_path, vocabulary):
    labels = tmp_path / "labels.tsv"
    labels.write_text("file\tsplit\texpected\tright\nphoto.jpg\ttest\tcat\ttabby_cat;chair\n", encoding="utf-8")
    (photo,) = load_labels(labels, vocabulary)
    assert photo.expected == {"cat"}
    assert {"cat", "tabby_cat", "mammal", "animal", "chair", "furniture"} <= photo.right
    assert load_labels(labels, vocabulary, split="fit") == []
    labels.write_text("file\tsplit\texpected\tright\nphoto.jpg\ttest\tunicorn\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unicorn"):
        load_labels(labels, vocabulary)
