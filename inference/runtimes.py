"""Which runtime runs each model, and the exported model files the non-PyTorch runtimes need.

`torch` runs the weights as they are. `onnx` (ONNX Runtime) and `openvino` run an export of the
same float weights, made once on first use into a cache folder and reused from then on; the
export's name carries a hash of the source weights and of the exporting library's version, so a
new checkpoint or a library upgrade exports afresh instead of reusing a stale file. Exports are
written under a temporary name and renamed into place, so processes starting together at worst
export twice and never read a half-written file.

`auto` picks, per model: on CUDA, PyTorch in half precision; on CPU, the fastest runtime measured
on the project's CPU machine (`load-tests/runtimes.py`, table in the README) among those whose
package is installed, else PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from inference.files import file_sha256

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "openvino")
RUNTIME_CHOICES = ("auto", *RUNTIMES)

# Fastest first, as measured by `load-tests/runtimes.py` on the 2-core CPU development machine
# (ms per image, batch 1 / 8; quiet machine): whole engine OpenVINO 58 / 58, ONNX Runtime 62 / 61,
# PyTorch 133 / 166. Per model, ONNX Runtime and OpenVINO are within a few percent of each other
# (classifier 14.3 / 11.2 and 14.7 / 12.5, detector 41 / 50 and 42 / 47); under background load
# OpenVINO held up better (engine 105 / 116 against 139 / 150), so it comes first for both.
CPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "classifier": ("openvino", "onnx", "torch"),
    "detector": ("openvino", "onnx", "torch"),
}

# What each runtime needs installed: to run a model, and to export it (the classifier goes through
# torch's ONNX exporter, which needs `onnx`, for both; ultralytics converts to OpenVINO directly).
_RUN_PACKAGES = {"torch": (), "onnx": ("onnxruntime",), "openvino": ("openvino",)}
_EXPORT_PACKAGES = {
    ("classifier", "onnx"): ("onnx",),
    ("classifier", "openvino"): ("onnx",),
    ("detector", "onnx"): ("onnx",),
}


class RuntimeUnavailable(RuntimeError):
    """An explicitly requested runtime cannot be used here; the message says why."""


def installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in packages)


def packages_for(runtime: str, model: str = "classifier") -> tuple[str, ...]:
    return _RUN_PACKAGES[runtime] + _EXPORT_PACKAGES.get((model, runtime), ())


def runtime_installed(runtime: str, model: str = "classifier") -> bool:
    return installed(*packages_for(runtime, model))


def resolve_runtime(requested: str, device: torch.device, model: str) -> str:
    """The runtime to use for `model` ("classifier" or "detector") on `device`.

    `auto`: torch on CUDA; on CPU the first installed runtime of `CPU_PREFERENCE`. An explicit
    choice is checked: a missing package or a non-CPU device raises `RuntimeUnavailable`.
    """
    if requested not in RUNTIME_CHOICES:
        raise RuntimeUnavailable(
            f"unknown {model} runtime {requested!r}: choose one of {', '.join(RUNTIME_CHOICES)}"
        )
    if requested == "auto":
        if device.type != "cpu":
            return "torch"
        return next(r for r in CPU_PREFERENCE[model] if runtime_installed(r, model))
    if requested != "torch" and device.type != "cpu":
        raise RuntimeUnavailable(
            f"the {requested} {model} runtime runs on CPU only; on {device} use torch or auto"
        )
    if not runtime_installed(requested, model):
        packages = " and ".join(packages_for(requested, model))
        raise RuntimeUnavailable(f"the {requested} {model} runtime needs {packages} installed")
    return requested


def default_cache_dir() -> Path:
    """Where exports go when no folder is configured: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imagetag" / "runtimes"


def _cache_key(source: Path, *recipe: str) -> str:
    digest = hashlib.sha256(file_sha256(source).encode())
    for part in recipe:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


_OPENVINO_TELEMETRY_MODULES = (
    "openvino.tools.ovc.convert_impl",
    "openvino.tools.ovc.telemetry_utils",
    "openvino.tools.ovc.utils",
    "openvino.tools.ovc.main",
)


