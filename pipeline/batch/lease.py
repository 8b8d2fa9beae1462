"""One run at a time per destination: the lease ``DEST/_lease``.

A run takes the lease before it claims or writes anything, renews it while it works, and gives it
back when it ends, however it ends. The lease is a small JSON file (``LeaseRecord``: run id, host,
pid, start, expiry, and on Linux what tells the holder's process apart from a later one with the
same pid) made with an atomic create (``storage.create_exclusive``): of two runs starting at once,
exactly one creates it. The other refuses with ``LeaseHeldError`` (exit code 75, "try again
later"), or with ``wait`` polls until the lease is given back or its holder is dead; the time it
polled is ``Lease.waited_s``, which is not part of the run's work.

A killed process cannot give its lease back: the next run removes a dead holder's lease and creates
its own. A holder is known dead
- when its lease has expired: its run stopped renewing it (a killed process, a lost machine). Expiry
  is read on the clock of the machine that looks, so the lease time (``DEFAULT_TTL_S``, 5 minutes)
  must stay well above the clock skew between machines and above the renewal period (a third of it);
- at once, when it ran on this host and its process is gone (``LeaseRecord.dead_because``): no
  process has its pid any more, the process has exited (not yet reaped), or (Linux) the pid belongs
  to a process that started at another time, a later one. "This host" is the same host name and,
  where the record has them, the same boot (``boot_id``) and pid namespace: a rebooted host, or
  another container that shares the host name, counts its pids afresh. A holder on another host is
  judged by expiry alone: its pids cannot be looked up from here.
Taking over a dead process's lease is logged as a warning (logger ``pipeline.batch.lease``) that names the
dead run, its pid and why it is known dead.

Two runs that find the same dead lease at the same moment both remove it; the atomic create lets
only one in, unless the second remove lands after the first create (a window of one round trip).
Then both run until the first renewal, a third of the lease time later: the run that finds
another's lease where its own should be has lost it, and stops at its next batch
(``LeaseLostError``). Outputs are named from inputs, so what both wrote in the meantime is the same
files, not duplicates.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pipeline.errors import DestinationError, PipelineError
from pipeline.io.storage import Files

DEFAULT_TTL_S = 300.0
EXIT_LEASE_HELD = 75  # EX_TEMPFAIL: the destination is busy; try again later

log = logging.getLogger(__name__)

_PROC = "/proc"  # Linux's process table; where it is absent, only "does the pid exist" can be asked


class LeaseHeldError(PipelineError):
    """Another live run holds the destination's lease."""

    exit_code = EXIT_LEASE_HELD


class LeaseLostError(DestinationError):
    """This run's lease was taken over (it could not renew it in time)."""


def new_run_id() -> str:
    """``<UTC time>-<host>-<random>``: sortable by start, unique across machines."""
    now = datetime.datetime.now(datetime.timezone.utc)
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
    return f"{now:%Y%m%dT%H%M%SZ}-{host}-{secrets.token_hex(3)}"


# -- the processes of this host (Linux /proc) -------------------------------------------------------


