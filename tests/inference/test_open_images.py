"""Open Images V7 detectors, proven without their real weights: a YOLOv8n of the same
architecture with a 601-class head and the real class names from the ultralytics package, its
head set so that it finds people in small cells and raccoons in large ones, saved as an ordinary
checkpoint and run through the engine, the fusion and the HTTP API beside the COCO detector."""

from pathlib import Path

import pytest
import requests
import torch
import yaml

from inference.detector import DetectorLoadError
from inference.engine import EngineConfig, TaggingEngine
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS, photo_base64, start_server, stop_server


def synthetic_detector(path: Path, names: dict[int, str], found_by_stride: dict[int, str]) -> Path:
    """A YOLOv8n checkpoint whose box branch predicts one large box per cell and whose class
    branch names `found_by_stride[level]` there (so NMS leaves a handful of boxes)."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=len(names), verbose=False)
    model.names = dict(names)
    index = {name: i for i, name in names.items()}
    head = model.model[-1]
    with torch.no_grad():
        for level, (boxes, classes) in enumerate(zip(head.cv2, head.cv3)):
            boxes[-1].weight.zero_()
            boxes[-1].bias.fill_(-10.0)
            boxes[-1].bias.view(4, head.reg_max)[:, head.reg_max - 1] = 10.0
            classes[-1].weight.zero_()
            classes[-1].bias.fill_(-12.0)
            if level in found_by_stride:
                classes[-1].bias[index[found_by_stride[level]]] = 3.0
    torch.save({"model": model.half(), "train_args": {"imgsz": 640, "task": "detect"}, "epoch": -1}, path)
    return path


def open_images_names() -> dict[int, str]:
    import ultralytics

    packaged = Path(ultralytics.__file__).parent / "cfg" / "datasets" / "open-images-v7.yaml"
    return yaml.safe_load(packaged.read_text())["names"]


@pytest.fixture(scope="module")
def open_images_weights(tmp_path_factory) -> Path:
    names = open_images_names()
    assert len(names) == 601
    return synthetic_detector(tmp_path_factory.mktemp("oiv7") / "yolov8n-oiv7-synthetic.pt", names, {1: "Person", 2: "Raccoon"})


@pytest.fixture(scope="module")
def side_by_side(open_images_weights) -> TaggingEngine:
    return TaggingEngine.build(
        EngineConfig(detector_weights=(DETECTOR_WEIGHTS, open_images_weights), detector_runtime="torch", torch_threads=2)
    )


def test_both_detectors_feed_one_tag_list(side_by_side):
    from PIL import Image

    (tags,) = side_by_side.predict([Image.open(PHOTOS / "bus.jpg").convert("RGB")])
    keys = [t.tag.key for t in tags]
    assert len(keys) == len(set(keys)), "one thing never comes back twice"
    by_key = {t.tag.key: t for t in tags}
    raccoon = by_key["raccoon"]
    assert (raccoon.tag.en, raccoon.tag.zh) == ("raccoon", "浣熊")
    assert raccoon.instances and "mammal" in by_key
    # COCO's "person" and Open Images' "Person" are one tag, with the boxes of both detectors
    coco_only = side_by_side.detectors[0].predict([Image.open(PHOTOS / "bus.jpg").convert("RGB")])[0]
    coco_people = sum(b.class_name == "person" for b in coco_only)
    assert len(by_key["person"].instances) > coco_people


def test_a_detector_with_unknown_class_names_is_refused_by_name(tmp_path):
    weights = synthetic_detector(tmp_path / "odd.pt", {0: "person", 1: "flux capacitor", 2: "hoverboard"}, {})
    with pytest.raises(DetectorLoadError, match="'flux capacitor', 'hoverboard'"):
        TaggingEngine.build(EngineConfig(detector_weights=(weights,), detector_runtime="torch", torch_threads=2))


def test_the_api_answers_with_open_images_tags(tmp_path, open_images_weights):
    server = start_server(
        tmp_path,
        env={
            "IMAGETAG_DETECTOR_WEIGHTS": f"{DETECTOR_WEIGHTS},{open_images_weights}",
            "IMAGETAG_DETECTOR_RUNTIME": "torch",
        },
    )
    try:
        response = requests.post(
            server.url("/v1.0/image/tagging"),
            json={"image": photo_base64("cat_chelsea.jpg"), "language": "zh", "threshold": 0},
            timeout=60,
        )
    finally:
        stop_server(server)
    assert response.status_code == 200, response.text
    tags = response.json()["result"]["tags"]
    names = [t["tag"] for t in tags]
    assert "浣熊" in names and "猫" in names
    assert len(names) == len(set(names))
    raccoon = next(t for t in tags if t["tag"] == "浣熊")
    assert raccoon["i18n_tag"] == {"zh": "浣熊", "en": "raccoon"} and raccoon["instances"]
