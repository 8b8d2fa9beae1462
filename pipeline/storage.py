"""One way to reach files: local paths and every fsspec URL (``s3://``, ``gs://``, ``memory://``...).

Writes are atomic where the store allows it: local files go to a temporary name in the same folder
and are renamed into place, so no half-written file is ever visible under its final name; object
stores (S3 and the like) make a PUT visible only once complete.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def filesystem(
    location: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for a local path or URL.

    fsspec shares filesystem instances and their listing caches within a process; files here change
    under us (re-runs, other workers), so the cache for the location is dropped first. A stale entry
    made s3fs send an old ETag and fail with PreconditionFailed.
    """
    fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
    fs.invalidate_cache(path)
    return fs, path


def read_bytes(location: str, storage_options: dict[str, Any] | None = None) -> bytes:
    if not is_url(location):
        return Path(location.removeprefix("file://")).expanduser().read_bytes()
    fs, path = filesystem(location, storage_options)
    return fs.cat_file(path)


def write_bytes(location: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``location``, creating parent folders; atomic as described above."""
    if is_url(location):
        fs, path = filesystem(location, storage_options)
        if not isinstance(fs, LocalFileSystem):
            fs.pipe_file(path, data)
            return
        location = path
    target = Path(location.removeprefix("file://")).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden name (not mkstemp, whose 0600 mode would ignore the user's umask).
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def join(base: str, rel: str) -> str:
    """``rel`` (posix) under ``base``, keeping URLs URLs and paths paths."""
    if is_url(base):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return str(Path(base.removeprefix("file://")).expanduser() / rel)


def list_files(location: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Paths of all files under ``location``, relative to it (posix); empty if it does not exist."""
    fs, root = filesystem(location, storage_options)
    if not fs.exists(root):
        return []
    root = root.rstrip("/")
    return sorted(p[len(root) :].lstrip("/") for p in fs.find(root))


def remove(location: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(location, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload_dir(local: str | Path, location: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy the files of a local folder to ``location`` (replacing files of the same names)."""
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            write_bytes(
                join(location, path.relative_to(local).as_posix()), path.read_bytes(), storage_options
            )


def pyarrow_filesystem(location: str, storage_options: dict[str, Any] | None = None):
    """(pyarrow filesystem, path) for libraries that take pyarrow filesystems (Ray Train, Ray Data).

    Wraps the fsspec filesystem rather than using pyarrow's own S3 client, which ignores
    ``AWS_ENDPOINT_URL``: one resolution of credentials and endpoints for the whole project.
    """
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(location, storage_options)
    if isinstance(fs, LocalFileSystem):
        return None, path
    return PyFileSystem(FSSpecHandler(fs)), path
