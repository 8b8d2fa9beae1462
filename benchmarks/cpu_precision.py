"""bf16 against fp32 on the CPU, through our engine: quality (PSNR_Y on Set5 and Set14, x2 and x4,
the paper's protocol) and speed (output MP/s on Set14 x4 LR, interleaved rounds in one process).
What ``precision=auto`` may pick on a CPU follows from it (``engine.EQUAL_QUALITY``: within 0.02 dB).

    .venv/bin/python benchmarks/cpu_precision.py [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from pipeline.config.builder import build_upscaler
from pipeline.config.settings import InferenceSpec
from pipeline.evaluation.scoring import evaluate
from pipeline.imaging import decode_image
from pipeline.io.pairs import load_benchmark
from pipeline.io.storage import Files

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PRECISIONS = ("fp32", "bf16")


def spec(scale: int, precision: str) -> InferenceSpec:
    return InferenceSpec(
        weights=str(SHARED / f"weights/PANx{scale}_DF2K.pth"), device="cpu", precision=precision
    )


def quality() -> None:
    print("| set | scale | fp32 PSNR_Y | bf16 PSNR_Y | bf16 - fp32 |")
    print("|---|---|---|---|---|")
    for dataset in ("Set5", "Set14"):
        for scale in (2, 4):
            _, pairs = load_benchmark(str(SHARED / "benchmarks" / dataset), scale)
            scores = {
                p: evaluate(build_upscaler(spec(scale, p), scale, files=Files()), dataset, pairs).psnr_y
                for p in PRECISIONS
            }
            delta = scores["bf16"] - scores["fp32"]
            print(f"| {dataset} | x{scale} | {scores['fp32']:.4f} | {scores['bf16']:.4f} | {delta:+.4f} |")


def speed(rounds: int) -> None:
    paths = sorted((SHARED / "benchmarks/Set14/LR_bicubic/X4").glob("*.png"))
    images = [decode_image(p.read_bytes()).pixels for p in paths]
    upscalers = {p: build_upscaler(spec(4, p), 4, files=Files()) for p in PRECISIONS}
    for upscaler in upscalers.values():
        upscaler.upscale(images[0])  # warm-up: oneDNN builds its kernels
    output_mp = sum(i.shape[0] * i.shape[1] * 16 for i in images) / 1e6
    seconds = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for precision, upscaler in upscalers.items():
            start = time.perf_counter()
            for image in images:
                upscaler.upscale(image)
            seconds[precision].append(time.perf_counter() - start)
    rates = {p: output_mp / sorted(s)[len(s) // 2] for p, s in seconds.items()}
    print(f"Set14 x4, {rounds} interleaved rounds, {torch.get_num_threads()} threads, median output MP/s: "
          + ", ".join(f"{p} {r:.3f}" for p, r in rates.items())
          + f"; bf16 / fp32 = {rates['bf16'] / rates['fp32']:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speed(args.rounds)
    quality()


if __name__ == "__main__":
    main()
