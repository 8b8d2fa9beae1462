"""Progress of a long command, on stderr: a live bar on a terminal; elsewhere (a cluster job's log,
a pipe) one status line every ``interval`` seconds and a last one at the end.

The status says how many items are done of how many (when known), how they ended (succeeded,
failed, skipped...), the output rate in megapixels per second and the time left. Rates and the
time left count only the items worked on in this run: items skipped at the start (done by an
earlier run) would make them look fast.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

DEFAULT_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class JobProgress:
    """``with JobProgress("upscaling") as p: p.update(counts, output_pixels, total)``."""

    def __init__(
        self,
        what: str,
        *,
        unit: str = "inputs",
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        live: bool | None = None,
    ) -> None:
        self.what, self.unit, self.interval = what, unit, interval
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.live = self.console.is_terminal if live is None else live
        self.started = time.monotonic()
        self.last_line = self.started
        self.first_done: int | None = None  # items already done at the first update (skipped ones)
        self.status = ""
        self.printed = ""  # the last status line printed
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> JobProgress:
        if self.live:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=None, status="starting")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.status and self.status != self.printed and exc_info[0] is None:
            self._print()

    def describe(self, counts: Mapping[str, int], output_pixels: int, total: int | None) -> str:
        """The one-line status: ``12/40 inputs (10 succeeded, 2 failed) · 1.25 MP/s · 0:31 left``."""
        done = sum(counts.values())
        if self.first_done is None:
            self.first_done = done
        parts = [f"{done}/{total} {self.unit}" if total is not None else f"{done} {self.unit}"]
        detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        if detail:
            parts[0] += f" ({detail})"
        elapsed = time.monotonic() - self.started
        if output_pixels and elapsed > 0:
            parts.append(f"{output_pixels / 1e6 / elapsed:.2f} MP/s")
        worked = done - self.first_done
        if total is not None and worked > 0 and done < total:
            parts.append(f"{_duration((total - done) * elapsed / worked)} left")
        return " · ".join(parts)

    def update(self, counts: Mapping[str, int], output_pixels: int = 0, total: int | None = None) -> None:
        self.status = self.describe(counts, output_pixels, total)
        if self._bar is not None:
            self._bar.update(self._task, completed=sum(counts.values()), total=total, status=self.status)
        elif time.monotonic() - self.last_line >= self.interval:
            self._print()

    def _print(self) -> None:
        self.last_line, self.printed = time.monotonic(), self.status
        print(f"{self.what}: {self.status}", file=self.stream, flush=True)
