"""The batch upscaling job on Ray Data: read bytes -> decode (CPU tasks) -> PAN (actor pool) ->
encode (CPU tasks) -> write PNG (CPU tasks) -> the driver records each input in the run ledger,
with its Parquet row and errors (``pipeline.batch.recorder``, ``pipeline.batch.ledger``) -> summary.

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
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Callable

from pipeline import __version__
from pipeline.batch import sinks
from pipeline.batch.lease import Lease, LeaseRecord, new_run_id
from pipeline.batch.ledger import RunLog
from pipeline.batch.planner import Plan, plan
from pipeline.batch.recorder import Recorder
from pipeline.batch.records import RunSummary, records_of
from pipeline.batch.stages import build_dataset
from pipeline.config.settings import AUTO, UpscaleJob
from pipeline.errors import DestinationError, PipelineError
from pipeline.io.storage import is_within, join, location_key
from pipeline.ray_runtime.pool import data_context, dataset_batches, place_model_actors
from pipeline.ray_runtime.session import connect

logger = logging.getLogger(__name__)


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
) -> RunSummary:
    """Run the job; returns its summary (also written to ``DEST/_summary.json``).

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
        destination = sinks.claim_dest(
            job.dest, checked.run, overwrite=job.overwrite, run_id=lease.run_id, files=job.files
        )
        if job.precision == AUTO and destination.precision:  # said with --verbose: every run does it
            logger.debug("%s keeps %s, the precision of its outputs (--precision chooses)", job.dest,
                         destination.precision)  # fmt: skip
            job = job.model_copy(update={"precision": destination.precision})
        work = plan(job, checked.exclude, since=destination.ledger_since)
        log = _start_log(job, destination, work, lease)
        recorder = Recorder(job, destination, log, work)
        for collision in work.collisions:
            recorder.collision(collision)
        for unit, done in work.adopted:
            recorder.adopt(unit, done)
        actor_hours = {"gpu": 0.0, "cpu": 0.0}
        if work.todo:
            actor_hours = _compute(job, work, recorder, lease, on_progress)
        seconds = time.perf_counter() - started - lease.waited_s  # waiting for another run is not this run's
        summary = recorder.summary(lease.run_id, seconds, actor_hours)
        lease.check()
        log.finish(summary.to_json())
        sinks.write_summary(job.dest, summary, job.files)
        made_in = max(summary.precision, key=summary.precision.get) if summary.precision else None
        sinks.finish_dest(job.dest, destination, job.files, made_in)
    return summary


def _start_log(job: UpscaleJob, destination: sinks.DestinationRecord, work: Plan, lease: Lease) -> RunLog:
    """The run's ledger, started, once the destination is ready for it (``sinks.prepare_dest``)."""
    sinks.prepare_dest(
        job.dest, job.sinks, overwrite=job.overwrite, after_crash=bool(work.unfinished_runs), files=job.files
    )
    log = RunLog(
        job.dest,
        lease.run_id,
        sinks.PartBuffer(job.parquet_part_rows, job.parquet_part_bytes),
        before_commit=lease.check,
        files=job.files,
    )
    log.start({"job": job.model_dump(mode="json"), "destination": dataclasses.asdict(destination),
               "package_version": __version__})  # fmt: skip
    return log


def _compute(
    job: UpscaleJob, work: Plan, recorder: Recorder, lease: Lease, on_progress: ProgressCallback | None
) -> dict[str, float]:
    """Upscale ``work.todo`` on Ray, recording each input as it comes back; returns what the model
    actors held meanwhile, in GPU- and CPU-hours (the CPUs a GPU actor reserves, or the cores a CPU
    actor computes on)."""
    connect(job.address)
    images = not any(u.kind != "image" for u in work.todo)
    total = work.skipped + work.gave_up + len(work.collisions) + len(work.todo) if images else None
    if on_progress:
        on_progress(recorder.counts, 0, total)
    data_context()
    pool = place_model_actors(job.device, job.actors, job.actor_cpus, len(work.todo), job.gpu_wait_seconds)
    dataset = build_dataset(job, work.todo, pool)
    computing = time.perf_counter()
    with dataset_batches(dataset) as batches:
        for batch in batches:
            lease.check()
            for record in records_of(batch):
                recorder.record(record)
            if on_progress:
                on_progress(recorder.counts, recorder.pixels["output"], total)
    hours = (time.perf_counter() - computing) / 3600
    per_actor_cpus = pool.num_cpus if pool.num_gpus else pool.threads
    return {"gpu": pool.size * pool.num_gpus * hours, "cpu": pool.size * per_actor_cpus * hours}


def check_error_fraction(job: UpscaleJob, summary: RunSummary) -> None:
    """Raise when more than ``max_error_fraction`` of the inputs failed."""
    if job.max_error_fraction is None or not summary.inputs:
        return
    fraction = summary.failed / summary.inputs
    if fraction > job.max_error_fraction:
        raise PipelineError(
            f"{summary.failed} of {summary.inputs} inputs failed ({fraction:.1%}), over "
            f"--max-error-fraction {job.max_error_fraction:.1%}; see {job.dest}/_errors"
        )
