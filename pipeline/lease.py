"""One run at a time per destination: the lease ``DEST/_lease``.

A run takes the lease before it claims or writes anything, renews it while it works, and gives it
back when it ends, however it ends (a killed process cannot: its lease runs out instead). The lease
is a small JSON file (run id, host, pid, start, expiry) made with an atomic create
(``storage.create_exclusive``): of two runs starting at once, exactly one creates it. The other
refuses with ``LeaseHeldError`` (exit code 75, "try again later"), or with ``wait`` polls until the
lease is given back or expires.

A lease that has expired belongs to a run that stopped renewing it: a killed process, a lost
machine. The next run removes it and creates its own. Expiry is read on the clock of the machine
that looks, so the lease time (``DEFAULT_TTL_S``, 5 minutes) must stay well above the clock skew
between machines and above the renewal period (a third of it). Two runs that find the same
expired lease at the same moment both remove it; the atomic create lets only one in, unless the
second remove lands after the first create (a window of one round trip). Then both run until the
first renewal, a third of the lease time later: the run that finds another's lease where its own
should be has lost it, and stops at its next batch (``LeaseLostError``). Outputs are named from
inputs, so what both wrote in the meantime is the same files, not duplicates.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import DestinationError, PipelineError
from pipeline.storage import create_exclusive, read_bytes, remove, write_bytes

DEFAULT_TTL_S = 300.0
EXIT_LEASE_HELD = 75  # EX_TEMPFAIL: the destination is busy; try again later


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


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started: float  # epoch seconds
    expires: float

    def describe(self) -> str:
        started = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
        left = self.expires - time.time()
        expiry = f"expires in {left:.0f} s" if left > 0 else "has expired"
        return (
            f"run {self.run_id} (pid {self.pid} on {self.host}, started {started:%Y-%m-%d %H:%M:%S} UTC; "
            f"its lease {expiry})"
        )


def lease_holder(location: str, storage_options: dict[str, Any] | None = None) -> LeaseRecord | None:
    """The lease at ``location`` as it is now, or None when nobody holds it."""
    try:
        return LeaseRecord(**json.loads(read_bytes(location, storage_options)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:  # not ours to guess: a person must look
        raise DestinationError(
            f"{location} is not a lease pan wrote ({exc}); remove it if no run is on"
        ) from exc


class Lease:
    """``with Lease(location, run_id): ...``: hold the lease at ``location`` for the block.

    ``wait``: poll every ``poll_s`` until the lease is free, calling ``on_wait(holder)`` once;
    otherwise a held lease raises ``LeaseHeldError`` at once. ``check()`` raises
    ``LeaseLostError`` if a renewal found the lease taken over.
    """

    def __init__(
        self,
        location: str,
        run_id: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        wait: bool = False,
        poll_s: float = 5.0,
        on_wait: Callable[[LeaseRecord], None] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.location, self.run_id, self.ttl_s = location, run_id, ttl_s
        self.wait, self.poll_s, self.on_wait = wait, poll_s, on_wait
        self.storage_options = storage_options
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None
        self._started = 0.0

    # -- the file ------------------------------------------------------------------------------

    def _record(self) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(
            self.run_id, socket.gethostname(), os.getpid(), self._started or now, now + self.ttl_s
        )

    def _encode(self) -> bytes:
        return (json.dumps(asdict(self._record()), indent=2) + "\n").encode()

    def holder(self) -> LeaseRecord | None:
        """The lease as it is now, or None when nobody holds it."""
        return lease_holder(self.location, self.storage_options)

    # -- taking, keeping, giving back -----------------------------------------------------------

    def acquire(self) -> None:
        told = False
        while True:
            self._started = time.time()
            if create_exclusive(self.location, self._encode(), self.storage_options):
                break
            holder = self.holder()
            if holder is None:
                continue  # given back between our create and our read: try again at once
            if holder.expires < time.time():
                remove(self.location, self.storage_options)  # its run stopped renewing it
                continue
            if not self.wait:
                raise LeaseHeldError(
                    f"{self.location} is held by {holder.describe()}: one run per destination at a time; "
                    "run again later, or with --wait-for-lease"
                )
            if self.on_wait and not told:
                self.on_wait(holder)
                told = True
            time.sleep(self.poll_s)
        self._thread = threading.Thread(target=self._renew, name="pan-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                holder = self.holder()
                if holder is None or holder.run_id != self.run_id:
                    self._lost = holder.describe() if holder else "nobody (it was removed)"
                    return
                write_bytes(self.location, self._encode(), self.storage_options)
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
            remove(self.location, self.storage_options)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
