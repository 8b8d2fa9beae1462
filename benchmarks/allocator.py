"""What ``pipeline.core.engine.keep_freed_memory`` (set by every ``Upscaler``) buys: the engine with it
and with glibc's default allocator, each measurement in a fresh process, settings alternated.

    .venv/bin/python benchmarks/allocator.py [--rounds 2] [--threads 2]

Workloads (x4, bf16, the official weights from ``../shared``; whole images):

- ``hd``: one 480x270 input (Set14's ``monarch.png``, centre-cropped to 16:9, Pillow bicubic), whose
  output is 1920x1080, as in ``peer.py``;
- ``set14``: the 14 Set14 LR images;
- ``mixed``: Set5, Set14, the 480x270 input and a 600x400 one, one after another.

Each process builds the ``Upscaler`` (``precision="bf16"``, so that ``auto``'s timing is not in the
way), makes one untimed pass (the first takes its memory from the kernel either way), then times
3 passes and prints the best: output MP/s, minor page faults and kernel CPU seconds per pass
(``getrusage``), and its peak resident memory. "default" replaces ``keep_freed_memory`` with a
no-op before the ``Upscaler`` is built; nothing else differs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from images import SHARED  # benchmarks/images.py

SETTINGS = ("kept", "default")
WORKLOADS = ("hd", "set14", "mixed")


def workload_images(workload: str) -> list:
    import numpy as np
    from images import HD_SOURCE, hd_lr, rgb  # benchmarks/images.py
    from PIL import Image

    def lr(name: str) -> list:
        return [rgb(p) for p in sorted((SHARED / "benchmarks" / name / "LR_bicubic" / "X4").glob("*.png"))]

    hd = hd_lr(SHARED)
    monarch = rgb(SHARED / "benchmarks" / "Set14" / "HR" / HD_SOURCE)
    chosen = {
        "hd": [hd],
        "set14": lr("Set14"),
        "mixed": [*lr("Set5"), *lr("Set14"), hd, monarch.resize((600, 400), Image.BICUBIC)],
    }[workload]
    return [np.asarray(image) for image in chosen]


def child(setting: str, workload: str, threads: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    import pipeline.core.engine as engine
    from pipeline.config.settings import InferenceSpec
    from pipeline.io.storage import Files

    if setting == "default":
        engine.keep_freed_memory = lambda: False
    torch.set_num_threads(threads)
    weights = SHARED / "weights" / "PANx4_DF2K.pth"
    upscaler = engine.build_upscaler(
        InferenceSpec(weights=str(weights), device="cpu", precision="bf16"), 4, files=Files()
    )
    pixels = workload_images(workload)
    megapixels = sum(p.shape[0] * p.shape[1] for p in pixels) * 16 / 1e6
    for p in pixels:
        upscaler.upscale(p)
    passes = []
    for _ in range(3):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for p in pixels:
            upscaler.upscale(p)
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        passes.append((seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    seconds, faults, kernel = min(passes)
    return {
        "mp_per_s": megapixels / seconds,
        "faults": faults,
        "kernel_s": kernel,
        "seconds": seconds,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return
    if not (SHARED / "weights" / "PANx4_DF2K.pth").is_file():
        print(f"SKIPPED: no {SHARED}/weights/PANx4_DF2K.pth")
        return
    results: dict = {(s, w): [] for s in SETTINGS for w in WORKLOADS}
    for r in range(args.rounds):
        for w in WORKLOADS:
            for s in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                cmd = [sys.executable, __file__, "--child", s, w, "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[s, w].append(json.loads(done.stdout.splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{args.threads} torch threads, bf16, x4; best of 3 passes, {args.rounds} processes each\n")
    print("| workload | allocator | MP/s (each process) | faults / pass | kernel s / pass | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for w in WORKLOADS:
        for s in SETTINGS:
            runs = results[s, w]
            rates = ", ".join(f"{x['mp_per_s']:.3f}" for x in runs)
            print(
                f"| {w} | {s} | {rates} | {statistics.median(x['faults'] for x in runs):,.0f} | "
                f"{statistics.median(x['kernel_s'] for x in runs):.3f} | "
                f"{statistics.median(x['max_rss_mb'] for x in runs):,.0f} |"
            )
        kept = statistics.median(x["mp_per_s"] for x in results["kept", w])
        default = statistics.median(x["mp_per_s"] for x in results["default", w])
        print(f"| {w} | kept / default | {kept / default:.2f}x | | | |")


if __name__ == "__main__":
    main()
