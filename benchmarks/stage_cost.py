"""What the upscaling pipeline costs around the model, per output megapixel, measured without a GPU:
``run_upscale`` on an embedded Ray whose model actor replays PAN's real outputs instead of running
PAN (issue 11: "how many CPU cores the encode stage needs per GPU to keep up").

1. PAN's outputs for the workload's images (Set14 + Set5 LR at the scale) are computed once, in
   this process, with the job's inference defaults, and saved to a temporary ``.npz``.
2. Ray starts with ``--cpus`` CPUs and ``--gpus`` logical GPUs (default 1: the GPU pipeline's
   shape, one model actor taking two calls at once); every Ray worker runs ``replay_engine`` first,
   which makes the model actor's ``actor_upscaler`` hand out a ``Replay`` of those outputs (looked
   up by the input's pixels). Everything else is the real job: read, decode, the actor's batches
   and their transfer, PNG encoding, the quality gate, writing, the driver's ledger and progress.
3. ``run_upscale`` over ``--copies`` copies of the images. With the model gone, the run is bound
   by the CPUs: **CPU-seconds per output MP** (all of the run's processes, measured like
   ``upscale_throughput.py``'s ``CpuMeter``) is what a GPU's rate asks of the CPUs, and **cores
   per GPU** = engine MP/s x CPU-seconds per output MP (``--engine-mp-s``, default the H100's 78.2
   MP/s at x4 from ``benchmarks/README.md``). Ray's start-up is left out (Ray is up before the run).

What it leaves out: the GPU's copies and kernels, and the CPU time the engine itself spends
around them (staging inputs, converting outputs: 2.3 ms per output MP on one core of the 2-core
VM, measured 2026-11-27 with a script in /tmp, not kept). A model-less run is faster than any
real one, so Ray Data's per-batch costs weigh in it as they would at the GPU's rate.

Usage::

    .venv/bin/python benchmarks/stage_cost.py [--scale 4] [--copies 40] [--cpus N] [--gpus 1]
        [--engine-mp-s 78.2] [--job '{"images_per_batch": 16}'] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from images import SHARED  # benchmarks/images.py
from upscale_throughput import CpuMeter, MeasuringCpu, make_inputs, workload_files

REPLAY_FILE = "PAN_STAGE_COST_REPLAY"  # the environment variable that names the outputs' .npz
H100_X4_MP_S = 78.2  # the engine on an NVIDIA H100, fp16 with CUDA graphs (benchmarks/README.md)


def _key(pixels: np.ndarray) -> str:
    return hashlib.sha256(pixels.tobytes()).hexdigest() + str(pixels.shape)


class Replay:
    """An engine that hands back PAN's output for each input it has seen computed."""

    def __init__(self, outputs: dict[str, np.ndarray], precision: str) -> None:
        self.outputs, self.precision = outputs, precision

    def upscale(self, image: np.ndarray) -> np.ndarray:
        return self.outputs[_key(image)]

    def upscale_many(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.upscale(image) for image in images]


def replay_engine() -> None:
    """Each Ray worker runs this first (``worker_process_setup_hook``), before any task: a model
    actor's ``actor_upscaler`` then returns a ``Replay`` of the outputs saved in
    ``$PAN_STAGE_COST_REPLAY``, loaded there. The task workers load nothing and import no torch,
    as in the real job."""
    import pipeline.ray_runtime.pool

    def replay(*args: Any, **kwargs: Any) -> Replay:
        with np.load(os.environ[REPLAY_FILE]) as saved:
            outputs = {name: saved[name] for name in saved.files if name != "precision"}
            return Replay(outputs, str(saved["precision"]))

    pipeline.ray_runtime.pool.actor_upscaler = replay


def save_outputs(files: list[Path], scale: int, weights: Path, into: Path) -> str:
    """PAN's output of each file, with the job's inference defaults, saved to ``into``; returns the
    precision it ran in."""
    from pipeline.config.builder import build_upscaler
    from pipeline.config.settings import InferenceSpec
    from pipeline.imaging import decode_image
    from pipeline.io.storage import Files

    upscaler = build_upscaler(InferenceSpec(weights=str(weights), device="cpu"), scale, files=Files())
    outputs = {}
    for path in files:
        pixels = decode_image(path.read_bytes()).pixels
        outputs[_key(pixels)] = upscaler.upscale(pixels)
    np.savez(into, precision=np.array(upscaler.precision), **outputs)
    return upscaler.precision


