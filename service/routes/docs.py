"""/docs (Swagger UI) and /redoc, with their scripts and styles served from the installed
packages, so that the documentation works where no CDN can be reached.

The assets come from the `fastapi-offline` package on PyPI (MIT), which ships the builds of
swagger-ui-dist (Apache-2.0) and Redoc (MIT) as files; only those files are used, not its app.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.errors import RouteNotFound

router = APIRouter(include_in_schema=False)

ASSETS_PATH = "/docs/assets"
_ASSETS = files("fastapi_offline") / "static"
_MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# The pages may load nothing from elsewhere: Redoc's bundle, for one, shows its vendor's logo
# from a CDN, which would tell that CDN who reads these docs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:"
)
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY}

# The default validator is an online service: its badge would be a request leaving the network.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


def _page(request: Request, render: Callable[..., HTMLResponse], **assets: str) -> HTMLResponse:
    """`render`'s page, pointed at the OpenAPI document and the packaged `assets`, behind any proxy prefix."""
    root = request.scope.get("root_path", "")
    page = render(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} API",
        **{argument: f"{root}{ASSETS_PATH}/{name}" for argument, name in assets.items()},
    )
    page.headers.update(_HEADERS)
    return page


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    swagger = partial(get_swagger_ui_html, swagger_ui_parameters=SWAGGER_UI_PARAMETERS)
    assets = {"swagger_js_url": "swagger-ui-bundle.js", "swagger_css_url": "swagger-ui.css"}
    return _page(request, swagger, swagger_favicon_url="favicon.png", **assets)


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    redoc = partial(get_redoc_html, with_google_fonts=False)
    return _page(request, redoc, redoc_js_url="redoc.standalone.js", redoc_favicon_url="favicon.png")


@router.get(ASSETS_PATH + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in _MEDIA_TYPES:
        raise RouteNotFound(f"no documentation asset named {name!r}")
    return FileResponse(
        str(_ASSETS / name), media_type=_MEDIA_TYPES[name], headers={"Cache-Control": "public, max-age=86400"}
    )
