"""Without Chromium the browser tests skip, and say why; under CI they fail instead."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

BROWSER_TEST = "tests/service/routes/test_docs.py::test_swagger_ui_and_redoc_render_every_operation_offline"


def run_without_chromium(ci: str | None) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name != "CI"}
    environment["PATH"] = os.path.dirname(sys.executable)  # no chromium, no chromedriver
    if ci is not None:
        environment["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", BROWSER_TEST],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(("ci", "outcome", "exit_code"), [(None, "1 skipped", 0), ("true", "1 error", 1)])
def test_a_missing_browser_skips_only_outside_ci(ci, outcome, exit_code):
    result = run_without_chromium(ci)
    assert result.returncode == exit_code and outcome in result.stdout, result.stdout[-2000:]
    assert "apt-get install chromium chromium-driver" in result.stdout
