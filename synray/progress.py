"""One progress display per job: a live line on a terminal, a line every few seconds off one, nothing when quiet.

Synthesis updates it from the driver as units finish. Training loops run in Ray Train workers, so rank 0
posts its counters (epoch, step, loss, images/s) to a small :class:`Board` actor and the driver polls it
while ``trainer.fit()`` blocks; Ray's own progress bars are off so that there is one display, not two.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["JobProgress", "Board", "watch_board", "Throttle"]


def _eta(done: float, total: float | None, since: tuple[float, float] | None, now: float) -> str:
    """Time left at the rate measured since the first progress seen (``since``: its time and count), so that
    start-up (actors, Train workers, the first batch) does not inflate the estimate."""
    if not total or since is None or done <= since[1] or done >= total:
        return ""
    left = (now - since[0]) * (total - done) / (done - since[1])
    return f"  ETA {int(left // 60)}:{int(left % 60):02d}"


class JobProgress:
    """``update(done, **fields)`` with ``done`` out of ``total`` (units, steps); ``fields`` are shown as ``key value``."""

    def __init__(self, title: str, total: int | None, unit: str, quiet: bool, every_s: float = 10.0) -> None:
        self.title, self.total, self.unit, self.quiet, self.every_s = title, total, unit, quiet, every_s
        self._last_line = -math.inf  # time.monotonic() counts from boot: the first line always prints
        self._printed_final = False
        self._first: tuple[float, float] | None = None  # (time, count) of the first progress seen
        self._live = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live("", console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.start()

    def _text(self, done: float, fields: Mapping[str, Any], now: float) -> str:
        if self._first is None and done > 0:
            self._first = (now, done)
        of = f"/{self.total}" if self.total else ""
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        head = f"[synray {self.title}] {self.unit} {int(done)}{of}"
        return "  ".join(x for x in (head, shown) if x) + _eta(done, self.total, self._first, now)

    def update(self, done: float, **fields: Any) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        text = self._text(done, fields, now)
        if self._live is not None:
            self._live.update(text)
            return
        final = bool(self.total) and done >= self.total
        if final and self._printed_final:
            return  # the driver keeps polling the board after the last step: one final line, not one per poll
        if now - self._last_line >= self.every_s or final:
            self._last_line, self._printed_final = now, final
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class Board:
    """The latest counters a training job posted (a Ray actor with no CPU, one per run)."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}

    def post(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def read(self) -> dict[str, Any]:
        return self.fields


class Throttle:
    """Calls ``send`` at most every ``every_s`` seconds (rank 0's posts to the board)."""

    def __init__(self, send: Callable[[dict[str, Any]], None], every_s: float = 2.0) -> None:
        self.send, self.every_s, self._last = send, every_s, -math.inf

    def __call__(self, fields: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.send(fields)


def watch_board(board: Any, progress: JobProgress, every_s: float = 1.0) -> Callable[[], None]:
    """Poll ``board`` into ``progress`` from a daemon thread; returns the function that stops it."""
    import ray

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                fields = ray.get(board.read.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - the display must never stop a job
                continue
            if fields:
                fields = dict(fields)
                progress.total = fields.pop("total", progress.total)
                progress.update(fields.pop("step", 0), **fields)

    thread = threading.Thread(target=loop, daemon=True, name="synray-progress")
    thread.start()

    def done() -> None:
        stop.set()
        thread.join(timeout=5)
        progress.close()

    return done
