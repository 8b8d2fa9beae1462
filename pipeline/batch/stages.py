"""The stages of the batch upscaling job on Ray Data: read -> decode -> PAN -> encode -> write."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from typing import Any

import numpy as np

from pipeline.batch import sinks
from pipeline.batch.sources import InputUnit, read_unit
from pipeline.config.settings import UpscaleJob
from pipeline.errors import InvalidImageError
from pipeline.imaging import DecodedImage, decode_image, encode_image, imresize
from pipeline.io.storage import Files, join
from pipeline.ray_runtime.pool import (
    ActorPool,
    actor_upscaler,
    model_stage,
)


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns = rows[0].keys() if rows else ()
    return {c: np.array([r[c] for r in rows] + [None], dtype=object)[:-1] for c in columns}


def _fail(row: dict[str, Any], exc: BaseException) -> None:
    row.update(error_type=type(exc).__name__, error=str(exc), image=None, output=None, data=b"")


def _image(value: Any) -> DecodedImage | None:
    """An image column's value; Ray Data may hand an all-None column on as NaN.

    Images travel between stages as ``DecodedImage`` objects, not as bare numpy columns: Ray Data
    turns a column of arrays into an Arrow tensor column, which needs one dtype and one number of
    dimensions per block (uint8 and uint16, gray and RGB images mix here) and cannot join a block
    whose column is all None (a batch of failed reads); it then fails the whole run."""
    return value if isinstance(value, DecodedImage) else None


def read_stage(
    batch: dict[str, np.ndarray], wanted: tuple[str, ...], image_column: str, files: Files
) -> dict:
    """Source files -> one row per input, with its raw bytes and what the run ledger needs to know
    of the file it came from (``unit*``)."""
    out = []
    for unit in _rows(batch):
        written = {s: frozenset(names) for s, names in json.loads(unit["written"]).items()}
        taken = json.loads(unit["taken"])
        unit_obj = InputUnit(
            unit["url"], unit["rel"], unit["kind"], unit["size"], unit["version"], written, taken
        )
        rows = list(read_unit(unit_obj, wanted, image_column, files))
        for r in rows:
            out.append(
                {"key": r.key, "name": r.name, "data": r.data or b"", "sinks": ",".join(r.sinks),
                 "done_sinks": ",".join(s for s in wanted if r.name in written.get(s, ())),
                 "unit": unit["rel"], "unit_size": unit["size"], "unit_version": unit["version"],
                 "unit_rows": len(rows),
                 "input_sha256": hashlib.sha256(r.data).hexdigest() if r.data else "",
                 "error_type": r.error_type, "error": r.error, "seconds": 0.0, "precision": "",
                 "image": None, "output": None,
                 "psnr_vs_bicubic": None,
                 "input_width": 0, "input_height": 0, "input_mode": "", "output_width": 0, "output_height": 0}
            )  # fmt: skip
    return _batch(out)


def decode_stage(batch: dict[str, np.ndarray], max_pixels: int) -> dict:
    rows = _rows(batch)
    for row in rows:
        if not row["sinks"] or row["error_type"]:
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
    """Holds one PAN (loaded once) on its device; upscales a batch's pixels in one engine call
    (``Upscaler.upscale_many``), so windows of equal shape share forward passes. The alpha
    channels are enlarged in the encode stage, on CPU tasks. With ``precision=auto``, the pool's
    actors agree on one precision per kind of device (``choices``: ``raycluster.precision_choices``)."""

    def __init__(self, job: UpscaleJob, threads: int, choices: Any | None = None) -> None:
        self.upscaler = actor_upscaler(job, job.scale, threads, choices, job.files)
        # A GPU actor takes two calls at once (``actor_pool``): Ray prepares one while the model
        # runs the other. The engine computes one call at a time anyway; holding the turn here
        # too keeps a call's waiting out of its rows' seconds.
        self._model_lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = _rows(batch)
        todo = [row for row in rows if _image(row["image"]) is not None]
        with self._model_lock:
            start = time.perf_counter()
            try:
                outputs = self.upscaler.upscale_many([row["image"].pixels for row in todo])
            except (ValueError, TypeError, RuntimeError):  # e.g. out of memory: find which, one by one
                outputs = []
                for row in todo:
                    try:
                        outputs.append(self.upscaler.upscale(row["image"].pixels))
                    except (ValueError, TypeError, RuntimeError) as exc:
                        outputs.append(exc)
            seconds = time.perf_counter() - start
        pixels = sum(row["image"].pixels.size for row in todo) or 1
        for row, output in zip(todo, outputs, strict=True):
            if isinstance(output, Exception):
                _fail(row, output)
                continue
            # "image" stays: the quality gate compares with it, and its alpha is enlarged
            row["output"] = dataclasses.replace(row["image"], pixels=output, alpha=None)
            row["seconds"] += seconds * row["image"].pixels.size / pixels
            row["precision"] = self.upscaler.precision
        return _batch(rows)


def psnr_vs_bicubic(source: np.ndarray, output: np.ndarray) -> float:
    """The quality gate's measure (not a paper metric, see ``pipeline.core.metrics`` for those): PSNR of
    an output against Pillow's bicubic upscale of its input to the same size, over all channels,
    with the peak of the pixels' dtype. Plausible outputs stay near bicubic; outputs PAN blew up and
    clamping hid are far from it. Measured with the official weights (benchmarks/quality_gate.py):
    Set5, Set14 and 20 BSDS200 photos at least 26.6 dB at x2 and 22.4 dB at x4 (medians 32.5 and
    29.8); uniform and strong Gaussian noise, salt-and-pepper and a 1-px checkerboard 4-11 dB."""
    from PIL import Image

    height, width = output.shape[:2]
    peak = float(np.iinfo(output.dtype).max)
    sources = source[..., None] if source.ndim == 2 else source
    outputs = output[..., None] if output.ndim == 2 else output
    squares = 0.0
    for c in range(sources.shape[2]):  # in place, one plane at a time: 1.8x faster than whole arrays
        plane = Image.fromarray(sources[..., c].astype(np.float32), "F").resize(
            (width, height), Image.BICUBIC
        )
        error = np.clip(np.asarray(plane), 0, peak)
        error -= outputs[..., c]
        squares += float(np.dot(error.ravel(), error.ravel()))
    mse = squares / output.size
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def encode_stage(batch: dict[str, np.ndarray], png_compress_level: int, gate: bool) -> dict:
    """Upscaled pixels -> PNG bytes, with the alpha channel enlarged (bicubic) and the quality
    gate's measure; the images are dropped."""
    rows = _rows(batch)
    for row in rows:
        output, source = _image(row["output"]), _image(row["image"])
        if output is None or source is None:
            continue
        start = time.perf_counter()
        if gate:
            row["psnr_vs_bicubic"] = psnr_vs_bicubic(source.pixels, output.pixels)
        if source.alpha is not None:
            output = dataclasses.replace(output, alpha=imresize(source.alpha, output.height / source.height))
        row.update(data=encode_image(output, "png", png_compress_level=png_compress_level))
        row.update(image=None, output=None, output_width=output.width, output_height=output.height)
        row["seconds"] += time.perf_counter() - start
    return _batch(rows)


