"""Training benchmarks on this machine: throughput with 1 and 2 Ray Train workers, a short
from-scratch run against the bicubic baseline, and fine-tuning the official weights.

    .venv/bin/python benchmarks/train_benchmark.py throughput [--steps 60]
    .venv/bin/python benchmarks/train_benchmark.py scratch [--steps 1500]
    .venv/bin/python benchmarks/train_benchmark.py finetune [--steps 36]

Each prints its figures and leaves the run (metrics.jsonl, learning_curve.png, export/) under
``--out`` (default benchmarks/results/train). Data: ``../shared/train/BSDS200`` for training,
``../shared/benchmarks/Set5`` for validation; weights ``../shared/weights``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from pipeline.config.settings import TrainJob
from pipeline.training.job import run_training

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
BICUBIC_SET5_X2 = 33.673  # ../shared/README.md, our convention


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fresh(out: Path, name: str) -> Path:
    shutil.rmtree(out / name, ignore_errors=True)
    return out / name


def throughput(out: Path, steps: int, batch: int, patch: int) -> None:
    """LR patches per second, measured from the metrics' per-step clock after a warm-up of 5 steps."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU (gloo)")
    for workers in (1, 2):
        name = f"throughput-{workers}w"
        job = TrainJob(data=str(SHARED / "train/BSDS200"), scale=2, name=name, storage=str(out),
                       workers=workers, batch_size=batch, patch_size=patch, max_steps=steps,
                       val_every=steps)  # fmt: skip
        _fresh(out, name)
        started = time.perf_counter()
        run_training(job)
        wall = time.perf_counter() - started
        records = _records(out / name)
        warm, last = records[4], records[-1]
        rate = (last["step"] - warm["step"]) * batch / (last["seconds"] - warm["seconds"])
        print(
            f"{workers} worker(s): {rate:.1f} LR patches/s ({batch} x {patch}px per step), {wall:.1f} s wall"
        )


def scratch(out: Path, steps: int, batch: int, patch: int, val_every: int) -> None:
    """PAN x2 from random weights on BSDS200 for a fixed budget; Set5 PSNR_Y against bicubic."""
    name = "scratch-x2"
    job = TrainJob(data=str(SHARED / "train/BSDS200"), scale=2, name=name, storage=str(out), workers=1,
                   batch_size=batch, patch_size=patch, max_steps=steps, val_every=val_every,
                   val_data=str(SHARED / "benchmarks/Set5"))  # fmt: skip
    _fresh(out, name)
    started = time.perf_counter()
    run_training(job)
    print(f"{steps} steps in {time.perf_counter() - started:.0f} s")
    for r in (r for r in _records(out / name) if "val_psnr_y" in r):
        print(f"step {r['step']:5d}  Set5 x2 PSNR_Y {r['val_psnr_y']:.3f} dB  SSIM_Y {r['val_ssim_y']:.4f}")
    final = [r for r in _records(out / name) if "val_psnr_y" in r][-1]["val_psnr_y"]
    verdict = "beats" if final > BICUBIC_SET5_X2 else "does NOT beat"
    print(f"final {final:.3f} dB {verdict} bicubic {BICUBIC_SET5_X2} dB")


def finetune(out: Path, steps: int, batch: int, patch: int, lr: float) -> None:
    """The official x2 weights fine-tuned on BSDS200 at a small lr: Set5 should stay near 38.00."""
    name = "finetune-x2"
    job = TrainJob(data=str(SHARED / "train/BSDS200"), scale=2, name=name, storage=str(out), workers=1,
                   batch_size=batch, patch_size=patch, max_steps=steps, val_every=max(1, steps // 4), lr=lr,
                   init_weights=str(SHARED / "weights/PANx2_DF2K.pth"),
                   val_data=str(SHARED / "benchmarks/Set5"))  # fmt: skip
    _fresh(out, name)
    run_training(job)
    for r in (r for r in _records(out / name) if "val_psnr_y" in r):
        print(f"step {r['step']:4d}  Set5 x2 PSNR_Y {r['val_psnr_y']:.4f} dB (official: 38.0007)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("throughput", "scratch", "finetune"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=48)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=2e-6)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results/train")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"needs {SHARED} (weights, BSDS200, Set5); absent here", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "throughput":
        throughput(args.out, args.steps or 60, args.batch_size, args.patch_size)
    elif args.what == "scratch":
        scratch(args.out, args.steps or 1500, args.batch_size, args.patch_size, args.val_every)
    else:
        finetune(args.out, args.steps or 36, args.batch_size, args.patch_size, args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
