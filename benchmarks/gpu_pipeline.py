"""The GPU path (issue 11): PAN's rate on one GPU and its share of the card's convolution rate, how
busy the pipeline keeps that GPU, and how many CPU cores per GPU the stages around the model
(read, decode, encode, write) need to keep up.

Needs CUDA and ``../shared`` (or ``PAN_SHARED``); without them it prints ``SKIPPED: ...`` and exits 0.
Prepared to fit a lent device's time (about 4 minutes with the defaults)::

    .venv/bin/python benchmarks/gpu_pipeline.py [--scale 4] [--cpus 2,4,8] [--actors 1] [--seconds 40]
        [--run-seconds S] [--variants] [--json F]

``--device cpu`` runs the same steps on the CPU (no busy fraction): a check of the script itself.

1. **Engine**: ``build_upscaler(InferenceSpec(weights=..., device="cuda"), s)``, the job's inference
   defaults (precision ``auto``), ``upscale_many`` over the decoded workload in groups of the job's
   ``images_per_batch``, synchronized. Output MP/s, and fp32-equivalent GFLOP/s: convolution MACs
   counted by hooks over one pass (``flops.ConvMacs``) against the dense 3x3 64-channel rate
   measured in the same run, in the engine's precision and in fp32 (``flops.dense_conv_gflops``).
2. **Pipeline**, once per ``--cpus N`` and ``--actors K``: an embedded Ray with N CPUs and 1 GPU
   (K model actors sharing it, 1/K of it each),
   ``run_upscale`` with the job's defaults, Ray's start-up included. Meanwhile ``nvidia-smi`` samples
   the GPU's utilization (the share of time a kernel ran) every 100 ms. **Busy fraction** = mean of
   those samples from the first finished batch to the end (steady state), and over the whole run.
3. **Cores per GPU**: with the best run's K, the smallest N whose pipeline MP/s is within 5 % of
   the best run's.

``--variants`` adds, last, the engine in each precision the device offers, and in auto's
precision without CUDA graphs and with ``compile`` (one graph per window shape, compiled during
the warm-up pass, which is timed apart): what ``auto`` chose from, and what graphs and compiling add.

The workload is Set14 + Set5 LR at the scale, copied as in ``upscale_throughput.py`` so that the
engine runs about ``--seconds`` per pass: sized from one pass over the 19 images, then, for the
pipeline runs, from the rate of the long pass, to ``--run-seconds`` of the engine's work (each
pipeline run then takes about as long or longer: at least a minute with ``--run-seconds 60``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flops import ConvMacs, dense_conv_gflops
from images import SHARED
from upscale_throughput import workload_files

CLOSE_TO_BEST = 0.95  # the cores that keep up: within 5 % of the best rate


class GpuSampler:
    """``nvidia-smi``'s utilization.gpu every 100 ms, in a thread, with the time of each sample."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
        self._process = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for text in self._process.stdout:
            first = text.strip().split(",")[0].strip()
            if first.isdigit():
                self.samples.append((time.perf_counter(), float(first) / 100))

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)

    def mean(self, since: float = 0.0) -> float | None:
        values = [v for t, v in self.samples if t >= since]
        return sum(values) / len(values) if values else None


def decoded(files: list[Path]) -> list[Any]:
    from pipeline.imaging import decode_image

    return [decode_image(f.read_bytes(), name=f.name).pixels for f in files]


def groups_of(pixels: list[Any], per_call: int) -> list[list[Any]]:
    """The workload as the model actor gets it: ``per_call`` images per ``upscale_many`` call."""
    return [pixels[i : i + per_call] for i in range(0, len(pixels), per_call)]


def eager_macs(spec: Any, scale: int, pixels: list[Any], per_call: int) -> int:
    """The convolutions' MACs of one pass over ``pixels`` with ``spec`` (an explicit precision), counted
    by hooks on an eager twin of the engine: a CUDA graph's replay runs no hooks (an H100 run counted
    16x too few so), and compiled code calls none. The twin plans the same windows as long as its
    memory budget does not tile an image the engine runs whole (Set14 and Set5 are far below it)."""
    from pipeline.config.builder import build_upscaler
    from pipeline.io.storage import Files

    twin = build_upscaler(
        spec.model_copy(update={"cuda_graphs": False, "compile": False}), scale, files=Files()
    )
    with ConvMacs(twin.model) as counter:
        for group in groups_of(pixels, per_call):
            twin.upscale_many(group)
    return counter.macs


