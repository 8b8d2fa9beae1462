"""How far tiled output is from whole-image output, in uint8 levels, per precision: Set14 LR
(``LR_bicubic/X{s}``) through the official weights, each image whole (``tile=0``) and with each tile
size, on the CPU. The bound the README and ``Upscaler`` state for ``--tile`` comes from this table.

Prints, per scale, tile and context, over the images larger than the tile's window (a smaller one
runs whole, identically): in each precision, the largest difference, how many output values
(channels counted apart) differ by more than one level, and the seconds the tiled passes took; and
the image with the largest difference in the last precision. About 3 minutes on 2 cores, one scale
(``--scales 4``) 1. ``--inputs DIR [--count N]`` takes the (first N) images of another folder as
the LR inputs at every scale. ``--before-rounding`` compares the float outputs (in levels) instead
of the integer ones. ``--speed N`` times instead: N interleaved rounds over Set14 (every
image, whole where one window covers it) and over a 480x270 image, at each tile and context, in
each precision, at the first scale; what a wider context costs.

    .venv/bin/python benchmarks/tiling_bound.py [--scales 2 3 4] [--tiles 48 96 256] [--contexts 24]
    .venv/bin/python benchmarks/tiling_bound.py --inputs ../shared/train/BSDS200 --count 20 --scales 4
    .venv/bin/python benchmarks/tiling_bound.py --before-rounding --scales 4 --tiles 48 --contexts 8 24 40
    .venv/bin/python benchmarks/tiling_bound.py --speed 3 --scales 4 --tiles 48 96 256 --contexts 24 40
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from images import SHARED, hd_lr  # benchmarks/images.py

from pipeline.core.engine import Upscaler, auto_precision
from pipeline.core.model import PAN
from pipeline.imaging import decode_image
from pipeline.io.weights import load_pretrained


def cpu_name() -> str:
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")


def inputs(
    scale: int, folder: Path | None = None, count: int | None = None
) -> tuple[dict[str, np.ndarray], PAN]:
    """The LR images (name -> pixels): Set14's at ``scale``, or the first ``count`` files of ``folder``
    taken as they are; and the official weights for ``scale``."""
    folder = folder or SHARED / "benchmarks" / "Set14" / "LR_bicubic" / f"X{scale}"
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    images = {p.stem: decode_image(p.read_bytes()).pixels for p in paths}
    return images, load_pretrained(SHARED / "weights" / f"PANx{scale}_DF2K.pth", scale=scale)


def measure(
    scale: int,
    tiles: list[int],
    contexts: list[int],
    precisions: list[str],
    folder: Path | None,
    count: int | None,
    before_rounding: bool,
) -> list[str]:
    """Markdown table rows for one scale."""
    images, model = inputs(scale, folder, count)

    def levels(engine: Upscaler, lr: np.ndarray) -> np.ndarray:
        """The output in levels: as integers, or as the network gives it, before rounding (RGB)."""
        if not before_rounding:
            return engine.upscale(lr).astype(int)
        rgb = np.broadcast_to(lr.reshape(*lr.shape[:2], -1), (*lr.shape[:2], 3))
        return engine.upscale_float(np.ascontiguousarray(rgb.transpose(2, 0, 1), np.float32) / 255) * 255

    # (tile, context, precision) -> (largest difference, values off by more than 1, seconds, worst image)
    found: dict[tuple[int, int, str], tuple[float, int, float, str]] = {}
    for precision in precisions:
        whole = Upscaler(model, device="cpu", precision=precision, tile=0)
        references = {name: levels(whole, lr) for name, lr in images.items()}
        for tile in tiles:
            for context in contexts:
                tiled = Upscaler(model, device="cpu", precision=precision, tile=tile, context=context)
                worst, over_one, seconds, worst_name = 0, 0, 0.0, "-"
                for name, lr in images.items():
                    if tile + 2 * context >= max(lr.shape[:2]):
                        continue  # one window along each axis: the whole image again
                    start = time.perf_counter()
                    out = levels(tiled, lr)
                    seconds += time.perf_counter() - start
                    diff = np.abs(out - references[name])
                    over_one += int((diff > 1).sum())
                    if diff.max() > worst:
                        worst, worst_name = float(diff.max()), name
                found[tile, context, precision] = worst, over_one, seconds, worst_name
    rows = []
    for tile in tiles:
        for context in contexts:
            compared = [lr for lr in images.values() if tile + 2 * context < max(lr.shape[:2])]
            values = sum(lr.shape[0] * lr.shape[1] * 3 * scale**2 for lr in compared) / 1e6
            cells = ["{:.3g} / {} / {:.1f}".format(*found[tile, context, p][:3]) for p in precisions]
            cells = cells if compared else ["-"] * len(precisions)
            worst_name = found[tile, context, precisions[-1]][3]
            head = f"| x{scale} | {tile} | {context} | {len(compared)} | {values:.1f}"
            rows.append(f"{head} | {' | '.join(cells)} | {worst_name} |")
    return rows


def speed(scale: int, tiles: list[int], contexts: list[int], precisions: list[str], rounds: int) -> None:
    """Median seconds of a pass over Set14 at ``scale``, and over one 480x270 image (the HD output
    at x4), per precision, tile and context."""
    images, model = inputs(scale)
    workloads = {"Set14": list(images.values()), "480x270": [np.asarray(hd_lr(SHARED))]}
    engines = {
        (p, t, c): Upscaler(model, device="cpu", precision=p, tile=t, context=c)
        for p in precisions
        for t in tiles
        for c in contexts
    }
    for engine in engines.values():
        engine.upscale(workloads["480x270"][0])  # warm-up: oneDNN builds its kernels
    seconds: dict[tuple[str, str, int, int], list[float]] = {}
    for _ in range(rounds):
        for workload, pixels in workloads.items():
            for key, engine in engines.items():
                start = time.perf_counter()
                for lr in pixels:
                    engine.upscale(lr)
                seconds.setdefault((workload, *key), []).append(time.perf_counter() - start)
    heads = " | ".join(f"context {c}: s (x first)" for c in contexts)
    print(f"| workload (x{scale}) | precision | tile | {heads} |")
    print("|---|---|---|" + "---|" * len(contexts))
    for workload in workloads:
        for p in precisions:
            for t in tiles:
                median = [sorted(seconds[workload, p, t, c])[rounds // 2] for c in contexts]
                cells = " | ".join(f"{m:.2f} ({m / median[0]:.2f})" for m in median)
                print(f"| {workload} | {p} | {t} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", choices=(2, 3, 4), default=[2, 3, 4])
    parser.add_argument("--tiles", type=int, nargs="+", default=[48, 96, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[24])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--inputs", type=Path, help="a folder of images to take as LR inputs instead of Set14"
    )
    parser.add_argument("--count", type=int, help="only the first COUNT images of --inputs")
    parser.add_argument("--before-rounding", action="store_true", help="compare outputs before rounding")
    parser.add_argument("--speed", type=int, metavar="ROUNDS", help="time passes instead (see above)")
    args = parser.parse_args()
    if not (SHARED / "benchmarks" / "Set14").is_dir():
        print(f"SKIPPED: needs {SHARED}/benchmarks/Set14 and weights/ (set PAN_SHARED)")
        return
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"precision auto: {auto_precision(torch.device('cpu'))}")  # fmt: skip
    if args.speed:
        speed(args.scales[0], args.tiles, args.contexts, args.precisions, args.speed)
        return
    heads = " | ".join(f"{p}: max / values > 1 / s" for p in args.precisions)
    print(f"| scale | tile | context | images | M values | {heads} | worst image ({args.precisions[-1]}) |")
    print("|---|---|---|---|---|" + "---|" * len(args.precisions) + "---|")
    start = time.perf_counter()
    for scale in args.scales:
        rows = measure(
            scale, args.tiles, args.contexts, args.precisions, args.inputs, args.count, args.before_rounding
        )
        for row in rows:
            print(row, flush=True)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
