"""What travels through the batch job and what it stores, each declared once.

- ``ImageRecord``: one input on its way from the read stage through decode, PAN, encode and write
  to the driver. The stages hand each other batches of one column, ``RECORD``, holding these
  objects (``records_of`` / ``batch_of``): Ray Data pickles Python objects into its blocks, where
  a column per field would need one Arrow type per block (uint8 and uint16 images, gray and RGB,
  and a batch of failed reads whose image column is all None, mix in one run).
- ``LedgerEntry``, ``OutputRow``, ``ErrorRow``: the rows a run stores: the run ledger's manifest
  (``pipeline.batch.ledger``), the Parquet sink and the errors table (``pipeline.batch.sinks``).
  Their Arrow schemas are derived from them (``arrow_schema``): each field carries its Arrow type.
- ``RunSummary``: what a run did, as ``run_upscale`` returns it and ``_summary.json`` holds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.imaging import DecodedImage
from pipeline.imaging.gate import GateScore

RECORD = "record"  # the one column of the job's Ray Data batches


def _arrow(kind: pa.DataType, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field stored as ``kind`` in Arrow."""
    return field(default=default, metadata={"arrow": kind})


def arrow_schema(row_type: type) -> pa.Schema:
    """The Arrow schema of a row dataclass: its fields, in order, with the types they carry."""
    return pa.schema([(f.name, f.metadata["arrow"]) for f in dataclasses.fields(row_type)])


def arrow_table(rows: list[Any], row_type: type) -> pa.Table:
    """Rows (instances of the dataclass ``row_type``) as an Arrow table of its schema."""
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in dataclasses.fields(row_type)}
    return pa.Table.from_pydict(columns, schema=arrow_schema(row_type))


# -- in flight --------------------------------------------------------------------------------


@dataclass(repr=False)
class ImageRecord:
    """One input of the batch job: where it comes from (``unit*``: the source file and what the
    listing said of it), where it goes (``sinks`` still to write, ``done_sinks`` holding it
    already), and what became of it so far. ``data`` holds the input's bytes until decoded, then
    the output's PNG; ``image`` and ``output`` the pixels between decode and encode."""

    key: str
    name: str
    unit: str
    unit_size: int
    unit_version: str
    unit_rows: int
    sinks: tuple[str, ...]
    done_sinks: tuple[str, ...]
    data: bytes = b""
    input_sha256: str | None = None
    error_type: str | None = None
    error: str | None = None
    image: DecodedImage | None = None
    output: DecodedImage | None = None
    seconds: float = 0.0  # of this input's own work in every stage
    precision: str | None = None  # PAN's
    gate: GateScore | None = None  # the quality gate's measures, where measured
    input_width: int = 0
    input_height: int = 0
    input_mode: str = ""
    output_width: int = 0
    output_height: int = 0

    @property
    def failed(self) -> bool:
        return self.error_type is not None

    @property
    def to_compute(self) -> bool:
        """Whether PAN has work for it: a sink lacks its output, and nothing failed so far."""
        return bool(self.sinks) and not self.failed

    def fail(self, exc: BaseException) -> None:
        """Record why it fails; its pixels and bytes are dropped."""
        self.error_type, self.error = type(exc).__name__, str(exc)
        self.image = self.output = None
        self.data = b""

    def __repr__(self) -> str:
        """What it is, not its bytes or pixels: Ray Data writes out ``str`` of a column's values
        each time it turns one into a block, and printing an image's bytes costs more than the
        stage's own work."""
        state = self.error_type or ("output" if self.output else "image" if self.image else "bytes")
        return f"ImageRecord({self.key!r}, {state}, {len(self.data)} bytes)"


def records_of(batch: dict[str, np.ndarray]) -> list[ImageRecord]:
    return list(batch[RECORD])


