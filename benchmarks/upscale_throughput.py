"""Throughput of PAN upscaling: the bare engine in-process versus the end-to-end Ray Data pipeline.

One run measures, on the same images and the same machine:

1. **Bare engine**: ``build_upscaler(InferenceSpec(weights=..., device="cpu"), s).upscale(pixels)``
   (the job's inference defaults, so the same precision ``auto`` picks) on every decoded image, in
   this process (decode and encode not included): output megapixels per second. Decoding
   (``decode_image``) and PNG encoding (``encode_image``, at the compression level the pipeline
   uses) of the same images are timed separately, so the cost of each stage is visible.
2. **End-to-end pipeline**: ``run_upscale(UpscaleJob(source, dest, scale, weights))`` from a state
   where Ray is not initialized, so its time includes starting an embedded local Ray, reading,
   decoding, the model actor(s), encoding and writing the PNG tree.
3. **Ratio**: pipeline MP/s / bare engine MP/s.

Ray's start-up alone is measured first (Ray started the way ``run_upscale`` starts it, then shut
down). One engine pass with torch on a single thread is timed too: that is what the pipeline's CPU
actor gets (Ray sets ``OMP_NUM_THREADS=1`` for an actor reserving fewer than 2 CPUs). Every phase
reports the CPU it used and what other processes took meanwhile; on a small machine another job
running at the same time skews the comparison, and the summary warns when that happened.

The workload is the Set14 + Set5 LR images at the chosen scale, copied ``--copies`` times under
distinct names (``copy{i}/<set>_<name>.png``); by default the number of copies is calibrated so that
the bare engine runs for at least ``--min-engine-seconds`` (60 s). Temporary files are removed.

Usage::

    .venv/bin/python benchmarks/upscale_throughput.py [--scale 4] [--repeat 1] [--copies N] [--json out.json]
    .venv/bin/python benchmarks/upscale_throughput.py --job '{}' --job '{"actors": 1}'   # compare settings
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from images import SHARED  # benchmarks/images.py

SETS = ("Set14", "Set5")
CONTENTION_CORES = 0.25  # other processes' average CPU use above which the summary warns


# -- helpers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuUse:
    """Average busy cores over a measured span (1.0 = one core fully busy)."""

    machine: float  # every process on the machine, from /proc/stat
    ours: float  # this process and its descendants (Ray's GCS, raylet and workers)

    @property
    def others(self) -> float:
        """What other work on the machine took: the contention the figures were measured under."""
        return max(self.machine - self.ours, 0.0)

    def __str__(self) -> str:
        return (
            f"{self.machine:.2f} of {os.cpu_count()} cores busy: benchmark {self.ours:.2f}, "
            f"other processes {self.others:.2f}"
        )


class MeasuringCpu:
    """The CPU seconds this process's measuring threads spent (``CpuMeter``, stage_cost's
    ``Titles``: reading /proc every fraction of a second), which they leave out of what they
    measure: the driver's figure is the job's, not the meters'."""

    _lock = threading.Lock()
    seconds = 0.0

    @classmethod
    def every(cls, interval: float, stop: threading.Event, step: Any) -> None:
        """Run ``step()`` every ``interval`` seconds until ``stop``, counting its thread's CPU."""
        while not stop.wait(interval):
            began = time.thread_time()
            step()
            with cls._lock:
                cls.seconds += time.thread_time() - began


