"""Ray plumbing shared by the jobs (upscale, eval, train): joining a cluster or starting an
embedded one that is quiet and leaves nothing behind, shutting it down, and finding the user's
error inside a Ray failure.

An embedded Ray (no address given) is the command's own: it starts without the dashboard, says
only what matters (Ray's own INFO lines, warnings and its one benign C++ error line are hidden
unless ``quiet_ray(verbose=True)``), is shut down when the command ends (normally, on an error,
on Ctrl-C or SIGTERM), and, should the command be killed outright, a watchdog process ends every
process it had started within a few seconds (Linux; without it, Ray's agents, about 200 MB,
outlive a SIGKILLed driver by a minute or more).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import ClusterError, PipelineError, first_line
from pipeline.ray_runtime import private
from pipeline.ray_runtime.quiet import quiet_loggers, quiet_worker_output, verbose

# watchdog: the write end of the watchdog's pipe, once started; joined: whether connect joined a
# cluster (an address or RAY_ADDRESS) rather than starting a Ray of its own
_state: dict[str, Any] = {"watchdog": None, "joined": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is: the command unwinds and shuts its Ray down."""


AUTH_TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # Ray's own, read by Ray's clients


def use_configured_token() -> None:
    """Ray sends a token only under ``RAY_AUTH_MODE=token``, and an explicit address never turns
    that mode on: joining a token cluster then fails after 20 s of retries with no word about the
    token. So a configured token (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) turns it on, here,
    before Ray is imported (its core reads the mode once)."""
    if any(os.environ.get(v) for v in AUTH_TOKEN_VARIABLES) and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"


def auth_token() -> str | None:
    """The Ray auth token the user configured (``RAY_AUTH_TOKEN``, else the first line of the file
    ``RAY_AUTH_TOKEN_PATH``), or None."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = first_line(Path(path).expanduser().read_text())
        except (OSError, IndexError) as exc:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: no token can be read there") from exc
    return token or None


def connect(address: str | None, *, ray_train: bool = False) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray; no-op if connected.

    Joining is explicit: ``auto`` (the Ray that ``ray start`` began on this machine), an address, or
    ``RAY_ADDRESS``. Without one the command's Ray is always a new one of its own (Ray's
    ``address="local"``), never a ``ray start`` cluster that happens to run on the machine (its
    resources and lifetime are not the command's), nor the dead one a stale
    ``/tmp/ray/ray_current_cluster`` names (``ray.init()`` would try to join that).

    The embedded Ray starts without its dashboard (about 1 s less start-up and a dozen processes,
    1.2 GB, fewer on a small machine); the commands report their own progress.

    ``ray_train``: the embedded Ray's workers run ``setup_worker`` first, which Ray Train's own
    actors need. Only training asks for it: a job with a runtime environment cannot use the
    workers Ray starts ahead with the cluster (for jobs without one), so every worker is started
    on demand, which delays its first tasks by a second or more and a short ``pan upscale`` by a
    few seconds (benchmarks/README.md, "Workers Ray starts ahead").
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    shown = verbose()
    embedded: dict[str, Any] = {}
    if not address:  # its workers inherit this process's environment (AWS_* included)
        _start_watchdog()
        embedded["include_dashboard"] = False
        if ray_train:
            embedded["runtime_env"] = {
                "worker_process_setup_hook": "pipeline.ray_runtime.session.setup_worker",
                "env_vars": {QUIET_WORKERS: "0" if shown else "1"},
            }
    level = logging.INFO if shown else logging.WARNING
    ray.init(address=address or EMBEDDED, logging_level=level, **embedded)
    _state["joined"] = bool(address)
    quiet_loggers()
    if not shown:
        quiet_worker_output()
    _terminate_on_sigterm()  # Ray's C++ core installs its own SIGTERM handler (a stack dump)


EMBEDDED = "local"  # ray.init's address for "start a new local Ray", whatever else runs here
QUIET_WORKERS = "PAN_QUIET_WORKERS"


def joined() -> bool:
    """Whether ``connect`` joined a cluster, rather than starting a Ray of the command's own."""
    return _state["joined"]


