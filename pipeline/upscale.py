"""The batch upscaling job on Ray Data: read bytes -> decode (CPU tasks) -> PAN (actor pool) ->
encode (CPU tasks) -> write PNG (CPU tasks) -> the driver records each input in the run ledger,
with its Parquet row and errors (``Recorder``, ``pipeline.ledger``) -> summary.

The GPU actors only run tensors; decoding and encoding happen in CPU tasks around them. Outputs
are named from input keys and the ledger says what is done, so a re-run takes only what is new,
changed or failed (``pipeline.planner``) and a killed run resumes. Every input ends as exactly one
of succeeded, failed (a row in ``DEST/_errors``), skipped (done before) or given up (failed
``max_attempts`` times), and has exactly one output in each sink it is written to.

Before Ray starts, ``preflight`` checks what a user can get wrong, in seconds: the destination is
not the source, inside it or around it (the inputs are read-only to us); the source lists; the
weights load at the scale; the destination takes a write and is ours, made with these settings
(``sinks.claim_dest``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline import __version__, sinks
from pipeline.errors import DestinationError, InvalidImageError, PipelineError
from pipeline.imaging import DecodedImage, decode_image, encode_image, imresize
from pipeline.jobspec import UpscaleJob
from pipeline.lease import Lease, LeaseRecord, new_run_id
from pipeline.ledger import RunLog
from pipeline.planner import Collision, Plan, plan
from pipeline.raycluster import (
    ActorPool,
    actor_pool,
    actor_upscaler,
    connect,
    data_context,
    dataset_batches,
    model_stage,
)
from pipeline.sinks import output_name
from pipeline.sources import COLLISION, InputUnit, read_unit
from pipeline.storage import Files, is_within, join, location_key

# -- stages (each runs in Ray tasks/actors on batches: dict of column -> numpy array) ---------------


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
    """The quality gate's measure (not a paper metric, see ``pipeline.metrics`` for those): PSNR of
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
    driver, which records it in the run ledger with its Parquet row (``pipeline.ledger``): a PNG
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


# -- driver ---------------------------------------------------------------------------------------


def _weights_identity(job: UpscaleJob) -> tuple[str, str]:
    """Load the weights once on the driver: fails fast on bad weights and names them for the sink."""
    from pipeline.weights import load_pretrained

    info = load_pretrained(job.weights, scale=job.scale, files=job.files).weights_info
    return info.id, info.sha256


