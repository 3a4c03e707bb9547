"""LDM training: image listing, contexts, first stage, the published checkpoint layout, resume, and
``synray train-ldm`` on Ray Train whose checkpoint then samples through the synthesis pipeline."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from faults import StopAfter

from synray.config import ConfigError, load_config
from synray.config.ldm import LDMConfig
from synray.ldm.data import LDMDataError, list_images, load_context_file
from synray.ldm.encode import prepare_latents
from synray.ldm.first_stage import DECODER_FILE, fit_first_stage
from synray.ldm.learner import EMA_FILE, MODEL_FILE, ldm_loop, unet_config
from synray.training.runner import local_hooks

ROOT = Path(__file__).resolve().parents[1]
UNET = {"initial_channels": 32, "channel_multipliers": [1, 2], "is_attention": [False, True],
        "n_blocks_per_resolution": 1, "context_channels": 32}
VQ = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 32}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """CASIA-style folders: 6 world identities x 4 images, plus a stray file and a nested folder to ignore."""
    from synray.world.world import World

    root = tmp_path_factory.mktemp("casia")
    w = World(seed=0, num_identities=6, difficulty=0.5)
    for i in range(6):
        (root / f"{i:07d}").mkdir()
        for s in range(4):
            cv2.imwrite(str(root / f"{i:07d}" / f"{s:03d}.jpg"), cv2.cvtColor(w.render(i, s, size=64), cv2.COLOR_RGB2BGR))
    (root / "README.txt").write_text("not an image")
    (root / "0000000" / "deeper").mkdir()
    cv2.imwrite(str(root / "0000000" / "deeper" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    return root


def ldm_cfg(data_path, out, embedder=None, **over) -> LDMConfig:
    data = {
        "name": "t", "data": {"source": "folders", "path": str(data_path), "image_size": [32, 32], "unit_size": 10},
        "contexts": {"source": "embedder", "embedder": str(embedder)} if embedder else {"source": "file", "path": "x"},
        "vq": {"encoder": None, "decoder": None, "config": VQ, "fit": {"steps": 15, "batch_size": 8, "n_embed": 64}},
        "unet": {"flavour": "idiff_face", "context_dropout": 0.25, "architecture": UNET},
        "training": {"steps": 12, "batch_size": 4, "checkpoint_every": 6, "log_every": 3},
        "output": {"uri": str(out)}, "tracking": {"enabled": False},
    }
    for k, v in over.items():
        data[k] = v
    return LDMConfig.model_validate(data)


# --- data and contexts ----------------------------------------------------------------------------

def test_list_images_casia_layout_and_context_files(faces, tmp_path):
    cfg = ldm_cfg(faces, tmp_path, contexts={"source": "file", "path": str(tmp_path / "c.npy")})
    items = list_images(cfg)
    assert len(items) == 24 and items.names[0] == "0000000/000.jpg" and items.names[-1] == "0000005/003.jpg"
    assert items.identities.tolist() == [i for i in range(6) for _ in range(4)]
    assert len(list_images(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_images": 5})}))) == 5
    emb = np.random.default_rng(0).normal(size=(24, 16)).astype(np.float32)
    np.save(tmp_path / "c.npy", emb)
    got = load_context_file(str(tmp_path / "c.npy"), items)
    assert np.allclose(got, emb / np.linalg.norm(emb, axis=1, keepdims=True), atol=1e-6)
    # ADMIS-style: names + embeddings in any order
    perm = np.random.default_rng(1).permutation(24)
    np.savez(tmp_path / "c.npz", names=np.array(items.names)[perm], embeddings=emb[perm])
    assert np.allclose(load_context_file(str(tmp_path / "c.npz"), items), got, atol=1e-6)
    np.savez(tmp_path / "short.npz", names=np.array(items.names[:3]), embeddings=emb[:3])
    with pytest.raises(LDMDataError, match="no embedding for 21 images"):
        load_context_file(str(tmp_path / "short.npz"), items)
    np.save(tmp_path / "few.npy", emb[:5])
    with pytest.raises(LDMDataError, match="5 rows for 24 images"):
        load_context_file(str(tmp_path / "few.npy"), items)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LDMDataError, match="no images"):
        list_images(ldm_cfg(tmp_path / "empty", tmp_path, contexts={"source": "file", "path": "c.npy"}))


def test_config_errors_name_the_key(faces, tmp_path, world_teacher):
    with pytest.raises(ConfigError, match="vq.fit.steps > 0"):
        load_config(None, LDMConfig, ["data.path=x", "vq.encoder=null", "vq.decoder=null"])
    with pytest.raises(ConfigError, match="contexts.embedder is required"):
        load_config(None, LDMConfig, ["data.path=x", "contexts.embedder=null"])
    with pytest.raises(ConfigError, match="unet.architecture must not set"):
        load_config(None, LDMConfig, ["data.path=x", "unet.architecture={context_dropout: 0.5}"])
    with pytest.raises(ConfigError, match="unet.context_dropout"):
        load_config(None, LDMConfig, ["data.path=x", "unet.context_dropout=1.5"])
    cfg = ldm_cfg(faces, tmp_path, world_teacher, unet={"architecture": {**UNET, "context_input_channels": 512}})
    with pytest.raises(LDMDataError, match="context_input_channels is 512 but the contexts are 32-d"):
        unet_config(cfg, 32)
    from synray.cli import main

    assert main(["train-ldm", str(ROOT / "conf/ldm/world_tiny.yaml"), "--set", f"data.path={tmp_path}/none"]) == 2
    assert main(["train-ldm", str(ROOT / "conf/ldm/world_tiny.yaml"), "--set", "training.steps=0"]) == 2
    uc = unet_config(ldm_cfg(faces, tmp_path, world_teacher, unet={"flavour": "uiface", "context_dropout": 0.5,
                                                             "architecture": UNET}), 32)
    assert uc.context_dropout == 0.5 and uc.learn_empty_context and uc.unconditioned_probability == 0.2


@pytest.mark.parametrize("override, message", [
    ("unet.architecture.channel_multipliers=[1, 0]", "unet.architecture.channel_multipliers: must be positive integers"),
    ("unet.architecture.channel_multipliers=[a, 2]", "unet.architecture.channel_multipliers.0: Input should be a valid integer"),
    ("unet.architecture.initial_chanels=32", "unet.architecture.initial_chanels: unknown key"),
    ("unet.architecture.is_attention=[true]", "unet.architecture.is_attention: has 1 entries but channel_multipliers has 2"),
    ("unet.architecture.context_channels=48", "unet.architecture.context_channels: must be a multiple of 32, got 48"),
    ("vq.config.ch=48", "vq.config.ch: must be a multiple of 32"),
    ("vq.config.ch_mult=5", "vq.config.ch_mult: Input should be a valid tuple"),
    ("vq.config.double_z=true", "vq.config.double_z: unknown key"),
    ("data.image_size=[33, 32]", "data.image_size [33, 32] must be divisible by the first stage's downsampling 2"),
])
def test_architecture_and_first_stage_errors_when_the_config_loads(override, message, capsys):
    """A bad UNet/VQ key or value fails at load time naming the dotted key, before any data is read."""
    conf = ROOT / "conf/ldm/world_tiny.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(conf, LDMConfig, [override])
    assert message in str(err.value)
    from synray.cli import main

    assert main(["train-ldm", str(conf), "--set", override]) == 2  # data.path does not exist: the config error is first
    assert message in capsys.readouterr().err


def test_architecture_checked_with_the_real_context_width():
    """At load time the context width is a placeholder; the run's contexts give the real one."""
    cfg = load_config(ROOT / "conf/ldm/world_tiny.yaml", LDMConfig)
    assert unet_config(cfg, 48).context_input_channels == 48
    fixed = load_config(ROOT / "conf/ldm/world_tiny.yaml", LDMConfig, ["unet.architecture.context_input_channels=32"])
    assert unet_config(fixed, 32).context_input_channels == 32
    with pytest.raises(LDMDataError, match="context_input_channels is 32 but the contexts are 48-d"):
        unet_config(fixed, 48)


