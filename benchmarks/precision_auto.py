"""``precision: auto`` on a loaded machine: how long an engine takes to decide, and whether it
decides the same way every time. Starts ``--load`` busy processes (default: two per core), then
``--runs`` times, each in a fresh process: builds ``Upscaler(model, precision="auto")`` (timed: the
decision and the model's preparation) and runs ``pan upscale-image`` on one 250x240 image at x2 with
``auto`` and with the precision it chose (wall time, Python's start-up included).

Usage::

    .venv/bin/python benchmarks/precision_auto.py [--runs 5] [--load N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from images import SHARED  # benchmarks/images.py

BUILD = """
import json, time, torch
from pipeline.core.engine import Upscaler
from pipeline.io.weights import load_pretrained
model = load_pretrained({weights!r}, scale=2)
start = time.perf_counter()
engine = Upscaler(model, device="cpu", precision="auto")
print(json.dumps({{"precision": engine.precision, "seconds": time.perf_counter() - start}}))
"""


def _busy() -> None:
    while True:
        pass


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load", type=int, default=2 * (os.cpu_count() or 1), help="busy processes")
    args = parser.parse_args()
    weights = SHARED / "weights/PANx2_DF2K.pth"
    image = SHARED / "benchmarks/Set14/LR_bicubic/X2/baboonx2.png"  # 250x240
    if not (weights.is_file() and image.is_file()):
        print(f"SKIPPED: needs {weights} and {image} (set PAN_SHARED)")
        return 0
    pan = str(Path(sys.executable).with_name("pan"))
    load = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for process in load:
        process.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            builds, walls = [], {"auto": [], "given": []}
            for run in range(args.runs):
                out = subprocess.run([sys.executable, "-c", BUILD.format(weights=str(weights))],
                                     check=True, capture_output=True, text=True).stdout  # fmt: skip
                builds.append(json.loads(out.splitlines()[-1]))
                chosen = builds[-1]["precision"]
                for label, flags in (("auto", []), ("given", ["--precision", chosen])):
                    argv = [pan, "upscale-image", str(image), f"{tmp}/{label}{run}.png", "--scale", "2"]
                    walls[label].append(_wall([*argv, "--weights", str(weights), *flags]))
    finally:
        for process in load:
            process.kill()
    choices = Counter(b["precision"] for b in builds)
    seconds = sorted(b["seconds"] for b in builds)
    print(f"{args.load} busy processes on {os.cpu_count()} cores, {args.runs} runs")
    print(f"decisions: {dict(choices)} ({'stable' if len(choices) == 1 else 'UNSTABLE'})")
    median = seconds[len(seconds) // 2]
    print(f"Upscaler(precision='auto') built in {seconds[0]:.3f}-{seconds[-1]:.3f} s (median {median:.3f})")
    for label, values in walls.items():
        name = "auto" if label == "auto" else "--precision " + ", ".join(sorted(choices))
        print(f"pan upscale-image {image.name} x2 with {name}: {min(values):.1f}-{max(values):.1f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
