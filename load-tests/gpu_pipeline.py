"""The device pipeline's ceilings, in one run on whatever device is present (CUDA if any):

- models alone: the classifier and the detector (forward and NMS) on batches already on the
  device, already preprocessed: the compute ceiling;
- pipeline: `DevicePipeline.predict` from JPEG bytes in memory (decode, crop, letterbox, both
  models, NMS, fusion), no HTTP, on one thread; and on `--replicas` threads, each with its own
  replica (`DevicePipeline.replica`), batch after batch, as a worker serves: the in-process
  ceiling is the better of the two;
- reference: what the service did per batch before the pipeline served, PIL decode then
  `TaggingEngine.predict`;
- fusion alone: `fuse()` per image, on the pipeline's own model outputs;
- with `--breakdown N`: the milliseconds of each step of the pipeline on one batch of N, the
  device synchronised after each step, so the step that is the wall shows;
- on CUDA, last and at the largest batch, experiments beside what the pipeline runs: the
  detector's network in the default layout against channels last, both networks replayed from
  one CUDA graph against "models alone", and what an input shape never met costs both networks'
  first call.

Each at several batch sizes, over the real photos of tests/photos and tests/evalset/photos,
printing images/s and, on CUDA, the peak GPU memory of each measurement (`--json` writes them too;
`gpu_benchmark.py` runs this as its first part).

    .venv/bin/python load-tests/gpu_pipeline.py --weights ../shared/weights/yolov8n-w8.pt
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.classifier import INPUT_SIZE, normalize  # noqa: E402
from inference.device_images import LETTERBOX_GREY, decode_for_models, decode_images  # noqa: E402
from inference.devices import resolve_device  # noqa: E402
from inference.engine import EngineConfig, TaggingEngine  # noqa: E402
from inference.fusion import fuse  # noqa: E402
from inference.image_header import decode_with_pil  # noqa: E402
from inference.pipeline import DevicePipeline, YoloNetwork, _boxes, batched_nms  # noqa: E402


def photo_bytes(limit: int) -> list[bytes]:
    tests = REPO / "tests"
    paths = sorted((tests / "photos").glob("*.jpg")) + sorted((tests / "evalset" / "photos").glob("*.jpg"))
    return [path.read_bytes() for path in paths[:limit]]


Stage = tuple[str, Callable[[int], None]]


def measure(
    stages: list[Stage], batch_size: int, seconds: float, min_batches: int, device: torch.device
) -> list[dict[str, float]]:
    """Images/s of each stage's `run(batch_index)`, after one warm-up batch each. The stages take
    turns batch by batch, so a machine whose load drifts (shared cores) weighs on all alike. On
    CUDA every batch is synchronised, and the peak memory is that of the stage's own batches."""
    cuda = device.type == "cuda"
    for _, run in stages:
        run(0)
    if cuda:
        torch.cuda.synchronize(device)
    timings: list[list[float]] = [[] for _ in stages]
    peaks = [0.0 for _ in stages]
    started = time.perf_counter()
    while len(timings[0]) < min_batches or time.perf_counter() - started < seconds * len(stages):
        for index, (_, run) in enumerate(stages):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            begin = time.perf_counter()
            run(len(timings[index]) + 1)
            if cuda:
                torch.cuda.synchronize(device)
                peaks[index] = max(peaks[index], torch.cuda.max_memory_allocated(device) / 2**20)
            timings[index].append(time.perf_counter() - begin)
    results = []
    for stage_timings, peak in zip(timings, peaks):
        result = {
            "images_per_s": batch_size * len(stage_timings) / sum(stage_timings),
            "median_batch_ms": 1000 * statistics.median(stage_timings),
        }
        if cuda:
            result["peak_gpu_mb"] = peak
        results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="detector weights (.pt runs its network directly)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument("--seconds", type=float, default=5.0, help="per stage and batch size, after one warm-up batch")
    parser.add_argument("--min-batches", type=int, default=3)
    parser.add_argument("--photos", type=int, default=400, help="at most this many photos, cycled")
    parser.add_argument("--classifier-runtime", default="auto")
    parser.add_argument("--detector-runtime", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenVINO threads on a CPU")
    parser.add_argument("--replicas", type=int, default=2,
                        help="threads, each on its own replica, for the replicated pipeline (IMAGETAG_MODEL_REPLICAS)")
    parser.add_argument("--skip-reference", action="store_true", help="leave out PIL + TaggingEngine.predict")
    parser.add_argument("--json", type=Path, help="also write the measurements here (for gpu_benchmark.py)")
    parser.add_argument("--breakdown", type=int, metavar="N", help="also time each step of the pipeline on batches of N")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    config = EngineConfig(
        detector_weights=(args.weights,),
        device=str(device),
        torch_threads=args.threads,
        classifier_runtime=args.classifier_runtime,
        detector_runtime=args.detector_runtime,
    )
    started = time.perf_counter()
    engine = TaggingEngine.build(config)
    pipeline = DevicePipeline(engine, max_batch=max(batch_sizes))
    pipeline.warm_up()
    replicas = [pipeline] + [
        pipeline.replica() or DevicePipeline.build(config, max(batch_sizes)) for _ in range(args.replicas - 1)
    ]
    photos = photo_bytes(args.photos)
    detector_kinds = ", ".join(
        f"{d.weights.name} ({'its network' if d.weights.suffix == '.pt' else 'ultralytics AutoBackend'})"
        for d in engine.detectors
    )
    print(f"device {device}; classifier {engine.classifier.runtime}; detector {detector_kinds}; "
          f"buckets {pipeline.buckets if pipeline.pad_to_buckets else 'none (unpadded)'}; "
          f"{len(photos)} photos; built and warmed in {time.perf_counter() - started:.1f} s")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")

    def batch(index: int, size: int) -> list[bytes]:
        start = index * size
        return [photos[(start + i) % len(photos)] for i in range(size)]

    rows: list[tuple[str, int, dict[str, float]]] = []
    new_shape: dict[str, float] | None = None
    for size in batch_sizes:
        classifier_input, letterboxed = prepared_inputs(pipeline, size)

        def models_alone(_: int) -> None:
            engine.classifier.logits(classifier_input)
            for detector in pipeline.detectors:
                detector.detections(letterboxed)

        def reference(index: int) -> None:
            engine.predict([decode_with_pil(data) for data in batch(index, size)])

        stages: list[Stage] = [
            ("models alone", models_alone),
            ("pipeline from bytes", lambda index: pipeline.predict(batch(index, size))),
        ]
        if not args.skip_reference:
            stages.append(("reference: PIL + engine", reference))
        rows += measured_rows(stages, size, args, device)
        if len(replicas) > 1:
            result = measure_replicas(replicas, lambda index: batch(index, size), size, args.seconds, device)
            rows.append((f"pipeline from bytes, {len(replicas)} replicas", size, result))
            print_row(*rows[-1])

    print()
    print("| stage | batch | images/s | median ms per batch | peak GPU MB |")
    print("|---|---|---|---|---|")
    for stage, size, result in rows:
        print_row(stage, size, result, markdown=True)
    fusion_ms = fusion_ms_per_image(pipeline, photos[: min(32, pipeline.buckets[-1])])
    print(f"fusion alone: {fusion_ms:.3f} ms per image (fuse(), on the pipeline's outputs)")
    steps = breakdown(pipeline, batch(0, args.breakdown)) if args.breakdown else []
    if steps:
        print(f"\nthe pipeline step by step, batch {args.breakdown} (median of 10, synchronised after each step):")
        for name, ms in steps:
            print(f"  {name:36s} {ms:8.2f} ms")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None

    def write_json() -> None:
        if args.json:
            args.json.write_text(json.dumps({
                "device": str(device),
                "gpu": gpu,
                "rows": [{"stage": stage, "batch_size": size, **result} for stage, size, result in rows],
                "fusion_ms_per_image": fusion_ms,
                "breakdown": {"batch_size": args.breakdown, "steps_ms": dict(steps)} if steps else None,
                "new_shape_ms": new_shape,
            }))

    write_json()
    if device.type == "cuda" and engine.detectors[0].weights.suffix == ".pt":
        # Last, at the largest batch only, the figures above already written: should one of these
        # break the device, they are kept.
        try:
            new_shape = first_time_shape_ms(engine, pipeline.detectors[0], device)
            print(f"\na shape never met before (batch 3, 544x640): first call {new_shape['first']:.1f} ms, "
                  f"then {new_shape['again']:.1f} ms")
            rows += experiments(engine, pipeline, max(batch_sizes), args, device)
        except Exception as error:
            print(f"the experiments failed: {error!r}", flush=True)
        write_json()
    return 0


def experiments(
    engine: TaggingEngine, pipeline: DevicePipeline, size: int, args: argparse.Namespace, device: torch.device
) -> list[tuple[str, int, dict[str, float]]]:
    """The detector in both layouts and both networks from one CUDA graph, beside what the
    pipeline runs, at batch `size`."""
    classifier_input, letterboxed = prepared_inputs(pipeline, size)
    network = pipeline.detectors[0]
    stages = detector_memory_formats(network, letterboxed)
    stages += models_in_a_cuda_graph(engine, network, classifier_input, letterboxed)
    print("experiments, each against what the pipeline runs:")
    return measured_rows(stages, size, args, device)


def prepared_inputs(pipeline: DevicePipeline, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `size` as both networks take it already on the device: the classifier's
    (size, 3, 260, 260) input and a grey square letterbox."""
    square = pipeline.letterbox_size
    return (
        torch.randn(size, 3, INPUT_SIZE, INPUT_SIZE, device=pipeline.device),
        torch.full((size, 3, square, square), LETTERBOX_GREY, dtype=torch.uint8, device=pipeline.device),
    )


def measured_rows(
    stages: list[Stage], size: int, args: argparse.Namespace, device: torch.device
) -> list[tuple[str, int, dict[str, float]]]:
    """`measure`'s result for each stage as a table row, each printed as it is taken."""
    results = measure(stages, size, args.seconds, args.min_batches, device)
    rows = [(stage, size, result) for (stage, _), result in zip(stages, results)]
    for row in rows:
        print_row(*row)
    return rows


def detector_memory_formats(network: YoloNetwork, letterboxed: torch.Tensor) -> list[Stage]:
    """The detector's network alone as the pipeline runs it (channels last) and in the default
    layout, side by side: half-precision convolutions should prefer channels last on tensor cores,
    and this shows whether they do."""
    nchw = copy.deepcopy(network.network).to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def as_the_pipeline_runs_it(_: int) -> None:
        network.network(network.network_input(letterboxed))

    @torch.inference_mode()
    def default_layout(_: int) -> None:
        nchw(letterboxed.to(network.dtype).div_(255))

    return [("detector network alone, channels_last", as_the_pipeline_runs_it),
            ("detector network alone, NCHW", default_layout)]


def models_in_a_cuda_graph(
    engine: TaggingEngine, network: YoloNetwork, classifier_input: torch.Tensor, letterboxed: torch.Tensor
) -> list[Stage]:
    """Both networks captured once at this batch size into one CUDA graph, then replayed: no Python
    and no kernel launch per layer. An experiment, beside "models alone": whether the eager
    networks are launch-bound here (the classifier took 4.5 ms for one image and 5.6 ms for 32 on
    an H200). No stage when capture fails; the reason is printed."""
    static_classifier, static_letterbox = classifier_input.clone(), letterboxed.clone()

    def both() -> tuple[torch.Tensor, object]:
        return engine.classifier.logits(static_classifier), network.network(network.network_input(static_letterbox))

    try:
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # capture wants its warm-up off the default stream
                for _ in range(3):
                    both()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                both()
    except Exception as error:  # an experiment must not cost the run its other figures
        print(f"models in a CUDA graph: not captured ({error!r})", flush=True)
        return []

    def replay(_: int) -> None:
        static_classifier.copy_(classifier_input)
        static_letterbox.copy_(letterboxed)
        graph.replay()

    return [("models in one CUDA graph", replay)]


@torch.inference_mode()
def first_time_shape_ms(engine: TaggingEngine, network: YoloNetwork, device: torch.device) -> dict[str, float]:
    """Both networks on an input shape none of the pipeline's buckets and letterboxes has, the
    first call against the same call again: what a new shape costs (its convolutions' cuDNN
    plans, lazily loaded kernels), the suspected cause of the service's old collapse."""
    classifier_input = torch.randn(3, 3, INPUT_SIZE + 4, INPUT_SIZE + 4, device=device)
    letterboxed = torch.full((3, 3, 544, 640), LETTERBOX_GREY, dtype=torch.uint8, device=device)
    timings = []
    for _ in range(2):
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        engine.classifier.logits(classifier_input)
        network.network(network.network_input(letterboxed))
        torch.cuda.synchronize(device)
        timings.append(1000 * (time.perf_counter() - begin))
    return {"first": timings[0], "again": timings[1]}


def measure_replicas(
    pipelines: list[DevicePipeline], batch: Callable[[int], list[bytes]], batch_size: int, seconds: float,
    device: torch.device,
) -> dict[str, float]:
    """Images/s of one thread per pipeline, each predicting batch after batch for `seconds`, as the
    worker's replicas do: one thread's CPU work (decode set-up, boxes, fusion) then overlaps
    another's kernels. Each thread runs one warm-up batch first, on itself: a thread's first CUDA
    call sets up its own cuBLAS handle."""
    cuda = device.type == "cuda"
    numbers = itertools.count()
    timings: list[float] = []
    warmed = threading.Barrier(len(pipelines) + 1)
    go = threading.Barrier(len(pipelines) + 1)
    started = 0.0

    def serve(pipeline: DevicePipeline) -> None:
        try:
            pipeline.predict(batch(next(numbers)))
        except BaseException:
            warmed.abort()  # the other threads and the caller stop waiting, and this error shows
            go.abort()
            raise
        warmed.wait()
        go.wait()
        while time.perf_counter() - started < seconds:
            begin = time.perf_counter()
            pipeline.predict(batch(next(numbers)))
            timings.append(time.perf_counter() - begin)

    with ThreadPoolExecutor(len(pipelines)) as threads:
        running = [threads.submit(serve, pipeline) for pipeline in pipelines]
        warmed.wait()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        go.wait()
        for thread in running:
            thread.result()
    result = {
        "images_per_s": batch_size * len(timings) / (time.perf_counter() - started),
        "median_batch_ms": 1000 * statistics.median(timings),
    }
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def print_row(stage: str, size: int, result: dict[str, float], markdown: bool = False) -> None:
    peak = f"{result['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in result else "-"
    if markdown:
        print(f"| {stage} | {size} | {result['images_per_s']:.1f} | {result['median_batch_ms']:.1f} | {peak} |")
    else:
        print(
            f"{stage:>24s}  batch {size:4d}: {result['images_per_s']:9.1f} images/s, "
            f"{result['median_batch_ms']:8.1f} ms per batch, peak GPU MB {peak}",
            flush=True,
        )


def breakdown(pipeline: DevicePipeline, datas: list[bytes], rounds: int = 10) -> list[tuple[str, float]]:
    """Median milliseconds of each step of `DevicePipeline.predict` on `datas` (one batch, the
    first detector), the device synchronised after each step; the first round is a warm-up."""
    device, engine, network = pipeline.device, pipeline.engine, pipeline.detectors[0]
    timings: dict[str, list[float]] = collections.defaultdict(list)

    def step(name: str, run: Callable[[], object]) -> object:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name].append(1000 * (time.perf_counter() - begin))
        return out

    def detector_network() -> list[torch.Tensor]:
        outputs = [network.network(network.network_input(group.batch)) for group in groups]
        return [output[0] if isinstance(output, (tuple, list)) else output for output in outputs]

    def nms() -> list[list[torch.Tensor]]:
        return [
            batched_nms(predictions, network.min_confidence, network.iou, network.max_detections)[: len(group.indices)]
            for predictions, group in zip(raw, groups)
        ]

    def to_cpu() -> tuple[object, list[tuple[torch.Tensor, ...]]]:
        rows = [torch.cat(per_image).cpu().split([len(d) for d in per_image]) for per_image in found]
        return logits.float().softmax(dim=-1).cpu().numpy(), rows

    def boxes_and_fusion() -> None:
        boxes: dict[int, list] = {}
        for group, group_rows in zip(groups, rows):
            for index, image_rows, placement in zip(group.indices, group_rows, group.placements):
                boxes[index] = _boxes(image_rows, placement, network.names)
        for index, p in enumerate(probabilities[: len(pixels)]):
            fuse(engine.vocabulary, p, boxes[index], engine.detector_keys, engine.calibration)

    with torch.inference_mode():
        for _ in range(rounds + 1):
            decoded = step("decode (nvJPEG or PIL, reduce)",
                           lambda: decode_for_models(datas, device, None, pipeline.model_input))
            pixels = [image.pixels for image in decoded]
            inputs = step("classifier crop + resize + normalize",
                          lambda: normalize(pipeline.classifier_input(pixels)))
            logits = step("classifier network", lambda: engine.classifier.logits(inputs))
            groups = step("detector letterbox (per shape)", lambda: pipeline.letterbox(pixels, network.rectangles))
            raw = step("detector network", detector_network)
            found = step("NMS", nms)
            probabilities, rows = step("results to the CPU", to_cpu)
            step("boxes + fusion (CPU)", boxes_and_fusion)
    return [(name, statistics.median(times[1:])) for name, times in timings.items()]


def fusion_ms_per_image(pipeline: DevicePipeline, photos: list[bytes], rounds: int = 5) -> float:
    engine = pipeline.engine
    decoded = [image for image in decode_images(photos, pipeline.device) if isinstance(image, torch.Tensor)]
    batch = normalize(pipeline.classifier_input(decoded))
    probabilities = engine.classifier.logits(batch).float().softmax(dim=-1).cpu().numpy()
    boxes = pipeline.detect(decoded)
    started = time.perf_counter()
    for _ in range(rounds):
        for p, b in zip(probabilities, boxes):
            fuse(engine.vocabulary, p, b, engine.detector_keys, engine.calibration)
    return 1000 * (time.perf_counter() - started) / (rounds * len(decoded))


if __name__ == "__main__":
    sys.exit(main())
