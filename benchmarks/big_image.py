"""Memory and time of one big image, a 12 MP phone photo, at x2 and x4: the engine alone and the job.

The input: ``SOURCE_PHOTO`` (a 481x321 BSDS200 photo) centre-cropped to 4:3 and enlarged with
Pillow bicubic to 4000x3000, saved as JPEG quality 90 in a temporary folder. Its content is smooth
(an 8x enlargement), which changes neither the time nor the memory: both follow the pixel count.

For each ``--scale``:

1. **Engine**: a fresh Python process decodes the JPEG (``decode_image``, as the job does), builds
   the engine as the job would (``build_upscaler``, official weights, CPU, ``--precision``) and times
   ``Upscaler.upscale`` on it. It reports the wall time, its peak RSS (``getrusage``: the kernel's
   high-water mark, exact), its RSS before the call (model loaded, input decoded), the tile size the
   engine chose, and the call's CPU seconds and minor page faults.
2. **Job**: ``python -m pipeline upscale SRC DEST --scale S`` (``pan upscale``), which starts an
   embedded Ray of its own: read, decode, the model actor, encode (PNG) and write. The peak memory
   is that of the whole run: every 0.2 s the process tree of the command (the CLI process, Ray's
   GCS, raylet, dashboard and every worker) is sampled and its memory summed. Ray's object store is
   shared memory, counted in the RSS of every process that maps it (the raylet that holds the
   store, and each worker reading an object from it), so summing RSS would count it several times:
   the sum taken is PSS (``memory_full_info().pss``: a shared page counts 1/n in each of its n
   processes). RSS sums are printed beside it. Sampling can miss a spike shorter than 0.2 s.

Usage::

    .venv/bin/python benchmarks/big_image.py [--scale 2 --scale 4] [--precision auto] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from images import SHARED, rgb  # benchmarks/images.py

SOURCE_PHOTO = SHARED / "train" / "BSDS200" / "100075.jpg"
BIG_SIZE = (4000, 3000)  # width, height: a 12 MP phone photo
JPEG_QUALITY = 90
SAMPLE_SECONDS = 0.2  # how often the job's process tree is sampled
LARGEST_SHOWN = 3  # processes named at the job's peak: the model actor, the encode worker, the raylet
REPO = Path(__file__).resolve().parents[1]  # the tree measured: its ``pipeline`` comes first on the path
MIB = 1 << 20


def make_input(folder: Path) -> Path:
    """``SOURCE_PHOTO`` centre-cropped to 4:3, enlarged to ``BIG_SIZE`` (Pillow bicubic), saved as
    ``folder/photo.jpg`` at ``JPEG_QUALITY``."""
    from PIL import Image

    photo = rgb(SOURCE_PHOTO)
    width = photo.height * BIG_SIZE[0] // BIG_SIZE[1]
    left = (photo.width - width) // 2
    big = photo.crop((left, 0, left + width, photo.height)).resize(BIG_SIZE, Image.BICUBIC)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "photo.jpg"
    big.save(path, quality=JPEG_QUALITY)
    return path


def weights_for(scale: int) -> Path:
    return SHARED / "weights" / f"PANx{scale}_DF2K.pth"


# -- the engine alone, in a process of its own ------------------------------------------------------


def engine_child(path: Path, scale: int, precision: str | None) -> None:
    """Runs in the child: one ``upscale`` of ``path``; prints a JSON line of what it measured."""
    from pipeline.config.builder import build_upscaler
    from pipeline.config.settings import InferenceSpec
    from pipeline.imaging import decode_image
    from pipeline.io.storage import Files

    settings = {"weights": str(weights_for(scale)), "device": "cpu"}
    if precision is not None:
        settings["precision"] = precision
    upscaler = build_upscaler(InferenceSpec(**settings), scale, files=Files())
    pixels = decode_image(path.read_bytes(), name=path.name).pixels
    height, width = pixels.shape[:2]
    tile = upscaler.tile_size(height, width)
    plan_y, plan_x = upscaler.plan(height, width)
    before = _self_usage()
    rss_before = _current_rss()
    start = time.perf_counter()
    output = upscaler.upscale(pixels)
    seconds = time.perf_counter() - start
    after = _self_usage()
    figures = {
        "seconds": seconds,
        "peak_rss": after.ru_maxrss * 1024,
        "rss_before": rss_before,
        "precision": upscaler.precision,
        "tile": tile,
        "windows": len(plan_y.windows) * len(plan_x.windows),
        "window": plan_x.length,
        "batch": upscaler._batch_for(plan_y.length, plan_x.length),
        "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "kernel_seconds": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "output": list(output.shape),
        "engine_module": sys.modules[type(upscaler).__module__].__file__,
    }
    print(json.dumps(figures))


def _self_usage() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


def _current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tree_env() -> dict[str, str]:
    """This environment with ``REPO`` first on the Python path (for the engine's process, the job and
    the Ray workers it starts), so that a copy of another version (``git archive``) measures itself
    rather than the installed package; and without ``RAY_ADDRESS``: the job starts a Ray of its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    return env


