"""The driver's bookkeeping of a run: every input that reaches it becomes the run's ledger entry,
Parquet row and errors (``RunLog``), and is counted; at the end, the ``RunSummary``."""

from __future__ import annotations

from collections import Counter

from pipeline import __version__
from pipeline.batch.ledger import RunLog
from pipeline.batch.planner import Collision, Plan
from pipeline.batch.records import ErrorRow, ImageRecord, LedgerEntry, OutputRow, RunSummary
from pipeline.batch.sinks import DestinationRecord, output_name
from pipeline.batch.sources import COLLISION, InputUnit
from pipeline.config.settings import UpscaleJob

SUSPECT = "Suspect"  # error_type of outputs the quality gate flags (their status stays succeeded)


class Recorder:
    """Records a run's inputs in its ``RunLog`` and counts them: ``counts`` by status (succeeded,
    failed, skipped, given_up), ``suspect``, input and output ``pixels``, and the outputs by the
    ``precisions`` PAN ran in (with ``precision=auto``, one per kind of device in the pool)."""

    def __init__(self, job: UpscaleJob, destination: DestinationRecord, log: RunLog, work: Plan) -> None:
        self.job, self.destination, self.log, self.work = job, destination, log, work
        self.counts = Counter(succeeded=0, failed=0, skipped=work.skipped, given_up=work.gave_up)
        self.pixels = Counter(input=0, output=0)
        self.precisions: Counter = Counter()
        self.suspect = 0

    # -- the rows ---------------------------------------------------------------------------

    def _entry(
        self, record: ImageRecord, status: str, attempts: int, sinks: set[str], error: ErrorRow | None = None
    ) -> LedgerEntry:
        return LedgerEntry(
            key=record.key, unit=record.unit, unit_size=record.unit_size, unit_version=record.unit_version,
            unit_rows=record.unit_rows, name=record.name, status=status, attempts=attempts,
            png="png" in sinks, parquet="parquet" in sinks, part=None,
            error_type=error.error_type if error else None, error=error.message if error else None,
            input_sha256=record.input_sha256, weights_sha256=self.destination.weights_sha256,
            package_version=__version__, run_id=self.log.run_id,
        )  # fmt: skip

    def _error(self, record: ImageRecord, error_type: str, message: str) -> ErrorRow:
        return ErrorRow(record.key, record.name, error_type, message, record.input_sha256, self.log.run_id)

    def _output(self, record: ImageRecord) -> OutputRow:
        return OutputRow(
            key=record.key, name=record.name, input_width=record.input_width,
            input_height=record.input_height, input_mode=record.input_mode,
            output_width=record.output_width, output_height=record.output_height, scale=self.job.scale,
            weights_id=self.destination.weights_id, weights_sha256=self.destination.weights_sha256,
            png=record.data, seconds=record.seconds,
            psnr_vs_input=record.gate.psnr_vs_input if record.gate else None,
            pattern_levels=record.gate.pattern_levels if record.gate else None,
            input_sha256=record.input_sha256, package_version=__version__, run_id=self.log.run_id,
        )  # fmt: skip

    def _attempt(self, key: str) -> int:
        """Which attempt at ``key`` this run's is: one more than the ledger counts before it."""
        return self.work.attempts.get(key, 0) + 1

    # -- what happened to an input ----------------------------------------------------------

    def _failed(self, record: ImageRecord, error_type: str, message: str) -> None:
        attempts = self._attempt(record.key)
        if attempts >= self.job.max_attempts:
            message += f" (attempt {attempts} of --max-attempts {self.job.max_attempts}: not tried again)"
        self.counts["failed"] += 1
        error = self._error(record, error_type, message)
        self.log.add(self._entry(record, "failed", attempts, set(), error), error=error)

    @staticmethod
    def _of_unit(unit: InputUnit, name: str) -> ImageRecord:
        """The record of a whole source file that never reached the stages."""
        return ImageRecord(unit.rel, name, unit.rel, unit.size, unit.version, 1, (), ())

    def collision(self, collision: Collision) -> None:
        record = self._of_unit(collision.unit, collision.name)
        self.work.attempts.setdefault(record.key, collision.attempts)
        self._failed(record, COLLISION, collision.message)

    def adopt(self, unit: InputUnit, done: tuple[str, ...]) -> None:
        """An input a rescan found finished in every sink."""
        self.log.add(self._entry(self._of_unit(unit, output_name(unit.rel)), "adopted", 0, set(done)))

    def record(self, record: ImageRecord) -> None:
        """An input back from the stages: failed, skipped (a shard member done before) or made."""
        done, now = set(record.done_sinks), set(record.sinks)
        if record.failed:
            self._failed(record, record.error_type, record.error or "")
            return
        if not now:  # every output was there: a shard member finished by an earlier run
            self.counts["skipped"] += 1
            if self.work.rescan:
                self.log.add(self._entry(record, "adopted", 0, done))
            return
        self.counts["succeeded"] += 1
        self.precisions[record.precision] += 1
        self.pixels.update(
            input=record.input_width * record.input_height, output=record.output_width * record.output_height
        )
        why = (
            record.gate.suspect(self.job.min_psnr_vs_input, self.job.max_pattern_levels)
            if record.gate
            else None
        )
        error = None
        if why:  # written all the same: a person decides
            self.suspect += 1
            error = self._error(record, SUSPECT, f"PAN's output is likely garbage (noise, patterns): {why}")
        written = done | (now - {"parquet"})  # a Parquet row counts once its part is written (RunLog.add)
        entry = self._entry(record, "succeeded", self._attempt(record.key), written, error)
        self.log.add(entry, self._output(record) if "parquet" in now else None, error)

    # -- the run ----------------------------------------------------------------------------

    def summary(self, run_id: str, seconds: float, actor_hours: dict[str, float]) -> RunSummary:
        """The run's ``RunSummary``: the counts, ``seconds`` of its own work, and what the model
        actors held while the images flowed (``actor_hours``: GPU- and CPU-hours: the CPUs a GPU
        actor reserves, or the cores a CPU actor computes on), so that a nightly report can price
        a megapixel."""
        output_mp = self.pixels["output"] / 1e6
        gpu_hours, cpu_hours = actor_hours["gpu"], actor_hours["cpu"]
        return RunSummary(
            run_id=run_id,
            inputs=self.counts.total(),
            succeeded=self.counts["succeeded"],
            failed=self.counts["failed"],
            skipped=self.counts["skipped"],
            given_up=self.counts["given_up"],
            suspect=self.suspect,
            files={k: self.work.units[k] for k in ("new", "changed", "retried", "unfinished", "redone")},
            ignored=dict(self.work.ignored),
            ignored_examples={k: list(v) for k, v in self.work.ignored_examples.items()},
            precision=dict(self.precisions),
            input_megapixels=self.pixels["input"] / 1e6,
            output_megapixels=output_mp,
            seconds=seconds,
            output_megapixels_per_second=output_mp / seconds if seconds else 0.0,
            actor_gpu_hours=gpu_hours,
            actor_cpu_hours=cpu_hours,
            output_megapixels_per_gpu_hour=output_mp / gpu_hours if gpu_hours else None,
            output_megapixels_per_cpu_hour=output_mp / cpu_hours if cpu_hours else None,
        )
