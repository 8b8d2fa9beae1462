"""The run ledger of a destination: what each run took and did, under ``DEST/_runs/<run id>/``.

- ``settings.json``: the run's settings and destination record, written when it starts;
- ``manifest-<n>.parquet``: the entries of the run's commit ``n`` (``records.LedgerEntry``), one per
  input it took: the source file's size and version, the output name, the status, the attempts,
  the sinks holding the output and the Parquet part holding its row, and lineage (sha256 of the
  input and of the weights, package version, run id). A run that finishes merges its commits
  into ``manifest.parquet``;
- ``summary.json``: written last. A run without one was killed (or is running: see ``DEST/_lease``).

Statuses: ``succeeded``; ``failed`` (``attempts`` counts the runs that tried it, this one
included); ``adopted`` (found finished in the destination by a rescan, made before the ledger).
Keys are the input keys of ``pipeline.batch.sources``; ``unit`` is the source file a key came from (the
key itself for an image file; the shard for a shard member), ``unit_rows`` the inputs that file held.

**Planning reads the ledger, never the outputs.** The latest entry of each key, from the runs since
the destination's ``ledger_since`` (an --overwrite run starts afresh), tells whether an input is
finished: a source file is done when its size and version equal the entries' and each of its
inputs either succeeded into every sink the run writes or failed ``max_attempts`` times. That
costs one listing of ``_runs/`` and one read per run (``manifest.parquet``), compared in Arrow.

**Commits keep the ledger in step with the outputs.** PNGs are written by the workers before their
rows reach the driver, so no entry claims a PNG that is missing; a PNG whose entry was lost in a
crash is made again under the same name. Parquet rows gather on the driver (``sinks.PartBuffer``)
and a commit writes, in this order: the errors of its entries, its manifest entries, then its
Parquet part, named by the run and commit number. A killed run can leave entries whose part was
never written, never a part that no entry names: the next run checks the parts named by unfinished
runs (one existence check each) and counts their rows as not written. So each output's row is in
exactly one part, however runs are killed and restarted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.batch.records import ErrorRow, LedgerEntry, OutputRow, arrow_schema, arrow_table
from pipeline.batch.sinks import RUNS_DIR, PartBuffer, parquet_bytes, part_name, write_errors
from pipeline.errors import DestinationError
from pipeline.io.storage import Files, join, reported

MANIFEST_SCHEMA = arrow_schema(LedgerEntry)
SETTINGS_NAME, SUMMARY_NAME, MANIFEST_NAME = "settings.json", "summary.json", "manifest.parquet"
DONE = ("succeeded", "adopted")
COMMIT_ENTRIES, COMMIT_SECONDS = 1000, 60.0  # commit entries without a Parquet row this often


def run_folder(dest: str, run_id: str) -> str:
    return join(dest, f"{RUNS_DIR}/{run_id}")


def _segment(commit: int) -> str:
    return f"manifest-{commit:05d}.parquet"


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    run_id: str
    manifests: tuple[str, ...]  # file names under the run's folder, in commit order
    finished: bool


def _run_files(dest: str, files: Files) -> list[RunFiles]:
    """The runs of the ledger, oldest first, from one listing of ``_runs/``."""
    with reported(join(dest, RUNS_DIR), "list"):
        fs, root = files.filesystem(join(dest, RUNS_DIR))
        if not fs.exists(root):
            return []
        root = root.rstrip("/")
        names_of: dict[str, set[str]] = {}
        for path in fs.find(root):
            run_id, _, name = path[len(root) :].strip("/").partition("/")
            if name and "/" not in name:
                names_of.setdefault(run_id, set()).add(name)
    runs = []
    for run_id in sorted(names_of):
        names = names_of[run_id]
        segments = sorted(n for n in names if n.startswith("manifest-") and n.endswith(".parquet"))
        # A finished run's merged manifest replaces its commits (left behind if killed while deleting).
        manifests = (MANIFEST_NAME,) if MANIFEST_NAME in names else tuple(segments)
        runs.append(RunFiles(run_id, manifests, SUMMARY_NAME in names))
    return runs


def _read_tables(
    locations: Sequence[str], files: Files, columns: Sequence[Sequence[str] | None]
) -> list[pa.Table]:
    """Parquet files (``columns[i]`` of file ``i``; None: all), read in parallel: object stores
    answer one request at a time per connection."""

    def read(location: str, names: Sequence[str] | None) -> pa.Table:
        data = files.read_bytes(location)
        try:
            return pq.read_table(
                io.BytesIO(data), schema=MANIFEST_SCHEMA, columns=list(names) if names else None
            )
        except (pa.ArrowException, ValueError) as exc:
            raise DestinationError(
                f"the run ledger file {location} is damaged ({exc}); restore it, or move its run's folder "
                "out of _runs and run once with --rescan-dest"
            ) from exc

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, locations, columns))


@dataclass(frozen=True)
class Ledger:
    """The latest entry of each key (``entries``, ``MANIFEST_SCHEMA``) and the runs read; ``owners``
    (``name``, ``key``, ``unit``): who owns each output name (``_owners``), when the columns read
    allow it (planning's do)."""

    entries: pa.Table
    runs: tuple[str, ...]
    unfinished: tuple[str, ...]  # runs that did not finish (killed), oldest first
    owners: pa.Table | None = None

    def triage(self, units: Iterable[Any], wanted: Sequence[str], max_attempts: int) -> Triage:
        """Sort source files (``InputUnit``s) by what the ledger says of them, in Arrow: which
        are done, which it has never seen at their size and version (new or changed), and the
        entries of the others (partly done, or failed but to be tried again)."""
        units = list(units)
        source = pa.table(
            {
                "unit": pa.array([u.rel for u in units], pa.string()),
                "unit_size": pa.array([u.size for u in units], pa.int64()),
                "unit_version": pa.array([u.version for u in units], pa.string()),
            }
        )
        known = set(pc.filter(source["unit"], pc.is_in(source["unit"], self.entries["unit"])).to_pylist())
        same = self.entries.join(source, ["unit", "unit_size", "unit_version"], join_type="inner")
        done = pc.is_in(same["status"], pa.array(DONE))
        for sink in wanted:
            done = pc.and_(done, same[sink])
        gave_up = pc.and_(
            pc.equal(same["status"], "failed"), pc.greater_equal(same["attempts"], max_attempts)
        )
        same = same.append_column("done", pc.cast(done, pa.int32())).append_column(
            "gave_up", pc.cast(gave_up, pa.int32())
        )
        per_unit = same.group_by("unit").aggregate(
            [("done", "sum"), ("gave_up", "sum"), ("unit_rows", "max")]
        )
        finished = pc.and_(
            pc.greater(per_unit["unit_rows_max"], 0),
            pc.greater_equal(
                pc.add(per_unit["done_sum"], per_unit["gave_up_sum"]), per_unit["unit_rows_max"]
            ),
        )
        complete = per_unit.filter(finished)
        counts = {
            unit: (d, g)
            for unit, d, g in zip(
                complete["unit"].to_pylist(),
                complete["done_sum"].to_pylist(),
                complete["gave_up_sum"].to_pylist(),
                strict=True,
            )
        }
        rest = same.filter(pc.invert(pc.is_in(same["unit"], complete["unit"])))
        partial: dict[str, list[dict[str, Any]]] = {}
        for entry in rest.drop_columns(["done", "gave_up"]).to_pylist():
            partial.setdefault(entry["unit"], []).append(entry)
        return Triage(counts, known, partial)


@dataclass(frozen=True)
class Triage:
    complete: dict[str, tuple[int, int]]  # unit -> (inputs done, inputs given up on)
    known: set[str]  # units with entries at some size and version
    partial: dict[str, list[dict[str, Any]]]  # unit -> latest entries at its size and version, not complete


PLANNING = ("key", "unit", "unit_size", "unit_version", "unit_rows", "name", "status", "attempts", "png",
            "parquet")  # fmt: skip


def read_ledger(
    dest: str,
    since: str | None,
    files: Files,
    columns: Sequence[str] = PLANNING,
) -> Ledger:
    """The ledger from run ``since`` on (all runs when None), with the entries' ``columns`` (what
    planning needs by default: lineage and messages stay on disk); see the module docstring."""
    runs = [r for r in _run_files(dest, files) if since is None or r.run_id >= since]
    owner = [r for r in runs for _ in r.manifests]
    locations = [join(run_folder(dest, r.run_id), name) for r in runs for name in r.manifests]
    columns = list(columns)
    checking = columns if "part" in columns else [*columns, "part"]  # the parts of runs that did not finish
    tables = _read_tables(locations, files, [columns if r.finished else checking for r in owner])
    checked: dict[str, bool] = {}
    for index, (run, table) in enumerate(zip(owner, tables, strict=True)):
        if run.finished:
            continue
        parts = [p for p in pc.unique(table["part"]).to_pylist() if p]
        for part in parts:
            if part not in checked:
                with reported(join(dest, part), "check"):
                    fs, path = files.filesystem(join(dest, part))
                    checked[part] = fs.exists(path)
        lost = [p for p in parts if not checked[p]]
        if lost:  # killed between its entries and its part: those rows were never written
            in_lost = pc.fill_null(pc.is_in(table["part"], pa.array(lost)), False)
            parquet = pc.and_(table["parquet"], pc.invert(in_lost))
            table = table.set_column(table.schema.get_field_index("parquet"), "parquet", parquet)
            table = table.set_column(
                table.schema.get_field_index("part"), "part", pc.if_else(in_lost, None, table["part"])
            )
        tables[index] = table.select(columns)
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    entries = pa.concat_tables(tables) if tables else schema.empty_table()
    # Entries are in run and commit order: their index is the order things happened in.
    entries = entries.append_column("order", pa.array(range(entries.num_rows), pa.int64()))
    latest = _latest(entries)
    owners = _owners(entries, latest) if {"key", "unit", "name", "status"} <= set(columns) else None
    return Ledger(
        latest.drop_columns(["order"]),
        tuple(r.run_id for r in runs),
        tuple(r.run_id for r in runs if not r.finished),
        owners,
    )


def _latest(entries: pa.Table) -> pa.Table:
    """The last entry of each key (by ``order``)."""
    if entries.num_rows == 0:
        return entries
    last = entries.group_by("key", use_threads=False).aggregate([("order", "max")])["order_max"]
    return entries.take(last)


def _owners(entries: pa.Table, latest: pa.Table) -> pa.Table:
    """(``name``, ``key``, ``unit``): for each output name, the input that owns it. An output name
    belongs to the first input that made an output under it (a done entry) and still has one (its
    latest entry is done), whether or not it is still in the source: a later input that maps to
    the name must not replace that output."""
    done = pa.array(DONE)
    made = entries.filter(pc.is_in(entries["status"], done))
    first = made.group_by("key", use_threads=False).aggregate([("order", "min")])
    current = latest.filter(pc.is_in(latest["status"], done)).select(["key", "unit", "name"])
    owned = current.join(first, "key")
    winner = owned.group_by("name", use_threads=False).aggregate([("order_min", "min")])
    owned = owned.join(winner, ["name", "order_min"], right_keys=["name", "order_min_min"])
    return owned.select(["name", "key", "unit"])


# -- writing --------------------------------------------------------------------------------------


class RunLog:
    """One run's ledger entries, errors and Parquet parts, committed together in the order the
    module docstring gives. ``add`` gathers; a commit happens when the Parquet part is full, or,
    while no Parquet row waits, every ``COMMIT_ENTRIES`` entries or ``COMMIT_SECONDS``.
    ``before_commit`` runs first (the lease's check: a run that lost it writes nothing more)."""

    def __init__(
        self,
        dest: str,
        run_id: str,
        parts: PartBuffer,
        *,
        before_commit: Callable[[], None] = lambda: None,
        files: Files,
    ) -> None:
        self.dest, self.run_id, self.parts = dest, run_id, parts
        self.before_commit, self.files = before_commit, files
        self.folder = run_folder(dest, run_id)
        self.commits = 0
        self._entries: list[LedgerEntry] = []
        self._in_part: list[bool] = []  # per entry: its output's row waits in the part being filled
        self._errors: list[ErrorRow] = []
        self._last_commit = time.monotonic()

    def start(self, settings: dict[str, Any]) -> None:
        text = json.dumps(settings, indent=2) + "\n"
        self.files.write_bytes(join(self.folder, SETTINGS_NAME), text.encode())

    def add(self, entry: LedgerEntry, output: OutputRow | None = None, error: ErrorRow | None = None) -> None:
        """``entry`` of an input, with its ``output``'s Parquet row (the entry's ``parquet`` and
        ``part`` are set here then: it goes to this run's part being filled) and an ``error``."""
        if output is not None:
            self.parts.add(output)
            entry = dataclasses.replace(entry, parquet=True, part=None)
        self._entries.append(entry)
        self._in_part.append(output is not None)
        if error is not None:
            self._errors.append(error)
        waiting = bool(self.parts.rows)
        if self.parts.full or (
            not waiting
            and (
                len(self._entries) >= COMMIT_ENTRIES or time.monotonic() - self._last_commit >= COMMIT_SECONDS
            )
        ):
            self.commit()

    def commit(self) -> None:
        if not self._entries and not self._errors:
            return
        self.before_commit()
        self.commits += 1
        part = part_name(self.run_id, self.commits) if self.parts.rows else None
        if self._errors:
            write_errors(self.dest, self.run_id, self.commits, self._errors, self.files)
        entries = [
            dataclasses.replace(e, part=part) if in_part else e
            for e, in_part in zip(self._entries, self._in_part, strict=True)
        ]
        self.files.write_bytes(join(self.folder, _segment(self.commits)), _parquet(entries))
        if part:
            self.parts.write(self.dest, part, self.files)
        self._entries, self._in_part, self._errors = [], [], []
        self._last_commit = time.monotonic()

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Commit what is left, merge the commits into one manifest, then write the summary."""
        self.commit()
        segments = [join(self.folder, _segment(n)) for n in range(1, self.commits + 1)]
        tables = _read_tables(segments, self.files, [None] * len(segments))
        merged = pa.concat_tables(tables) if tables else None
        if merged is None:
            merged = MANIFEST_SCHEMA.empty_table()
        self.files.write_bytes(join(self.folder, MANIFEST_NAME), parquet_bytes(merged))
        for location in segments:
            self.files.remove(location)
        text = json.dumps(dict(summary), indent=2) + "\n"
        self.files.write_bytes(join(self.folder, SUMMARY_NAME), text.encode())


def _parquet(entries: list[LedgerEntry]) -> bytes:
    return parquet_bytes(arrow_table(entries, LedgerEntry))


# -- pan runs -------------------------------------------------------------------------------------


def run_rows(dest: str, files: Files) -> list[dict[str, Any]]:
    """One row per run, oldest first: its id, whether it finished, and its counts (from its
    summary, or from its commits for a run that did not finish)."""
    rows = []
    for run in _run_files(dest, files):
        folder = run_folder(dest, run.run_id)
        if run.finished:
            summary = json.loads(files.read_bytes(join(folder, SUMMARY_NAME)))
            rows.append({"run_id": run.run_id, "finished": True, **summary})
            continue
        tables = _read_tables([join(folder, m) for m in run.manifests], files, [None] * len(run.manifests))
        entries = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
        statuses = entries["status"].to_pylist()
        suspect = entries["error_type"].to_pylist().count("Suspect")
        rows.append(
            {"run_id": run.run_id, "finished": False, "succeeded": statuses.count("succeeded"),
             "failed": statuses.count("failed"), "suspect": suspect}
        )  # fmt: skip
    return rows


def failed_inputs(dest: str, since: str | None, files: Files) -> list[dict]:
    """The inputs whose latest entry is a failure, most attempted first."""
    entries = read_ledger(dest, since, files, columns=MANIFEST_SCHEMA.names).entries
    failed = entries.filter(pc.equal(entries["status"], "failed"))
    columns = ["key", "attempts", "error_type", "error", "run_id"]
    return sorted(failed.select(columns).to_pylist(), key=lambda e: (-e["attempts"], e["key"]))