def keep_runtimes_offline() -> None:
    """Keeps ultralytics and OpenVINO offline, quiet and from installing anything.

    Ultralytics otherwise tries to pip-install missing runtimes, phones home and logs to stdout
    (where `imagetag tag` writes its JSON lines); it reads these variables when first imported.
    Unless the user has opted out with a consent file under ~/intel, `import openvino` and every
    `ov.convert_model` (ours, and ultralytics' OpenVINO export) send usage events to Google
    Analytics; a self-hosted service must not. OpenVINO uses a no-op stub when the
    `openvino-telemetry` package cannot be imported, so make it unimportable before OpenVINO
    is first imported, or, if it was already imported, point the converter's modules at the stub.

    Called where the models are built (`TaggingEngine.build`, the exporters), never at import:
    importing this package changes nothing in the process. Idempotent.
    """
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import fails: stub
        return
    if sys.modules["openvino_telemetry"] is None or "openvino" not in sys.modules:
        return
    from openvino.tools.ovc import telemetry_stub

    for name in _OPENVINO_TELEMETRY_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "tm"):
            module.tm = telemetry_stub


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters warn (deprecations, constant folding) and print progress; none of it is ours.

    stdout is where `imagetag tag` writes its JSON lines, so their prints go to stderr.
    """
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


def _publish(built: Path, final: Path) -> Path:
    """Moves a finished export into place atomically; a concurrent winner's copy is kept."""
    if final.exists():
        _remove(built)
        return final
    if built.is_dir():
        try:
            os.rename(built, final)
        except OSError:  # another process published the same folder first
            shutil.rmtree(built, ignore_errors=True)
            if not final.exists():
                raise
    else:
        os.replace(built, final)
    return final


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _staging_name(final: Path) -> Path:
    """A unique hidden sibling of `final`, ending like it so that ignore rules cover leftovers."""
    ending = "_openvino_model" if final.name.endswith("_openvino_model") else final.suffix
    return final.with_name(f".{final.name[: -len(ending)]}.{uuid.uuid4().hex[:8]}.tmp{ending}")


# --- classifier -------------------------------------------------------------------------------

CLASSIFIER_STEM = "efficientnet_lite2"
# Bump when the export recipe below changes, so caches made by the old recipe are not reused.
_CLASSIFIER_RECIPE = "1"
ONNX_OPSET = 17


