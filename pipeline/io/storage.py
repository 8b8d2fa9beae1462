"""One way to reach files: local paths and every fsspec URL (``s3://``, ``gs://``, ``memory://``...).

A job reaches its files through one ``Files`` object, built once from the job's storage options
(fsspec's: credentials, endpoint, ``anon``...): every read, write, listing and delete goes through
it, in the driver and in every Ray task, actor and Ray Train worker it is shipped to, so no process
can reach a URL without the settings the user gave once. The functions of this module that take
no ``Files`` only name and compare locations; they never touch storage.

Writes are atomic where the store allows it: local files go to a temporary name in the same folder
and are renamed into place, so no half-written file is ever visible under its final name; object
stores (S3 and the like) make a PUT visible only once complete.

Failures the user can fix (permission denied, no space left, a missing bucket, an unreachable
endpoint, missing credentials) leave here as ``StorageError`` naming the location; a file that is
simply absent stays ``FileNotFoundError`` on reads, which callers treat as a normal answer.
Local paths are made absolute on the driver (``resolve_location``) before a job ships them to Ray
workers, whose working folder is not the user's.
"""

from __future__ import annotations

import errno
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError, StorageError, first_line

PROBE_PREFIX = ".pan-write-probe-"
# For checks before a job starts: one quick try, so a down endpoint is reported in about a second
# instead of after botocore's and s3fs's retries (5-10 s measured against a closed port).
_FAIL_FAST = {"s3": {"config_kwargs": {"connect_timeout": 3, "retries": {"max_attempts": 1}}}}


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def resolve_location(location: str) -> str:
    """A URL unchanged; a local path (``~``, relative, ``file://``) as an absolute path."""
    if is_url(location):
        return location
    return os.path.abspath(Path(location.removeprefix("file://")).expanduser())


@contextmanager
def reported(location: str, doing: str, *, absent_ok: bool = False) -> Iterator[None]:
    """What fails in the block while ``doing`` (reading, writing, listing...) ``location`` leaves
    as one ``StorageError`` line (``storage_error``). A ``PipelineError`` passes unchanged, and so
    does ``FileNotFoundError`` with ``absent_ok``: an absent file is an answer the caller handles."""
    try:
        yield
    except PipelineError:
        raise
    except FileNotFoundError as exc:
        if absent_ok:
            raise
        raise storage_error(exc, location, doing) from exc
    except Exception as exc:
        raise storage_error(exc, location, doing) from exc


def storage_error(exc: BaseException, location: str, doing: str) -> StorageError:
    """``exc``, raised while ``doing`` (reading, writing, listing...) ``location``, as one line
    that says what is wrong and what to do."""
    kind = {c.__name__ for c in type(exc).__mro__}  # botocore's and aiohttp's, without importing them
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        why = "no space left on the device (or over quota): free some space or choose another destination"
    elif code == errno.EROFS:
        why = "the file system is read-only"
    elif isinstance(exc, PermissionError) or "AccessDenied" in str(exc):
        why = "permission denied: check the folder's permissions or the credentials' rights"
    elif isinstance(exc, NotADirectoryError | FileExistsError):
        why = "a part of the path is a file, not a folder"
    elif isinstance(exc, IsADirectoryError):
        why = "it is a folder, not a file"
    elif isinstance(exc, FileNotFoundError) and is_url(location):
        bucket = location.split("://", 1)[1].split("/", 1)[0]
        why = f"not found; does the bucket '{bucket}' exist?"
    elif isinstance(exc, FileNotFoundError):
        why = "no such file or folder"
    elif "NoCredentialsError" in kind or "PartialCredentialsError" in kind:
        why = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --storage-options"
    elif kind & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"}:
        why = f"cannot reach the endpoint ({first_line(exc)}); is it up, is AWS_ENDPOINT_URL right?"
    else:
        why = f"{type(exc).__name__}: {first_line(exc)}"
    return StorageError(f"cannot {doing} {location}: {why}")


def location_key(location: str) -> tuple[str, str]:
    """(protocol, normalised path) for comparing locations: local paths resolved (symlinks
    followed), URLs without trailing slashes."""
    if is_url(location):
        protocol, rest = location.split("://", 1)
        return protocol, posixpath.normpath("/" + rest).rstrip("/") or "/"
    return "file", os.path.realpath(resolve_location(location))


