"""The inference-client interface's own logic: when a request may still be queued."""

from __future__ import annotations

import time

import pytest

from inference.client import DeadlineExceeded, InferenceUnavailable, admission_deadline


def test_no_deadline_means_the_default_from_now():
    before = time.monotonic()
    deadline = admission_deadline(None, 30.0)
    assert before + 30.0 <= deadline <= time.monotonic() + 30.0


def test_a_given_deadline_is_kept_and_a_passed_one_refused():
    future = time.monotonic() + 5
    assert admission_deadline(future, 30.0) == future
    with pytest.raises(DeadlineExceeded) as raised:
        admission_deadline(time.monotonic() - 0.001, 30.0)
    assert isinstance(raised.value, InferenceUnavailable)  # a 503 for the caller, not a 500
