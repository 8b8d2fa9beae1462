"""Training input (issue 27): patch pairs per CPU-second from a prepared set, against decoding an
image pair per patch (``PatchDataset``), at x2 and x4, in one run.

    .venv/bin/python benchmarks/prepared_input.py [--images 50] [--batches 300] [--work DIR]

The set: the first ``--images`` BSDS200 photos (481x321 JPEGs), enlarged with Pillow bicubic to
DIV2K's size, 2040x1356 (1356x2040 when upright), saved as PNG at zlib level 6. HR only, as
DIV2K's HR zip: LR is made with the MATLAB bicubic. Patches: 64 px LR, batches of 32.

What is measured, each in patch pairs per CPU-second (user + system time of this process and of
every process it started, Ray's included, so other work on the machine does not count):
1. ``PatchDataset`` over the folder (``open_pairs``), ``cache_images=0``: DIV2K's regime, whose 800
   pairs are 12 times a loader's 64-pair cache; one process, as a DataLoader worker runs it;
2. ``pan prepare`` of the folder at x2 and x4 (crop 360, step 180) on Ray Data: images per second;
3. the prepared set, memory-mapped, cut by ``PrefetchedBatches`` (what a Ray Train worker runs);
4. the prepared set through Ray Data's streaming ingest, as ``get_dataset_shard`` feeds a worker:
   a row per sub-image, shuffled, ``map_batches`` cutting one patch from each, ``iter_torch_batches``;
5. the copy of one 256-px HR patch under each of the 8 flips/rotations into a channels-first array
   (what ``PatchSampler`` does) and into a channels-last one, in microseconds, mean of the 8.
The set's files are in the page cache (just written, or read by the warm-up): a node that has
mapped its share once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import SHARED

DIV2K_SIZE = (2040, 1356)  # width, height of a landscape DIV2K image
SCALES = (2, 4)
PATCH, BATCH = 64, 32


def _cpu_seconds() -> float:
    """User + system seconds of this process and its descendants alive now (Ray's processes)."""
    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` DIV2K-sized PNGs from BSDS200 (kept when ``folder`` holds them already)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for source in sorted((SHARED / "train/BSDS200").glob("*.jpg"))[:count]:
        target = folder / f"{source.stem}.png"
        if not target.exists():
            with Image.open(source) as photo:
                size = DIV2K_SIZE if photo.width >= photo.height else DIV2K_SIZE[::-1]
                photo.convert("RGB").resize(size, Image.BICUBIC).save(target, compress_level=6)
        made.append(target)
    return made


def pairs_rate(folder: Path, scale: int, patches: int) -> float:
    """Patch pairs per CPU-second of ``PatchDataset`` without a cache (one decode per patch)."""
    import torch

    from pipeline.io.pairs import open_pairs
    from pipeline.training.patches import PatchDataset

    torch.manual_seed(0)
    dataset = PatchDataset(open_pairs(str(folder), scale), scale, PATCH, cache_images=0)
    order = torch.randperm(len(dataset)).tolist()
    started = time.process_time()
    for i in range(patches):
        dataset[order[i % len(order)]]
    return patches / (time.process_time() - started)


def prepare(folder: Path, dest: Path) -> dict[str, float]:
    from pipeline.config.settings import PrepareJob
    from pipeline.training.prepare import run_prepare

    job = PrepareJob(sources=(str(folder),), dest=str(dest), scale=SCALES)
    cpu, wall = _cpu_seconds(), time.perf_counter()
    summary = run_prepare(job)
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    return {"images": summary.inputs, "written": summary.written, "sub_images": summary.sub_images,
            "gigabytes": summary.bytes / 1e9, "wall_s": wall, "cpu_s": cpu}  # fmt: skip


def prefetched_rate(dest: Path, scale: int, batches: int) -> tuple[float, float]:
    """(patch pairs per CPU-second, per wall second) of ``PrefetchedBatches`` over the whole set."""
    from pipeline.io.storage import Files
    from pipeline.training.inputs import PrefetchedBatches
    from pipeline.training.prepared import open_prepared

    prepared = open_prepared(str(dest), Files())
    sampler = prepared.sampler(prepared.shares(1)[0], scale, Files(), seed=(0, 0, 0))
    stream = PrefetchedBatches(sampler, BATCH, PATCH)
    try:
        for _ in range(batches // 4):  # warm-up: the thread starts, pages come into memory
            next(stream)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(stream)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        stream.close()
    return batches * BATCH / cpu, batches * BATCH / wall


class _Cut:
    """Ray Data stage: one random aligned, flipped/rotated patch pair from each sub-image row; an
    actor, so that its shards stay mapped from batch to batch."""

    def __init__(self, root: str, scale: int) -> None:
        self.root, self.scale, self.rng = root, scale, np.random.default_rng()
        self.mapped: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _arrays(self, shard: str) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.training.prepared import HR_NAME, lr_name, shard_file

        if shard not in self.mapped:
            self.mapped[shard] = tuple(
                np.load(Path(self.root, shard_file(shard, name)), mmap_mode="r")
                for name in (HR_NAME, lr_name(self.scale))
            )
        return self.mapped[shard]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.training.prepared import PatchSampler

        arrays = [self._arrays(str(shard)) for shard in batch["shard"]]
        hr = [a[0][int(i) : int(i) + 1] for a, i in zip(arrays, batch["item"], strict=True)]
        lr = [a[1][int(i) : int(i) + 1] for a, i in zip(arrays, batch["item"], strict=True)]
        lr_patches, hr_patches = PatchSampler(hr, lr, self.scale, self.rng).batch(len(hr), PATCH)
        return {"lr": lr_patches, "hr": hr_patches}


def ray_data_rate(dest: Path, scale: int, batches: int) -> tuple[float, float]:
    """(patch pairs per CPU-second, per wall second) through Ray Data's streaming ingest."""
    import ray.data

    from pipeline.io.storage import Files
    from pipeline.training.prepared import open_prepared

    prepared = open_prepared(str(dest), Files())
    rows = [{"shard": s.name, "item": i} for s in prepared.shards for i in range(s.crops)]
    dataset = (
        ray.data.from_items(rows)
        .random_shuffle()
        .map_batches(
            _Cut,
            fn_constructor_kwargs={"root": str(dest), "scale": scale},
            batch_size=BATCH,
            # fractional CPUs: whole-CPU actors on a small machine starve the read and shuffle tasks
            compute=ray.data.ActorPoolStrategy(size=psutil.cpu_count()),
            num_cpus=0.5,
        )
    )
    stream = iter(dataset.iter_torch_batches(batch_size=BATCH))
    warm = min(batches // 4, len(rows) // BATCH // 4)
    for _ in range(warm):
        next(stream)
    cpu, wall, taken = _cpu_seconds(), time.perf_counter(), 0
    for batch in stream:
        taken += len(batch["lr"])
        if taken >= batches * BATCH:
            break
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    return taken / cpu, taken / wall


def transform_copy_us(dest: Path, repeat: int = 200) -> tuple[float, float]:
    """(channels-first, channels-last) CPU microseconds to copy one 256-px HR patch out of a mapped
    sub-image under one of the 8 transforms, the mean of the 8."""
    from pipeline.training.prepared import HR_NAME, dihedral, shard_file

    shard = sorted((dest / "shards").glob("*/*/" + HR_NAME))[0].parent.relative_to(dest / "shards").as_posix()
    patch = np.load(dest / shard_file(shard, HR_NAME), mmap_mode="r")[0, :256, :256]
    first, last = np.empty((3, 256, 256), np.uint8), np.empty((256, 256, 3), np.uint8)
    means = []
    for out, layout in ((first, (2, 0, 1)), (last, (0, 1, 2))):
        started = time.process_time()
        for _ in range(repeat):
            for k in range(8):
                out[...] = dihedral(patch, k).transpose(layout)
        means.append((time.process_time() - started) / repeat / 8 * 1e6)
    return means[0], means[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=50, help="DIV2K-sized images made from BSDS200")
    parser.add_argument("--batches", type=int, default=300, help="batches of 32 measured per prepared reader")
    parser.add_argument("--pair-patches", type=int, default=40, help="patches measured from image pairs")
    parser.add_argument("--work", type=Path, help="keep the images and the set here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    if not (SHARED / "train/BSDS200").is_dir():
        print(f"SKIPPED: needs {SHARED}/train/BSDS200", file=sys.stderr)
        return 0
    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="pan-prepared-input-"))
    figures: dict[str, object] = {}
    try:
        made = make_images(work / "images", args.images)
        print(f"{len(made)} DIV2K-sized PNGs (BSDS200, Pillow bicubic to {DIV2K_SIZE[0]}x{DIV2K_SIZE[1]})")
        ray.init(num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False)
        figures["prepare"] = prep = prepare(work / "images", work / "prepared")
        print(f"pan prepare x2+x4: {prep['images']} images ({prep['written']} written) -> "
              f"{prep['sub_images']} sub-images, {prep['gigabytes']:.2f} GB, {prep['wall_s']:.1f} s wall, "
              f"{prep['cpu_s']:.1f} CPU-s")  # fmt: skip
        for scale in SCALES:
            old = pairs_rate(work / "images", scale, args.pair_patches)
            new_cpu, new_wall = prefetched_rate(work / "prepared", scale, args.batches)
            rd_cpu, rd_wall = ray_data_rate(work / "prepared", scale, args.batches)
            figures[f"x{scale}"] = {"pairs": old, "prefetched": new_cpu, "prefetched_wall": new_wall,
                                    "ray_data": rd_cpu, "ray_data_wall": rd_wall}  # fmt: skip
            print(f"x{scale}, {PATCH}-px LR patch pairs per CPU-second: image pairs {old:.1f} | prepared, "
                  f"memory-mapped {new_cpu:.0f} ({new_cpu / old:.0f}x; {new_wall:.0f}/s wall) | prepared, "
                  f"Ray Data ingest {rd_cpu:.0f} ({rd_wall:.0f}/s wall)")  # fmt: skip
        first, last = transform_copy_us(work / "prepared")
        figures["transform_copy_us"] = {"channels_first": first, "channels_last": last}
        print(f"one 256-px HR patch under a flip/rotation: {first:.0f} us into channels-first, {last:.0f} us "
              "into channels-last (mean of the 8)")  # fmt: skip
    finally:
        ray.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
