"""The job progress display off a terminal: a line every few seconds, the final one once, nothing when quiet."""

import synray.progress as progress
from synray.progress import JobProgress


def test_progress_lines_off_a_terminal_end_with_one_final_line(capsys, monkeypatch):
    # time.monotonic() counts from boot: on a machine up for a minute the first line must print all the same
    monkeypatch.setattr(progress.time, "monotonic", lambda: 60.0)
    p = JobProgress("train-ldm", total=100, unit="step", quiet=False, every_s=3600.0)
    p.update(10, loss=0.5)  # the first line prints at once, then at most every every_s seconds
    p.update(50, loss=0.4)
    for _ in range(5):  # the driver polls the board after the last step: still one final line
        p.update(100, loss=0.3)
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == "[synray train-ldm] step 10/100  loss 0.5", lines
    assert lines[1] == "[synray train-ldm] step 100/100  loss 0.3", lines
    quiet = JobProgress("synth", total=4, unit="units", quiet=True)
    quiet.update(4)
    assert capsys.readouterr().err == ""


def test_the_boards_throttle_sends_the_first_post_at_once(monkeypatch):
    monkeypatch.setattr(progress.time, "monotonic", lambda: 60.0)  # a machine up for a minute
    sent = []
    throttle = progress.Throttle(sent.append, every_s=3600.0)
    throttle({"step": 1})
    throttle({"step": 2})
    throttle({"step": 3}, force=True)
    assert sent == [{"step": 1}, {"step": 3}]


def test_eta_is_the_rate_since_the_first_step_not_since_start_up(capsys, monkeypatch):
    clock = iter([20.0, 30.0])  # step 1 seen 20 s after the job started (start-up), step 11 ten seconds later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = JobProgress("train", total=101, unit="step", quiet=False, every_s=0.0)
    p.update(1)
    p.update(11)
    lines = capsys.readouterr().err.splitlines()
    # 1 step/s since step 1: 90 steps left -> 1:30 (counting start-up as progress would say 30 * 90 / 11 s = 4:05)
    assert lines == ["[synray train] step 1/101", "[synray train] step 11/101  ETA 1:30"], lines


def test_a_training_line_reaches_the_log_once_under_ray_trains_print_patch(monkeypatch):
    """Ray Train workers replace ``print`` with one that logs the message and also echoes it when stdout is
    wrapped (as in a Ray worker): a loop's progress line printed that way reached the driver twice."""
    import builtins
    import io
    import logging
    import sys

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from synray.training.runner import Hooks

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)  # a wrapped stdout, not sys.__stdout__
    root, handler = logging.getLogger(), logging.StreamHandler(out)  # the worker's log goes to the same place
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    monkeypatch.setattr(builtins, "print", redirected_print)
    try:
        Hooks(rank=0).log("[synray train] epoch 1/1 step 8")
        Hooks(rank=1).log("[synray train] rank 1 is silent")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert out.getvalue() == "[synray train] epoch 1/1 step 8\n", out.getvalue()
