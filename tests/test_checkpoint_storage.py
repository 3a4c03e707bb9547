"""Checkpoints on S3 (the moto server): every writer goes through one upload path that never publishes a partial
object, and a job killed in the middle of uploading a checkpoint resumes from the last complete one."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from faults import KillMidUpload

from synray.io import storage
from synray.io.s3 import run_storage
from synray.jobs import load_job, run_job
from synray.training.checkpointing import CheckpointReader

ROOT = Path(__file__).resolve().parents[1]


def _bucket_uri(s3_server, name: str) -> str:
    return f"s3://{s3_server['bucket']}/{name}-{uuid.uuid4().hex[:8]}"


def test_a_failed_writer_publishes_nothing(s3_server):
    path, fs = run_storage(_bucket_uri(s3_server, "ckpt"))
    with pytest.raises(RuntimeError, match="writer failed"):
        with fs.open_output_stream(f"{path}/half.pt") as fh:
            fh.write(b"x" * 1000)
            raise RuntimeError("writer failed")
    assert fs.get_file_info(f"{path}/half.pt").type == pafs.FileType.NotFound
    with fs.open_output_stream(f"{path}/whole.pt") as fh:
        fh.write(b"y" * 1000)
    with fs.open_input_stream(f"{path}/whole.pt") as fh:
        assert fh.read() == b"y" * 1000


def _checkpoint_dirs(uri: str) -> list[str]:
    loc = storage.resolve(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def _assert_complete(run_uri: str, names: set[str]) -> None:
    """Every checkpoint folder left on S3 holds every file, each loadable (no half-written object)."""
    dirs = _checkpoint_dirs(run_uri)
    assert dirs, f"no checkpoints under {run_uri}"
    for d in dirs:
        reader = CheckpointReader(storage.resolve(run_uri).fs, d)
        assert names <= set(reader.names()), (d, reader.names())
        for name in names:
            if name.endswith((".pt", ".ckpt")):
                reader.load(name)
            else:
                json.loads(reader.read_bytes(name))


@pytest.mark.ray
def test_distillation_killed_mid_upload_resumes_from_the_last_complete_checkpoint(ray_session, world_teacher, s3_server,
                                                                                  tmp_path):
    out = _bucket_uri(s3_server, "distill")
    cfg = load_job(ROOT / "conf/distill/world_tiny.yaml", [
        f"teacher={world_teacher}", f"output.uri={out}", "tracking.enabled=false", "scaling.num_workers=1",
        "epochs=2", "iterations_per_epoch=3", "validation.batches=1", "checkpoint.max_failures=1",
        "checkpoint.num_to_keep=null"])
    steps_per_epoch = 3 * (2 if cfg.resampling else 1)
    marker = tmp_path / "killed"
    outcome = run_job(cfg, callbacks=[KillMidUpload(2 * steps_per_epoch, marker)], quiet=True)
    assert marker.exists()  # the upload of the epoch-2 checkpoint was cut off
    assert outcome.metrics["epoch"] == 2 and outcome.metrics["resumed_from_epoch"] == 1
    _assert_complete(storage.join(out, cfg.name), {"student.pt", "trainer_state.pt", "meta.json"})


@pytest.mark.ray
def test_ldm_training_killed_mid_upload_resumes_from_the_last_complete_checkpoint(ray_session, world_teacher,
                                                                                  s3_server, tmp_path):
    from synray.synthesis.pipeline import run_local

    run_local(load_job(ROOT / "conf/synth/world.yaml", [
        f"output.uri={tmp_path}/world", "identities.count=4", "identities.unit_size=4",
        "generator.images_per_identity=4", "tracking.enabled=false"]))
    out = _bucket_uri(s3_server, "ldm")
    cfg = load_job(ROOT / "conf/ldm/world_tiny.yaml", [
        f"data.path={tmp_path}/world", f"contexts.embedder={world_teacher}", f"output.uri={out}",
        "tracking.enabled=false", "vq.fit.steps=10", "vq.fit.n_embed=64", "training.steps=4",
        "training.checkpoint_every=2", "training.batch_size=4", "data.unit_size=16", "scaling.num_workers=1",
        "checkpoint.max_failures=1", "checkpoint.num_to_keep=null",
        "data.cache_bytes=0"])  # the latents stream from S3 each pass (large sets; small ones are cached elsewhere)
    marker = tmp_path / "killed"
    outcome = run_job(cfg, callbacks=[KillMidUpload(4, marker)], quiet=True)
    assert marker.exists()
    assert outcome.metrics["step"] == 4 and outcome.metrics["resumed_from_step"] == 2
    _assert_complete(storage.join(out, f"{cfg.name}-train"),
                     {"model.ckpt", "ema_averaged_model.ckpt", "optimization.ckpt", "meta.json"})