class CpuMeter:
    """Measures :class:`CpuUse` between ``start()`` and ``stop()`` (Linux /proc; None elsewhere).

    A thread samples the CPU time of this process's descendants every ``interval`` seconds, so Ray
    workers that exit before ``stop()`` are still counted (up to their last sample).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self._interval = interval
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: dict[int, float] = {}  # pid -> CPU seconds when first seen
        self._last: dict[int, float] = {}  # pid -> CPU seconds when last seen
        self._machine: tuple[float, float] | None = None
        self._wall = 0.0
        self._measuring = 0.0  # MeasuringCpu.seconds at start()

    @staticmethod
    def _machine_ticks() -> tuple[float, float] | None:
        """(busy, total) jiffies of all CPUs since boot."""
        try:
            values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except OSError:
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        return sum(values) - idle, sum(values)

    def _tree_cpu(self) -> dict[int, float]:
        """CPU seconds (user + system) of this process and all its descendants, by pid."""
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited while we looked
            pid = int(stat.parent.name)
            parents[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / self._ticks
        root, tree = os.getpid(), {}
        for pid in cpu:
            p, depth = pid, 0
            while p not in (0, 1, root) and depth < 64:
                p, depth = parents.get(p, 0), depth + 1
            if p == root:
                tree[pid] = cpu[pid]
        return tree

    def _sample(self, baseline: bool = False) -> None:
        for pid, seconds in self._tree_cpu().items():
            self._first.setdefault(pid, seconds if baseline else 0.0)  # a new process starts at 0
            self._last[pid] = seconds

    def start(self) -> None:
        self._machine = self._machine_ticks()
        if self._machine is None:
            return
        self._first.clear()
        self._last.clear()
        self._sample(baseline=True)  # CPU already used by processes alive now is not counted
        self._wall = time.perf_counter()
        self._measuring = MeasuringCpu.seconds
        self._thread = threading.Thread(
            target=MeasuringCpu.every, args=(self._interval, self._stop, self._sample), daemon=True
        )
        self._thread.start()

    def by_process(self) -> dict[int, float]:
        """CPU seconds each process used since ``start()``, as last sampled (by pid), this one's
        without its measuring threads'."""
        used = {pid: self._last[pid] - self._first[pid] for pid in self._last}
        used[os.getpid()] = used.get(os.getpid(), 0.0) - (MeasuringCpu.seconds - self._measuring)
        return used

    def stop(self) -> CpuUse | None:
        if self._thread is None or self._machine is None:
            return None
        self._stop.set()
        self._thread.join()
        self._sample()
        end = self._machine_ticks()
        wall = time.perf_counter() - self._wall
        if end is None or end[1] == self._machine[1] or wall <= 0:
            return None
        machine = (end[0] - self._machine[0]) / (end[1] - self._machine[1]) * (os.cpu_count() or 1)
        ours = sum(self.by_process().values()) / wall
        return CpuUse(machine=machine, ours=ours)


@dataclass
class EngineResult:
    """One in-process pass over the workload; seconds are summed over images."""

    images: int = 0
    output_megapixels: float = 0.0
    read_seconds: float = 0.0
    decode_seconds: float = 0.0
    upscale_seconds: float = 0.0
    encode_seconds: float = 0.0
    encoded_megabytes: float = 0.0
    cpu: CpuUse | None = None

    @property
    def engine_mp_per_second(self) -> float:
        return self.output_megapixels / self.upscale_seconds

    @property
    def serial_seconds(self) -> float:
        return self.read_seconds + self.decode_seconds + self.upscale_seconds + self.encode_seconds


@dataclass
class PipelineResult:
    """One ``run_upscale`` call, timed from before the call (Ray not yet initialized)."""

    wall_seconds: float
    summary: Any  # pipeline.batch.records.RunSummary
    first_result_seconds: float | None  # wall time until the first finished batch came back
    cpu: CpuUse | None
    outputs_on_disk: int
    max_abs_diff: int | None  # pipeline output vs in-process engine output, first image
    options: dict[str, Any] = field(default_factory=dict)  # UpscaleJob settings beyond the defaults
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds, images done)

    @property
    def mp_per_second(self) -> float:
        return self.summary.output_megapixels / self.wall_seconds

    @property
    def steady_mp_per_second(self) -> float | None:
        """Throughput over the last 90 % of the images: start-up, pipeline fill and the burst of
        finished images that arrives with the first batch are excluded."""
        total = self.progress[-1][1] if self.progress else 0
        after = [(t, n) for t, n in self.progress if n >= 0.1 * total]
        if len(after) < 2:
            return None
        (t0, n0), (t1, n1) = after[0], after[-1]
        per_image = self.summary.output_megapixels / max(self.summary.succeeded, 1)
        return (n1 - n0) * per_image / (t1 - t0) if t1 > t0 else None


