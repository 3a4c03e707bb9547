"""A re-run with the same name and output resumes a run only with the settings its checkpoints were made with."""

from __future__ import annotations

from pathlib import Path

import pytest

from synray.config import ConfigError
from synray.distill.loop import RESUMABLE as DISTILL_RESUMABLE
from synray.jobs import load_job
from synray.ldm.job import RESUMABLE as LDM_RESUMABLE
from synray.training.recognition import RESUMABLE as TRAIN_RESUMABLE
from synray.training.runner import RUN_FILE, check_resume, guarded_settings

ROOT = Path(__file__).resolve().parents[1]


def _train(*over: str):
    return load_job(ROOT / "conf/train/world_tiny.yaml", ["data.train=/data/world", *over])


def test_changed_settings_are_refused_with_a_diff_once_checkpoints_exist(tmp_path):
    run = tmp_path / "run"
    first = guarded_settings(_train(), TRAIN_RESUMABLE)
    check_resume(str(run), first)  # a new run records its settings
    assert (run / RUN_FILE).exists()
    check_resume(str(run), guarded_settings(_train("optimizer.lr=0.5"), TRAIN_RESUMABLE))  # no checkpoint yet: a new run
    (run / "checkpoint_000000010").mkdir()
    changed = guarded_settings(_train("optimizer.lr=0.01", "data.train=/data/other", "head.kwargs={s: 32.0, m: 0.5}"),
                               TRAIN_RESUMABLE)
    with pytest.raises(ConfigError) as err:
        check_resume(str(run), changed)
    text = str(err.value)
    assert "optimizer.lr: 0.5 -> 0.01" in text and "data.train: '/data/world' -> '/data/other'" in text
    assert "head.kwargs.m: 0.3 -> 0.5" in text and "epochs" not in text
    # the allow-list: longer training, other evaluation and resources continue the run
    check_resume(str(run), guarded_settings(_train("optimizer.lr=0.5", "epochs=20", "scaling.num_workers=[1,4]",
                                                   "eval.every_epochs=3", "checkpoint.every_steps=50"), TRAIN_RESUMABLE))


def test_every_training_job_names_what_a_resume_may_change():
    distill = load_job(ROOT / "conf/distill/world_tiny.yaml", ["teacher=t.pt"])
    assert "epochs" not in guarded_settings(distill, DISTILL_RESUMABLE)
    assert "resampling_coef" in guarded_settings(distill, DISTILL_RESUMABLE)
    ldm = load_job(ROOT / "conf/ldm/world_tiny.yaml", ["data.path=/data/world", "contexts.embedder=t.pt"])
    kept = guarded_settings(ldm, LDM_RESUMABLE)
    assert "training.steps" not in kept and "unet.context_dropout" in kept and "training.lr" in kept
