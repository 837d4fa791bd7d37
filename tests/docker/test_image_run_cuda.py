"""The CUDA worker image as far as it can be built without Docker Hub, GHCR or a GPU:
docker/Dockerfile.cuda on the Debian 12 base of docker/build-local.sh, with PYTHON=python-base
(`bash docker/build-local.sh cuda` -> build/imagetag-worker-cuda.oci.tar).

That is every Python layer of the image (PyPI's CUDA 13.0 torch and the NVIDIA wheels, the pinned
dependencies, the project), its user, environment and health check, but neither the
`nvidia/cuda` base nor uv's Python: docker/README.md says what stays unproven. CI does not build
it (time); these tests skip unless the archive of these sources is there (or IMAGETAG_IMAGE_BUILD=1).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, RedisProcess
from tests.docker.test_image_run import Image, assert_clean, find_archive, loaded, serve_a_job_from_redis, stop

ARCHIVE = REPO / "build" / "imagetag-worker-cuda.oci.tar"


@pytest.fixture(scope="module")
def cuda_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    archive = find_archive("cuda", ARCHIVE, required=False)
    yield from loaded(archive, tmp_path_factory.mktemp("buildah-cuda"))


def test_the_cuda_image_is_configured_as_the_dockerfile_says(cuda_image: Image) -> None:
    config = cuda_image.archive.config["config"]
    assert config["User"] == "10001:10001"
    assert config["Cmd"] == ["imagetag", "worker"]
    assert config["Healthcheck"]["Test"] == ["CMD", "imagetag-healthcheck", "worker"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["IMAGETAG_DEVICE"] == "cuda" and env["IMAGETAG_METRICS_PORT"] == "9100"
    assert_clean(cuda_image.snapshot)


def test_the_cuda_image_has_pypis_cuda_torch(cuda_image: Image) -> None:
    result = cuda_image.container.run(
        "python", "-c", "import cv2, torch, torchvision, ultralytics, service.cli; "
        "print(torch.__version__, torch.version.cuda, torchvision.__version__)")
    assert result.returncode == 0, result.stderr[-3000:]
    # the last line: importing ultralytics may print its settings notice first
    torch_version, cuda, torchvision_version = result.stdout.strip().splitlines()[-1].split()
    assert torch_version.startswith("2.14.1") and cuda == "13.0" and torchvision_version.startswith("0.29.1")


def test_the_cuda_worker_refuses_to_run_without_a_gpu(cuda_image: Image, tmp_path: Path) -> None:
    """IMAGETAG_DEVICE=cuda (the image's): no GPU here, so the worker must stop, not fall back to
    the CPU."""
    redis = RedisProcess(tmp_path)
    redis.start()
    log = tmp_path / "worker.log"
    worker = cuda_image.container.start(log, "imagetag", "worker", env={"IMAGETAG_REDIS_URL": redis.url})
    try:
        worker.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker kept running without a GPU: {log.read_text(errors='replace')[-3000:]}")
    finally:
        stop(worker)
        redis.stop()
    output = log.read_text(errors="replace")
    assert worker.returncode != 0 and re.search(r"NVIDIA|CUDA", output), output[-3000:]


def test_the_cuda_images_worker_serves_jobs_on_the_cpu(cuda_image: Image, tmp_path: Path) -> None:
    """The same layers with IMAGETAG_DEVICE=cpu: the whole worker path, Redis to tags."""
    redis = RedisProcess(tmp_path)
    redis.start()
    try:
        serve_a_job_from_redis(cuda_image, redis, tmp_path, {"IMAGETAG_DEVICE": "cpu"})
    finally:
        redis.stop()