def batch_of(records: list[ImageRecord]) -> dict[str, np.ndarray]:
    column = np.empty(len(records), dtype=object)  # not np.array(records): it would look inside them
    column[:] = records
    return {RECORD: column}


# -- stored -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One input a run took: a row of the run ledger's manifest (``pipeline.batch.ledger``)."""

    key: str = _arrow(pa.string())
    unit: str = _arrow(pa.string())
    unit_size: int = _arrow(pa.int64())
    unit_version: str = _arrow(pa.string())
    unit_rows: int = _arrow(pa.int32())  # 0: unknown (the file could not be read)
    name: str = _arrow(pa.string())
    status: str = _arrow(pa.string())  # succeeded | failed | adopted
    attempts: int = _arrow(pa.int16())
    png: bool = _arrow(pa.bool_())  # the output is in the PNG tree
    parquet: bool = _arrow(pa.bool_())  # ... and has its row in `part`
    part: str | None = _arrow(pa.string())
    error_type: str | None = _arrow(pa.string())  # why it failed, or "Suspect" (succeeded, flagged)
    error: str | None = _arrow(pa.string())
    input_sha256: str | None = _arrow(pa.string())
    weights_sha256: str | None = _arrow(pa.string())
    package_version: str = _arrow(pa.string())
    run_id: str = _arrow(pa.string())


@dataclass(frozen=True)
class OutputRow:
    """One output in the Parquet sink: its PNG and which bytes, weights, code and run made it."""

    key: str = _arrow(pa.string())
    name: str = _arrow(pa.string())
    input_width: int = _arrow(pa.int32())
    input_height: int = _arrow(pa.int32())
    input_mode: str = _arrow(pa.string())
    output_width: int = _arrow(pa.int32())
    output_height: int = _arrow(pa.int32())
    scale: int = _arrow(pa.int8())
    weights_id: str = _arrow(pa.string())
    weights_sha256: str = _arrow(pa.string())
    png: bytes = _arrow(pa.binary())
    seconds: float = _arrow(pa.float64())
    psnr_vs_input: float | None = _arrow(pa.float64())  # the quality gate's measures (imaging.gate)
    pattern_levels: float | None = _arrow(pa.float64())
    input_sha256: str | None = _arrow(pa.string())
    package_version: str = _arrow(pa.string())
    run_id: str = _arrow(pa.string())


@dataclass(frozen=True)
class ErrorRow:
    """One failure or quality-gate flag in the errors table; ``input_sha256`` is None when the
    bytes could not be read."""

    key: str = _arrow(pa.string())
    name: str = _arrow(pa.string())
    error_type: str = _arrow(pa.string())
    message: str = _arrow(pa.string())
    input_sha256: str | None = _arrow(pa.string())
    run_id: str = _arrow(pa.string())


# -- a run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What a run did. ``inputs`` = ``succeeded`` + ``failed`` + ``skipped`` (done by earlier runs) +
    ``given_up`` (failed ``max_attempts`` times: not tried again); ``suspect`` of the succeeded were
    flagged by the quality gate. ``files``: source files read, by why (new, changed, retried,
    unfinished, redone); ``ignored``: files that are not inputs, by why (hidden, other), with
    ``ignored_examples``; ``precision``: outputs by the precision PAN ran in. The cost is what
    the model actors held while images flowed, in GPU- and CPU-hours, and output megapixels per
    such hour (None where none was held)."""

    run_id: str
    inputs: int
    succeeded: int
    failed: int
    skipped: int
    given_up: int
    suspect: int
    files: dict[str, int]
    ignored: dict[str, int]
    ignored_examples: dict[str, list[str]]
    precision: dict[str, int]
    input_megapixels: float
    output_megapixels: float
    seconds: float  # the run's own: waiting for another run's lease is left out
    output_megapixels_per_second: float
    actor_gpu_hours: float
    actor_cpu_hours: float
    output_megapixels_per_gpu_hour: float | None
    output_megapixels_per_cpu_hour: float | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
