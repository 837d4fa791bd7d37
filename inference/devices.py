"""Which torch device the models run on, checked against the hardware this process can see."""

from __future__ import annotations

import torch


class DeviceUnavailable(RuntimeError):
    """The configured device does not exist here; the message says what does."""


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else the CPU), `cpu`, `cuda` or `cuda:N`. A named GPU that is not
    there is an error, never a silent fall-back to the CPU: that would run, only many times slower."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {name!r}: no CUDA GPU is visible to torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); check the NVIDIA driver and "
            "the container's GPU access, or use cpu"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
