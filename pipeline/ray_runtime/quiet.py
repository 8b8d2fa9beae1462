"""How much of Ray's own output a command shows: everything with ``--verbose``, else only what
the user asked for."""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any

from pipeline.ray_runtime import private

_state = {"verbose": False, "stderr_filter": False}


def quiet_ray(*, verbose: bool) -> None:
    """How much of Ray's own output the command shows: everything with ``verbose``, else errors.

    Call it before Ray starts. Besides log levels (applied by ``connect``), this hides the token
    authentication notice of a new local cluster (authentication stays on), the job client's
    package uploads and its log-stream notices (``quiet_loggers``), Ray Data's warnings about its
    own sizing, and, where stderr is this process's own file descriptor 2 (a console, not a
    capture), filters Ray's C++ output to it.
    """
    _state["verbose"] = verbose
    quiet_loggers()
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data(\.|$)")
        _filter_native_stderr()


# Loggers of Ray's client side that say what a user did not ask for: the token notice of a new
# local cluster, "Uploading package ...", "WebSocket closed for job ...". Ray's modules set their
# own level when imported, so this is applied again after each import (``quiet_loggers``).
_CLIENT_LOGGERS = (private.TOKEN_NOTICE, private.DASHBOARD_SDK, private.JOB_SDK, private.PACKAGE_UPLOAD)


def quiet_loggers() -> None:
    """Set Ray's client-side loggers to ERROR (INFO with ``verbose``). Call it after importing the
    Ray modules that own them: they set INFO on themselves at import."""
    level = logging.INFO if _state["verbose"] else logging.ERROR
    for logger in _CLIENT_LOGGERS:
        logging.getLogger(logger.name).setLevel(level)


USER_LINE = "[pan] "  # a worker's line meant for the user (``say``); the driver shows those only


def say(text: str) -> None:
    """Print ``text`` from a Ray worker for the user to read on the driver: shown as it is (no
    ``(RayTrainWorker pid=...)`` prefix, no colour codes), while the rest of the workers' output
    stays hidden unless ``--verbose`` (``connect``)."""
    print(f"{USER_LINE}{text}", flush=True)


def _show_user_lines(data: dict[str, Any]) -> None:
    """Ray's stream of worker output on the driver, reduced to the ``say`` lines."""
    stream = sys.stderr if data.get("is_err") else sys.stdout
    for line in data.get("lines", ()):
        if line.startswith(USER_LINE):
            print(line[len(USER_LINE) :], file=stream, flush=True)


def quiet_worker_output() -> None:
    """On the driver, show the workers' ``say`` lines only (``connect`` calls it unless verbose)."""
    dispatcher = private.WORKER_OUTPUT.get()
    dispatcher.remove_handler(private.RAY_PRINT_LOGS_HANDLER.name)
    dispatcher.add_handler("pan_user_lines", _show_user_lines)


# Lines of a job's log that Ray's job manager writes around the driver's own output (its start,
# its runtime environment), and Ray's log records from the driver's process.
_JOB_LOG_NOISE = (
    re.compile(r"^Running entrypoint for job \S+: "),
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\t(DEBUG|INFO) \S+\.py:\d+ -- "),
)


def job_log_lines(text: str) -> str:
    """A job's logs as a user reads them: Ray's own lines left out unless ``verbose``."""
    if _state["verbose"]:
        return text
    kept = [
        line for line in text.splitlines(keepends=True) if not any(p.search(line) for p in _JOB_LOG_NOISE)
    ]
    return "".join(kept)


def verbose() -> bool:
    """Whether Ray's own output is shown (``quiet_ray``)."""
    return _state["verbose"]


# Lines Ray's C++ core writes straight to file descriptor 2, which no logging setting reaches, and
# which say nothing a user can act on. Ray Data's actor pools always trip this one.
_NATIVE_NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments"),
    re.compile(rb"task_manager\.cc:\d+: Failed to push error to driver"),  # on Ctrl-C / SIGTERM
)


def _filter_native_stderr() -> None:
    """Route fd 2 through a pipe whose reader thread drops ``_NATIVE_NOISE`` lines; Python's
    ``sys.stderr`` keeps writing to the original descriptor directly (so a terminal stays one)."""
    if _state["stderr_filter"]:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # a capture (pytest), not a descriptor
        return
    _state["stderr_filter"] = True
    sys.stderr.flush()
    original = os.dup(2)
    sys.stderr = os.fdopen(
        original, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace"
    )
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(p.search(line) for p in _NATIVE_NOISE):
                    os.write(original, line)

    thread = threading.Thread(target=pump, name="pan-stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:  # at exit: fd 2 back, and what is still in the pipe written out
        os.dup2(original, 2)
        thread.join(timeout=1.0)

    atexit.register(restore)
