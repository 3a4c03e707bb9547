"""Faults tests inject into training loops through the runner's callbacks (nothing of this lives in synray).

``conftest.py`` registers this module to be pickled by value, so Ray Train workers and Tune trials get
these classes without the tests folder on their path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from synray.training.runner import Callback, Hooks


def claim(marker: str) -> bool:
    """True for the first caller only (the marker file is created atomically)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class CrashOnce(Callback):
    """Rank ``rank`` dies (``os._exit``) once, after optimiser step ``step``, unless ``marker`` exists.

    It first waits until the controller has registered every checkpoint reported so far, so the test
    sees a crash in steady state rather than a race with the last report.
    """

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, str(marker)

    def after_step(self, hooks: Hooks, step: int) -> None:
        if step == self.step and hooks.rank == self.rank and not os.path.exists(self.marker):
            import ray.train

            ray.train.get_all_reported_checkpoints(timeout_s=120)
            with open(self.marker, "w") as fh:
                fh.write(f"rank {hooks.rank} exited at step {step}\n")
            os._exit(1)


class StopAfter(Callback):
    """Raise (as if the process were killed) once a report at ``key`` >= ``at`` carried a checkpoint,
    unless it is the last one (``last``)."""

    def __init__(self, key: str, at: int, last: int) -> None:
        self.key, self.at, self.last = key, at, last

    def after_report(self, hooks: Hooks, metrics: Mapping[str, Any], checkpointed: bool) -> None:
        value = int(metrics[self.key])
        if checkpointed and self.at <= value < self.last:
            raise RuntimeError(f"stopped after {self.key} {value}")


class FailOnce(Callback):
    """The first trial to claim ``marker`` raises after ``after_reports`` reports (a Tune trial failure)."""

    def __init__(self, after_reports: int, marker: str) -> None:
        self.after_reports, self.marker, self.reports = after_reports, str(marker), 0
        self.armed: bool | None = None

    def after_report(self, hooks: Hooks, metrics: Mapping[str, Any], checkpointed: bool) -> None:
        if self.armed is None:
            self.armed = claim(self.marker)
        self.reports += 1
        if self.armed and self.reports == self.after_reports:
            raise RuntimeError(f"injected trial failure after {self.reports} report(s)")