def write_stage(batch: dict[str, np.ndarray], dest: str, overwrite: bool, files: Files) -> dict:
    """Write each finished row's PNG where the PNG tree lacks it, and pass every row on to the
    driver, which records it in the run ledger with its Parquet row (``pipeline.batch.ledger``): a PNG
    is always written before its entry. A sink that cannot be written raises ``StorageError``,
    which ends the run with one line."""
    rows = _rows(batch)
    for row in rows:
        wanted = row["sinks"].split(",") if row["sinks"] else []
        if "png" in wanted and not row["error_type"]:
            sinks.write_png(dest, row["name"], row["data"], files)
        if (
            row["error_type"] and overwrite and "png" in wanted
        ):  # no output made now: none of the old settings stays
            files.remove(join(dest, row["name"]))
        if "parquet" not in wanted or row["error_type"]:
            row["data"] = b""  # the driver needs the PNG only for the Parquet row
        row.pop("image", None)
        row.pop("output", None)
    return _batch(rows)


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


def build_dataset(job: UpscaleJob, todo: list[InputUnit], pool: ActorPool):
    """The lazy Ray Dataset: read -> decode -> PAN actors (``pool``) -> encode -> write PNG,
    one row per input for the driver to record (``Recorder``)."""
    import ray.data

    items = [
        {"url": u.url, "rel": u.rel, "kind": u.kind, "size": u.size, "version": u.version,
         "written": json.dumps({s: sorted(names) for s, names in u.written.items()}),
         "taken": json.dumps(dict(u.taken))}
        for u in todo
    ]  # fmt: skip
    per_image = {"batch_size": job.images_per_batch, "udf_modifying_row_count": False}
    read_args = {"wanted": job.sinks, "image_column": job.image_column, "files": job.files}
    write_args = {"dest": job.dest, "overwrite": job.overwrite, "files": job.files}
    encode_args = {"png_compress_level": job.png_compress_level, "gate": job.min_psnr_vs_bicubic is not None}
    decoded = (
        ray.data.from_items(items, override_num_blocks=read_blocks(todo, pool.size))
        .map_batches(read_stage, batch_size=None, fn_kwargs=read_args)  # a read task: one block
        .map_batches(decode_stage, fn_kwargs={"max_pixels": job.max_pixels}, **per_image)
    )
    batch = job.images_per_batch
    upscaled = model_stage(decoded, UpscaleActor, pool, job.precision, batch_size=batch, job=job)
    encoded = upscaled.map_batches(encode_stage, fn_kwargs=encode_args, **per_image)
    return encoded.map_batches(write_stage, fn_kwargs=write_args, **per_image)