def _boot_id() -> str | None:
    """This boot of this host (``/proc/sys/kernel/random/boot_id``); None without /proc."""
    try:
        with open(f"{_PROC}/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """The pid namespace this process's pids are counted in (``pid:[4026531836]``); None without /proc."""
    try:
        return os.readlink(f"{_PROC}/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of process ``pid``: fields 3 and 22 of
    ``/proc/<pid>/stat``; None when /proc does not show it."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces and ")": split after the last.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """What ``DEST/_lease`` holds (JSON, one key per field).

    ``started``, ``expires``: epoch seconds. ``boot_id`` (``/proc/sys/kernel/random/boot_id``),
    ``pid_namespace`` and ``start_ticks`` (the holder's process start, in clock ticks after boot:
    field 22 of ``/proc/<pid>/stat``) tell the holder's process apart from a later one with the same
    pid; None where the holder's host has no /proc, and absent from records of earlier versions.
    """

    run_id: str
    host: str
    pid: int
    started: float
    expires: float
    boot_id: str | None = None
    pid_namespace: str | None = None
    start_ticks: int | None = None

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        """Raises ``ValueError`` or ``TypeError`` for anything but a lease record."""
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise TypeError(f"a JSON {type(fields).__name__}, not an object")
        # Fields this version does not know are left out, so that it still sees a later version's lease.
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    def describe(self) -> str:
        started = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
        left = self.expires - time.time()
        expiry = f"expires in {left:.0f} s" if left > 0 else "has expired"
        return (
            f"run {self.run_id} (pid {self.pid} on {self.host}, started {started:%Y-%m-%d %H:%M:%S} UTC; "
            f"its lease {expiry})"
        )

    def dead_because(self) -> str | None:
        """Why the holder's process is known to be dead, or None when it may be alive.

        Known only for a holder on this host (same host name and, where recorded, the same boot id
        and pid namespace): its pid is gone, or shows an exited process, or (where ``start_ticks`` is
        recorded and /proc shows it) a process that started at another time. Says nothing of expiry.
        """
        if self.host != socket.gethostname() or self.pid <= 0:  # kill(0 or -1) would ask about a group
            return None
        if self.boot_id is not None and self.boot_id != _boot_id():
            return None  # another boot (or a machine of the same name): its pids are not this boot's
        if self.pid_namespace is not None and self.pid_namespace != _pid_namespace():
            return None  # another container on this host: its pids are not ours to look up
        if os.name != "posix":
            return None  # os.kill(pid, 0) terminates the process on Windows: there is no harmless probe
        try:
            os.kill(self.pid, 0)  # asks, sends nothing; unlike /proc, not hidden by hidepid
        except ProcessLookupError:
            return f"no process has pid {self.pid} any more"
        except PermissionError:
            pass  # it exists, under another user
        stat = _proc_stat(self.pid)
        if stat is None:  # no /proc, or hidden from us, or exited just now: the next look will tell
            return None
        state, start_ticks = stat
        if state in "ZXx":
            return f"its process (pid {self.pid}) has exited and is not yet reaped"
        if self.start_ticks is not None and start_ticks != self.start_ticks:
            tick = os.sysconf("SC_CLK_TCK")
            return (
                f"pid {self.pid} is now another process, started {start_ticks / tick:.2f} s after boot, "
                f"not {self.start_ticks / tick:.2f} s"
            )
        return None


def lease_holder(location: str, files: Files) -> LeaseRecord | None:
    """The lease at ``location`` as it is now, or None when nobody holds it."""
    try:
        return LeaseRecord.from_json(files.read_bytes(location))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:  # not ours to guess: a person must look
        raise DestinationError(
            f"{location} is not a lease pan wrote ({exc}); remove it if no run is on"
        ) from exc


class Lease:
    """``with Lease(location, run_id, files): ...``: hold the lease at ``location`` (reached through
    ``files``, the job's ``storage.Files``) for the block.

    ``wait``: poll every ``poll_s`` until the lease is free, calling ``on_wait(holder)`` once;
    otherwise a lease held by a live run raises ``LeaseHeldError`` at once. A dead holder's lease is
    taken over (see the module docstring). ``waited_s``: the seconds the last ``acquire`` spent
    waiting for another live run (0.0 when it did not wait), which is not this run's work.
    ``check()`` raises ``LeaseLostError`` if a renewal found the lease taken over.
    """

    def __init__(
        self,
        location: str,
        run_id: str,
        files: Files,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        wait: bool = False,
        poll_s: float = 5.0,
        on_wait: Callable[[LeaseRecord], None] | None = None,
    ) -> None:
        self.location, self.run_id, self.ttl_s = location, run_id, ttl_s
        self.wait, self.poll_s, self.on_wait = wait, poll_s, on_wait
        self.files = files
        self.waited_s = 0.0
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None
        self._started = 0.0

    # -- the file ------------------------------------------------------------------------------

    def _record(self) -> LeaseRecord:
        now = time.time()
        pid = os.getpid()
        stat = _proc_stat(pid)
        return LeaseRecord(
            self.run_id,
            socket.gethostname(),
            pid,
            self._started or now,
            now + self.ttl_s,
            boot_id=_boot_id(),
            pid_namespace=_pid_namespace(),
            start_ticks=stat[1] if stat else None,
        )

    def _encode(self) -> bytes:
        return (json.dumps(asdict(self._record()), indent=2) + "\n").encode()

    def holder(self) -> LeaseRecord | None:
        """The lease as it is now, or None when nobody holds it."""
        return lease_holder(self.location, self.files)

    # -- taking, keeping, giving back -----------------------------------------------------------

    def acquire(self) -> None:
        told = False
        waiting_since: float | None = None
        while True:
            self._started = time.time()
            if self.files.create_exclusive(self.location, self._encode()):
                break
            holder = self.holder()
            if holder is None:
                continue  # given back between our create and our read: try again at once
            if holder.expires < time.time():
                self.files.remove(self.location)  # its run stopped renewing it
                continue
            dead = holder.dead_because()
            if dead:
                log.warning(
                    "%s: run %s (pid %d on %s) is dead: %s; taking its lease over",
                    self.location,
                    holder.run_id,
                    holder.pid,
                    holder.host,
                    dead,
                )
                self.files.remove(self.location)
                continue
            if not self.wait:
                raise LeaseHeldError(
                    f"{self.location} is held by {holder.describe()}: one run per destination at a time; "
                    "run again later, or with --wait-for-lease"
                )
            if waiting_since is None:
                waiting_since = time.monotonic()
            if self.on_wait and not told:
                self.on_wait(holder)
                told = True
            time.sleep(self.poll_s)
        self.waited_s = time.monotonic() - waiting_since if waiting_since is not None else 0.0
        self._thread = threading.Thread(target=self._renew, name="pan-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                holder = self.holder()
                if holder is None or holder.run_id != self.run_id:
                    self._lost = holder.describe() if holder else "nobody (it was removed)"
                    return
                self.files.write_bytes(self.location, self._encode())
            except PipelineError:  # a storage hiccup: try again next period, before expiry
                continue

    def check(self) -> None:
        if self._lost:
            raise LeaseLostError(f"lost the lease {self.location} to {self._lost}; this run stopped")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        holder = self.holder()
        if holder is not None and holder.run_id == self.run_id:
            self.files.remove(self.location)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
