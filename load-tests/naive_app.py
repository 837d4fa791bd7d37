"""The baseline the service must beat: the FastAPI wrapper people write by hand.

Same models, same decoding, same response; but each request calls the models on its own, right
in the handler (blocking the event loop), with no batching, no queue and no limits.

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/uvicorn --app-dir load-tests naive_app:app --port 8090
"""

from __future__ import annotations

import base64
import io

from fastapi import FastAPI
from PIL import Image, ImageOps

from inference.engine import TaggingEngine
from service.settings import Settings
from service.tagging import render

settings = Settings()
engine = TaggingEngine.build(settings.engine_config())
app = FastAPI()


@app.post("/v1.0/image/tagging")
async def tag(body: dict) -> dict:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(base64.b64decode(body["image"])))).convert("RGB")
    (tags,) = engine.predict([image])
    response = render(tags, language=body.get("language", "zh"), threshold=body.get("threshold", 60), limit=body.get("limit", 50))
    return response.model_dump()


@app.get("/readyz")
async def ready() -> dict:
    return {"status": "ready"}
