"""Where a batch job's results go, named from the inputs so that runs are idempotent.

Layout under DEST (this module owns it, names included):
- ``<name>``: the PNG tree, format ``png``/``both``. ``name`` comes from the input's key
  (``output_name``): ``sub/photo.jpg`` -> ``sub/photo.png``; a member ``m.jpg`` of shard
  ``sub/s.tar`` (or ``.parquet``) -> ``sub/s/m.png``. A name belongs to the first input that
  took it, across runs (``pipeline.batch.planner``); no name lies in pan's own files below
  (``RESERVED``).
- ``parquet/part-<run id>-<n>.parquet``: one row per output (format ``parquet``/``both``), see
  ``records.OutputRow``, in parts of up to ``parquet_part_rows`` rows or about ``parquet_part_bytes``
  (``PartBuffer``). A part is named by the run and its commit number, and each output's row is in
  exactly one part: the run ledger says which (``pipeline.batch.ledger``). An input that changed since it
  was upscaled gets a new row from the run that redid it; the older row stays, with its own
  ``input_sha256`` and ``run_id``, so the latest ``run_id`` per ``name`` is the current one.
- ``_errors/<run id>-<n>.parquet``: the errors table (``records.ErrorRow``), one file per commit, kept
  across runs: ``pyarrow.parquet.read_table(DEST + "/_errors")`` is every run's failures and
  quality-gate flags.
- ``_runs/<run id>/``: the run ledger (``pipeline.batch.ledger``): what each run took and did.
- ``_summary.json``: the counts, throughput and cost of the last run;
- ``_pan.json``: the destination record: it says the destination is ours and which scale and
  weights made its outputs (``DestinationRecord``);
- ``_lease``: held by the run working on the destination (``pipeline.batch.lease``).
- ``_staging/``: the temporaries of PNG writes in progress (local destinations): a writer killed
  mid-write leaves its temporary there, not in the PNG tree; every run clears it as it starts and
  as it finishes.
Every file appears under its final name only when complete (see ``pipeline.io.storage``).

A destination is claimed before any work (``claim_dest``): a new or empty one gets a record; one
with a record is ours, and is refused when the run's scale or weights differ from it, unless the
run overwrites; a non-empty one without a record holds files we did not write and is refused,
``--overwrite`` or not, unless it holds pan's ``_summary.json`` (a destination of a pan without
records), which is adopted. Hidden files do not count: outputs are never hidden.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch.records import ErrorRow, OutputRow, RunSummary, arrow_schema, arrow_table
from pipeline.errors import DestinationError
from pipeline.io.storage import Files, is_url, join, reported

PARQUET_DIR = "parquet"
ERRORS_DIR = "_errors"
RUNS_DIR = "_runs"  # pipeline.batch.ledger
SUMMARY_NAME = "_summary.json"
RECORD_NAME = "_pan.json"
LEASE_NAME = "_lease"  # pipeline.batch.lease: one run at a time
STAGING_DIR = "_staging"
# pan's own names at the top of DEST: no output may lie in or on them (``reserved_by``)
RESERVED = (PARQUET_DIR, ERRORS_DIR, RUNS_DIR, SUMMARY_NAME, RECORD_NAME, LEASE_NAME, STAGING_DIR)
log = logging.getLogger(__name__)

PARQUET_SCHEMA = arrow_schema(OutputRow)
ERRORS_SCHEMA = arrow_schema(ErrorRow)


def output_name(key: str, shard: str | None = None) -> str:
    """The output name of an input: for an image file, ``key`` (its path under the source) with
    extension ``.png``; for a member of ``shard``, ``key`` is the member's path as the shard names
    it, and the name lies under ``shard_prefix(shard)``."""
    stem = posixpath.splitext(key)[0] + ".png"
    return shard_prefix(shard) + stem if shard is not None else stem


def reserved_by(name: str) -> str | None:
    """pan's own file or folder of the destination (``RESERVED``) that output ``name`` (or a shard
    prefix) would lie in, or None: an input ``parquet/a.jpg`` or ``_runs/x.png`` cannot have its
    output there, since the Parquet parts and the run ledger live there."""
    top = name.split("/", 1)[0]
    return top if top in RESERVED else None


def shard_prefix(shard: str) -> str:
    """The folder of a shard's outputs: ``sub/s.tar`` -> ``sub/s/``."""
    return posixpath.splitext(shard)[0] + "/"


def parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    """``table`` as the bytes of a Parquet file (``options``: ``pyarrow.parquet.write_table``'s)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


def existing_outputs(dest: str, sinks: Sequence[str], files: Files) -> dict[str, frozenset[str]]:
    """For each of ``sinks``, the output names it holds complete, found by listing the whole
    destination and reading the ``name`` column of every Parquet part: what ``rescan_dest`` and a
    destination without a run ledger cost, once."""
    listed = files.list_files(dest)
    written: dict[str, frozenset[str]] = {}
    if "png" in sinks:
        written["png"] = frozenset(f for f in listed if f.endswith(".png") and reserved_by(f) is None)
    if "parquet" in sinks:
        names: set[str] = set()
        fs, root = files.filesystem(join(dest, PARQUET_DIR))
        for part in (f for f in listed if f.startswith(f"{PARQUET_DIR}/part-") and f.endswith(".parquet")):
            with fs.open(f"{root.rstrip('/')}/{part.split('/', 1)[1]}", "rb") as f:
                names.update(pq.read_table(f, columns=["name"]).column("name").to_pylist())
        written["parquet"] = frozenset(names)
    return written


@dataclass(frozen=True)
class DestinationRecord:
    """What made a destination's outputs (``DEST/_pan.json``)."""

    scale: int
    weights_id: str
    weights_sha256: str
    # Set while an --overwrite run replaces outputs made with other settings: until one finishes,
    # the destination mixes both, and only another --overwrite run may continue.
    replacing: dict[str, Any] | None = None
    # The first run whose ledger counts (pipeline.batch.ledger): an --overwrite run starts afresh.
    ledger_since: str | None = None
    # The precision of the first outputs: later runs with precision auto keep it, so that one
    # destination holds one precision's outputs unless a run is told another (``finish_dest``).
    precision: str | None = None

    def differs(self, other: DestinationRecord) -> bool:
        return (self.scale, self.weights_sha256) != (other.scale, other.weights_sha256)

    def describe(self) -> str:
        return f"x{self.scale} with weights {self.weights_id} (sha256 {self.weights_sha256[:12]})"


def read_record(dest: str, files: Files) -> DestinationRecord | None:
    location = join(dest, RECORD_NAME)
    try:
        data = json.loads(files.read_bytes(location))
        fields = {f.name for f in dataclasses.fields(DestinationRecord)}
        return DestinationRecord(**{k: v for k, v in data.items() if k in fields})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise DestinationError(
            f"{location} is damaged ({exc}); restore it or choose a new destination"
        ) from exc