def check_locations(job: UpscaleJob) -> str | None:
    """Refuse a destination that is the source, lies inside it (unless ``dest_inside_source``) or
    holds it: outputs would replace inputs or be read back as inputs. Returns the destination's
    path relative to the source when it lies inside it (to leave out of the inputs), else None."""
    if is_within(job.source, job.dest):
        what = "is" if is_within(job.dest, job.source) else "holds"
        raise DestinationError(
            f"the destination {job.dest} {what} the source {job.source}: outputs could replace inputs; "
            "choose a destination outside the source"
        )
    if not is_within(job.dest, job.source):
        return None
    if not job.dest_inside_source:
        raise DestinationError(
            f"the destination {job.dest} lies inside the source {job.source}, so its outputs would be read "
            "as inputs by the next run; choose a destination outside the source, or pass "
            "--dest-inside-source to leave the destination's files out of the inputs"
        )
    return posixpath.relpath(location_key(job.dest)[1], location_key(job.source)[1])


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What the checks before a run established."""

    run: sinks.DestinationRecord  # the scale and weights of this run, to claim the destination with
    exclude: str | None  # the destination, relative to the source, when it lies inside it


def preflight(job: UpscaleJob) -> Preflight:
    """Every check that needs no Ray, cheapest first; raises the ``PipelineError`` that names the
    problem (see the module docstring). The destination is claimed afterwards, under the lease."""
    exclude = check_locations(job)
    if not job.files.check_listable(job.source):
        raise PipelineError(f"source not found: {job.source}")
    weights_id, weights_sha256 = _weights_identity(job)
    job.files.check_writable(job.dest)
    return Preflight(sinks.DestinationRecord(job.scale, weights_id, weights_sha256), exclude)


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


ProgressCallback = Callable[[Counter, int, "int | None"], None]


def run_upscale(
    job: UpscaleJob,
    on_progress: ProgressCallback | None = None,
    on_lease_wait: Callable[[LeaseRecord], None] | None = None,
) -> dict[str, Any]:
    """Run the job; returns the summary (also written to ``DEST/_summary.json``).

    ``on_progress(counts, output_pixels, total)``: after each finished batch, the inputs by status
    (succeeded, failed, skipped), the output pixels so far and the number of inputs (None when
    shards hold an unknown number). ``on_lease_wait(holder)``: once, when ``wait_for_lease`` waits
    for another run (see ``pipeline.lease``).
    """
    started = time.perf_counter()
    checked = preflight(job)
    lease = Lease(
        join(job.dest, sinks.LEASE_NAME),
        new_run_id(),
        job.files,
        ttl_s=job.lease_seconds,
        wait=job.wait_for_lease,
        on_wait=on_lease_wait,
    )
    with lease:
        return _run_leased(job, checked, lease, started, on_progress)


def _run_leased(
    job: UpscaleJob, checked: Preflight, lease: Lease, started: float, on_progress: ProgressCallback | None
) -> dict[str, Any]:
    run_id = lease.run_id
    record = sinks.claim_dest(job.dest, checked.run, overwrite=job.overwrite, run_id=run_id, files=job.files)
    work = plan(job, checked.exclude, since=record.ledger_since)
    if work.todo:
        connect(job.address)
    sinks.prepare_dest(
        job.dest,
        job.sinks,
        overwrite=job.overwrite,
        after_crash=bool(work.unfinished_runs),
        files=job.files,
    )
    log = RunLog(
        job.dest,
        run_id,
        sinks.PartBuffer(job.parquet_part_rows, job.parquet_part_bytes),
        before_commit=lease.check,
        files=job.files,
    )
    log.start({"job": job.model_dump(mode="json"), "destination": dataclasses.asdict(record),
               "package_version": __version__})  # fmt: skip
    recorder = Recorder(job, record, log, work)
    for collision in work.collisions:
        recorder.collision(collision)
    for unit, done in work.adopted:
        recorder.adopt(unit, done)
    actor_hours = {"gpu": 0.0, "cpu": 0.0}
    images = not any(u.kind != "image" for u in work.todo)
    total = work.skipped + work.gave_up + len(work.collisions) + len(work.todo) if images else None
    if on_progress:
        on_progress(recorder.counts, 0, total)
    if work.todo:
        data_context()
        pool = actor_pool(job.actors, job.actor_cpus, len(work.todo))
        ds = build_dataset(job, work.todo, pool)
        computing = time.perf_counter()
        with dataset_batches(ds) as batches:
            for batch in batches:
                lease.check()
                for row in _rows(batch):
                    recorder.row(row)
                if on_progress:
                    on_progress(recorder.counts, recorder.pixels["output"], total)
        hours = (time.perf_counter() - computing) / 3600
        per_actor_cpus = pool.num_cpus if pool.num_gpus else pool.threads
        actor_hours = {
            "gpu": pool.size * pool.num_gpus * hours,
            "cpu": pool.size * per_actor_cpus * hours,
        }
    counts, pixels = recorder.counts, recorder.pixels
    seconds = time.perf_counter() - started - lease.waited_s  # waiting for another run is not this run's
    summary = {
        "run_id": run_id,
        "inputs": counts.total(),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],  # done by earlier runs
        "given_up": counts["given_up"],  # failed max_attempts times before: not tried again
        "suspect": recorder.suspect,  # succeeded, but flagged by the quality gate (see _errors)
        "files": {k: work.units[k] for k in ("new", "changed", "retried", "unfinished", "redone")},
        "ignored": dict(work.ignored),  # files of the source that are not inputs: hidden, other types
        "ignored_examples": {k: list(v) for k, v in work.ignored_examples.items()},
        "precision": dict(recorder.precisions),  # outputs by the precision PAN ran in
        "input_megapixels": pixels["input"] / 1e6,
        "output_megapixels": pixels["output"] / 1e6,
        "seconds": seconds,
        "output_megapixels_per_second": pixels["output"] / 1e6 / seconds if seconds else 0.0,
        **_cost(pixels["output"] / 1e6, actor_hours),
    }
    lease.check()
    log.finish(summary)
    sinks.write_summary(job.dest, summary, job.files)
    sinks.finish_dest(job.dest, record, job.files)
    return summary


class Recorder:
    """Turns the rows that reach the driver into the run's ledger entries, Parquet rows and errors
    (``RunLog``), and counts them: ``counts`` by status (succeeded, failed, skipped, gave_up),
    ``suspect``, input and output ``pixels``, and the outputs by the ``precisions`` PAN ran in (with
    ``precision=auto``, one per kind of device in the pool: the summary says what was chosen)."""

    def __init__(self, job: UpscaleJob, record: sinks.DestinationRecord, log: RunLog, work: Plan) -> None:
        self.job, self.record, self.log, self.work = job, record, log, work
        self.counts = Counter(succeeded=0, failed=0, skipped=work.skipped, given_up=work.gave_up)
        self.pixels = Counter(input=0, output=0)
        self.precisions: Counter = Counter()
        self.suspect = 0

    def _entry(self, row: dict[str, Any], status: str, attempts: int, sinks_: set[str], **error: str) -> dict:
        return {
            "key": row["key"], "unit": row["unit"], "unit_size": row["unit_size"],
            "unit_version": row["unit_version"], "unit_rows": row["unit_rows"], "name": row["name"],
            "status": status, "attempts": attempts, "png": "png" in sinks_, "parquet": "parquet" in sinks_,
            "part": None, "error_type": error.get("error_type") or None, "error": error.get("error") or None,
            "input_sha256": row.get("input_sha256") or None, "weights_sha256": self.record.weights_sha256,
            "package_version": __version__, "run_id": self.log.run_id,
        }  # fmt: skip

    def _error(self, row: dict[str, Any], error_type: str, message: str) -> dict[str, Any]:
        return {"key": row["key"], "name": row["name"], "error_type": error_type, "message": message,
                "input_sha256": row.get("input_sha256") or None, "run_id": self.log.run_id}  # fmt: skip

    def _attempt(self, key: str) -> int:
        """Which attempt at ``key`` this run's is: one more than the ledger counts before it."""
        return self.work.attempts.get(key, 0) + 1

    def _failed(self, row: dict[str, Any], error_type: str, message: str) -> None:
        attempts = self._attempt(row["key"])
        if attempts >= self.job.max_attempts:
            message += f" (attempt {attempts} of --max-attempts {self.job.max_attempts}: not tried again)"
        self.counts["failed"] += 1
        entry = self._entry(row, "failed", attempts, set(), error_type=error_type, error=message)
        self.log.add(entry, error=self._error(row, error_type, message))

    @staticmethod
    def _unit_row(unit: InputUnit, key: str, name: str) -> dict[str, Any]:
        return {"key": key, "name": name, "unit": unit.rel, "unit_size": unit.size,
                "unit_version": unit.version, "unit_rows": 1}  # fmt: skip

    def collision(self, collision: Collision) -> None:
        row = self._unit_row(collision.unit, collision.unit.rel, collision.name)
        self.work.attempts.setdefault(row["key"], collision.attempts)
        self._failed(row, COLLISION, collision.message)

    def adopt(self, unit: InputUnit, done: tuple[str, ...]) -> None:
        """An input a rescan found finished in every sink."""
        self.log.add(
            self._entry(self._unit_row(unit, unit.rel, output_name(unit.rel)), "adopted", 0, set(done))
        )

    def row(self, row: dict[str, Any]) -> None:
        done = set(filter(None, row["done_sinks"].split(",")))
        now = set(filter(None, row["sinks"].split(",")))
        if row["error_type"]:
            self._failed(row, row["error_type"], row["error"])
            return
        if not now:  # every output was there: a shard member finished by an earlier run
            self.counts["skipped"] += 1
            if self.work.rescan:
                self.log.add(self._entry(row, "adopted", 0, done))
            return
        self.counts["succeeded"] += 1
        self.precisions[row["precision"]] += 1
        self.pixels.update(
            input=row["input_width"] * row["input_height"], output=row["output_width"] * row["output_height"]
        )
        score = _measured(row)
        suspect = score is not None and score < self.job.min_psnr_vs_bicubic
        error = {}
        if suspect:  # written all the same: a person decides
            self.suspect += 1
            message = (
                f"PSNR {score:.1f} dB against bicubic, under --min-psnr-vs-bicubic "
                f"{self.job.min_psnr_vs_bicubic:g}: PAN's output is likely garbage (noise, patterns)"
            )
            error = {"error_type": SUSPECT, "error": message}
        attempts = self._attempt(row["key"])
        written = done | (now - {"parquet"})  # a Parquet row counts once its part is written (RunLog.add)
        entry = self._entry(row, "succeeded", attempts, written, **error)
        parquet_row = None
        if "parquet" in now:
            parquet_row = {
                **{k: row[k] for k in ("key", "name", "input_width", "input_height", "input_mode",
                                       "output_width", "output_height", "seconds")},
                "psnr_vs_bicubic": score, "scale": self.job.scale, "weights_id": self.record.weights_id,
                "weights_sha256": self.record.weights_sha256, "png": row["data"],
                "input_sha256": row["input_sha256"], "package_version": __version__,
                "run_id": self.log.run_id,
            }  # fmt: skip
        self.log.add(entry, parquet_row, self._error(row, SUSPECT, error["error"]) if suspect else None)


SUSPECT = "Suspect"  # error_type of outputs the quality gate flags (their status stays succeeded)


def _measured(row: dict[str, Any]) -> float | None:
    """The row's ``psnr_vs_bicubic``, or None when not measured (the gate is off, no output).
    Ray Data may hand an all-None column on as NaN, so NaN means not measured too."""
    value = row["psnr_vs_bicubic"]
    return None if value is None or value != value else float(value)


def _cost(output_megapixels: float, actor_hours: dict[str, float]) -> dict[str, float | None]:
    """What the model actors held while the images flowed: GPU- and CPU-hours (the CPUs a GPU actor
    reserves, or the cores a CPU actor computes on), and output megapixels per such hour, so that a
    nightly report can price a megapixel. None where no such hour was held."""
    return {
        "actor_gpu_hours": actor_hours["gpu"],
        "actor_cpu_hours": actor_hours["cpu"],
        "output_megapixels_per_gpu_hour": output_megapixels / actor_hours["gpu"]
        if actor_hours["gpu"]
        else None,
        "output_megapixels_per_cpu_hour": output_megapixels / actor_hours["cpu"]
        if actor_hours["cpu"]
        else None,
    }


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
