"""The package as a user gets it: a wheel (not the editable checkout) in a fresh virtual
environment, then the README's quick start from an empty directory far from the repository."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest
import requests

from tests.conftest import DETECTOR_WEIGHTS, PHOTOS, REPO, free_port


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin/` of a new venv holding the built wheel. Its dependencies (torch and the rest,
    gigabytes) are borrowed from the test environment through a `.pth` path line: that line adds
    their folder only, not the editable install's import hook, so `service` and `inference`
    come from the wheel alone."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the wheel is made of, so the checkout gets no build/ folder.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("service", "inference"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(root / "dist"), str(source)],
        check=True, cwd=root, timeout=300,
    )
    (wheel,) = (root / "dist").glob("imagetag-*.whl")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(site, "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True, timeout=300,
    )
    return python.parent


def run(bin_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETAG_")} | env
    return subprocess.run(
        [str(bin_dir / "imagetag"), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120
    )


def test_the_wheel_is_what_runs(installed, tmp_path):
    where = subprocess.run(
        [str(installed / "python"), "-c", "import service, inference; print(service.__file__, inference.__file__)"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    ).stdout
    assert str(REPO) not in where and "site-packages" in where


def test_weights_commands_find_the_packaged_manifest(installed, tmp_path):
    listed = run(installed, tmp_path, "weights", "list")
    assert listed.returncode == 0, listed.stderr
    assert "yolo11n" in listed.stdout and "efficientnet-lite2" in listed.stdout
    # Offline (these machines) it cannot download, but it knew what to download.
    fetched = run(installed, tmp_path, "weights", "fetch", "yolo11n")
    assert "no weights named" not in fetched.stderr and "Traceback" not in fetched.stderr
    assert fetched.returncode == 0 or "cannot download" in fetched.stderr
    if fetched.returncode == 0:
        assert (tmp_path / "weights" / "yolo11n.pt").exists()


def test_quick_start_writes_to_the_data_folder_and_serves_the_sample_flow(installed, tmp_path):
    credentials = run(installed, tmp_path, "admin", "dev-credentials", "--json")
    assert credentials.returncode == 0, credentials.stderr
    c = json.loads(credentials.stdout)
    assert {p.name for p in (tmp_path / "data").iterdir()} >= {"identity.sqlite3", "master.key", "dev-credentials.json"}

    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETAG_")}
    environment |= {"IMAGETAG_DETECTOR_WEIGHTS": str(DETECTOR_WEIGHTS), "IMAGETAG_TORCH_THREADS": "2",
                    "IMAGETAG_MODEL_REPLICAS": "1"}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([str(installed / "imagetag"), "serve", "--port", str(port)], cwd=tmp_path,
                              env=environment, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        # The README's "Calling the API" sample, as the vendor's own sample flow does it.
        login = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "domain": {"name": c["domain"]}, "name": c["user"], "password": c["password"]}}},
            "scope": {"project": {"name": c["project_name"]}}}}
        token = requests.post(f"{base}/v3/auth/tokens", json=login, timeout=30).headers["X-Subject-Token"]
        image = base64.b64encode((PHOTOS / "cat_chelsea.jpg").read_bytes()).decode()
        response = requests.post(f"{base}/v1.0/image/tagging", headers={"X-Auth-Token": token},
                                 json={"image": image, "language": "en", "limit": 3}, timeout=60)
        assert response.status_code == 200, response.text
        assert "cat" in [t["tag"] for t in response.json()["result"]["tags"]]
        # The demo page and the documentation's assets are package data of the wheel.
        assert "demo/demo.js" in requests.get(f"{base}/", timeout=10).text
        for asset in ("/demo/demo.js", "/docs/assets/swagger-ui-bundle.js"):
            assert requests.get(f"{base}{asset}", timeout=10).status_code == 200, asset
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
