"""/docs and /redoc: served from the package, and rendered by a real browser with the network cut."""

from __future__ import annotations

import asyncio
import re

import httpx
from selenium.webdriver.common.by import By

from service.routes.docs import ASSETS_PATH
from tests.service.fakes import build_app, gateway, serving


def urls_in(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', html) + re.findall(r"url: '([^']*)'", html)


def test_the_pages_name_only_assets_the_service_serves(tmp_path):
    async def main() -> dict[str, httpx.Response]:
        async with serving(build_app(tmp_path)) as client:
            pages = {path: await client.get(path) for path in ("/docs", "/redoc")}
            assets = {url: await client.get(url) for page in pages.values() for url in urls_in(page.text)}
            return pages | assets | {"missing": await client.get(f"{ASSETS_PATH}/swagger-ui.js.map")}

    responses = asyncio.run(main())
    missing = responses.pop("missing")
    assert missing.status_code == 404 and missing.json()["error_code"] == "APIG.0101"
    assert set(responses) == {
        "/docs", "/redoc", "/openapi.json", f"{ASSETS_PATH}/favicon.png", f"{ASSETS_PATH}/swagger-ui.css",
        f"{ASSETS_PATH}/swagger-ui-bundle.js", f"{ASSETS_PATH}/redoc.standalone.js",
    }
    for url, response in responses.items():
        assert response.status_code == 200, url
    assert responses[f"{ASSETS_PATH}/swagger-ui-bundle.js"].headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in responses[f"{ASSETS_PATH}/swagger-ui-bundle.js"].text
    assert "Redoc" in responses[f"{ASSETS_PATH}/redoc.standalone.js"].text
    assert '"validatorUrl": null' in responses["/docs"].text  # the online validator's badge stays off
    for page in ("/docs", "/redoc"):
        assert "img-src 'self' data:;" in responses[page].headers["Content-Security-Policy"]


def test_swagger_ui_and_redoc_render_every_operation_offline(tmp_path, browser):
    with gateway(tmp_path, auth_mode="iam") as server:
        spec = httpx.get(server.url("/openapi.json")).json()
        summaries = {op["summary"] for methods in spec["paths"].values() for op in methods.values()}
        browser.requested_urls()

        browser.driver.get(server.url("/docs"))
        blocks = browser.wait_for(lambda: browser.driver.find_elements(By.CSS_SELECTOR, ".opblock-summary"))
        assert {b.find_element(By.CSS_SELECTOR, ".opblock-summary-description").text for b in blocks} == summaries
        assert any(b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").text == "/v2/{project_id}/image/tagging"
                   for b in blocks)
        assert browser.driver.find_element(By.CSS_SELECTOR, ".btn.authorize")  # the security schemes

        browser.driver.get(server.url("/redoc"))
        browser.wait_for(lambda: all(s in browser.driver.find_element(By.TAG_NAME, "body").text for s in summaries))

        requested = browser.requested_urls()
        assert f"{server.url(ASSETS_PATH)}/swagger-ui-bundle.js" in requested
        assert f"{server.url(ASSETS_PATH)}/redoc.standalone.js" in requested
        assert [url for url in requested if not url.startswith((server.base_url + "/", "data:", "blob:"))] == []
