"""The quality report's claims, held: the labelled set is sound, the calibration was fitted on its
fitting half only, and on the test half the engine measures exactly what the README says.

The figures are strict on purpose: a change that makes the tags better or worse fails here, and
whoever made it re-runs `load-tests/quality_report.py` and updates the README with the new ones.
"""

import csv
import hashlib

import pytest

from inference.evaluation import load_labels, measure, observe
from inference.fusion import Calibration
from tests.conftest import PHOTOS, REPO

EVALSET = REPO / "tests" / "evalset"
LABELS = EVALSET / "labels.tsv"

# Measured by load-tests/quality_report.py on the 144 test photos (README, "Tag quality").
TEST_PHOTOS = 144
RIGHT_RETURNED, RETURNED = 166, 190  # precision 87.4% at the default threshold 60
EXPECTED_HITS, PHOTOS_WITH_EXPECTATION = 120, 134  # top-5 recall 89.6%, both languages
PHOTOS_WITHOUT_TAGS = 38
EXPECTED_CALIBRATION_ERROR = 0.016
# The engine before calibration (commit 9dc340c) on the same photos, by load-tests/baseline_quality.py.
BASELINE_EXPECTED_HITS = 114


def rows():
    with LABELS.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_the_labelled_set_is_large_split_in_halves_and_sourced():
    labelled = rows()
    assert len(labelled) >= 200
    files = [r["file"] for r in labelled]
    assert len(set(files)) == len(files)
    splits = [r["split"] for r in labelled]
    assert set(splits) == {"fit", "test"}
    assert abs(splits.count("fit") - splits.count("test")) <= 1
    for row in labelled:
        assert (EVALSET / "photos" / row["file"]).is_file(), row["file"]
        assert row["package"] and row["path"] and row["licence"], f"{row['file']}: source or licence missing"
    on_disk = {p.name for p in (EVALSET / "photos").iterdir()}
    assert on_disk == set(files), "photos/ holds exactly the labelled photos"


def test_no_photo_the_engine_was_tuned_on_is_in_the_set():
    tuned = {hashlib.sha256(p.read_bytes()).digest() for p in PHOTOS.glob("*.jpg")}
    evaluated = {hashlib.sha256(p.read_bytes()).digest() for p in (EVALSET / "photos").glob("*.jpg")}
    assert not tuned & evaluated


def test_the_shipped_calibration_was_fitted_on_these_labels_fitting_half():
    fitted_on = Calibration.load().fitted_on
    assert fitted_on["split"] == "fit"
    assert fitted_on["labels_sha256"] == hashlib.sha256(LABELS.read_bytes()).hexdigest(), (
        "labels.tsv changed since the calibration was fitted: run load-tests/fit_calibration.py"
    )
    assert fitted_on["photos"] == sum(r["split"] == "fit" for r in rows())


@pytest.fixture(scope="module")
def quality(engine):
    photos = load_labels(LABELS, engine.vocabulary, split="test")
    return measure(observe(engine, photos), engine.vocabulary)


def test_precision_at_the_default_threshold(quality):
    assert quality.photos == TEST_PHOTOS
    assert (quality.right_returned, quality.returned) == (RIGHT_RETURNED, RETURNED)


def test_top_five_recall_in_both_languages_is_no_lower_than_before_calibration(quality):
    hits = round(quality.recall_en * PHOTOS_WITH_EXPECTATION)
    assert hits == EXPECTED_HITS
    assert round(quality.recall_zh * PHOTOS_WITH_EXPECTATION) == EXPECTED_HITS
    assert hits >= BASELINE_EXPECTED_HITS


def test_photos_left_without_a_tag(quality):
    assert round(quality.no_tag * TEST_PHOTOS) == PHOTOS_WITHOUT_TAGS


def test_confidences_are_calibrated(quality):
    assert quality.calibration["all"].ece == pytest.approx(EXPECTED_CALIBRATION_ERROR, abs=0.0015)
    assert quality.calibration["all"].ece <= 0.05
