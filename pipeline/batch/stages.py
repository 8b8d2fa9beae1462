"""The stages of the batch upscaling job on Ray Data: read -> decode -> PAN -> encode -> write."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.batch import sinks
from pipeline.batch.records import ImageRecord, batch_of, records_of
from pipeline.batch.sources import InputUnit, read_unit
from pipeline.config.settings import UpscaleJob
from pipeline.errors import InvalidImageError
from pipeline.imaging import decode_image, encode_image, imresize
from pipeline.imaging.gate import gate_score
from pipeline.io.storage import Files, join
from pipeline.ray_runtime.pool import (
    ActorPool,
    actor_upscaler,
    model_stage,
)


def input_stage(
    batch: dict[str, np.ndarray], images_per_batch: int, max_pixels: int, **read: Any
) -> Iterator[dict]:
    """Source files (``InputUnit``s, one column ``unit``) -> batches of ``images_per_batch``
    decoded ``ImageRecord``s: ``read_records`` then ``decode_records``, in one call, for the reason
    ``output_stage`` gives. A shard's bytes are read whole (its row count goes into each record);
    its images are decoded a batch at a time, each batch handed on before the next is decoded."""
    records = []
    for unit in batch["unit"]:
        for record in read_records(unit, **read):
            records.append(record)
            if len(records) == images_per_batch:
                yield batch_of(decode_records(records, max_pixels))
                records = []
    if records:
        yield batch_of(decode_records(records, max_pixels))


def read_records(
    unit: InputUnit, wanted: tuple[str, ...], image_column: str, files: Files
) -> list[ImageRecord]:
    """An ``ImageRecord`` per input of a source file, with its raw bytes and what the run ledger
    needs to know of the file it came from."""
    rows = list(read_unit(unit, wanted, image_column, files))
    return [
        ImageRecord(
            r.key, r.name, unit.rel, unit.size, unit.version, len(rows), r.sinks,
            tuple(s for s in wanted if r.name in unit.written.get(s, ())),
            data=r.data or b"",
            input_sha256=hashlib.sha256(r.data).hexdigest() if r.data else None,
            error_type=r.error_type or None, error=r.error or None,
        )
        for r in rows
    ]  # fmt: skip


def decode_records(records: list[ImageRecord], max_pixels: int) -> list[ImageRecord]:
    """Each record's bytes -> its pixels (``image``), or its failure."""
    for record in records:
        if not record.to_compute:
            continue
        start = time.perf_counter()
        try:
            image = decode_image(record.data, name=record.key, max_pixels=max_pixels)
        except InvalidImageError as exc:
            record.fail(exc)
            continue
        record.image, record.data = image, b""
        record.input_width, record.input_height, record.input_mode = (
            image.width,
            image.height,
            image.source_mode,
        )
        record.seconds += time.perf_counter() - start
    return records


class UpscaleActor:
    """Holds one PAN (loaded once) on its device; upscales a batch's pixels in one engine call
    (``Upscaler.upscale_many``), so windows of equal shape share forward passes. The alpha
    channels are enlarged in the encode stage, on CPU tasks."""

    def __init__(self, job: UpscaleJob, threads: int) -> None:
        self.upscaler = actor_upscaler(job, job.scale, threads, job.files)
        # A GPU actor takes two calls at once (``actor_pool``): Ray prepares one while the model
        # runs the other. The engine computes one call at a time anyway; holding the turn here
        # too keeps a call's waiting out of its records' seconds.
        self._model_lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        records = records_of(batch)
        todo = [r for r in records if r.image is not None]
        with self._model_lock:
            start = time.perf_counter()
            try:
                outputs = self.upscaler.upscale_many([r.image.pixels for r in todo])
            except (ValueError, TypeError, RuntimeError):  # e.g. out of memory: find which, one by one
                outputs = []
                for record in todo:
                    try:
                        outputs.append(self.upscaler.upscale(record.image.pixels))
                    except (ValueError, TypeError, RuntimeError) as exc:
                        outputs.append(exc)
            seconds = time.perf_counter() - start
        pixels = sum(r.image.pixels.size for r in todo) or 1
        for record, output in zip(todo, outputs, strict=True):
            if isinstance(output, Exception):
                record.fail(output)
                continue
            # the image stays: the quality gate compares with it, and its alpha is enlarged
            record.output = dataclasses.replace(record.image, pixels=output, alpha=None)
            record.seconds += seconds * record.image.pixels.size / pixels
            record.precision = self.upscaler.precision
        return batch_of(records)


