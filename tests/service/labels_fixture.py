"""Fixed model output for the label-structure tests, and how the recorded contract response was made.

`contract_responses.json` holds the bytes the gateway answered for these tags before
`label_structure` existed (commit 05b5171): `record()` run with that commit's code on the path.
"""

from __future__ import annotations

import json
from pathlib import Path

from inference.results import Instance, ScoredTag
from inference.vocabulary import Vocabulary
from tests.service.fakes import FakeInference

RECORDED = Path(__file__).parent / "data" / "contract_responses.json"
BODIES = {
    "en": {"image": "", "language": "en", "threshold": 0, "limit": 150},
    "zh": {"image": "", "threshold": 10.5, "limit": 4},
}


def tags() -> list[ScoredTag]:
    vocabulary = Vocabulary.load()
    scored = [("mammal", 0.97), ("animal", 0.97), ("cat", 0.96843), ("cow", 0.70004), ("tabby_cat", 0.451)]
    box = Instance(0.87139, 3.5612, 0.1234, 394.6871, 293.7049)
    return [ScoredTag(vocabulary.tags[key], p, (box,) if key in ("cat", "cow") else ()) for key, p in scored]


class FixedTags(FakeInference):
    async def tag(self, images, deadline=None):
        self.images += images
        return [tags() for _ in images]


def record(image_base64: str) -> None:
    """Run once with the pre-extension code: `PYTHONPATH=<its tree> python -c '...record(...)'`."""
    import tempfile

    import requests

    from tests.service.fakes import gateway

    with tempfile.TemporaryDirectory() as directory, gateway(Path(directory), FixedTags()) as server:
        answers = {
            name: requests.post(server.url("/v1.0/image/tagging"), json=body | {"image": image_base64}, timeout=30).text
            for name, body in BODIES.items()
        }
    RECORDED.write_text(json.dumps(answers, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