def engine_figures(upscaler: Any, pixels: list[Any], per_call: int, macs: int) -> dict[str, float]:
    """One synchronized pass after warm-up: output MP/s and fp32-equivalent GFLOP/s (``macs``: the
    pass's convolution MACs, from ``eager_macs``)."""
    import torch

    sync = torch.cuda.synchronize if upscaler.device.type == "cuda" else (lambda: None)
    groups = groups_of(pixels, per_call)
    # Warm-up: cuDNN plans, the allocator; on a GPU a second pass, since a CUDA graph is recorded
    # at its shape's second batch (``engine._CudaGraphs``).
    for _ in range(2 if upscaler.device.type == "cuda" else 1):
        for group in groups:
            upscaler.upscale_many(group)
    sync()
    start = time.perf_counter()
    megapixels = sum(out.shape[0] * out.shape[1] for group in groups for out in upscaler.upscale_many(group))
    sync()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "output_megapixels": megapixels / 1e6,
        "mp_per_second": megapixels / 1e6 / seconds,
        "gflops_fp32_equivalent": 2 * macs / seconds / 1e9,
        "cuda_graphs": upscaler.graphed_shapes,
    }


def engine_variants(spec: Any, scale: int, pixels: list[Any], per_call: int, chosen: str) -> list[dict]:
    """The engine in each precision (with CUDA graphs on a GPU, the default), in ``chosen``
    without graphs, then in ``chosen`` compiled (build and warm-up timed apart)."""
    from pipeline.config.builder import build_upscaler
    from pipeline.core.engine import EQUAL_QUALITY, resolve_device
    from pipeline.io.storage import Files

    device = resolve_device(spec.device)
    import torch

    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    variants = [(p, "default", {}) for p in EQUAL_QUALITY[device.type] if p != "bf16" or bf16]
    variants += [(chosen, "no CUDA graphs", {"cuda_graphs": False}), (chosen, "compiled", {"compile": True})]
    rows = []
    for precision, label, settings in variants:
        variant = spec.model_copy(update={"precision": precision, **settings})
        start = time.perf_counter()
        try:
            upscaler = build_upscaler(variant, scale, files=Files())
            figures = engine_figures(upscaler, pixels, per_call, eager_macs(variant, scale, pixels, per_call))
        except Exception as exc:  # a precision the card lacks, or compile without a compiler
            print(f"  {precision} {label}: failed: {exc!r}")
            continue
        figures.update(precision=precision, variant=label, build_and_warm_up_seconds=
                       time.perf_counter() - start - figures["seconds"])  # fmt: skip
        rows.append(figures)
        print(
            f"  {precision} {label}: {figures['mp_per_second']:.2f} output MP/s "
            f"(build and warm-up {figures['build_and_warm_up_seconds']:.1f} s)"
        )
    return rows


def make_copies(files: list[Path], copies: int, root: Path) -> None:
    for i in range(copies):
        folder = root / f"copy{i:04d}"
        folder.mkdir(parents=True)
        for src in files:
            shutil.copyfile(src, folder / f"{src.parents[2].name}_{src.name}")


