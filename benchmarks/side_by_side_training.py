"""Our ``pan train`` beside the authors' ``codes/train.py`` (zhaohengyuan1/PAN): the same data,
scale, patch size, batch, seed and schedule; Set5 PSNR_Y at the same steps, every checkpoint scored
by one evaluator (ours: Y from 0-255 RGB, crop = scale, fp32, outputs rounded to 8 bits), and
seconds per step (median, and the 10th percentile: the machine's quiet moments).

    .venv/bin/python benchmarks/side_by_side_training.py --authors-tree PAN --authors-python PY \\
        [--scale 2 --steps 300 --eval-every 100 --batch 8 --lr-patch 32 --seeds 10 11]

The authors' trainer needs a checkout of github.com/zhaohengyuan1/PAN (checked at 4d045d1; it has no
licence file, so it is not copied here) and an environment of its own::

    python3 -m venv authors-venv && authors-venv/bin/pip install torch==2.13.0
    authors-venv/bin/pip install numpy opencv-python-headless pyyaml lmdb tensorboard

and runs through ``authors_trainer.py`` (three shims for a CPU, their files unchanged).

The data, made once under ``--work``: each BSDS200 photo decoded once, cut to a multiple of the
scale, into sub-images by the rule of their ``extract_subimages.py`` (``--crop``/``--step``/
``--thres``; 240/120/48 by default, as the photos are smaller than their 360), HR and its MATLAB
bicubic LR (``pipeline.imaging.resize.imresize`` of the whole image, cut at the same place, as their
'pair' mode does with DF2K's official LR) as PNGs of the same names: both trainers read the same
bytes, neither decodes a JPEG or resizes.

The same for both: Adam(0.9, 0.99), lr 7e-4, cosine period ``--period`` (the paper's 250k: nearly
flat over a short run) to 1e-7, L1, no warm-up, no EMA, the seed (so the same initial weights:
both seed torch, then build PAN with PyTorch's default init). Different by construction: the
patch and flip random streams (theirs Python's ``random``, ours torch's), so compare over seeds,
not step by step; threads (theirs ``--threads``; ours one per Ray Train worker).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from images import SHARED  # benchmarks/images.py
from PIL import Image

HERE = Path(__file__).resolve().parent
STAMP = re.compile(r"^(\d\d-\d\d-\d\d \d\d:\d\d:\d\d\.\d\d\d) - INFO: (.*)$")
ITER = re.compile(r"iter:\s*([\d,]+), lr:\(([^,]+),\)\] l_pix: (\S+)")
SKIP = 3  # warm-up steps left out of the step times


def prepare(out: Path, scale: int, crop: int, step: int, thres: int) -> int:
    """BSDS200 as HR/LR PNG sub-images under ``out``; returns the pairs' count."""
    from pipeline.imaging.resize import imresize

    def starts(length: int) -> list[int]:  # extract_subimages.py's rule along one axis
        space = list(range(0, length - crop + 1, step))
        return [*space, length - crop] if length - (space[-1] + crop) > thres else space

    (out / "HR").mkdir(parents=True, exist_ok=True)
    (out / "LR").mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted((SHARED / "train/BSDS200").glob("*.jpg")):
        hr = np.asarray(Image.open(path).convert("RGB"))
        hr = np.ascontiguousarray(hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale])
        lr = imresize(hr, 1 / scale)
        cuts = [(y, x) for y in starts(hr.shape[0]) for x in starts(hr.shape[1])]
        for i, (y, x) in enumerate(cuts, 1):
            name = f"{path.stem}_s{i:03d}.png"
            Image.fromarray(hr[y : y + crop, x : x + crop]).save(out / "HR" / name, compress_level=1)
            c, ly, lx = crop // scale, y // scale, x // scale
            Image.fromarray(lr[ly : ly + c, lx : lx + c]).save(out / "LR" / name, compress_level=1)
            count += 1
    return count


