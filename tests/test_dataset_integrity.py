"""Dataset integrity: what a resume finds in its output, one writer per output, complete datasets only
for training, refused context rows, and errors that name the file and row."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from synray.config import ConfigError, load_config
from synray.jobs import load_job
from synray.config.synth import SynthConfig
from synray.config.train import TrainConfig
from synray.io import lease as L
from synray.io import shards, storage
from synray.io.images import ImageDecodeError, encode_image
from synray.synthesis import contexts as C
from synray.synthesis.pipeline import content_hash, run_local
from synray.training.data import DataError, dataset_info, decode_augment

ROOT = Path(__file__).resolve().parents[1]
WORLD = ["tracking.enabled=false", "generator.images_per_identity=2", "generator.batch_size=8",
         "identities.count=10", "identities.unit_size=2"]


def world(out, *extra):
    return load_job(ROOT / "conf/synth/world.yaml", [*WORLD, f"output.uri={out}", *extra])


def table_of(uri):
    """A shard's columns, ``quality`` (NaN when not computed) as a NaN-safe tuple."""
    t = shards.read_shard(uri).to_pydict()
    t["quality"] = tuple(np.nan_to_num(t["quality"], nan=-9.0))
    return t


# --- resume: every shard checked ---------------------------------------------------------------

def test_foreign_shard_in_the_middle_of_a_resume_is_named(tmp_path):
    out = str(tmp_path / "ds")
    run_local(world(out))
    other = str(tmp_path / "other")
    run_local(world(other, "seed=5"))
    shutil.copyfile(shards.shard_uri(other, 2), shards.shard_uri(out, 2))  # units 0..4: unit 2 is neither end
    with pytest.raises(shards.ForeignShardError, match=r"part-000002\.parquet was written by a different config"):
        run_local(world(out))
    # training refuses the mixed folder too, naming both configs
    with pytest.raises(shards.IncompleteDatasetError, match="2 different configs"):
        shards.open_dataset(out)