def pipeline_run(
    source: Path, dest: Path, scale: int, weights: Path, cpus: int, actors: int | None, device: str
) -> dict:
    import ray

    from pipeline.batch.job import run_upscale
    from pipeline.config.settings import UpscaleJob

    gpus = 1 if device == "cuda" else 0
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    sampler = GpuSampler() if gpus and shutil.which("nvidia-smi") else None  # None: busy not measured
    first: list[tuple[float, int]] = []  # (when, output pixels by then) at the first finished batch
    start = time.perf_counter()

    def on_progress(counts: Counter, pixels: int, _total: int | None) -> None:
        if counts["succeeded"] + counts["failed"] and not first:
            first.append((time.perf_counter(), pixels))

    try:
        job = UpscaleJob(source=str(source), dest=str(dest), scale=scale, weights=str(weights), actors=actors)
        summary = run_upscale(job, on_progress=on_progress)
        wall = time.perf_counter() - start
    finally:
        if sampler:
            sampler.stop()
        ray.shutdown()
    shutil.rmtree(dest, ignore_errors=True)
    steady = None  # from the first finished batch on: the rate once running, without Ray's start-up
    if first and start + wall > first[0][0]:
        steady = (summary.output_megapixels - first[0][1] / 1e6) / (start + wall - first[0][0])
    return {
        "cpus": cpus,
        "actors": actors or 1,
        "wall_seconds": wall,
        "mp_per_second": summary.output_megapixels / wall,
        "succeeded": summary.succeeded,
        "failed": summary.failed,
        "precision": summary.precision,
        "first_batch_seconds": first[0][0] - start if first else None,
        "steady_mp_per_second": steady,
        "gpu_busy_steady": sampler.mean(first[0][0]) if sampler and first else None,
        "gpu_busy_whole_run": sampler.mean() if sampler else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, choices=(2, 3, 4), default=4)
    parser.add_argument("--cpus", default="2,4,8", help="Ray CPUs of each pipeline run (comma-separated)")
    parser.add_argument("--actors", default="1", help="model actors sharing the GPU (comma-separated)")
    parser.add_argument("--seconds", type=float, default=40.0, help="engine seconds per pass (sets copies)")
    parser.add_argument(
        "--run-seconds", type=float, default=None,
        help="engine seconds of work in each pipeline run (default: --seconds); a run lasts at least that",
    )  # fmt: skip
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--variants", action="store_true", help="also time each precision, and compile")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    cpus = [int(n) for n in args.cpus.split(",")]
    actors = [int(n) for n in args.actors.split(",")]

    import torch

    weights = SHARED / "weights" / f"PANx{args.scale}_DF2K.pth"
    files = workload_files(args.scale)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: CUDA sees no GPU here (run it where `device` lends one)")
        return 0
    if not weights.is_file() or not files:
        print(f"SKIPPED: benchmark images or weights not found under {SHARED}; set PAN_SHARED")
        return 0

    from pipeline.config.builder import build_upscaler
    from pipeline.config.settings import InferenceSpec, UpscaleJob
    from pipeline.core.engine import DTYPES
    from pipeline.io.storage import Files

    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    spec = InferenceSpec(weights=str(weights), device=args.device)
    upscaler = build_upscaler(spec, args.scale, files=Files())
    per_call = UpscaleJob.model_fields["images_per_batch"].default
    print(f"{card}: torch {torch.__version__}, PAN x{args.scale}, precision auto -> {upscaler.precision}")
    pixels = decoded(files)
    macs = eager_macs(spec.model_copy(update={"precision": upscaler.precision}), args.scale, pixels, per_call)
    one = engine_figures(upscaler, pixels, per_call, macs)
    copies = max(1, math.ceil(args.seconds / one["seconds"]))
    engine = engine_figures(upscaler, pixels * copies, per_call, macs * copies)  # MACs are per image
    # The pipelines' workload, sized from the long pass's rate: on the H100 the 19-image pass ran
    # at about 10 MP/s, 22 copies at 78, and ``--seconds 8`` gave the pipelines 5 s of engine work.
    run_seconds = args.run_seconds or args.seconds
    runs_copies = max(copies, math.ceil(run_seconds * engine["mp_per_second"] / one["output_megapixels"]))
    dense = {
        upscaler.precision: dense_conv_gflops(args.device, DTYPES[upscaler.precision]),
        "fp32": dense_conv_gflops(args.device, torch.float32),
    }
    print(
        f"engine: {engine['mp_per_second']:.2f} output MP/s over {copies} x {len(files)} images "
        f"({engine['cuda_graphs']} CUDA graphs), "
        f"{engine['gflops_fp32_equivalent']:.0f} GFLOP/s fp32-equivalent; dense 3x3 conv "
        + ", ".join(
            f"{p} {g:.0f} GFLOP/s (engine at {engine['gflops_fp32_equivalent'] / g:.1%})"
            for p, g in dense.items()
        )
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="pan-gpu-bench-") as tmp:
        source = Path(tmp) / "in"
        make_copies(files, runs_copies, source)
        print(f"pipeline workload: {runs_copies} x {len(files)} images")
        for n, k in [(n, k) for k in actors for n in cpus]:
            run = pipeline_run(source, Path(tmp) / f"out{n}-{k}", args.scale, weights, n, k, args.device)
            runs.append(run)
            busy = run["gpu_busy_steady"]
            print(
                f"pipeline, {n} CPUs, {k} actor(s): {run['mp_per_second']:.2f} output MP/s "
                f"({run['mp_per_second'] / engine['mp_per_second']:.2f} of the engine; steady "
                f"{run['steady_mp_per_second'] or float('nan'):.2f}), "
                f"{run['succeeded']} succeeded, {run['failed']} failed, first batch after "
                f"{run['first_batch_seconds'] or float('nan'):.1f} s, GPU busy "
                + (
                    f"{busy:.0%} steady, {run['gpu_busy_whole_run']:.0%} whole run"
                    if busy is not None
                    else "n/a"
                )
            )
    best = max(runs, key=lambda r: r["mp_per_second"])
    close = [r for r in runs if r["actors"] == best["actors"]]
    enough = min(r["cpus"] for r in close if r["mp_per_second"] >= CLOSE_TO_BEST * best["mp_per_second"])
    print(f"CPU cores per GPU that keep up (within 5% of the best rate, {best['actors']} actor(s)): {enough}")
    record = {
        "card": card, "scale": args.scale, "precision": upscaler.precision, "copies": copies,
        "pipeline_copies": runs_copies, "engine": engine, "dense_gflops": dense, "pipeline": runs,
        "cores_per_gpu": enough,
    }  # fmt: skip
    if args.json:  # written before the variants too: compiling can outlast a lent device's time
        args.json.write_text(json.dumps(record, indent=2))
    if args.variants:
        some = max(1, copies // 4)
        print(f"engine variants, over {some} x {len(files)} images:")
        record["variants"] = engine_variants(spec, args.scale, pixels * some, per_call, upscaler.precision)
        if args.json:
            args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
