"""The Ray Train runner's settings that are not in a job's config."""

from __future__ import annotations

import os

import pytest

from synray.config.run import CheckpointConfig, ScalingConfig
from synray.training import runner

POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


class _Built(Exception):
    pass


def _poll_seen_by_the_trainer(monkeypatch, tmp_path) -> str | None:
    seen = []

    def trainer(*args, **kwargs):
        seen.append(os.environ.get(POLL))  # what Ray Train hands its controller (the driver's value)
        raise _Built

    monkeypatch.setattr(runner, "TorchTrainer", trainer)
    with pytest.raises(_Built):
        runner.fit(lambda cfg, hooks: {}, {}, name="poll", output_uri=str(tmp_path), scaling=ScalingConfig(),
                   checkpoint=CheckpointConfig(), quiet=True)
    return seen[0]


def test_the_controller_polls_the_workers_every_half_second_unless_the_user_says(monkeypatch, tmp_path):
    """Ray Train's controller collects a worker's report when it polls (every 2 s by default) and a worker's next
    report waits for that (a queue of one): jobs with short epochs waited for the poll at every epoch."""
    monkeypatch.delenv(POLL, raising=False)
    assert _poll_seen_by_the_trainer(monkeypatch, tmp_path) == runner.POLL_INTERVAL_S == "0.5"
    monkeypatch.setenv(POLL, "3")
    assert _poll_seen_by_the_trainer(monkeypatch, tmp_path) == "3"


def test_ray_trains_per_report_line_is_quiet_in_the_workers():
    """Ray Train's ``Reporting training result ...`` INFO line (the whole metrics dict, every rank, every epoch) is
    logged under its file's path, outside ``ray.train.*`` where the run's log level applies; the worker drops it."""
    import logging

    from ray.train.v2._internal.execution import context

    log, root = logging.getLogger(context.__file__), logging.getLogger()
    assert log is context.logger  # the logger the report line goes to
    saved = log.level, root.level
    try:
        log.setLevel(logging.NOTSET)
        root.setLevel(logging.INFO)  # as Ray Train configures a worker: root at INFO, to the console
        assert log.isEnabledFor(logging.INFO)
        runner.quiet_report_log()
        assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.WARNING)
    finally:
        log.setLevel(saved[0])
        root.setLevel(saved[1])