def run_authors(a: argparse.Namespace, data: Path, seed: int) -> dict:
    """Their trainer on a private copy of their tree (train.py writes experiments/ into it), with
    their own train_PANx{s}.yml changed only in data, sizes, length, seed and cadence."""
    name = f"authors-x{a.scale}-s{seed}"
    tree = a.work / "PAN"
    if not tree.exists():
        shutil.copytree(
            a.authors_tree, tree, ignore=shutil.ignore_patterns("experiments", "results", "datasets")
        )
    shutil.rmtree(tree / "experiments" / name, ignore_errors=True)
    opt = yaml.safe_load((tree / f"codes/options/train/train_PANx{a.scale}.yml").read_text())
    opt["name"] = name
    opt["datasets"]["train"].update(dataroot_GT=str(data / "HR"), dataroot_LQ=str(data / "LR"), n_workers=0,
                                    batch_size=a.batch, GT_size=a.lr_patch * a.scale)  # fmt: skip
    set5 = SHARED / "benchmarks/Set5"
    opt["datasets"]["val"].update(
        dataroot_GT=str(set5 / "HR"), dataroot_LQ=str(set5 / f"LR_bicubic/X{a.scale}")
    )
    opt["train"].update(niter=a.steps, manual_seed=seed, val_freq=10**9, T_period=[a.period] * 4,
                        restarts=[a.period * k for k in (1, 2, 3)])  # fmt: skip
    opt["logger"].update(print_freq=1, save_checkpoint_freq=a.eval_every)
    options = a.work / f"{name}.yml"
    options.write_text(yaml.safe_dump(opt, sort_keys=False))
    command = [a.authors_python, str(HERE / "authors_trainer.py"), "-opt", str(options), "--threads", "1"]
    started = time.perf_counter()
    run = subprocess.run(
        command, env={**os.environ, "PAN_CODES": str(tree / "codes")}, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    (a.work / f"{name}.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise SystemExit(f"the authors' trainer failed ({run.returncode}): {a.work / name}.log")
    experiment = tree / "experiments" / name
    steps = []
    for line in next(experiment.glob("*train_*.log")).read_text().splitlines():
        if (stamp := STAMP.match(line)) and (it := ITER.search(stamp.group(2))):
            when = datetime.strptime(stamp.group(1), "%y-%m-%d %H:%M:%S.%f").timestamp()
            steps.append({"step": int(it.group(1).replace(",", "")), "t": when, "loss": float(it.group(3))})
    saved = {
        int(p.name.split("_")[0]): p for p in (experiment / "models").glob("*_G.pth") if p.name[0].isdigit()
    }
    return {"steps": steps, "psnr": {k: psnr_y(p, a.scale) for k, p in sorted(saved.items())}, "wall": wall}


def run_ours(a: argparse.Namespace, data: Path, seed: int) -> dict:
    """``pan train`` with the same settings, one Ray Train worker (one thread)."""
    name = f"ours-x{a.scale}-s{seed}"
    shutil.rmtree(a.work / "runs" / name, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "train", "--data", str(data / "HR"),
               "--lr-data", str(data / "LR"), "--scale", str(a.scale), "--workers", "1",
               "--max-steps", str(a.steps), "--batch-size", str(a.batch),
               "--patch-size", str(a.lr_patch), "--restart-every", str(a.period), "--seed", str(seed),
               "--val-data", str(SHARED / "benchmarks/Set5"), "--val-every", str(a.eval_every),
               "--log-every", "1", "--storage", str(a.work / "runs"), "--name", name]  # fmt: skip
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - started
    (a.work / f"{name}.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise SystemExit(f"pan train failed ({run.returncode}): {a.work / name}.log")
    rows = [json.loads(line) for line in (a.work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": r["step"], "t": r["seconds"], "loss": r["loss"]} for r in rows]
    return {
        "steps": steps,
        "psnr": {r["step"]: r["val_psnr_y"] for r in rows if "val_psnr_y" in r},
        "wall": wall,
    }


def psnr_y(state: Path, scale: int) -> float:
    """Set5 PSNR_Y of the authors' checkpoint (a plain state dict of the same PAN), scored as our
    trainer validates."""
    from pipeline.config.builder import build_upscaler
    from pipeline.config.settings import InferenceSpec
    from pipeline.core.model import PAN
    from pipeline.evaluation.scoring import evaluate
    from pipeline.io.pairs import load_benchmark

    model = PAN(scale=scale)
    model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
    upscaler = build_upscaler(
        InferenceSpec(precision="fp32"), scale, files=None, model=model.eval(), device="cpu"
    )
    return evaluate(upscaler, "Set5", load_benchmark(str(SHARED / "benchmarks/Set5"), scale)[1]).psnr_y


def step_seconds(steps: list[dict], every: int, quantile: float) -> float:
    """A quantile of the step times after ``SKIP`` steps, leaving out the steps after an evaluation."""
    times = sorted(
        b["t"] - a["t"] for a, b in itertools.pairwise(steps) if a["step"] >= SKIP and a["step"] % every
    )
    return times[min(len(times) - 1, int(quantile * len(times)))] if times else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors-tree", type=Path, required=True, help="a checkout of zhaohengyuan1/PAN")
    ap.add_argument("--authors-python", required=True, help="the python of the authors' environment")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr-patch", type=int, default=32, help="LR patch px (their GT_size: scale x this)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11])
    ap.add_argument("--period", type=int, default=250_000, help="cosine period (the paper's 250000)")
    ap.add_argument("--crop", type=int, default=240)
    ap.add_argument("--step", type=int, default=120)
    ap.add_argument("--thres", type=int, default=48)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pan-side-by-side"))
    a = ap.parse_args()
    if not (a.authors_tree / "codes/train.py").is_file() or not Path(a.authors_python).is_file():
        raise SystemExit(
            f"needs the authors' tree ({a.authors_tree}/codes/train.py) and python ({a.authors_python})"
        )
    data = a.work / f"data-x{a.scale}-{a.crop}-{a.step}-{a.thres}"
    if not (data / "LR").is_dir():
        print(f"{prepare(data, a.scale, a.crop, a.step, a.thres)} sub-image pairs in {data}", flush=True)
    runs = []
    for seed in a.seeds:
        for who, run in (("authors", run_authors), ("ours", run_ours)):  # alternated: both see the same load
            load = os.getloadavg()[0]
            result = run(a, data, seed)
            row = {"trainer": who, "seed": seed, "load": round(load, 1), "wall_s": round(result["wall"], 1),
                   "s_per_step": round(step_seconds(result["steps"], a.eval_every, 0.5), 4),
                   "s_per_step_p10": round(step_seconds(result["steps"], a.eval_every, 0.1), 4),
                   "set5_psnr_y": {k: round(v, 4) for k, v in sorted(result["psnr"].items())}}  # fmt: skip
            print(json.dumps(row), flush=True)
            runs.append(row)
    print(table(runs))


def table(runs: list[dict]) -> str:
    steps = sorted({k for r in runs for k in r["set5_psnr_y"]})
    lines = ["| trainer | seed | s/step (median, p10) | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|" + "---|" * (3 + len(steps))]  # fmt: skip
    for r in runs:
        cells = " | ".join(f"{r['set5_psnr_y'].get(s, float('nan')):.3f}" for s in steps)
        lines.append(
            f"| {r['trainer']} | {r['seed']} | {r['s_per_step']:.3f}, {r['s_per_step_p10']:.3f} | {cells} |"
        )
    for who in ("authors", "ours"):
        mine = [r for r in runs if r["trainer"] == who]
        cells = " | ".join(f"{statistics.mean(r['set5_psnr_y'][s] for r in mine):.3f}" for s in steps)
        lines.append(
            f"| **{who}, mean** | | {statistics.mean(r['s_per_step'] for r in mine):.3f} | {cells} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
