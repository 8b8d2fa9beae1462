"""What a batch job reads: image files, Parquet shards and tar (webdataset) shards under one root.

One code path for local folders and every fsspec URL. ``list_inputs`` walks the root on the driver
and returns work units (one per file); ``read_unit`` runs inside a Ray task and turns a unit into
rows of ``key`` + raw ``bytes`` (no decoding here). Keys are paths relative to the root, posix
style: ``sub/photo.jpg`` for a file, ``shards/000.parquet/000017`` or ``shards/000.tar/s42.jpg``
for a shard member. Each row also has its output ``name``: the key with image extension ``.png``
(``sub/photo.png``, ``shards/000/000017.png``, ``shards/000/s42.png``), which makes runs idempotent.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.imaging import IMAGE_SUFFIXES
from pipeline.storage import filesystem, join

KEY_COLUMNS = ("key", "__key__", "path", "name", "filename")  # a Parquet shard's own row names


@dataclass(frozen=True)
class InputUnit:
    """One file to read: a single image, or a shard holding many."""

    url: str
    rel: str  # path relative to the source root
    kind: str  # "image" | "parquet" | "tar"
    done: frozenset[str] = field(default_factory=frozenset)  # output names that already exist

    @property
    def name(self) -> str:
        """Output name of an image unit; shard members are named under ``member_prefix``."""
        return posixpath.splitext(self.rel)[0] + ".png"

    @property
    def member_prefix(self) -> str:
        return posixpath.splitext(self.rel)[0] + "/"


def kind_of(path: str) -> str | None:
    suffix = posixpath.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".tar":
        return "tar"
    return None


def list_inputs(source: str, storage_options: dict[str, Any] | None = None) -> list[InputUnit]:
    """Every readable input under ``source`` (a folder or a single file), sorted by path."""
    fs, root = filesystem(source, storage_options)
    if not fs.exists(root):
        raise PipelineError(f"source not found: {source}")
    if fs.isfile(root):
        kind = kind_of(root)
        if kind is None:
            raise PipelineError(f"{source} is not an image, a .parquet or a .tar shard")
        return [InputUnit(source, posixpath.basename(root), kind)]
    root = root.rstrip("/")
    units = []
    for path in sorted(fs.find(root)):
        rel = path[len(root) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files and our own metadata (_errors, _summary.json) are not inputs
        kind = kind_of(rel)
        if kind is not None:
            units.append(InputUnit(join(source, rel), rel, kind))
    return units


@dataclass(frozen=True)
class InputRow:
    key: str
    name: str
    data: bytes | None  # None when skipped (outputs exist) or unreadable
    skipped: bool = False
    error_type: str = ""
    error: str = ""


def read_unit(unit: InputUnit, image_column: str, storage_options: dict[str, Any]) -> Iterator[InputRow]:
    """Rows of raw bytes for one unit; a unit that cannot be read yields one error row."""
    fs, path = filesystem(unit.url, storage_options)
    try:
        if unit.kind == "image":
            yield InputRow(unit.rel, unit.name, fs.cat_file(path))
        elif unit.kind == "parquet":
            yield from _parquet_rows(unit, fs.cat_file(path), image_column)
        else:
            yield from _tar_rows(unit, fs.cat_file(path))
    except (OSError, ValueError, tarfile.TarError, PipelineError) as exc:
        # pyarrow raises ArrowInvalid (a ValueError) for damaged Parquet; fsspec raises OSError.
        error = f"{unit.rel}: {exc}"
        yield InputRow(unit.rel, unit.name, None, error_type=type(exc).__name__, error=error)


def _parquet_rows(unit: InputUnit, data: bytes, image_column: str) -> Iterator[InputRow]:
    table = pq.read_table(io.BytesIO(data))
    if image_column not in table.column_names:
        raise PipelineError(f"no column '{image_column}' (columns: {table.column_names}); use --image-column")
    column = table.column(image_column).to_pylist()
    key_column = next((c for c in KEY_COLUMNS if c in table.column_names and c != image_column), None)
    names = table.column(key_column).to_pylist() if key_column else None
    for index, cell in enumerate(column):
        member = str(names[index]) if names else f"{index:06d}"
        key = f"{unit.rel}/{member}"
        name = unit.member_prefix + posixpath.splitext(posixpath.basename(member))[0] + ".png"
        if name in unit.done:
            yield InputRow(key, name, None, skipped=True)
            continue
        if isinstance(cell, dict):  # a datasets Image column: {"bytes": ..., "path": ...}
            cell = cell.get("bytes")
        yield InputRow(key, name, bytes(cell) if cell is not None else b"")


def _tar_rows(unit: InputUnit, data: bytes) -> Iterator[InputRow]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if not member.isfile() or kind_of(member.name) != "image":
                continue  # webdataset samples also carry .json/.txt/.cls members
            member_name = member.name.removeprefix("./")
            key = f"{unit.rel}/{member_name}"
            name = unit.member_prefix + posixpath.splitext(member_name)[0] + ".png"
            if name in unit.done:
                yield InputRow(key, name, None, skipped=True)
                continue
            extracted = tar.extractfile(member)
            yield InputRow(key, name, extracted.read() if extracted else b"")
