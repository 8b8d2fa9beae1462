"""The Hugging Face hub as a place settings can name: telling a repo id from a local path, and
failing fast when the hub cannot be reached.

A setting that takes weights or a dataset (``--weights``, ``--data``) may be a local path, a URL or
a hub repo id (``owner/name``). ``resolve_source`` decides once, on the driver: what exists locally
is a local path (made absolute, so Ray workers read what the user meant); ``owner/name`` that does
not exist locally, and whose ``owner`` is not a local folder, is a repo id; anything else is a
local path that does not exist, reported as such instead of being tried on the hub.

``unreachable_reason`` answers "can we ask the hub?" with one quick TCP connection (or at once
under ``HF_HUB_OFFLINE``), so an offline machine learns it in a second or two, not after the
hub client's retries (27 s measured for the default weights).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from pipeline.io.storage import is_url, resolve_location

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_WEIGHTS = "eugenesiow/pan"  # the model card's weights on the hub
CONNECT_TIMEOUT_S = 3.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Names that are files, not repos: "weights/PANx2.pth" is a path even though it has one slash.
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".parquet", ".zip", ".tar", ".gz", ".tgz")
_TRUE = ("1", "true", "yes", "on")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub repo id (``owner/name``) and no local file suffix."""
    return bool(_REPO_ID.match(text)) and not text.lower().endswith(_FILE_SUFFIXES)


def resolve_source(text: str) -> str:
    """A URL unchanged; an existing local path absolute; a repo id (not a local path) unchanged;
    anything else as the absolute local path it names (whose absence is reported when used)."""
    if is_url(text):
        return text
    path = Path(text.removeprefix("file://")).expanduser()
    # "benchmarks/Set5" where benchmarks/ is a local folder means a path that is missing, not a repo.
    if path.exists() or path.parent.is_dir() or not is_repo_id(text):
        return resolve_location(text)
    return text


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@functools.cache
def _probe(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc.strerror or type(exc).__name__})"


def unreachable_reason() -> str | None:
    """Why the hub cannot be asked now (``HF_HUB_OFFLINE``, no connection to ``HF_ENDPOINT``), or
    None when it answers. The connection is tried once per process."""
    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return _probe(url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