def setup_worker() -> None:
    """Each worker of an embedded Ray started for training runs this first
    (``worker_process_setup_hook``, ``connect(ray_train=True)``).

    It names its own cluster in ``RAY_ADDRESS``: Ray Train's placement-group cleaner asks the
    State API for "the" local cluster, and fails with "Found multiple active Ray instances" when
    another command has a Ray running on the machine. In a quiet run, it also silences what Ray
    Train's internal actors log at every step or second, which its ``LoggingConfig`` does not
    reach: that a result was reported, and, with no dashboard to ask, that the controller's state
    could not be queried (that only matters on a shared cluster)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if os.environ.get(QUIET_WORKERS) != "1":
        return
    logging.getLogger(private.PLACEMENT_GROUP_CLEANER.name).setLevel(logging.ERROR)
    # Named without importing Ray Train (0.7 s of CPU in every worker, most of which never train).
    logging.getLogger(private.TRAIN_CONTEXT.name).setLevel(logging.WARNING)


_WATCHDOG = r"""
import os, signal, sys, time
fd, mark, me = int(sys.argv[1]), sys.argv[2].encode(), os.getpid()
while os.read(fd, 4096):  # blocks until EOF: the driver has ended, however it ended
    pass
def marked():  # every process that inherited the driver's mark: Ray's GCS, raylet, agents, workers
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != me:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        yield int(pid)
            except OSError:
                pass
for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.0)):
    for pid in marked():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    end = time.monotonic() + grace
    while time.monotonic() < end and next(marked(), None):
        time.sleep(0.05)
"""
WATCHDOG_MARK = "PAN_RAY_OWNER"


def _start_watchdog() -> None:
    """Before an embedded Ray starts: a small process that waits for this one to end (EOF on a
    pipe only we hold; Python's pipes are not inherited by what Ray starts), then ends every
    process carrying this driver's mark in its environment, which all of Ray's processes inherit.
    A normal exit has already shut Ray down, so it finds nothing to do."""
    if _state["watchdog"] is not None or not os.path.isdir("/proc"):
        return
    mark = f"{os.getpid()}-{secrets.token_hex(8)}"
    read_end, write_end = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != WATCHDOG_MARK}
    subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(read_end), f"{WATCHDOG_MARK}={mark}"],
        pass_fds=(read_end,), env=env, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(read_end)
    _state["watchdog"] = write_end  # held open for this process's life
    os.environ[WATCHDOG_MARK] = mark


def _terminate_on_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not break the shutdown
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)


@contextmanager
def shutdown_on_exit() -> Iterator[None]:
    """Shut down the Ray the block started (or disconnect from the cluster it joined) when it ends:
    normally, on an error, on Ctrl-C, or on SIGTERM (raised as ``Terminated``), so that no Ray
    process of ours outlives the command. A Ray that was up before the block is left as it is."""
    previous = signal.getsignal(signal.SIGTERM)
    already = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    _terminate_on_sigterm()
    try:
        yield
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and not already:
            ray.shutdown()
            sys.unraisablehook = _after_shutdown(sys.unraisablehook)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _after_shutdown(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops what Ray Data's iterators raise from ``__del__``
    when they are collected after the shutdown ("Ray has not been started yet"): a Ctrl-C that
    lands inside ``next()`` keeps the iterator alive in the traceback, past ``dataset_batches``'s
    close. Everything else goes to ``hook``."""

    def drop_ray_data_finalizers(unraisable: Any) -> None:
        where = getattr(unraisable.object, "__module__", None) or ""
        if type(unraisable.exc_value).__name__ == "RaySystemError" and where.startswith("ray.data"):
            return
        hook(unraisable)

    return drop_ray_data_finalizers


def user_error(exc: BaseException) -> PipelineError | None:
    """The PipelineError (bad weights, unusable device...) that made a Ray task or actor fail.

    Ray passes some failures (an actor's constructor) only as text, so the text is read too.
    """
    from pipeline import errors

    chain, seen = exc, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, PipelineError):
            return chain
        chain = chain.__cause__ or chain.__context__
    match = re.search(r"pipeline\.errors\.(\w+): (.+)", str(exc))
    error_class = getattr(errors, match.group(1), None) if match else None
    if isinstance(error_class, type) and issubclass(error_class, PipelineError):
        return error_class(match.group(2).strip())
    return None
