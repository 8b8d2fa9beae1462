"""What a batch job reads: image files, Parquet shards and tar (webdataset) shards under one root.

One code path for local folders and every fsspec URL. ``list_inputs`` walks the root on the driver
and returns work units (one per file); ``read_unit`` runs inside a Ray task and turns a unit into
rows of ``key`` + raw ``bytes`` (no decoding here). Keys are paths relative to the root, posix
style: ``sub/photo.jpg`` for a file, ``shards/000.parquet/000017`` or ``shards/000.tar/s42.jpg``
for a shard member. Each row also has its output ``name``, made from the key by
``sinks.output_name`` (``sub/photo.png``, ``shards/000/000017.png``, ``shards/000/s42.png``), which
makes runs idempotent.

Each unit carries the size and version (ETag, else modification time) the listing gave: what the
run ledger compares to find new and changed inputs (``pipeline.batch.ledger``).

What is not an input is counted, never dropped unseen (``Listing``): hidden files and folders (a
path part starting with ``.``: editors' and systems' own files, ``.DS_Store``, ``.git``) and files
of other types (by extension: not an image, ``.parquet`` or ``.tar``). Names starting with ``_``
are inputs like any other (``_DSC0001.JPG`` is how cameras name Adobe RGB files); pan's own files
live in the destination, which lies outside the source or, where it may lie inside, is left out
by its path (``exclude``).

Each unit knows, per sink, which of its output names are already written (``written``); a row
carries the sinks it still has to be written to (``sinks``), so an input half done by an earlier
run (its PNG written but not its Parquet row, say) is finished without writing anything twice.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.batch.sinks import output_name, shard_prefix
from pipeline.errors import PipelineError
from pipeline.imaging import IMAGE_SUFFIXES
from pipeline.io.storage import Files, join, reported

KEY_COLUMNS = ("key", "__key__", "path", "name", "filename")  # a Parquet shard's own row names


@dataclass(frozen=True)
class InputUnit:
    """One file to read: a single image, or a shard holding many."""

    url: str
    rel: str  # path relative to the source root
    kind: str  # "image" | "parquet" | "tar"
    size: int = 0
    version: str = ""  # ETag, else modification time: changes when the file does
    # sink -> this unit's output names already written there (for a shard: its members')
    written: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # a shard's member output names that other inputs own (name -> the owner's key): those members
    # are collisions (``pipeline.batch.planner``)
    taken: Mapping[str, str] = field(default_factory=dict)


def file_version(info: Mapping[str, Any]) -> str:
    """What changes when a file does, from a listing's entry: the ETag where the store gives one
    (S3 and the like), else the modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    return str(mtime) if mtime is not None else ""


def kind_of(path: str) -> str | None:
    suffix = posixpath.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".tar":
        return "tar"
    return None


def missing_sinks(name: str, sinks: Sequence[str], written: Mapping[str, frozenset[str]]) -> tuple[str, ...]:
    """The sinks among ``sinks`` that do not hold output ``name`` yet."""
    return tuple(s for s in sinks if name not in written.get(s, ()))


HIDDEN = "hidden"  # a file or folder whose name starts with "."
OTHER = "other"  # not an image, .parquet or .tar by its extension
EXAMPLES_KEPT = 3


@dataclass(frozen=True)
class Listing:
    """A source's files: the inputs (``units``, sorted by path), and the files that are not inputs,
    counted by why (``ignored``: ``HIDDEN``, ``OTHER``) with a few of their paths (``examples``)."""

    units: list[InputUnit]
    ignored: Mapping[str, int] = field(default_factory=dict)
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def list_inputs(source: str, files: Files, *, exclude: str | None = None) -> Listing:
    """Every input under ``source`` (a folder or a single file), sorted by path, and what else the
    source holds (see the module docstring).

    ``exclude``: a folder under ``source`` (relative, posix) whose files are not inputs: a
    destination inside the source (pan's own files: neither listed nor counted).
    """
    with reported(source, "list"):
        fs, root = files.filesystem(source)
        if not fs.exists(root):
            raise PipelineError(f"source not found: {source}")
        if fs.isfile(root):
            kind = kind_of(root)
            if kind is None:
                raise PipelineError(f"{source} is not an image, a .parquet or a .tar shard")
            info = fs.info(root)
            unit = InputUnit(
                source, posixpath.basename(root), kind, int(info.get("size") or 0), file_version(info)
            )
            return Listing([unit])
        root = root.rstrip("/")
        listing = fs.find(root, detail=True)
    units = []
    ignored: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for path in sorted(listing):
        rel = path[len(root) :].lstrip("/")
        if exclude and (rel == exclude or rel.startswith(exclude.rstrip("/") + "/")):
            continue
        kind = kind_of(rel)
        why = HIDDEN if any(part.startswith(".") for part in rel.split("/")) else None if kind else OTHER
        if why:
            ignored[why] += 1
            if len(examples.setdefault(why, [])) < EXAMPLES_KEPT:
                examples[why].append(rel)
            continue
        info = listing[path]
        units.append(InputUnit(join(source, rel), rel, kind, int(info.get("size") or 0), file_version(info)))
    return Listing(units, dict(ignored), {k: tuple(v) for k, v in examples.items()})