def workload_files(scale: int) -> list[Path]:
    files: list[Path] = []
    for name in SETS:
        folder = SHARED / "benchmarks" / name / "LR_bicubic" / f"X{scale}"
        files.extend(sorted(folder.glob("*.png")))
    return files


def make_inputs(files: list[Path], copies: int, root: Path) -> list[Path]:
    """Copy every file ``copies`` times to ``root/copy{i}/<set>_<name>`` (distinct output names)."""
    made = []
    for i in range(copies):
        folder = root / f"copy{i:03d}"
        folder.mkdir(parents=True)
        for src in files:
            dst = folder / f"{src.parents[2].name}_{src.name}"
            shutil.copyfile(src, dst)
            made.append(dst)
    return made


TARGET_RATIO = 0.9  # issue 11: the pipeline at least 0.9 of the engine, at x2 and x4, >= 1 min of work


# -- 1. bare engine ---------------------------------------------------------------------------------


def make_upscaler(weights: Path, scale: int) -> tuple[Any, float]:
    """The in-process engine with the job's inference defaults, and the seconds it took to load the
    weights and build it."""
    from pipeline.config.builder import build_upscaler
    from pipeline.config.settings import InferenceSpec
    from pipeline.io.storage import Files

    start = time.perf_counter()
    upscaler = build_upscaler(InferenceSpec(weights=str(weights), device="cpu"), scale, files=Files())
    return upscaler, time.perf_counter() - start


def engine_pass(upscaler: Any, files: list[Path], threads: int | None = None) -> tuple[float, float]:
    """(seconds, output MP) of one warm engine pass over ``files``, with torch on ``threads`` threads."""
    import torch

    from pipeline.imaging import decode_image

    pixels = [decode_image(f.read_bytes(), name=f.name).pixels for f in files]
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        upscaler.upscale(pixels[0])  # warm-up (first call allocates)
        start = time.perf_counter()
        megapixels = sum(out.shape[0] * out.shape[1] for out in map(upscaler.upscale, pixels)) / 1e6
        return time.perf_counter() - start, megapixels
    finally:
        torch.set_num_threads(before)


def run_engine(upscaler: Any, inputs: list[Path], png_compress_level: int) -> EngineResult:
    """Read, decode, upscale and encode every input in this process, timing each stage."""
    from pipeline.imaging import decode_image, encode_image

    result = EngineResult()
    meter = CpuMeter()
    meter.start()
    clock = time.perf_counter
    for path in inputs:
        t0 = clock()
        data = path.read_bytes()
        t1 = clock()
        image = decode_image(data, name=path.name)
        t2 = clock()
        pixels = upscaler.upscale(image.pixels)
        t3 = clock()
        encoded = encode_image(replace(image, pixels=pixels), "png", png_compress_level=png_compress_level)
        t4 = clock()
        result.read_seconds += t1 - t0
        result.decode_seconds += t2 - t1
        result.upscale_seconds += t3 - t2
        result.encode_seconds += t4 - t3
        result.images += 1
        result.output_megapixels += pixels.shape[0] * pixels.shape[1] / 1e6
        result.encoded_megabytes += len(encoded) / 1e6
    result.cpu = meter.stop()
    return result


# -- 2. pipeline ------------------------------------------------------------------------------------


def start_ray() -> None:
    """Start an embedded local Ray the way ``run_upscale`` does (``pipeline.ray_runtime.session.connect``)."""
    from pipeline.ray_runtime.session import connect

    connect(None)


def ray_startup_seconds() -> float:
    """Wall time of starting an embedded local Ray as run_upscale does (then shut down again)."""
    import ray

    start = time.perf_counter()
    start_ray()
    init = time.perf_counter() - start
    ray.shutdown()
    return init