def test_truncated_shard_is_reported_and_rewritten(tmp_path, caplog):
    out = str(tmp_path / "ds")
    run_local(world(out))
    target = shards.shard_uri(out, 3)
    before = table_of(target)
    data = Path(target).read_bytes()
    Path(target).write_bytes(data[: len(data) // 2])
    with pytest.raises(shards.CorruptShardError, match="part-000003.parquet"):
        shards.open_dataset(out)
    with caplog.at_level(logging.WARNING, logger="synray.synthesis.pipeline"):
        summary = run_local(world(out))
    assert summary["shards_rewritten"] == ["part-000003.parquet"]
    assert summary["units_written"] == 1 and summary["units_skipped"] == 4
    assert any("part-000003.parquet" in r.getMessage() for r in caplog.records)
    assert table_of(target) == before
    assert shards.open_dataset(out).complete
    # a shard whose footer contradicts its slot (unit 1's file in unit 4's place) is rewritten too
    shutil.copyfile(shards.shard_uri(out, 1), shards.shard_uri(out, 4))
    assert run_local(world(out))["shards_rewritten"] == ["part-000004.parquet"]
    assert shards.shard_metadata(shards.shard_uri(out, 4))["unit"] == 4


def test_orphan_temp_files_are_removed(tmp_path):
    out = str(tmp_path / "ds")
    run_local(world(out))
    orphans = [Path(shards.data_uri(out)) / ".part-000001.parquet.tmp-0123abcd", Path(out) / "._manifest.json.tmp-89abcdef"]
    for p in orphans:
        p.write_bytes(b"PAR1 half a file")
    summary = run_local(world(out))
    assert summary["temp_files_removed"] == 2 and summary["units_written"] == 0
    assert not any(p.exists() for p in orphans)
    assert (Path(out) / L.LEASE_NAME).exists()  # other hidden files stay


# --- the config hash covers input file contents --------------------------------------------------

@pytest.fixture()
def tiny_ldm(tmp_path):
    from synray.diffusion.schedule import linear_schedule
    from synray.models.ldm_checkpoint import save_unet_checkpoint
    from synray.models.unet import ConditionalUNet, UNetConfig
    from synray.models.vq import VQConfig, VQDecoder

    def unet(seed, path):
        torch.manual_seed(seed)
        net = ConditionalUNet(UNetConfig(initial_channels=32, channel_multipliers=(1, 2), is_attention=(False, False),
                                         n_blocks_per_resolution=1, context_channels=32))
        save_unet_checkpoint(net, path, linear_schedule())

    unet(0, tmp_path / "unet.ckpt")
    torch.manual_seed(0)
    torch.save(VQDecoder(VQConfig.small()).state_dict(), tmp_path / "vq.pt")
    np.save(tmp_path / "ctx.npy", C.gaussian(3, np.arange(4), 512))
    over = ["tracking.enabled=false", "identities.count=4", "identities.unit_size=2", "generator.images_per_identity=1",
            "generator.latent_shape=[3,8,8]", "generator.sampler={method: ddim, steps: 2}", "generator.num_gpus=0", "alignment.size=[32,32]",
            "contexts.source=embeddings_file", f"contexts.path={tmp_path / 'ctx.npy'}",
            f"generator.unet={tmp_path / 'unet.ckpt'}", f"generator.vq_decoder={tmp_path / 'vq.pt'}",
            "generator.vq_config={ch: 32, ch_mult: [1, 2], num_res_blocks: 1, resolution: 32}",
            f"output.uri={tmp_path / 'ds'}"]
    return tmp_path, unet, over


def test_retrained_weights_at_the_same_path_change_the_config_hash(tiny_ldm):
    d, unet, over = tiny_ldm
    cfg = load_job(ROOT / "conf/synth/uiface.yaml", over)
    first = content_hash(cfg)
    run_local(cfg)
    shutil.copyfile(d / "unet.ckpt", d / "moved.ckpt")
    unet(1, d / "unet.ckpt")  # "retrained" into the same checkpoint path
    assert content_hash(cfg) != first
    with pytest.raises(shards.ForeignShardError, match="different config"):
        run_local(cfg)
    # the same bytes at another path are the same dataset; other contexts are not
    moved = load_job(ROOT / "conf/synth/uiface.yaml", [*over, f"generator.unet={d / 'moved.ckpt'}"])
    assert content_hash(moved) == first
    assert run_local(moved)["units_written"] == 0
    np.save(d / "ctx.npy", C.gaussian(4, np.arange(4), 512))
    assert content_hash(moved) != first


# --- one writer per output ---------------------------------------------------------------------

HOLD = """
import sys, time
from synray.io.lease import acquire_lease
lease = acquire_lease(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_second_local_writer_fails_fast_and_a_dead_one_blocks_nothing(tmp_path):
    out = str(tmp_path / "ds")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(L.LeaseError, match=rf"being written by job pid {proc.pid}"):
            run_local(world(out))
        assert time.perf_counter() - t0 < 10
        assert not storage.exists(shards.data_uri(out))  # refused before anything was written
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert run_local(world(out))["units_written"] == 5  # the kernel dropped the dead job's lock
    with L.acquire_lease(out):  # and this job released its own at the end
        with pytest.raises(L.LeaseError):
            L.acquire_lease(out)


def _put_lease(s3_uri, holder):
    import json

    import boto3

    bucket, _, key = storage.resolve(storage.join(s3_uri, L.LEASE_NAME)).path.partition("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(holder).encode())


def test_s3_lease_conditional_put_refresh_and_takeover(s3_server):
    out = f"s3://{s3_server['bucket']}/lease-{time.time_ns()}"
    first = L.acquire_lease(out, ttl_s=60)
    try:
        with pytest.raises(L.LeaseError, match="being written by job pid"):
            run_local(world(out))  # If-None-Match: * refused the second creator
        etag = first._etag
        first.refresh()
        assert first._etag != etag and first.lost is None
    finally:
        first.release()
    assert run_local(world(out))["units_written"] == 5
    # a live holder elsewhere is respected; once it stops refreshing, its lease goes stale and is taken over
    _put_lease(out, {"owner": "x", "host": "elsewhere", "pid": 1, "started": "then", "ttl_s": 2})
    with pytest.raises(L.LeaseError, match="on elsewhere"):
        L.acquire_lease(out)
    time.sleep(3.5)
    taker = L.acquire_lease(out)
    try:
        # the holder this one replaced finds out at its next refresh and stops
        ghost = L.OutputLease(out)
        ghost._client, ghost._etag = taker._client, '"0123456789abcdef0123456789abcdef"'
        ghost.refresh()
        with pytest.raises(L.LeaseError, match="taken over"):
            ghost.check()
    finally:
        taker.release()
    # a holder that ran on this host and is gone is stale at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    _put_lease(out, {"owner": "y", "host": socket.gethostname(), "pid": int(dead.stdout), "started": "then", "ttl_s": 600})
    L.acquire_lease(out).release()


# --- readers take complete datasets only --------------------------------------------------------

def test_training_refuses_an_incomplete_dataset_unless_allowed(tmp_path):
    out = str(tmp_path / "ds")
    run_local(world(out))
    assert dataset_info(out).rows == 20
    os.remove(Path(out) / shards.SUCCESS)
    with pytest.raises(DataError, match=r"no _SUCCESS marker.*data\.allow_incomplete: true"):
        dataset_info(out)
    assert dataset_info(out, allow_incomplete=True).rows == 20
    run_local(world(out))
    os.remove(shards.shard_uri(out, 1))  # half synthesized: a unit is missing
    with pytest.raises(DataError, match=r"have no shard: \['part-000001.parquet'\]"):
        dataset_info(out)
    info = dataset_info(out, allow_incomplete=True)
    assert info.rows == 16 and len(info.files) == 4
    assert load_config(None, TrainConfig, [f"data.train={out}", "data.allow_incomplete=true"]).data.allow_incomplete
    # readers given <out>/data (the path pyarrow and pandas take) mean the dataset at <out>
    run_local(world(out))
    assert shards.open_dataset(shards.data_uri(out)).uri == out


def test_previous_layout_stays_readable_and_is_not_written_into(tmp_path):
    out = tmp_path / "ds"
    run_local(world(str(out)))
    old = tmp_path / "old"
    old.mkdir()
    for f in (out / "data").iterdir():
        shutil.copyfile(f, old / f.name)
    shutil.copyfile(out / shards.MANIFEST, old / "manifest.json")
    shutil.copyfile(out / shards.CONFIG, old / "config.yaml")
    opened = shards.open_dataset(str(old))
    assert opened.complete and opened.rows == 20 and shards.read_manifest(str(old))["rows"] == 20
    with pytest.raises(shards.ShardError, match="previous layout.*new output.uri"):
        run_local(world(str(old)))
    os.remove(old / "manifest.json")
    with pytest.raises(shards.IncompleteDatasetError, match="no manifest.json"):
        shards.open_dataset(str(old))


# --- refused inputs, named errors ----------------------------------------------------------------

@pytest.mark.parametrize("bad,what", [(np.nan, "NaN/inf"), (np.inf, "NaN/inf"), (0.0, "all zeros")])
def test_bad_context_rows_are_refused_naming_the_identity(tmp_path, bad, what):
    table = C.gaussian(0, np.arange(10), 512)
    table[7] = bad
    np.save(tmp_path / "ctx.npy", table)
    cfg = world(tmp_path / "ds", "contexts.source=embeddings_file", f"contexts.path={tmp_path / 'ctx.npy'}")
    with pytest.raises(C.ContextError, match=rf"ctx\.npy.*identity \[7\] holds {what}"):
        run_local(cfg)
    assert not shards.list_shards(cfg.output.uri)
    with pytest.raises(C.ContextError, match=r"identit.*\[7\]"):  # the same rule wherever contexts come from
        C.check_rows(table[5:9], np.arange(5, 9), "an embedder")


def test_corrupt_image_error_names_shard_and_row(tmp_path):
    out = str(tmp_path / "ds")
    rng = np.random.default_rng(0)
    for unit in (0, 1):
        ids = np.repeat(np.arange(unit * 2, unit * 2 + 2), 3)
        images = [encode_image(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in ids]
        if unit == 1:
            images[4] = b"\x89PNG garbage"
        shards.write_shard(out, unit, {"image": images, "identity": ids, "sample": np.tile(np.arange(3), 2),
                                       "kind": ["generated"] * 6, "seed": np.arange(6), "height": [8] * 6, "width": [8] * 6})
    info = dataset_info(out, allow_incomplete=True)
    # a decode batch as Ray Data hands it over (rows of both shards, a path column), row 4 of unit 1 at position 7
    tables = [pq.read_table(storage.resolve(u).path) for u in info.files]
    batch = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables])
             for c in ("image", "identity", "sample")}
    batch["path"] = np.array([storage.resolve(u).path for u in info.files for _ in range(6)], dtype=object)
    with pytest.raises(ImageDecodeError, match=r"shard .*data/part-000001\.parquet row 4 \(identity 3, sample 1\)"):
        decode_augment(batch, image_size=(8, 8), ids=info.identities)


def test_world_detector_is_a_config_error():
    with pytest.raises(ConfigError, match="alignment.detector"):
        load_config(None, SynthConfig, ["alignment.mode=landmarks", "alignment.detector=world"])
