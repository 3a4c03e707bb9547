"""The job progress display off a terminal: a line every few seconds, the final one once, nothing when quiet."""

from synray.progress import JobProgress


def test_progress_lines_off_a_terminal_end_with_one_final_line(capsys):
    p = JobProgress("train-ldm", total=100, unit="step", quiet=False, every_s=3600.0)
    p.update(10, loss=0.5)  # the first line prints at once, then at most every every_s seconds
    p.update(50, loss=0.4)
    for _ in range(5):  # the driver polls the board after the last step: still one final line
        p.update(100, loss=0.3)
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[synray train-ldm] step 10/100  loss 0.5  ETA "), lines
    assert lines[1] == "[synray train-ldm] step 100/100  loss 0.3", lines
    quiet = JobProgress("synth", total=4, unit="units", quiet=True)
    quiet.update(4)
    assert capsys.readouterr().err == ""