def run_pipeline(
    source: Path,
    dest: Path,
    scale: int,
    weights: Path,
    check: tuple[Path, Any] | None,
    options: dict[str, Any],
) -> PipelineResult:
    """``run_upscale`` into ``dest`` with Ray not initialized; ``check``: (input, engine output);
    ``options``: further ``UpscaleJob`` settings (none: the job's defaults)."""
    import ray

    from pipeline.batch.job import run_upscale
    from pipeline.config.settings import UpscaleJob
    from pipeline.imaging import decode_image

    if ray.is_initialized():
        raise RuntimeError("Ray is initialized: the pipeline's time must include its start-up")
    job = UpscaleJob(source=str(source), dest=str(dest), scale=scale, weights=str(weights), **options)
    progress: list[tuple[float, int]] = []
    meter = CpuMeter()
    meter.start()
    start = time.perf_counter()

    def on_progress(counts: Counter, output_pixels: int, total: int | None) -> None:
        if counts["succeeded"] + counts["failed"]:  # a batch came back (not the call before work)
            progress.append((time.perf_counter() - start, counts["succeeded"] + counts["failed"]))

    try:
        summary = run_upscale(job, on_progress=on_progress)
        wall = time.perf_counter() - start
        cpu = meter.stop()
    finally:
        ray.shutdown()
    max_diff = None
    if check is not None:
        rel, expected = check
        produced = decode_image((dest / rel.with_suffix(".png")).read_bytes()).pixels
        max_diff = int(abs(produced.astype(int) - expected.astype(int)).max())
    return PipelineResult(
        wall_seconds=wall,
        summary=summary,
        first_result_seconds=progress[0][0] if progress else None,
        cpu=cpu,
        outputs_on_disk=sum(1 for _ in dest.rglob("*.png")),
        max_abs_diff=max_diff,
        progress=progress,
        options=options,
    )