class Titles:
    """What each process was seen doing (its title, sampled every 0.2 s while the run lasts): a
    Ray worker's title names the task or actor it runs (``ray::MapWorker(...)``), or ``IDLE``."""

    def __init__(self) -> None:
        self.seen: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=MeasuringCpu.every, args=(0.2, self._stop, self._look), daemon=True
        )

    def _look(self) -> None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            name = title.split(".")[0] if title.startswith("ray::") else Path(title.split(" ")[0]).name
            if name and name != "ray::IDLE":
                self.seen.setdefault(int(cmdline.parent.name), set()).add(name)

    def __enter__(self) -> Titles:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def by_kind(self, cpu: dict[int, float]) -> dict[str, float]:
        """CPU seconds by what the processes did (a worker that ran several things: all of them)."""
        kinds: Counter = Counter()
        for pid, seconds in cpu.items():
            seen = self.seen.get(pid, {"(not seen at work)"})
            names = sorted(n for n in seen if n.startswith("ray::")) or sorted(seen)  # not "python"
            kinds["driver" if pid == os.getpid() else " / ".join(names)] += seconds
        return dict(kinds.most_common())


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ray

    from pipeline.batch.job import run_upscale
    from pipeline.config.settings import UpscaleJob

    files = workload_files(args.scale)
    weights = args.weights
    precision = save_outputs(files, args.scale, weights, tmp / "outputs.npz")
    make_inputs(files, args.copies, tmp / "in")
    here = str(Path(__file__).resolve().parent)
    ray.init(
        num_cpus=args.cpus,
        num_gpus=args.gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "stage_cost.replay_engine",
            "env_vars": {
                REPLAY_FILE: str(tmp / "outputs.npz"),
                "PYTHONPATH": os.pathsep.join([here, *sys.path]),
            },
        },
    )
    try:
        job = UpscaleJob(
            source=str(tmp / "in"),
            dest=str(tmp / "out"),
            scale=args.scale,
            weights=str(weights),
            device="cpu",
            **args.job,
        )
        progress: list[tuple[float, int]] = []
        whole, steady = CpuMeter(), CpuMeter()

        def on_progress(counts: Counter, output_pixels: int, total: int | None) -> None:
            if counts["succeeded"] + counts["failed"]:
                if not progress:  # the first batch is back: the steady state starts
                    steady.start()
                progress.append((time.perf_counter() - start, counts["succeeded"] + counts["failed"]))

        with Titles() as titles:
            whole.start()
            start = time.perf_counter()
            summary = run_upscale(job, on_progress=on_progress)
            wall = time.perf_counter() - start
            cpu_whole, cpu_steady = whole.stop(), steady.stop()
        where = titles.by_kind(steady.by_process())
    finally:
        ray.shutdown()
    images, megapixels = summary.succeeded, summary.output_megapixels
    if images != len(files) * args.copies or summary.precision != {precision: images}:
        raise RuntimeError(f"the replayed run did not make every output: {summary}")
    first_seconds, first_images = progress[0]
    steady_seconds = wall - first_seconds
    steady_mp = megapixels * (images - first_images) / images  # every copy holds the same 19 images
    figures: dict[str, Any] = {
        "scale": args.scale,
        "cpus": args.cpus,
        "logical_gpus": args.gpus,
        "images": images,
        "output_megapixels": megapixels,
        "wall_seconds": wall,
        "first_batch_seconds": first_seconds,
        "output_mp_per_second": megapixels / wall,
        "steady_mp_per_second": steady_mp / steady_seconds,
        "engine_mp_per_second": args.engine_mp_s,
        "job_options": args.job,
        "steady_cpu_ms_per_image_by_process": {
            kind: seconds / (images - first_images) * 1e3 for kind, seconds in where.items()
        },
    }
    for name, cpu, seconds, mp in (("whole", cpu_whole, wall, megapixels),
                                   ("steady", cpu_steady, steady_seconds, steady_mp)):  # fmt: skip
        if cpu is None:  # no /proc: no CPU figures
            continue
        per_mp = cpu.ours * seconds / mp
        figures[name] = {
            "busy_cores": cpu.ours,
            "other_processes_cores": cpu.others,
            "cpu_seconds_per_output_mp": per_mp,
            "cpu_ms_per_image": per_mp * megapixels / images * 1e3,
            "cores_per_gpu": args.engine_mp_s * per_mp,
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, choices=(2, 3, 4), default=4)
    parser.add_argument("--copies", type=int, default=40, help="copies of Set14+Set5 (19 images each)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray's CPUs")
    parser.add_argument("--gpus", type=int, default=1, help="logical GPUs (1: the GPU pipeline's shape)")
    parser.add_argument("--engine-mp-s", type=float, default=H100_X4_MP_S, help="a GPU engine's output MP/s")
    parser.add_argument("--weights", type=Path, default=None, help="default: shared/weights/PANx{s}_DF2K.pth")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--job",
        type=json.loads,
        default={},
        metavar="JSON",
        help="UpscaleJob settings, e.g. '{\"images_per_batch\": 16}'",
    )
    args = parser.parse_args()
    weights = args.weights or SHARED / "weights" / f"PANx{args.scale}_DF2K.pth"
    if not weights.is_file() or not workload_files(args.scale):
        print(f"SKIPPED: benchmark images or weights not found under {SHARED}; set PAN_SHARED")
        return 0
    args.weights = weights
    with tempfile.TemporaryDirectory(prefix="pan-stage-cost-") as tmp:
        figures = run(args, Path(tmp))
    print(
        f"x{figures['scale']}, {figures['images']} images ({figures['output_megapixels']:.1f} output MP), "
        f"{figures['cpus']} CPUs, {figures['logical_gpus']} logical GPU(s), "
        f"job options {figures['job_options']}, the model replayed: "
        f"{figures['output_mp_per_second']:.2f} output MP/s over {figures['wall_seconds']:.1f} s, "
        f"{figures['steady_mp_per_second']:.2f} from the first batch on "
        f"(after {figures['first_batch_seconds']:.1f} s)"
    )
    for name, label in (("whole", "whole run"), ("steady", "steady state")):
        if name in figures:
            f = figures[name]
            print(
                f"  {label:12s} {f['busy_cores']:.2f} cores busy (other processes "
                f"{f['other_processes_cores']:.2f}): {f['cpu_seconds_per_output_mp']:.3f} CPU-s per "
                f"output MP ({f['cpu_ms_per_image']:.1f} CPU-ms per image) -> "
                f"{f['cores_per_gpu']:.1f} cores per GPU at {figures['engine_mp_per_second']:.1f} MP/s"
            )
    print("  steady state, CPU-ms per image by process: " + ", ".join(
        f"{kind} {ms:.1f}" for kind, ms in figures["steady_cpu_ms_per_image_by_process"].items() if ms >= 0.1
    ))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
