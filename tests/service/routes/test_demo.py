"""The demo page: its files from the package, and a real browser using it against real servers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import httpx
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from tests.conftest import PHOTOS, REPO
from tests.service.fakes import build_app, gateway, serving

CAT = PHOTOS / "cat_chelsea.jpg"


class Controls(HTMLParser):
    """The page's form controls, the labels' targets and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[str] = []
        self.labelled: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag in ("input", "select", "textarea"):
            self.controls.append(attributes.get("id", ""))
        if tag == "label":
            self.labelled.add(attributes.get("for", ""))
        self.links += [attributes[name] for name in ("src", "href") if name in attributes]


def test_the_page_its_files_and_its_config(tmp_path):
    async def main() -> dict[str, httpx.Response]:
        responses = {}
        for mode in ("none", "iam"):
            async with serving(build_app(tmp_path / mode, auth_mode=mode)) as client:
                responses[f"config {mode}"] = await client.get("/demo/config")
                for url in ("/", "/demo/demo.js", "/demo/demo.css", "/demo/secrets.txt", "/demo/..%2Fapp.py"):
                    responses[url] = await client.get(url)
        return responses

    responses = asyncio.run(main())
    assert responses["/"].headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in responses["/"].headers["content-security-policy"]
    assert responses["/demo/demo.js"].headers["content-type"].startswith("text/javascript")
    assert responses["/demo/demo.css"].headers["content-type"].startswith("text/css")
    for missing in ("/demo/secrets.txt", "/demo/..%2Fapp.py"):
        assert responses[missing].status_code == 404 and responses[missing].json()["error_code"] == "APIG.0101"
    page = Controls()
    page.feed(responses["/"].text)
    assert page.controls and set(page.controls) <= page.labelled  # every control has a label
    assert page.links and all("://" not in link and not link.startswith("/") for link in page.links)
    assert "://" not in re.sub(r"http://www\.w3\.org/2000/svg", "", responses["/demo/demo.js"].text)
    for mode in ("none", "iam"):
        config = responses[f"config {mode}"].json()
        assert config["auth"] == mode and set(config) == {"auth", "options"}
        assert config["options"]["threshold"] | {"minimum": 0, "maximum": 100} == config["options"]["threshold"]
        assert config["options"]["limit"]["default"] == 50 and config["options"]["language"]["enum"] == ["zh", "en"]


def open_page(browser, base_url: str) -> None:
    browser.driver.get(base_url + "/")
    browser.wait_for(lambda: browser.driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))


def tag_the_cat(browser) -> None:
    driver = browser.driver
    driver.find_element(By.ID, "file").send_keys(str(CAT))
    Select(driver.find_element(By.ID, "language")).select_by_value("en")
    driver.find_element(By.ID, "submit").click()


def drop_the_cat(browser) -> None:
    """Drops the photo on the drop zone, as a file dragged from the desktop arrives."""
    browser.driver.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dropped = new DataTransfer();
        dropped.items.add(new File([bytes], "cat.jpg", {type: "image/jpeg"}));
        document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: dropped}));""",
        base64.b64encode(CAT.read_bytes()).decode(),
    )


def status(browser) -> str:
    return browser.driver.find_element(By.ID, "status").text


def table(browser) -> dict[str, list[str]]:
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#tags tbody tr")
    return {cells[0]: cells[1:] for cells in ([td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows)}


def test_a_photo_of_a_cat_is_tagged_cat_with_its_box_drawn(server, browser):
    """The real models, through the page, as a person would use it (auth off, as the fixture runs)."""
    browser.requested_urls()
    open_page(browser, server.base_url)
    assert not browser.driver.find_element(By.ID, "login").is_displayed()
    tag_the_cat(browser)
    tags = browser.wait_for(lambda: table(browser))
    assert "cat" in tags and float(tags["cat"][1].removesuffix(" %")) >= 60
    box = browser.driver.find_element(By.CSS_SELECTOR, "#boxes g[data-tag='cat'] rect")
    assert float(box.get_attribute("width")) > 100 and float(box.get_attribute("height")) > 100
    assert box.size["width"] > 50  # drawn over the picture, at its displayed scale
    preview = browser.driver.find_element(By.ID, "preview")
    assert browser.driver.execute_script("return arguments[0].naturalWidth", preview) > 0
    requested = browser.requested_urls()
    assert f"{server.base_url}/v2.0/image/tagging" in requested
    assert [url for url in requested if not url.startswith((server.base_url + "/", "data:", "blob:"))] == []


def dev_credentials(data_dir) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "admin", "dev-credentials", "--json"],
        env={**os.environ, "IMAGETAG_DATA_DIR": str(data_dir), "IMAGETAG_AUTH_MODE": "iam"},
        capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
    )
    return json.loads(result.stdout)


def test_with_iam_the_page_signs_in_tags_with_the_token_and_signs_out(tmp_path, browser):
    credentials = dev_credentials(tmp_path)
    with gateway(tmp_path, auth_mode="iam") as server:
        open_page(browser, server.base_url)
        driver = browser.driver
        tag_the_cat(browser)
        assert browser.wait_for(lambda: status(browser)) == "Sign in first."

        for field, value in (("domain", "domain"), ("user", "user"), ("password", "password"), ("project", "project_name")):
            driver.find_element(By.ID, field).send_keys(credentials[value] + ("-wrong" if field == "password" else ""))
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        browser.wait_for(lambda: "failed" in status(browser))
        assert "APIG.0301" in status(browser)

        driver.find_element(By.ID, "password").send_keys(credentials["password"])
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        browser.wait_for(lambda: driver.find_element(By.ID, "signed-in").is_displayed())
        assert driver.find_element(By.ID, "who").text == credentials["user"]
        assert driver.switch_to.active_element == driver.find_element(By.ID, "sign-out")

        driver.find_element(By.ID, "file").clear()
        drop_the_cat(browser)
        assert status(browser) == "Chosen: cat.jpg"
        driver.find_element(By.ID, "submit").click()
        assert "cat" in browser.wait_for(lambda: table(browser))
        (image,) = server.inference.images
        assert image == CAT.read_bytes()  # the file itself, as the page read it

        driver.find_element(By.ID, "sign-out").click()
        browser.wait_for(lambda: status(browser) == "Signed out.")
        assert driver.find_element(By.ID, "login-form").is_displayed()
        project = credentials["project_id"]
        assert any(f"/v2/{project}/image/tagging" in url for url in browser.requested_urls())


def test_by_keyboard_alone_a_url_is_tagged(tmp_path, browser, files_server):
    with gateway(tmp_path, url_allowed_networks=["127.0.0.1/32"]) as server:
        open_page(browser, server.base_url)
        driver = browser.driver
        reached = []
        for _ in range(12):
            ActionChains(driver).send_keys(Keys.TAB).perform()
            reached.append(driver.switch_to.active_element.get_attribute("id") or driver.switch_to.active_element.tag_name)
        controls = ["file", "url", "language", "threshold", "limit", "submit"]
        assert [r for r in reached if r in controls][: len(controls)] == controls

        driver.find_element(By.ID, "url").click()
        ActionChains(driver).send_keys(f"{files_server}/cat_chelsea.jpg", Keys.ENTER).perform()
        assert "猫" in browser.wait_for(lambda: table(browser))  # the API's default language, zh
        preview = driver.find_element(By.ID, "preview")
        assert preview.get_attribute("src") == f"{files_server}/cat_chelsea.jpg"
        assert server.inference.images == [CAT.read_bytes()]