@dataclass(frozen=True)
class InputRow:
    key: str
    name: str
    data: bytes | None  # None when skipped (outputs exist) or unreadable
    sinks: tuple[str, ...] = ()  # the sinks to write it to; empty: skipped, every output exists
    error_type: str = ""
    error: str = ""

    @property
    def skipped(self) -> bool:
        return not self.sinks and not self.error_type


COLLISION = "OutputNameCollision"


def collision_message(key: str, name: str, owner: str, advice: str = "rename one of them") -> str:
    """Why input ``key`` gets no output: its output ``name`` (or shard prefix) is taken by
    ``owner`` ("the input a.png", "pan's own folder _runs/ of the destination")."""
    return f"{key}: its output name {name} is taken by {owner}; {advice}"


def read_unit(unit: InputUnit, sinks: Sequence[str], image_column: str, files: Files) -> Iterator[InputRow]:
    """Rows of raw bytes for one unit, each with the ``sinks`` that still lack its output; a unit
    that cannot be read yields one error row. Shard members whose output name another input owns
    (``unit.taken``) or an earlier member took (``x/a.png`` and ``y/a.png`` of a Parquet shard)
    become error rows, never a second output."""
    fs, path = files.filesystem(unit.url)
    seen: dict[str, str] = {}  # output name -> the member that took it
    try:
        if unit.kind == "image":
            name = output_name(unit.rel)
            rows = (InputRow(unit.rel, name, fs.cat_file(path), missing_sinks(name, sinks, unit.written)),)
        elif unit.kind == "parquet":
            rows = _parquet_rows(unit, sinks, fs.cat_file(path), image_column)
        else:
            rows = _tar_rows(unit, sinks, fs.cat_file(path))
        for row in rows:
            owner = unit.taken.get(row.name) or seen.get(row.name)
            if owner:
                message = collision_message(row.key, row.name, f"the input {owner}")
                yield InputRow(row.key, row.name, None, tuple(sinks), COLLISION, message)
                continue
            seen[row.name] = row.key
            yield row
    except (OSError, ValueError, tarfile.TarError, PipelineError) as exc:
        # pyarrow raises ArrowInvalid (a ValueError) for damaged Parquet; fsspec raises OSError.
        error = f"{unit.rel}: {exc}"
        name = output_name(unit.rel) if unit.kind == "image" else shard_prefix(unit.rel)
        yield InputRow(unit.rel, name, None, tuple(sinks), error_type=type(exc).__name__, error=error)


def _parquet_rows(
    unit: InputUnit, sinks: Sequence[str], data: bytes, image_column: str
) -> Iterator[InputRow]:
    table = pq.read_table(io.BytesIO(data))
    if image_column not in table.column_names:
        raise PipelineError(f"no column '{image_column}' (columns: {table.column_names}); use --image-column")
    column = table.column(image_column).to_pylist()
    key_column = next((c for c in KEY_COLUMNS if c in table.column_names and c != image_column), None)
    names = table.column(key_column).to_pylist() if key_column else None
    for index, cell in enumerate(column):
        member = str(names[index]) if names else f"{index:06d}"
        key = f"{unit.rel}/{member}"
        name = output_name(posixpath.basename(member), unit.rel)
        missing = missing_sinks(name, sinks, unit.written)
        if not missing:
            yield InputRow(key, name, None)
            continue
        if isinstance(cell, dict):  # a datasets Image column: {"bytes": ..., "path": ...}
            cell = cell.get("bytes")
        yield InputRow(key, name, bytes(cell) if cell is not None else b"", missing)


def _tar_rows(unit: InputUnit, sinks: Sequence[str], data: bytes) -> Iterator[InputRow]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if not member.isfile() or kind_of(member.name) != "image":
                continue  # webdataset samples also carry .json/.txt/.cls members
            member_name = member.name.removeprefix("./")
            key = f"{unit.rel}/{member_name}"
            name = output_name(member_name, unit.rel)
            missing = missing_sinks(name, sinks, unit.written)
            if not missing:
                yield InputRow(key, name, None)
                continue
            extracted = tar.extractfile(member)
            yield InputRow(key, name, extracted.read() if extracted else b"", missing)