def write_record(dest: str, record: DestinationRecord, files: Files) -> None:
    from pipeline import __version__

    payload = {
        **dataclasses.asdict(record),
        "written_by": f"pan-pipeline {__version__}",
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    files.write_bytes(join(dest, RECORD_NAME), (json.dumps(payload, indent=2) + "\n").encode())


def _some_visible_files(dest: str, files: Files, limit: int = 4) -> list[str]:
    """Up to ``limit`` files under ``dest`` that are not hidden, nor in a hidden folder (relative
    paths); the walk stops there, so a big foreign folder costs little."""
    found: list[str] = []
    try:
        with reported(dest, "list", absent_ok=True):
            fs, root = files.filesystem(dest)
            if not fs.exists(root):
                return []
            root = root.rstrip("/")
            for folder, dirs, files in fs.walk(root, topdown=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel = folder[len(root) :].strip("/")
                ours = () if rel else (LEASE_NAME,)  # the lease is taken before the claim
                found += [
                    f"{rel}/{f}" if rel else f
                    for f in sorted(files)
                    if not f.startswith(".") and f not in ours
                ]
                if len(found) >= limit:
                    break
    except FileNotFoundError:  # gone while walked: nothing there
        return []
    return found[:limit]


def claim_dest(
    dest: str,
    run: DestinationRecord,
    *,
    overwrite: bool,
    run_id: str,
    files: Files,
) -> DestinationRecord:
    """Check that ``dest`` may take this run's outputs and record the run's settings there (see
    the module docstring); returns the record written. ``DestinationError`` says why not. An
    ``overwrite`` run ``run_id`` becomes the record's ``ledger_since``."""
    record = read_record(dest, files)
    since = run_id if overwrite else record.ledger_since if record else None
    precision = None if overwrite or record is None else record.precision
    run = dataclasses.replace(run, ledger_since=since, precision=precision)
    if record is None:
        entries = _some_visible_files(dest, files)
        fs, summary = files.filesystem(join(dest, SUMMARY_NAME))
        legacy = fs.exists(summary)  # made by a pan that wrote no record
        if entries and not legacy:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise DestinationError(
                f"{dest} already holds files that pan did not write ({shown}); choose a new or empty "
                "destination (--overwrite never replaces files pan did not write)"
            )
        if entries:
            log.warning(
                "%s was made before destinations had a %s; adopting it as %s",
                dest,
                RECORD_NAME,
                run.describe(),
            )
    elif record.replacing and not overwrite:
        raise DestinationError(
            f"an --overwrite run into {dest} did not finish: it holds outputs made {record.describe()} "
            f"and others made x{record.replacing['scale']} with weights {record.replacing['weights_id']}; "
            "run again with --overwrite to finish replacing them"
        )
    elif record.differs(run) and not overwrite:
        raise DestinationError(
            f"{dest} holds outputs made {record.describe()}, but this run is {run.describe()}; "
            "choose another destination, or pass --overwrite to replace them all"
        )
    if record is not None and record.differs(run):
        replaced = record.replacing or {"scale": record.scale, "weights_id": record.weights_id}
        run = dataclasses.replace(run, replacing=replaced)
    elif record is not None and record.replacing:
        run = dataclasses.replace(run, replacing=record.replacing)
    if run != record:
        write_record(dest, run, files)
    return run


def finish_dest(dest: str, record: DestinationRecord, files: Files, precision: str | None) -> None:
    """After a run that went through every input: an --overwrite that was replacing other
    settings' outputs is complete, a destination without a precision takes ``precision`` (what
    this run's outputs were made in), and the temporaries of writers killed mid-run are cleared."""
    _clear_staging(dest, files)
    final = dataclasses.replace(record, replacing=None, precision=record.precision or precision)
    if final != record:
        write_record(dest, final, files)


def prepare_dest(
    dest: str,
    sinks: Sequence[str],
    *,
    overwrite: bool,
    after_crash: bool,
    files: Files,
) -> None:
    """Clear what a new run replaces: the Parquet parts with ``overwrite`` (every input is redone);
    in a local destination (object stores have no temporaries), the staging folder of PNG writes;
    after a run that did not finish (``after_crash``), the hidden temporaries its other killed
    writes left (the ledger's, the Parquet parts'), which costs one listing of the destination."""
    if overwrite and "parquet" in sinks:
        files.remove(join(dest, PARQUET_DIR))
    _clear_staging(dest, files)
    if after_crash and not is_url(dest):
        for rel in files.list_files(dest):
            if rel.rsplit("/", 1)[-1].startswith(".") and rel.endswith(".part"):
                files.remove(join(dest, rel))


def _clear_staging(dest: str, files: Files) -> None:
    """Remove ``STAGING_DIR``: what is left there belongs to writers that died (one run at a time
    holds the destination). Object stores have no temporaries, hence no such folder."""
    if not is_url(dest):
        files.remove(join(dest, STAGING_DIR))


def write_png(dest: str, name: str, data: bytes, files: Files) -> None:
    """One file of the PNG tree, its temporary kept out of the tree (``STAGING_DIR``)."""
    files.write_bytes(join(dest, name), data, staging=join(dest, STAGING_DIR))


def part_name(run_id: str, commit: int) -> str:
    """The Parquet part of a run's commit, relative to DEST."""
    return f"{PARQUET_DIR}/part-{run_id}-{commit:05d}.parquet"


class PartBuffer:
    """``OutputRow``s gathered on the driver until they make a part of ``max_rows`` rows or about
    ``max_bytes`` bytes of PNG: parts sized for analytics, not by model batch."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.rows: list[OutputRow] = []
        self.bytes = 0

    def add(self, row: OutputRow) -> None:
        self.rows.append(row)
        self.bytes += len(row.png or b"")

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.max_rows or self.bytes >= self.max_bytes

    def write(self, dest: str, name: str, files: Files) -> None:
        """Write the rows gathered as part ``name`` and start a new part. PNG bytes do not
        compress: that column is stored as is."""
        table = arrow_table(self.rows, OutputRow)
        data = parquet_bytes(
            table, compression={c: "none" if c == "png" else "snappy" for c in table.column_names}
        )
        files.write_bytes(join(dest, name), data)
        self.rows, self.bytes = [], 0


def write_errors(
    dest: str,
    run_id: str,
    commit: int,
    errors: Sequence[ErrorRow],
    files: Files,
) -> None:
    """Rows of the errors table, as one file of a run's commit."""
    table = arrow_table(list(errors), ErrorRow)
    files.write_bytes(join(dest, f"{ERRORS_DIR}/{run_id}-{commit:05d}.parquet"), parquet_bytes(table))


def write_summary(dest: str, summary: RunSummary, files: Files) -> None:
    files.write_bytes(join(dest, SUMMARY_NAME), (json.dumps(summary.to_json(), indent=2) + "\n").encode())
