"""Where a batch job's results go, named from the inputs so that runs are idempotent.

Layout under DEST:
- ``<name>``: the PNG tree (``name`` = input key with extension ``.png``), format ``png``/``both``;
- ``parquet/part-<hash>.parquet``: one row per image (format ``parquet``/``both``), see ``PARQUET_SCHEMA``;
  the hash is of the names the file holds, so a re-run writing the same images writes the same file;
- ``_errors/<hash>.parquet``: one file per failed input (``key, name, error_type, message``), so
  ``pyarrow.parquet.read_table(DEST + "/_errors")`` is the errors table; cleared at the start of
  a run, since every failed input is retried;
- ``_summary.json``: the counts and throughput of the last run.
Every file appears under its final name only when complete (see ``pipeline.storage``).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import filesystem, join, list_files, remove, write_bytes

FORMATS = ("png", "parquet", "both")
PARQUET_DIR = "parquet"
ERRORS_DIR = "_errors"
SUMMARY_NAME = "_summary.json"

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("name", pa.string()),
        ("input_width", pa.int32()),
        ("input_height", pa.int32()),
        ("input_mode", pa.string()),
        ("output_width", pa.int32()),
        ("output_height", pa.int32()),
        ("scale", pa.int8()),
        ("weights_id", pa.string()),
        ("weights_sha256", pa.string()),
        ("png", pa.binary()),
        ("seconds", pa.float64()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [("key", pa.string()), ("name", pa.string()), ("error_type", pa.string()), ("message", pa.string())]
)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def wants_png(fmt: str) -> bool:
    return fmt in ("png", "both")


def wants_parquet(fmt: str) -> bool:
    return fmt in ("parquet", "both")


def existing_outputs(dest: str, fmt: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """Names whose outputs are complete for ``fmt`` (for ``both``: present in both sinks)."""
    files = list_files(dest, storage_options)
    sets = []
    if wants_png(fmt):
        sets.append({f for f in files if f.endswith(".png") and not f.startswith(("_", f"{PARQUET_DIR}/"))})
    if wants_parquet(fmt):
        names: set[str] = set()
        fs, root = filesystem(join(dest, PARQUET_DIR), storage_options)
        for part in (f for f in files if f.startswith(f"{PARQUET_DIR}/part-") and f.endswith(".parquet")):
            with fs.open(f"{root.rstrip('/')}/{part.split('/', 1)[1]}", "rb") as f:
                names.update(pq.read_table(f, columns=["name"]).column("name").to_pylist())
        sets.append(names)
    return set.intersection(*sets)


def prepare_dest(
    dest: str, fmt: str, *, overwrite: bool, storage_options: dict[str, Any] | None = None
) -> None:
    """Clear what a new run replaces: old errors always, old Parquet parts with ``overwrite``;
    and leftovers of a killed run (hidden ``.part`` temporaries)."""
    remove(join(dest, ERRORS_DIR), storage_options)
    if overwrite and wants_parquet(fmt):
        remove(join(dest, PARQUET_DIR), storage_options)
    for rel in list_files(dest, storage_options):
        if rel.rsplit("/", 1)[-1].startswith(".") and rel.endswith(".part"):
            remove(join(dest, rel), storage_options)


def write_png(dest: str, name: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes(join(dest, name), data, storage_options)


def write_parquet_part(
    dest: str, rows: Sequence[dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> str:
    """One Parquet file holding ``rows`` (dicts with PARQUET_SCHEMA's fields); returns its name."""
    table = pa.Table.from_pylist(list(rows), schema=PARQUET_SCHEMA)
    part = f"{PARQUET_DIR}/part-{_digest('|'.join(sorted(r['name'] for r in rows)))}.parquet"
    write_bytes(join(dest, part), _table_bytes(table), storage_options)
    return part


def write_error(
    dest: str,
    key: str,
    name: str,
    error_type: str,
    message: str,
    storage_options: dict[str, Any] | None = None,
) -> None:
    table = pa.Table.from_pylist(
        [{"key": key, "name": name, "error_type": error_type, "message": message}], schema=ERRORS_SCHEMA
    )
    write_bytes(join(dest, f"{ERRORS_DIR}/{_digest(key)}.parquet"), _table_bytes(table), storage_options)


def write_summary(dest: str, summary: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    write_bytes(join(dest, SUMMARY_NAME), (json.dumps(summary, indent=2) + "\n").encode(), storage_options)
