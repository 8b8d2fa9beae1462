"""The batch upscaling job on Ray Data: read bytes -> decode (CPU tasks) -> PAN (actor pool) ->
encode (CPU tasks) -> write PNG (CPU tasks) -> the driver records each input in the run ledger,
with its Parquet row and errors (``Recorder``, ``pipeline.batch.ledger``) -> summary.

The GPU actors only run tensors; decoding and encoding happen in CPU tasks around them. Outputs
are named from input keys and the ledger says what is done, so a re-run takes only what is new,
changed or failed (``pipeline.batch.planner``) and a killed run resumes. Every input ends as exactly one
of succeeded, failed (a row in ``DEST/_errors``), skipped (done before) or given up (failed
``max_attempts`` times), and has exactly one output in each sink it is written to.

Before Ray starts, ``preflight`` checks what a user can get wrong, in seconds: the destination is
not the source, inside it or around it (the inputs are read-only to us); the source lists; the
weights load at the scale; the destination takes a write and is ours, made with these settings
(``sinks.claim_dest``).
"""

from __future__ import annotations

import dataclasses
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pipeline import __version__
from pipeline.batch import sinks
from pipeline.batch.lease import Lease, LeaseRecord, new_run_id
from pipeline.batch.ledger import RunLog
from pipeline.batch.planner import Collision, Plan, plan
from pipeline.batch.sinks import output_name
from pipeline.batch.sources import COLLISION, InputUnit
from pipeline.batch.stages import _rows, build_dataset
from pipeline.config.settings import UpscaleJob
from pipeline.errors import DestinationError, PipelineError
from pipeline.io.storage import is_within, join, location_key
from pipeline.ray_runtime.pool import (
    actor_pool,
    data_context,
    dataset_batches,
)
from pipeline.ray_runtime.session import connect

# -- stages (each runs in Ray tasks/actors on batches: dict of column -> numpy array) ---------------


# -- driver ---------------------------------------------------------------------------------------


def _weights_identity(job: UpscaleJob) -> tuple[str, str]:
    """Load the weights once on the driver: fails fast on bad weights and names them for the sink."""
    from pipeline.io.weights import load_pretrained

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
    for another run (see ``pipeline.batch.lease``).
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
