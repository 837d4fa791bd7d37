"""A real headless Chromium (Debian's, driven by its chromedriver) that cannot reach the network.

Every host name but 127.0.0.1 fails to resolve, and every request not to loopback goes to a
proxy on a closed loopback port, so nothing leaves the machine; the requests the page made are
read back from Chromium's own network log, so a test can also say that none was even tried.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
NETWORK_CUT = ("--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")


class Browser:
    def __init__(self, driver) -> None:
        self.driver = driver

    def requested_urls(self) -> list[str]:
        """Every URL asked for since the last call, as Chromium's network log has it, less those
        that the page's Content-Security-Policy stopped before they were sent."""
        urls, blocked = {}, set()
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message["params"]
            if message["method"] == "Network.requestWillBeSent":
                urls[params["requestId"]] = params["request"]["url"]
            elif message["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
                blocked.add(params["requestId"])
        return [url for request_id, url in urls.items() if request_id not in blocked]

    def wait_for(self, find: Callable[[], Any], timeout_s: float = 120) -> Any:
        """What `find` returns, once it is truthy."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = find()
            if found:
                return found
            page = self.driver.execute_script("return document.body ? document.body.innerText : ''")
            assert time.monotonic() < deadline, f"timed out on {self.driver.current_url}, which shows: {page[-500:]}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "no chromium/chromedriver: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests; {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-background-networking", "--no-first-run", "--window-size=1280,1600", *NETWORK_CUT):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield Browser(driver)
    finally:
        driver.quit()
