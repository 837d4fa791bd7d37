"""Device names checked against the hardware torch sees; run in a subprocess with
CUDA_VISIBLE_DEVICES empty, so that "no GPU" is true on any machine, GPU hosts included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from inference.devices import DeviceUnavailable, resolve_device
from tests.conftest import REPO

NAMES = ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "tpu", "gpu", "cuda:x", "mps"]


def resolve_without_a_gpu() -> dict[str, str]:
    script = (
        "import json\n"
        "from inference.devices import DeviceUnavailable, resolve_device\n"
        "out = {}\n"
        f"for name in {NAMES!r}:\n"
        "    try:\n"
        "        out[name] = str(resolve_device(name))\n"
        "    except DeviceUnavailable as error:\n"
        "        out[name] = 'error: ' + str(error)\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_a_gpu_that_is_not_there_is_an_error_not_the_cpu():
    resolved = resolve_without_a_gpu()
    assert resolved["auto"] == "cpu" and resolved["cpu"] == "cpu"
    for name in ("cuda", "cuda:0", "cuda:7"):
        assert resolved[name].startswith(f"error: device {name!r}: no CUDA GPU is visible"), resolved[name]
    for name in ("tpu", "gpu", "cuda:x", "mps"):
        assert resolved[name] == f"error: unknown device {name!r}: use auto, cpu, cuda or cuda:N"


def test_on_this_machine_gpus_past_the_last_are_refused():
    count = torch.cuda.device_count()
    if count:
        assert resolve_device("cuda") == torch.device("cuda")
        assert resolve_device(f"cuda:{count - 1}").index == count - 1
    try:
        resolve_device(f"cuda:{count}")
    except DeviceUnavailable as error:
        assert f"cuda:{count}" in str(error)
    else:
        raise AssertionError(f"cuda:{count} was accepted with {count} devices")