def run_engine(path: Path, scale: int, precision: str | None) -> dict:
    """The engine alone on ``path`` at ``scale``, in a fresh process (``engine_child``)."""
    command = [sys.executable, __file__, "--engine-child", str(path), "--scale", str(scale)]
    if precision is not None:
        command += ["--precision", precision]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=tree_env())
    if done.returncode != 0:
        sys.exit(f"the engine's process failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - start
    return figures


# -- the end-to-end job -----------------------------------------------------------------------------


@dataclass
class TreeMemory:
    """The peak, over the samples, of the memory summed over a process tree (bytes)."""

    peak_pss: int = 0
    peak_rss: int = 0
    processes_at_peak: int = 0
    largest_at_peak: str = ""  # the processes holding most of the peak PSS, with their PSS
    samples: int = 0
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> CPU seconds at its last sample

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the tree's processes, up to each one's last sample: on a machine shared
        with other work the wall time stretches, the CPU time much less."""
        return sum(self.cpu.values())


def sample_tree(root: int, memory: TreeMemory, stop: threading.Event) -> None:
    """Until ``stop``: every ``SAMPLE_SECONDS``, sum PSS and RSS over ``root`` and its descendants."""
    import psutil

    try:
        parent = psutil.Process(root)
    except psutil.NoSuchProcess:
        return
    while not stop.wait(SAMPLE_SECONDS):
        try:
            processes = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        pss = rss = 0
        sizes = []
        for process in processes:
            try:
                info = process.memory_full_info()
                name = " ".join(process.cmdline()[:3])[:60] or process.name()
                times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # it ended between the listing and the reading
            pss += info.pss
            rss += info.rss
            memory.cpu[process.pid] = times.user + times.system
            sizes.append((info.pss, name))
        memory.samples += 1
        if pss > memory.peak_pss:
            memory.peak_pss, memory.processes_at_peak = pss, len(processes)
            largest = sorted(sizes, reverse=True)[:LARGEST_SHOWN]
            memory.largest_at_peak = ", ".join(f"{name} ({size / MIB:,.0f} MiB)" for size, name in largest)
        memory.peak_rss = max(memory.peak_rss, rss)


def run_job(source: Path, dest: Path, scale: int, precision: str | None, log: Path) -> dict:
    """``python -m pipeline upscale source dest --scale scale`` with a local Ray of its own: its wall
    time, and the peak of its process tree's memory (``sample_tree``)."""
    command = [sys.executable, "-m", "pipeline", "upscale", str(source), str(dest)]
    command += ["--scale", str(scale), "--weights", str(weights_for(scale))]
    if precision is not None:
        command += ["--precision", precision]
    memory, stop = TreeMemory(), threading.Event()
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=tree_env())
        sampler = threading.Thread(target=sample_tree, args=(child.pid, memory, stop), daemon=True)
        sampler.start()
        code = child.wait()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if code != 0:
        sys.exit(f"the job failed ({code}):\n{log.read_text()[-4000:]}")
    outputs = list(dest.rglob("*.png"))
    return {
        "seconds": seconds,
        "memory": memory,
        "output_bytes": sum(p.stat().st_size for p in outputs),
        "outputs": len(outputs),
    }


def describe_job(job: dict) -> str:
    memory = job["memory"]
    return (
        f"{job['seconds']:.1f} s, {memory.cpu_seconds:.0f} CPU s; peak PSS {memory.peak_pss / MIB:,.0f} MiB "
        f"(RSS {memory.peak_rss / MIB:,.0f} MiB) over {memory.processes_at_peak} processes, the largest: "
        f"{memory.largest_at_peak}; {memory.samples} samples; {job['outputs']} PNG of "
        f"{job['output_bytes'] / MIB:,.0f} MiB"
    )


# -- the report -------------------------------------------------------------------------------------


def report(rows: list[tuple[int, dict, dict]]) -> None:
    print()
    columns = (
        "scale", "output MP", "precision", "tile (windows of px, batch)", "engine s (CPU s)",
        "engine peak RSS MiB (before the call)", "job s (CPU s)", "job peak PSS MiB (RSS sum)",
        "largest processes at peak",
    )  # fmt: skip
    print(f"| {' | '.join(columns)} |")
    print("|---" * len(columns) + "|")
    for scale, engine, job in rows:
        height, width = engine["output"][:2]
        memory = job["memory"]
        print(
            f"| x{scale} | {height * width / 1e6:.0f} | {engine['precision']} | {engine['tile']} "
            f"({engine['windows']} of {engine['window']}, {engine['batch']}) "
            f"| {engine['seconds']:.1f} ({engine['cpu_seconds']:.0f}) "
            f"| {engine['peak_rss'] / MIB:,.0f} ({engine['rss_before'] / MIB:,.0f}) "
            f"| {job['seconds']:.1f} ({memory.cpu_seconds:.0f}) "
            f"| {memory.peak_pss / MIB:,.0f} ({memory.peak_rss / MIB:,.0f}) | {memory.largest_at_peak} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, action="append", choices=(2, 3, 4), help="default: 2 and 4")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), help="default: the job's")
    parser.add_argument("--keep", action="store_true", help="keep the input, outputs and logs")
    parser.add_argument("--engine-child", type=Path, help=argparse.SUPPRESS)  # run_engine's process
    args = parser.parse_args()
    scales = args.scale or [2, 4]
    if args.engine_child is not None:
        engine_child(args.engine_child, scales[0], args.precision)
        return
    folder = Path(tempfile.mkdtemp(prefix="pan-big-image-"))
    try:
        photo = make_input(folder / "source")
        print(f"input: {photo} ({BIG_SIZE[0]}x{BIG_SIZE[1]} JPEG q{JPEG_QUALITY}, "
              f"{photo.stat().st_size / MIB:.1f} MiB, from {SOURCE_PHOTO.name})", flush=True)  # fmt: skip
        rows = []
        for scale in scales:
            engine = run_engine(photo, scale, args.precision)
            print(f"x{scale} engine: {json.dumps(engine)}", flush=True)
            dest = folder / f"out-x{scale}"
            job = run_job(photo.parent, dest, scale, args.precision, folder / f"job-x{scale}.log")
            print(f"x{scale} job: {describe_job(job)}", flush=True)
            rows.append((scale, engine, job))
        report(rows)
    finally:
        if args.keep:
            print(f"kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