def encode_stage(batch: dict[str, np.ndarray], png_compress_level: int | str, gate: bool) -> dict:
    """Upscaled pixels -> PNG bytes, with the alpha channel enlarged (bicubic) and, with ``gate``,
    the quality gate's measures (``pipeline.imaging.gate``); the images are dropped."""
    records = records_of(batch)
    for record in records:
        output, source = record.output, record.image
        if output is None or source is None:
            continue
        start = time.perf_counter()
        if gate:
            record.gate = gate_score(source.pixels, output.pixels)
        if source.alpha is not None:
            output = dataclasses.replace(output, alpha=imresize(source.alpha, output.height / source.height))
        record.data = encode_image(output, "png", png_compress_level=png_compress_level)
        record.output_width, record.output_height = output.width, output.height
        record.image = record.output = None
        record.seconds += time.perf_counter() - start
    return batch_of(records)


def write_stage(batch: dict[str, np.ndarray], dest: str, overwrite: bool, files: Files) -> dict:
    """Write each finished record's PNG where the PNG tree lacks it, and pass every record on to
    the driver, which records it in the run ledger with its Parquet row (``pipeline.batch.ledger``):
    a PNG is always written before its entry. A sink that cannot be written raises
    ``StorageError``, which ends the run with one line."""
    records = records_of(batch)
    for record in records:
        if "png" in record.sinks and not record.failed:
            sinks.write_png(dest, record.name, record.data, files)
        if record.failed and overwrite and "png" in record.sinks:  # none of the old settings' stays
            files.remove(join(dest, record.name))
        if "parquet" not in record.sinks or record.failed:
            record.data = b""  # the driver needs the PNG only for the Parquet row
    return batch_of(records)


IMAGES_PER_READ_TASK = 16


def read_blocks(todo: list[InputUnit], actors: int) -> int:
    """How many read (+ decode) tasks: one per shard, or per ``IMAGES_PER_READ_TASK`` single images,
    but at least two per model actor (as inputs allow) so that every actor gets work.

    Reading and decoding an image takes about a millisecond while a Ray task costs tens of them:
    tasks of one image or two would spend on their overhead the CPU that encoding needs on a small
    machine.
    """
    per_task = 1 if any(u.kind != "image" for u in todo) else IMAGES_PER_READ_TASK
    return max(1, min(len(todo), max(-(-len(todo) // per_task), 2 * actors)))


def build_dataset(job: UpscaleJob, todo: list[InputUnit], pool: ActorPool):
    """The lazy Ray Dataset: read -> decode -> PAN actors (``pool``) -> encode -> write PNG, an
    ``ImageRecord`` per input for the driver to record (``Recorder``)."""
    import ray.data

    items = [{"unit": unit} for unit in todo]
    per_image = {"batch_size": job.images_per_batch, "udf_modifying_row_count": False}
    read_args = {"wanted": job.sinks, "image_column": job.image_column, "files": job.files,
                 "images_per_batch": job.images_per_batch, "max_pixels": job.max_pixels}  # fmt: skip
    write_args = {"dest": job.dest, "overwrite": job.overwrite, "files": job.files}
    gate = job.min_psnr_vs_input is not None or job.max_pattern_levels is not None
    encode_args = {"png_compress_level": job.png_compress_level, "gate": gate}
    sources = ray.data.from_items(items, override_num_blocks=read_blocks(todo, pool.size))
    decoded = sources.map_batches(input_stage, batch_size=None, fn_kwargs=read_args)  # a task per block
    batch = job.images_per_batch
    upscaled = model_stage(decoded, UpscaleActor, pool, batch_size=batch, job=job)
    return upscaled.map_batches(output_stage, fn_kwargs={**encode_args, **write_args}, **per_image)


def output_stage(
    batch: dict[str, np.ndarray], png_compress_level: int | str, gate: bool, **write: Any
) -> dict:
    """``encode_stage`` then ``write_stage``, in one call: Ray Data shapes a block between every two
    stages, fused ones too, which costs more than the write itself (benchmarks/README.md,
    "stage_cost.py")."""
    return write_stage(encode_stage(batch, png_compress_level, gate), **write)