def classifier_export(
    model: torch.nn.Module, weights: Path, input_size: int, runtime: str, cache_dir: Path
) -> Path:
    """The classifier as an `onnx` file or `openvino` IR folder in `cache_dir`, exported if missing.

    `model` is the float PyTorch model loaded from `weights` (used only when exporting).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(weights, _CLASSIFIER_RECIPE, torch.__version__, str(input_size), str(ONNX_OPSET))
    onnx_path = cache_dir / f"{CLASSIFIER_STEM}-{key}.onnx"
    if not onnx_path.exists():
        log.info("exporting the classifier to %s (once)", onnx_path)
        staging = _staging_name(onnx_path)
        try:
            with _quiet():
                torch.onnx.export(
                    model.float().cpu().eval(),
                    (torch.zeros(1, 3, input_size, input_size),),
                    str(staging),
                    input_names=["pixels"],
                    output_names=["logits"],
                    dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=ONNX_OPSET,
                    dynamo=False,  # the TorchScript exporter: no onnxscript needed, 2x faster here
                )
            _publish(staging, onnx_path)
        finally:
            staging.unlink(missing_ok=True)
    if runtime == "onnx":
        return onnx_path
    if runtime != "openvino":
        raise ValueError(f"no export for runtime {runtime!r}")
    import openvino as ov

    keep_runtimes_offline()
    ir_dir = cache_dir / f"{CLASSIFIER_STEM}-{key}-ov{ov.__version__.split('-')[0]}_openvino_model"
    if not (ir_dir / "model.xml").exists():
        log.info("converting the classifier to OpenVINO IR in %s (once)", ir_dir)
        staging = _staging_name(ir_dir)
        staging.mkdir()
        try:
            with _quiet():
                # Float32 weights: the default fp16 compression would change the outputs.
                ov.save_model(ov.convert_model(onnx_path), staging / "model.xml", compress_to_fp16=False)
            _publish(staging, ir_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ir_dir / "model.xml"


# --- detector ---------------------------------------------------------------------------------

_DETECTOR_RECIPE = "1"


def export_detector(pt_path: Path, runtime: str, out_dir: Path, image_size: int = 640) -> Path:
    """An ultralytics `.pt` checkpoint exported for `runtime` ("onnx" or "openvino") into `out_dir`.

    Float32, dynamic batch and image shape (so batches and ultralytics' rectangular letterbox
    work as with the `.pt`), no NMS in the graph (ultralytics applies its own, as for the `.pt`).
    Runs offline: nothing is downloaded.
    Returns the `.onnx` file or the `_openvino_model` folder, reusing a previous export of the
    same checkpoint. Independent of the rest of imagetag: usable from scripts and benchmarks.
    """
    if runtime not in ("onnx", "openvino"):
        raise ValueError(f"cannot export the detector for runtime {runtime!r}")
    keep_runtimes_offline()
    import ultralytics
    from ultralytics import YOLO

    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = [_DETECTOR_RECIPE, ultralytics.__version__, torch.__version__, str(image_size)]
    if runtime == "openvino":
        import openvino as ov

        keep_runtimes_offline()
        recipe.append(ov.__version__)
    key = _cache_key(pt_path, *recipe)
    stem = pt_path.stem
    final = out_dir / (f"{stem}-{key}.onnx" if runtime == "onnx" else f"{stem}-{key}_openvino_model")
    if final.exists():
        return final
    log.info("exporting detector %s to %s (once)", pt_path, final)
    # Ultralytics writes its export beside the checkpoint: export a private copy in a scratch
    # folder, then move the result next to `final` and rename it into place.
    with tempfile.TemporaryDirectory(prefix="imagetag-export-") as scratch:
        source = Path(scratch) / f"{stem}.pt"
        shutil.copyfile(pt_path, source)
        options = {"format": runtime, "imgsz": image_size, "dynamic": True, "half": False, "device": "cpu"}
        if runtime == "onnx":
            options["simplify"] = False  # onnxslim is not a dependency; ONNX Runtime optimizes itself
        with _quiet():
            exported = YOLO(str(source), task="detect").export(**options)
        exported = Path(exported)
        staging = _staging_name(final)
        try:
            if exported.is_dir():
                shutil.copytree(exported, staging)
            else:
                shutil.copyfile(exported, staging)
            _publish(staging, final)
        finally:
            _remove(staging)
    return final


OPENVINO_CPU_CONFIG = {
    # Float32 everywhere: on CPUs with AVX512-BF16 or AMX OpenVINO otherwise computes in bfloat16,
    # which measured here moves classifier probabilities by up to 0.05 (top-3 order changed on 6
    # of 22 photos) and detector confidences by up to 0.05 (borderline boxes come and go).
    "INFERENCE_PRECISION_HINT": "f32",
    # No thread pinning: the service shares its cores with PyTorch's threads (preprocessing, NMS)
    # and with other worker processes; pinning measured no faster here.
    "ENABLE_CPU_PINNING": False,
}


def openvino_config(threads: int | None) -> dict[str, object]:
    config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", **OPENVINO_CPU_CONFIG}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def configure_openvino_detector(detector, threads: int | None = None) -> None:
    """Gives an OpenVINO detector the settings of `openvino_config` (float32 above all).

    Ultralytics compiles its OpenVINO backend with a latency hint only, and builds it at the first
    predict; a predict-start callback recompiles it, once, with our settings. No effect on other
    formats; if ultralytics' internals change, a warning is logged and its own setup kept. The
    tests check the outcome (boxes within 1 px, confidences within 0.01 of the `.pt`).
    """

    def on_predict_start(predictor) -> None:
        backend = getattr(predictor.model, "backend", None)
        compiled = getattr(backend, "ov_compiled_model", None)
        if compiled is None or getattr(backend, "_imagetag_configured", False):
            return
        backend._imagetag_configured = True
        try:
            import openvino as ov

            compile_model = backend.compile_model  # partial(core.compile_model, device_name=, config=)
            config = {**compile_model.keywords.get("config", {}), **openvino_config(threads)}
            keywords = {**compile_model.keywords, "device_name": "CPU", "config": config}
            recompile = functools.partial(compile_model.func, *compile_model.args, **keywords)
            source = Path(detector.model.model)
            xml = source if source.suffix == ".xml" else next(source.glob("*.xml"))
            backend.ov_compiled_model = recompile(ov.Core().read_model(str(xml)))
            backend.compile_model = recompile
        except Exception as error:  # ultralytics internals moved: run as ultralytics set it up
            log.warning("cannot apply OpenVINO settings to the detector: %r", error)
            return
        log.debug("detector OpenVINO backend recompiled with %s", config)

    detector.model.add_callback("on_predict_start", on_predict_start)


def detector_weights_for(weights: Path, runtime: str, cache_dir: Path, image_size: int = 640) -> Path:
    """The file the detector should load for `runtime`: the weights themselves for torch or for
    an existing export (its format decides), else the `.pt` exported into `cache_dir`."""
    if runtime == "torch" or weights.suffix != ".pt" or not weights.is_file():
        return weights  # torch, an export already, or missing (the detector says so clearly)
    return export_detector(weights, runtime, cache_dir, image_size)
