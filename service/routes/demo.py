"""The demo page at `/`: plain HTML, CSS and JavaScript from the package, calling the public API."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from service.errors import RouteNotFound
from service.protocol.demo import DemoConfig
from service.protocol.tagging import TaggingOptions

router = APIRouter(include_in_schema=False)

_STATIC = files("service") / "static" / "demo"
_MEDIA_TYPES = {"demo.js": "text/javascript", "demo.css": "text/css"}


# The page's own files and the API only; images from anywhere, as a URL to tag is shown as it is.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src * data: blob:; object-src 'none'; base-uri 'none'"


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(
        str(_STATIC / "index.html"), media_type="text/html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY}
    )


@router.get("/demo/config")
async def config(request: Request) -> DemoConfig:
    return DemoConfig(
        auth=request.app.state.settings.auth_mode,
        options=TaggingOptions.model_json_schema()["properties"],
    )


@router.get("/demo/{name}")
async def asset(name: str) -> FileResponse:
    if name not in _MEDIA_TYPES:
        raise RouteNotFound(f"no demo file named {name!r}")
    return FileResponse(str(_STATIC / name), media_type=_MEDIA_TYPES[name])
