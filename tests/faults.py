"""Faults tests inject into training loops through the runner's callbacks (nothing of this lives in synray).

``conftest.py`` registers this module to be pickled by value, so Ray Train workers and Tune trials get
these classes without the tests folder on their path.
"""

from __future__ import annotations

import io
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

            ray.train.get_all_reported_checkpoints(timeout_s=600)  # a loaded machine registers late
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


class KillMidUpload(Callback):
    """The first process to claim ``marker`` dies (``os._exit``) in the middle of uploading the checkpoint that
    follows optimiser step ``step``: one file of it uploaded whole, the next cut off half-way through its body.
    (Uploads run on several threads: which file is cut off varies, that one is.)"""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, str(marker)

    def after_step(self, hooks: Hooks, step: int) -> None:
        if step != self.step or hooks.rank != 0 or not claim(self.marker):
            return
        from synray.io import storage

        try:  # under Ray Train: die in steady state, once the controller has registered the earlier checkpoints
            import ray.train

            ray.train.get_all_reported_checkpoints(timeout_s=600)  # a loaded machine registers late
        except Exception:  # noqa: BLE001 - a Tune trial: its reports are registered as they are made
            pass

        real, calls = storage.s3_client, []

        class HalfThenDie(io.RawIOBase):
            def __init__(self, data: bytes) -> None:
                self.data, self.pos = data, 0

            def readable(self) -> bool:
                return True

            def seekable(self) -> bool:
                return True

            def tell(self) -> int:
                return self.pos

            def seek(self, pos: int, whence: int = 0) -> int:
                self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.data) + pos)
                return self.pos

            def readinto(self, b) -> int:
                if self.pos >= len(self.data) // 2:
                    os._exit(1)
                n = min(len(b), len(self.data) // 2 - self.pos)
                b[:n] = self.data[self.pos:self.pos + n]
                self.pos += n
                return n

        def dying_client():
            client = real()
            put = client.put_object

            def put_object(Body, **kw):
                calls.append(kw.get("Key"))
                if len(calls) < 2:
                    return put(Body=Body, **kw)
                return put(Body=HalfThenDie(bytes(Body)), ContentLength=len(Body), **kw)

            client.put_object = put_object
            return client

        storage.s3_client = dying_client
