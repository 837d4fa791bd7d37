"""The result types a gateway reads, importable without the models' libraries."""

import subprocess
import sys

from inference.results import ModelError, UndecodableImage
from tests.conftest import REPO


def test_the_result_types_import_no_model_or_array_library():
    code = "import sys, inference.results; sys.exit(sorted({'torch', 'numpy', 'PIL'} & set(sys.modules)) or 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_an_undecodable_image_is_a_model_error_of_its_own():
    """A caller that knows only `ModelError` still fails that image alone, never the request."""
    assert issubclass(UndecodableImage, ModelError)