def same_location(a: str, b: str) -> bool:
    """Whether two locations name the same file: same normalised path, or for local files that
    exist, the same file on disk (a hard link, a symlink)."""
    if location_key(a) == location_key(b):
        return True
    if is_url(a) or is_url(b):
        return False
    try:
        return os.path.samefile(resolve_location(a), resolve_location(b))
    except OSError:
        return False


def is_within(inner: str, outer: str) -> bool:
    """Whether ``inner`` is ``outer`` or lies under it (same protocol, path prefix by parts)."""
    (p1, a), (p2, b) = location_key(inner), location_key(outer)
    if p1 != p2:
        return False
    sep = os.sep if p1 == "file" else "/"
    return a == b or a.startswith(b.rstrip(sep) + sep)


def join(base: str, rel: str) -> str:
    """``rel`` (posix) under ``base``, keeping URLs URLs and paths paths."""
    if is_url(base):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return str(Path(base.removeprefix("file://")).expanduser() / rel)


EXCLUSIVE_CREATE = "local files (a hard link to a complete file) and S3 (a put with If-None-Match: *)"


class Files:
    """How a job reaches its files: every read, write, listing and delete with the job's storage
    ``options`` (fsspec's, e.g. ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url":
    ...}}`` or ``{"anon": true}``), built once and shipped whole to every process of the job.

    It pickles as its options (each process makes its own filesystems; fsspec caches them per
    options), and its ``repr`` names the options' keys, never their values (credentials).
    Failures the user can fix leave as ``StorageError`` (``reported``); an absent file stays
    ``FileNotFoundError`` on reads, which callers treat as a normal answer.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return Files, (self.options,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Files) and other.options == self.options

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.options)))

    def __repr__(self) -> str:
        return f"Files(options with keys {sorted(self.options)})" if self.options else "Files()"

    def filesystem(self, location: str, *, fail_fast: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem and the path within it for a local path or URL.

        fsspec shares filesystem instances and their listing caches within a process; files here
        change under us (re-runs, other workers), so the cache for the location is dropped first: a
        stale entry makes s3fs send an old ETag and fail with PreconditionFailed. ``fail_fast``: no
        retries and short timeouts where the protocol has such settings (checks before a job starts).
        """
        options = dict(self.options)
        protocol = location.split("://", 1)[0] if is_url(location) else "file"
        if "::" in location and options:  # zip://member::s3://bucket/a.zip: the options are the inner one's
            inner = location.rsplit("::", 1)[1]
            options = {inner.split("://", 1)[0] if is_url(inner) else "file": options}
        for key, value in _FAIL_FAST.get(protocol, {}).items() if fail_fast else ():
            options[key] = {**value, **options.get(key, {})} if isinstance(value, dict) else value
        fs, path = fsspec.core.url_to_fs(location, **options)
        fs.invalidate_cache(path)
        return fs, path

    def pyarrow_filesystem(self, location: str) -> tuple[Any, str]:
        """(pyarrow filesystem, path) for libraries that take pyarrow filesystems (Ray Train, Ray
        Data); (None, path) for a local path.

        Wraps the fsspec filesystem rather than using pyarrow's own S3 client, which ignores
        ``AWS_ENDPOINT_URL``: one resolution of credentials and endpoints for the whole project.
        """
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = self.filesystem(location)
        if isinstance(fs, LocalFileSystem):
            return None, path
        return PyFileSystem(FSSpecHandler(fs)), path

    def exists(self, location: str) -> bool:
        with reported(location, "check"):
            fs, path = self.filesystem(location)
            return bool(fs.exists(path))

    def read_bytes(self, location: str) -> bytes:
        """The bytes at ``location``; ``FileNotFoundError`` when there is none."""
        with reported(location, "read", absent_ok=True):
            if not is_url(location):
                return Path(location.removeprefix("file://")).expanduser().read_bytes()
            fs, path = self.filesystem(location)
            return fs.cat_file(path)

    def write_bytes(self, location: str, data: bytes, *, staging: str | None = None) -> None:
        """Write ``data`` to ``location``, creating parent folders. Local files go to a temporary
        name in the same folder and are renamed into place, so no half-written file is ever
        visible under its final name; object stores make a PUT visible only once complete.

        ``staging``: a local folder (on the target's filesystem) to hold the temporary instead of
        the target's own folder, so that a writer killed mid-write (its node lost) leaves its
        temporary there, for its owner to clear, not beside the finished files. Where the rename
        from it cannot work (the folder is on another filesystem), the temporary goes to the
        target's folder after all. Object stores need no temporary and ignore it."""
        with reported(location, "write"):
            if is_url(location):
                fs, path = self.filesystem(location)
                if not isinstance(fs, LocalFileSystem):
                    fs.pipe_file(path, data)
                    return
                location = path
            _write_local(Path(location.removeprefix("file://")).expanduser(), data, staging)

    def create_exclusive(self, location: str, data: bytes) -> bool:
        """Write ``data`` to ``location`` only if nothing is there, atomically: True if this call
        created it, False if it existed. Only storages with an atomic create qualify
        (``EXCLUSIVE_CREATE``); any other is a ``StorageError``, since a check-then-write would let
        two writers both believe they won."""
        with reported(location, "create"):
            fs, path = self.filesystem(location)
            if isinstance(fs, LocalFileSystem):
                target = Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
                try:
                    tmp.write_bytes(data)
                    os.link(tmp, target)  # fails if target exists; readers never see a partial file
                    return True
                except FileExistsError:
                    return False
                finally:
                    tmp.unlink(missing_ok=True)
            protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
            if not protocols & {"s3", "s3a"}:
                raise StorageError(
                    f"{location}: no atomic create on this storage; pan has one for {EXCLUSIVE_CREATE}"
                )
            try:
                fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False

    def check_writable(self, location: str) -> None:
        """Prove that files can be written under the folder or prefix ``location`` (creating it if
        needed): write a small hidden probe file and delete it. One quick try on object stores, so
        a missing bucket, bad credentials or a down endpoint fail here in about a second."""
        probe = join(location, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        with reported(location, "write under"):
            if is_url(location):
                fs, path = self.filesystem(probe, fail_fast=True)
                fs.pipe_file(path, b"probe")
                fs.rm_file(path)
                return
            folder = Path(resolve_location(location))
            if folder.exists() and not folder.is_dir():
                raise StorageError(f"cannot write under {location}: it is a file, not a folder")
            folder.mkdir(parents=True, exist_ok=True)
            Path(probe).write_bytes(b"probe")
            Path(probe).unlink()

    def check_listable(self, location: str) -> bool:
        """Whether ``location`` exists, asked with one quick try; ``StorageError`` when the store
        cannot answer (unreachable endpoint, no credentials, permission denied)."""
        with reported(location, "list"):
            fs, path = self.filesystem(location, fail_fast=True)
            return bool(fs.exists(path))

    def list_files(self, location: str) -> list[str]:
        """Paths of all files under ``location``, relative to it (posix); empty if it does not exist."""
        with reported(location, "list"):
            fs, root = self.filesystem(location)
            if not fs.exists(root):
                return []
            root = root.rstrip("/")
            return sorted(p[len(root) :].lstrip("/") for p in fs.find(root))

    def remove(self, location: str) -> None:
        """Delete the file or folder at ``location``, if there is one."""
        with reported(location, "delete"):
            fs, path = self.filesystem(location)
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def upload_dir(self, local: str | Path, location: str) -> None:
        """Copy the files of a local folder to ``location`` (replacing files of the same names)."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.write_bytes(join(location, path.relative_to(local).as_posix()), path.read_bytes())


def _write_local(target: Path, data: bytes, staging: str | None) -> None:
    """``Files.write_bytes`` on a local disk: a temporary, then an atomic rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden name (not mkstemp, whose 0600 mode would ignore the user's umask).
    name = f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    folder = target.parent
    if staging is not None and not is_url(staging):
        folder = Path(staging.removeprefix("file://")).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / name
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV or folder == target.parent:
                raise
            tmp.unlink()
            tmp = target.with_name(name)
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