def test_fitted_first_stage_reconstructs_and_quantises(faces):
    from synray.ldm.data import load_images
    from synray.models.vq import VQConfig

    cfg = ldm_cfg(faces, "x", contexts={"source": "file", "path": "c.npy"})
    items = list_images(cfg)
    images = load_images(items, np.arange(24), (32, 32))
    enc, dec, stats = fit_first_stage(images, VQConfig(**{**VQ, "ch_mult": (1, 2), "n_embed": 64}), steps=50, batch_size=8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    baseline = float(((x - x.mean((0, 2, 3), keepdim=True)) ** 2).mean())  # predicting the mean colour
    assert stats["reconstruction_mse"] < 0.5 * baseline, (stats, baseline)
    assert stats["reconstruction_mse_quantized"] < 0.75 * baseline  # the k-means codebook keeps decoding close
    with pytest.raises(LDMDataError, match="uint8"):
        fit_first_stage(images.astype(np.float32), VQConfig.small(), steps=1)


# --- training, checkpoints, resume ----------------------------------------------------------------

def test_local_training_writes_the_published_layout_and_resumes(faces, tmp_path, world_teacher, reference):
    from synray.models.checkpoint import read_checkpoint
    from synray.models.ldm_checkpoint import (
        infer_unet_config,
        load_unet,
        normalize_unet_state,
    )

    cfg = ldm_cfg(faces, tmp_path / "out", world_teacher)
    info = prepare_latents(cfg, use_ray=False)
    assert info.rows == 24 and info.latent_shape == (3, 16, 16) and info.context_dim == 32 and len(info.files) == 3
    first_stage = json.loads(Path(info.first_stage, "vq_config.json").read_text())
    assert first_stage["source"] == "fitted" and first_stage["config"]["n_embed"] == 64
    assert prepare_latents(cfg, use_ray=False).files == info.files  # finished: nothing re-encoded
    with pytest.raises(LDMDataError, match="another data/contexts/vq config"):
        prepare_latents(cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": (16, 16)})}), use_ray=False)
    # another UNet recipe (another name: its own run folder) on these latents: nothing fitted or encoded again
    other = ldm_cfg(faces, tmp_path / "out", world_teacher, name="other",
                    data={**cfg.data.model_dump(), "latents": info.uri},
                    unet={"flavour": "idiff_face", "context_dropout": 0.0, "architecture": UNET})
    assert prepare_latents(other, use_ray=False) == info
    assert not (tmp_path / "out" / "other").exists()
    with pytest.raises(LDMDataError, match="data.latents: .* another data/contexts/vq config"):
        prepare_latents(other.model_copy(update={"data": other.data.model_copy(update={"image_size": (16, 16)})}),
                        use_ray=False)
    with pytest.raises(LDMDataError, match="data.latents: .*latents.json does not exist"):
        prepare_latents(ldm_cfg(faces, tmp_path / "out", world_teacher,
                                data={**cfg.data.model_dump(), "latents": str(tmp_path / "none")}), use_ray=False)

    saved, reports = {}, []

    def report(metrics, directory):
        reports.append(metrics)
        if directory:
            dst = tmp_path / f"ck{metrics['step']}"
            dst.mkdir()
            for f in os.listdir(directory):
                (dst / f).write_bytes(Path(directory, f).read_bytes())
            saved[metrics["step"]] = dst

    with pytest.raises(RuntimeError, match="stopped after step 6"):
        ldm_loop(cfg, local_hooks(send=report, callbacks=[StopAfter("step", 6, cfg.training.steps)]), info.to_dict())
    final = ldm_loop(cfg, local_hooks(str(saved[6]), send=report), info.to_dict())
    assert [m["step"] for m in reports] == [3, 6, 9, 12] and final["resumed_from_step"] == 6
    assert all(np.isfinite(m["loss"]) for m in reports) and sorted(saved) == [6, 12]
    ck = saved[12]
    for name in (MODEL_FILE, EMA_FILE, "optimization.ckpt", DECODER_FILE, "first_stage_encoder_state_dict.pt"):
        assert (ck / name).exists(), name
    layout = json.loads((reference / "generation" / "ddpm_checkpoint_layout.json").read_text())
    raw = read_checkpoint(ck / EMA_FILE)
    assert [k for k in raw if not k.startswith(layout["unet_prefix"])] == list(layout["non_unet_entries"])
    ema, live = load_unet(ck / EMA_FILE), load_unet(ck / MODEL_FILE)  # strict, architecture read off the file
    assert ema.config == infer_unet_config(normalize_unet_state(raw))
    assert ema.config.initial_channels == 32 and ema.config.context_input_channels == 32
    diffs = [float((a - b).abs().max()) for a, b in zip(ema.state_dict().values(), live.state_dict().values())]
    assert max(diffs) > 0  # the EMA average is not the live weights


@pytest.mark.ray
@pytest.mark.slow  # two Ray Train runs (train, then resume) and a synthesis: 1.5-5 min on the shared 2 cores
def test_train_ldm_on_ray_then_synthesize(ray_session, world_teacher, tmp_path):
    """World shards -> ``synray train-ldm`` (UIFace flavour, 2 DDP workers, Ray tasks encode) -> resume -> ``synth``."""
    import mlflow

    from synray.io import shards
    from synray.io.images import decode_image
    from synray.jobs import load_job, run_job
    from synray.synthesis.pipeline import run_local

    world = load_job(ROOT / "conf/synth/world.yaml", [
        f"output.uri={tmp_path}/world", "identities.count=6", "identities.unit_size=3",
        "generator.images_per_identity=4", "tracking.enabled=false"])
    run_local(world)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"data.path={tmp_path}/world", f"contexts.embedder={world_teacher}", f"output.uri={tmp_path}/ldm",
              f"tracking.uri={uri}", "tracking.experiment=t-ldm", "data.unit_size=12", "vq.fit.steps=10",
              "vq.fit.n_embed=64", "training.batch_size=4", "training.checkpoint_every=4", "training.log_every=2",
              "unet.flavour=uiface"]  # learnable empty context + uncond20 under DDP
    first = run_job(load_job(ROOT / "conf/ldm/world_tiny.yaml", common + ["training.steps=4"]), quiet=True)
    assert first.metrics["step"] == 4 and first.metrics["world_size"] == 2 and first.metrics["resumed_from_step"] == -1
    again = run_job(load_job(ROOT / "conf/ldm/world_tiny.yaml", common + ["training.steps=8"]), quiet=True)
    assert again.metrics["step"] == 8 and again.metrics["resumed_from_step"] == 4 and np.isfinite(again.metrics["loss"])
    meta = json.loads(Path(again.checkpoint_uri, "meta.json").read_text())
    assert meta["step"] == 8 and meta["unet_config"]["context_dropout"] == 0.25
    assert meta["unet_config"]["learn_empty_context"] and meta["unet_config"]["unconditioned_probability"] == 0.2
    gen = again.extra["generator"]
    assert gen["latent_shape"] == [3, 16, 16] and Path(gen["unet"]).name == "ema_averaged_model.ckpt"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["t-ldm"])
    assert len(runs) == 2 and runs["metrics.loss"].notna().all()

    synth = load_job(ROOT / "conf/synth/world.yaml", [
        f"output.uri={tmp_path}/samples", "identities.count=2", "identities.unit_size=2", "contexts.dim=32",
        "generator.images_per_identity=2", "generator.type=ldm", f"generator.unet={gen['unet']}",
        f"generator.vq_decoder={gen['vq_decoder']}", f"generator.vq_config={json.dumps(gen['vq_config'])}",
        "generator.latent_shape=[3,16,16]", "generator.sampler.steps=4", "alignment.mode=resize",
        "tracking.enabled=false"])
    summary = run_local(synth)
    assert summary["manifest"]["rows"] == 4
    rows = [r for s in shards.list_shards(synth.output.uri).values() for r in shards.read_shard(s).to_pylist()]
    imgs = [decode_image(r["image"]) for r in rows]
    assert all(im.shape == (112, 112, 3) for im in imgs) and len({im.tobytes() for im in imgs}) == 4
