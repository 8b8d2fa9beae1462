"""The batch upscaling job on Ray Data: read bytes -> decode (CPU tasks) -> PAN (actor pool) ->
encode (CPU tasks) -> write (PNG tree, Parquet, errors table) -> summary.

The GPU actors only run tensors; decoding and encoding happen in CPU tasks around them. Outputs
are named from input keys, so a re-run skips what exists and a killed run resumes. Every input ends
as exactly one of succeeded, failed (a row in ``DEST/_errors``) or skipped.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline import sinks
from pipeline.errors import InvalidImageError, PipelineError
from pipeline.imaging import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, encode_image
from pipeline.jobspec import JobSpec
from pipeline.raycluster import actor_device, actor_pool, connect, user_error
from pipeline.sources import InputUnit, list_inputs, read_unit


class UpscaleJob(JobSpec):
    """Every setting of an upscaling run; the one place their defaults live."""

    source: str
    dest: str
    scale: Literal[2, 3, 4]
    weights: str | None = None  # None: the default hub weights (eugenesiow/pan)
    format: Literal["png", "parquet", "both"] = "png"
    image_column: str = "image"  # for Parquet shards
    storage_options: dict[str, Any] = Field(default_factory=dict)
    overwrite: bool = False
    max_error_fraction: float | None = Field(default=None, ge=0, le=1)
    device: str = "auto"  # where actors compute: auto (their GPU if given one), cpu, cuda
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tile: int | None = Field(default=None, ge=0)  # None: automatic by memory; 0: whole image
    actors: int | None = Field(default=None, ge=1)  # None: one per GPU, else by CPU count
    actor_cpus: float = Field(default=0.5, gt=0)  # CPUs reserved per CPU actor (fractional)
    images_per_batch: int = Field(default=4, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    png_compress_level: int = Field(default=1, ge=0, le=9)  # zlib 1: 4.5x faster than 6, files 14 % larger
    address: str | None = None  # None: RAY_ADDRESS, else an embedded local Ray


# -- stages (each runs in Ray tasks/actors on batches: dict of column -> numpy array) ---------------


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns = rows[0].keys() if rows else ()
    return {c: np.array([r[c] for r in rows] + [None], dtype=object)[:-1] for c in columns}


def _status(row: dict[str, Any]) -> str:
    return "skipped" if row["skipped"] else "failed" if row["error_type"] else "succeeded"


def _fail(row: dict[str, Any], exc: BaseException) -> None:
    row.update(error_type=type(exc).__name__, error=str(exc), image=None, data=b"")


def read_stage(batch: dict[str, np.ndarray], image_column: str, storage_options: dict[str, Any]) -> dict:
    out = []
    for unit in _rows(batch):
        unit_obj = InputUnit(unit["url"], unit["rel"], unit["kind"], frozenset(unit["done"]))
        for r in read_unit(unit_obj, image_column, storage_options):
            out.append(
                {"key": r.key, "name": r.name, "data": r.data or b"", "skipped": r.skipped,
                 "error_type": r.error_type, "error": r.error, "image": None, "seconds": 0.0,
                 "input_width": 0, "input_height": 0, "input_mode": "", "output_width": 0, "output_height": 0}
            )  # fmt: skip
    return _batch(out)


def decode_stage(batch: dict[str, np.ndarray], max_pixels: int) -> dict:
    rows = _rows(batch)
    for row in rows:
        if row["skipped"] or row["error_type"]:
            continue
        start = time.perf_counter()
        try:
            image = decode_image(row["data"], name=row["key"], max_pixels=max_pixels)
        except InvalidImageError as exc:
            _fail(row, exc)
            continue
        row.update(image=image, data=b"", input_width=image.width, input_height=image.height)
        row.update(input_mode=image.source_mode, seconds=row["seconds"] + time.perf_counter() - start)
    return _batch(rows)


class UpscaleActor:
    """Holds one PAN (loaded once) on its device and upscales decoded images."""

    def __init__(self, job: UpscaleJob, threads: int) -> None:
        import torch

        from pipeline.engine import AUTO, Upscaler
        from pipeline.weights import load_pretrained

        device = actor_device(job.device)
        if device == "cpu":
            # Ray sets OMP_NUM_THREADS to the (fractional, so 1) CPUs an actor reserves; the model
            # is the bottleneck, so let it use its share of the node's cores (measured: 1.9x on 2).
            torch.set_num_threads(threads)
        model = load_pretrained(job.weights, scale=job.scale, storage_options=job.storage_options)
        tile = AUTO if job.tile is None else job.tile
        self.upscaler = Upscaler(model, device=device, precision=job.precision, tile=tile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = _rows(batch)
        for row in rows:
            if not isinstance(row["image"], DecodedImage):  # an all-empty column comes back as NaN
                continue
            start = time.perf_counter()
            try:
                row["image"] = self.upscaler.upscale_image(row["image"])
            except (ValueError, TypeError, RuntimeError) as exc:  # e.g. an image too big for memory
                _fail(row, exc)
                continue
            row["seconds"] += time.perf_counter() - start
        return _batch(rows)


def encode_stage(batch: dict[str, np.ndarray], png_compress_level: int) -> dict:
    rows = _rows(batch)
    for row in rows:
        image = row["image"]
        if not isinstance(image, DecodedImage):
            continue
        start = time.perf_counter()
        row.update(data=encode_image(image, "png", png_compress_level=png_compress_level), image=None)
        row.update(output_width=image.width, output_height=image.height)
        row["seconds"] += time.perf_counter() - start
    return _batch(rows)


def write_stage(batch: dict[str, np.ndarray], job: UpscaleJob, weights_id: str, weights_sha256: str) -> dict:
    rows = _rows(batch)
    done = [r for r in rows if not r["skipped"] and not r["error_type"]]
    for row in done:
        if sinks.wants_png(job.format):
            sinks.write_png(job.dest, row["name"], row["data"], job.storage_options)
    if done and sinks.wants_parquet(job.format):
        records = [
            {**{k: r[k] for k in ("key", "name", "input_width", "input_height", "input_mode",
                                  "output_width", "output_height", "seconds")},
             "scale": job.scale, "weights_id": weights_id, "weights_sha256": weights_sha256, "png": r["data"]}
            for r in done
        ]  # fmt: skip
        sinks.write_parquet_part(job.dest, records, job.storage_options)
    for row in rows:
        if row["error_type"]:
            sinks.write_error(
                job.dest, row["key"], row["name"], row["error_type"], row["error"], job.storage_options
            )
    return _batch(
        [
            {"key": r["key"], "status": _status(r), "input_pixels": r["input_width"] * r["input_height"],
             "output_pixels": r["output_width"] * r["output_height"], "seconds": r["seconds"]}
            for r in rows
        ]
    )  # fmt: skip


# -- driver ---------------------------------------------------------------------------------------


def _weights_identity(job: UpscaleJob) -> tuple[str, str]:
    """Load the weights once on the driver: fails fast on bad weights and names them for the sink."""
    from pipeline.weights import load_pretrained

    info = load_pretrained(job.weights, scale=job.scale, storage_options=job.storage_options).weights_info
    return info.id, info.sha256


def plan(job: UpscaleJob) -> tuple[list[InputUnit], list[tuple[str, str]], int]:
    """(units to read, name collisions as (key, name), count of inputs skipped as done)."""
    units = list_inputs(job.source, job.storage_options)
    done = set() if job.overwrite else sinks.existing_outputs(job.dest, job.format, job.storage_options)
    names = Counter(u.name for u in units if u.kind == "image")
    todo, collisions, skipped = [], [], 0
    seen: set[str] = set()
    for unit in units:
        if unit.kind == "image":
            if names[unit.name] > 1 and unit.name in seen:
                collisions.append((unit.rel, unit.name))
                continue
            seen.add(unit.name)
            if unit.name in done:
                skipped += 1
                continue
            todo.append(unit)
        else:
            prefix = unit.member_prefix
            todo.append(
                InputUnit(unit.url, unit.rel, unit.kind, frozenset(n for n in done if n.startswith(prefix)))
            )
    return todo, collisions, skipped


def model_pool(job: UpscaleJob, units: int) -> dict[str, Any]:
    """The model actors for ``units`` inputs to read: one per GPU where the cluster has GPUs; else one
    CPU actor per CPU, unless ``job.actors`` says how many; never more actors than inputs. On the CPU
    each computes on its share of the cores (``threads``): one torch thread by default.

    On the CPU, one single-threaded actor per core beats fewer multi-threaded ones: PAN scales
    linearly over processes, while OpenMP threads stall at every barrier when a decode or encode
    task takes their core (measured on 2 cores: 1.35 vs 1.02 output MP/s, benchmarks/README.md).
    """
    import ray

    pool = actor_pool(job.actors, job.actor_cpus)
    pool["size"] = max(1, min(pool["size"], units))
    pool["threads"] = max(1, int(ray.cluster_resources().get("CPU", 1) // pool["size"]))
    return pool


IMAGES_PER_READ_TASK = 16


def read_blocks(todo: list[InputUnit], actors: int) -> int:
    """How many read (+ decode) tasks: one per shard, or per ``IMAGES_PER_READ_TASK`` single images,
    but at least two per model actor (as inputs allow) so that every actor gets work.

    Reading and decoding an image takes about a millisecond while a Ray task costs tens of them:
    with one task per image or two, task overhead took the CPU that encoding needed on a small
    machine.
    """
    per_task = 1 if any(u.kind != "image" for u in todo) else IMAGES_PER_READ_TASK
    return max(1, min(len(todo), max(-(-len(todo) // per_task), 2 * actors)))


def build_dataset(job: UpscaleJob, todo: list[InputUnit], weights_id: str, weights_sha256: str):
    """The lazy Ray Dataset: read -> decode -> PAN actors -> encode -> write, one status row per input."""
    import ray.data

    items = [{"url": u.url, "rel": u.rel, "kind": u.kind, "done": sorted(u.done)} for u in todo]
    pool = model_pool(job, len(todo))
    per_image = {"batch_size": job.images_per_batch, "udf_modifying_row_count": False}
    read_args = {"image_column": job.image_column, "storage_options": job.storage_options}
    write_args = {"job": job, "weights_id": weights_id, "weights_sha256": weights_sha256}
    return (
        ray.data.from_items(items, override_num_blocks=read_blocks(todo, pool["size"]))
        .map_batches(read_stage, batch_size=8, fn_kwargs=read_args)
        .map_batches(decode_stage, fn_kwargs={"max_pixels": job.max_pixels}, **per_image)
        .map_batches(
            UpscaleActor,
            fn_constructor_kwargs={"job": job, "threads": pool["threads"]},
            compute=ray.data.ActorPoolStrategy(size=pool["size"]),
            num_gpus=pool["num_gpus"],
            num_cpus=pool["num_cpus"],
            **per_image,
        )
        .map_batches(encode_stage, fn_kwargs={"png_compress_level": job.png_compress_level}, **per_image)
        .map_batches(write_stage, fn_kwargs=write_args, **per_image)
    )


def run_upscale(job: UpscaleJob, on_progress: Callable[[Counter], None] | None = None) -> dict[str, Any]:
    """Run the job; returns the summary (also written to ``DEST/_summary.json``)."""
    import ray.data

    started = time.perf_counter()
    todo, collisions, skipped = plan(job)
    with ThreadPoolExecutor(max_workers=1) as side:
        identity = side.submit(_weights_identity, job)  # torch import + load, while Ray starts
        if todo:
            connect(job.address, dashboard=False)
        weights_id, weights_sha256 = identity.result()
    sinks.prepare_dest(job.dest, job.format, overwrite=job.overwrite, storage_options=job.storage_options)
    for key, name in collisions:
        message = f"{key}: its output name {name} is taken by another input; rename one of them"
        sinks.write_error(job.dest, key, name, "OutputNameCollision", message, job.storage_options)
    counts = Counter(skipped=skipped, failed=len(collisions))
    pixels = Counter()
    if todo:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = build_dataset(job, todo, weights_id, weights_sha256)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                counts.update(batch["status"].tolist())
                pixels.update(
                    input=int(batch["input_pixels"].sum()), output=int(batch["output_pixels"].sum())
                )
                if on_progress:
                    on_progress(counts)
        except Exception as exc:  # a task or actor failed: surface the user's error, if it is one
            raise (user_error(exc) or exc) from None
    seconds = time.perf_counter() - started
    summary = {
        "inputs": counts["succeeded"] + counts["failed"] + counts["skipped"],
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "input_megapixels": pixels["input"] / 1e6,
        "output_megapixels": pixels["output"] / 1e6,
        "seconds": seconds,
        "output_megapixels_per_second": pixels["output"] / 1e6 / seconds if seconds else 0.0,
    }
    sinks.write_summary(job.dest, summary, job.storage_options)
    return summary


def check_error_fraction(job: UpscaleJob, summary: dict[str, Any]) -> None:
    """Raise when more than ``max_error_fraction`` of the inputs failed."""
    if job.max_error_fraction is None or not summary["inputs"]:
        return
    fraction = summary["failed"] / summary["inputs"]
    if fraction > job.max_error_fraction:
        raise PipelineError(
            f"{summary['failed']} of {summary['inputs']} inputs failed ({fraction:.1%}), over "
            f"--max-error-fraction {job.max_error_fraction:.1%}; see {job.dest}/_errors"
        )