def worker_threads(num_cpus: float) -> int:
    """torch's intra-op threads inside a Ray actor that reserves ``num_cpus`` (diagnostic only)."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    class Probe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    start_ray()
    try:
        return ray.get(Probe.remote().threads.remote())
    finally:
        ray.shutdown()


# -- report -----------------------------------------------------------------------------------------


def line(label: str, text: str) -> None:
    print(f"  {label:<32} {text}")


def print_engine(e: EngineResult, png_level: int) -> None:
    line("images", f"{e.images}  ({e.output_megapixels:.1f} output MP)")
    stages = {
        "read": e.read_seconds,
        "decode": e.decode_seconds,
        "upscale (bare engine)": e.upscale_seconds,
        f"PNG encode (level {png_level})": e.encode_seconds,
    }
    for label, seconds in stages.items():
        per_image = seconds / e.images * 1e3
        line(label, f"{seconds:8.2f} s  {per_image:7.1f} ms/image  {seconds / e.serial_seconds:6.1%}")
    line("serial total", f"{e.serial_seconds:8.2f} s")
    line("bare engine throughput", f"{e.engine_mp_per_second:.3f} output MP/s")
    line("serial decode+engine+encode", f"{e.output_megapixels / e.serial_seconds:.3f} output MP/s")
    line("CPU during the pass", str(e.cpu))


def print_pipeline(p: PipelineResult) -> None:
    s = p.summary
    counts = f"{s.succeeded} / {s.failed} / {s.skipped}"
    line("succeeded / failed / skipped", f"{counts}  ({p.outputs_on_disk} PNGs written)")
    line("output", f"{s.output_megapixels:.1f} MP, precision {s.precision}")
    line("wall time (incl. Ray start-up)", f"{p.wall_seconds:8.2f} s  (summary 'seconds' {s.seconds:.2f})")
    if p.first_result_seconds is not None:
        line("first batch back after", f"{p.first_result_seconds:8.2f} s")
    reported = s.output_megapixels_per_second
    line("pipeline throughput", f"{p.mp_per_second:.3f} output MP/s  (summary says {reported:.3f})")
    if p.steady_mp_per_second is not None:
        line("steady state (last 90 %)", f"{p.steady_mp_per_second:.3f} output MP/s")
    line("CPU during the run", str(p.cpu))
    if p.max_abs_diff is not None:
        line("max |pipeline - engine|", f"{p.max_abs_diff} (first image, in 8-bit levels)")


def print_summary(
    engines: list[EngineResult],
    pipelines: list[PipelineResult],
    startup: float,
    threads: int | None,
    single_rate: float,
    pure_rate: float,
) -> float:
    """Print the headline figures (medians over repeats, per set of job options); returns the ratio
    of the first set (the defaults unless ``--job`` said otherwise)."""
    engine_rate = statistics.median(e.engine_mp_per_second for e in engines)
    e = engines[len(engines) // 2]
    print("\n== summary" + (f" (median of {len(engines)} repeats)" if len(engines) > 1 else "") + " ==")
    line("bare engine", f"{engine_rate:.3f} output MP/s")
    line("bare engine, upscale only", f"{pure_rate:.3f} output MP/s (best calibration pass, no encoding)")
    line("bare engine, 1 torch thread", f"{single_rate:.3f} output MP/s (one calibration pass)")
    ratios = []
    for options in dict.fromkeys(json.dumps(p.options, sort_keys=True) for p in pipelines):
        runs = [p for p in pipelines if json.dumps(p.options, sort_keys=True) == options]
        pipeline_rate = statistics.median(p.mp_per_second for p in runs)
        ratios.append(pipeline_rate / engine_rate)
        met = "met" if ratios[-1] >= TARGET_RATIO else "NOT met"
        print(f"  pipeline, job options {options if options != '{}' else '{} (defaults)'}:")
        line("  end-to-end pipeline", f"{pipeline_rate:.3f} output MP/s")
        line("  ratio pipeline / engine", f"{ratios[-1]:.2f}  (target >= {TARGET_RATIO}: {met})")
        line("  ratio pipeline / upscale-only engine", f"{pipeline_rate / pure_rate:.2f}")
        line("  ratio pipeline / 1-thread engine", f"{pipeline_rate / single_rate:.2f}")
    ratio = ratios[0]
    line("Ray start-up", f"{startup:.2f} s")
    others = [x.cpu.others for x in [*engines, *pipelines] if x.cpu is not None]
    if others and max(others) > CONTENTION_CORES:
        print(
            f"  WARNING: other processes took up to {max(others):.2f} cores during the measurements; on "
            f"{os.cpu_count()} cores that skews the ratio (a multi-threaded in-process engine suffers "
            "most). Re-run on an idle machine for comparable figures."
        )
    stages = {"decode": e.decode_seconds, "model": e.upscale_seconds, "PNG encode": e.encode_seconds}
    line("per-image stage times", ", ".join(f"{k} {v / e.images * 1e3:.1f} ms" for k, v in stages.items()))
    if threads is not None:
        line("torch threads, Ray actor", f"{threads} with num_cpus=0.5 (the pipeline's CPU actor default)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, choices=(2, 3, 4), default=4)
    parser.add_argument("--repeat", type=int, default=1, help="engine + pipeline passes (interleaved)")
    parser.add_argument("--copies", type=int, default=None, help="copies of Set14+Set5 (default: calibrate)")
    parser.add_argument("--min-engine-seconds", type=float, default=60.0, help="calibration target")
    parser.add_argument("--weights", type=Path, default=None, help="default: shared/weights/PANx{s}_DF2K.pth")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--engine-threads", type=int, default=None, help="torch threads of the bare engine (default: torch's)"
    )
    parser.add_argument("--no-probe", action="store_true", help="skip the Ray actor thread-count probe")
    parser.add_argument(
        "--job",
        type=json.loads,
        action="append",
        metavar="JSON",
        help="UpscaleJob settings for a pipeline pass, e.g. '{\"actors\": 1}'; repeat to compare several "
        "in one run (each repeat runs every one); default: the job's defaults",
    )
    args = parser.parse_args(argv)

    weights = args.weights or SHARED / "weights" / f"PANx{args.scale}_DF2K.pth"
    files = workload_files(args.scale)
    if not SHARED.is_dir() or not weights.is_file() or not files:
        print(
            f"SKIPPED: benchmark images or weights not found (shared={SHARED}, weights={weights}); "
            "set PAN_SHARED to the folder holding benchmarks/ and weights/"
        )
        return 0
    if os.environ.pop("RAY_ADDRESS", None):
        print("note: RAY_ADDRESS ignored; this benchmark measures an embedded local Ray")

    import numpy as np
    import ray
    import torch

    from pipeline.config.settings import UpscaleJob
    from pipeline.imaging import decode_image

    jobs = args.job or [{}]
    png_level = UpscaleJob.model_fields["png_compress_level"].default

    if args.engine_threads:
        torch.set_num_threads(args.engine_threads)
    print(f"PAN x{args.scale} throughput: {len(files)} images from {'+'.join(SETS)}, weights {weights}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"ray {ray.__version__}, numpy {np.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    if ray.is_initialized():
        raise RuntimeError("Ray must not be initialized before the benchmark starts")

    startup = ray_startup_seconds()
    print(f"\nRay start-up (embedded local Ray as run_upscale starts it, measured alone): {startup:.2f} s")
    upscaler, load_seconds = make_upscaler(weights, args.scale)
    print(f"model load + Upscaler construction: {load_seconds:.2f} s, precision {upscaler.precision}")
    # Best of two passes: a burst of other work on the machine should not shrink the workload.
    one_pass, megapixels = min(engine_pass(upscaler, files) for _ in range(2))
    # 10 % over the target: a warm full-length pass can run faster than the calibration passes.
    copies = args.copies or max(1, math.ceil(1.1 * args.min_engine_seconds / one_pass))
    print(
        f"calibration: one engine pass over {len(files)} images = {one_pass:.2f} s "
        f"({megapixels / one_pass:.3f} MP/s) -> {copies} copies"
    )
    single, _ = engine_pass(upscaler, files, threads=1)
    single_rate = megapixels / single
    print(
        f"same pass with torch on 1 thread (what a Ray actor with num_cpus < 2 gets): {single:.2f} s "
        f"({single_rate:.3f} MP/s)"
    )

    engines: list[EngineResult] = []
    pipelines: list[PipelineResult] = []
    with tempfile.TemporaryDirectory(prefix="pan-bench-") as tmp:
        source = Path(tmp) / "in"
        inputs = make_inputs(files, copies, source)
        check = (inputs[0].relative_to(source), upscaler.upscale(decode_image(inputs[0].read_bytes()).pixels))
        print(f"workload: {copies} copies x {len(files)} images = {len(inputs)} inputs")
        for r in range(args.repeat):
            print(f"\n[{r + 1}/{args.repeat}] 1. bare engine, in-process (device=cpu)")
            engines.append(run_engine(upscaler, inputs, png_level))
            print_engine(engines[-1], png_level)
            for options in jobs:
                print(
                    f"\n[{r + 1}/{args.repeat}] 2. end-to-end pipeline: run_upscale (Ray start-up included), "
                    f"job options {json.dumps(options)}"
                )
                dest = Path(tmp) / f"out{r}"
                pipelines.append(run_pipeline(source, dest, args.scale, weights, check, options))
                print_pipeline(pipelines[-1])
                shutil.rmtree(dest, ignore_errors=True)

    threads = None if args.no_probe else worker_threads(0.5)
    ratio = print_summary(engines, pipelines, startup, threads, single_rate, megapixels / one_pass)

    if args.json:
        record = {
            "scale": args.scale,
            "copies": copies,
            "images": len(files) * copies,
            "cpus": os.cpu_count(),
            "ray_startup_seconds": startup,
            "model_load_seconds": load_seconds,
            "calibration_pass_seconds": one_pass,
            "single_thread_engine_mp_per_second": single_rate,
            "upscale_only_engine_mp_per_second": megapixels / one_pass,
            "engine": [{**asdict(x), "engine_mp_per_second": x.engine_mp_per_second} for x in engines],
            "pipeline": [
                {
                    **asdict(x),
                    "mp_per_second": x.mp_per_second,
                    "steady_mp_per_second": x.steady_mp_per_second,
                }
                for x in pipelines
            ],
            "ratio": ratio,
            "actor_torch_threads": threads,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
