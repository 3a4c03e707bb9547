"""``synray <command> CONFIG --check`` on the seed recipes, with files synray writes in the published layouts under
their published names: "ok" when they fit the recipe, else every problem at once, each naming its config key."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from synray.cli import main
from synray.diffusion.schedule import linear_schedule
from synray.models.export import save_backbone
from synray.models.ldm_checkpoint import save_unet_checkpoint
from synray.models.registry import build_backbone
from synray.models.unet import ConditionalUNet, UNetConfig
from synray.models.vq import VQConfig, VQDecoder, VQEncoder
from synray.world.world import World

CONF = Path(__file__).resolve().parents[1] / "conf"
CTX = 32  # context width of the small models (the published ones take 512)
VQ_SMALL = "{ch: 32, ch_mult: [1, 2], num_res_blocks: 1, resolution: 32}"
SMALL_UNET = dict(initial_channels=32, channel_multipliers=(1, 2), is_attention=(False, True), n_blocks_per_resolution=1,
                  context_channels=32, context_input_channels=CTX)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The published files of the recipes, written by synray's own savers at small size."""
    d = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    for sub, learn in (("admis", False), ("uiface", True)):
        unet = ConditionalUNet(UNetConfig(**SMALL_UNET, learn_empty_context=learn))
        save_unet_checkpoint(unet, d / sub / "ema_averaged_model_200000.ckpt", linear_schedule())
    vq = VQConfig.small()
    torch.save(VQEncoder(vq).state_dict(), d / "first_stage_encoder_state_dict.pt")
    torch.save(VQDecoder(vq).state_dict(), d / "first_stage_decoder_state_dict.pt")
    kw = {"layers": (1, 1, 1, 1), "widths": (8, 16, 16, 32), "embedding_dim": CTX, "input_size": (32, 32)}
    save_backbone(d / "elasticface_embedder.pt", "iresnet18", build_backbone("iresnet18", **kw), kw)
    rng = np.random.default_rng(0)
    np.save(d / "uiface_context_embeddings.npy", rng.standard_normal((10, CTX)).astype(np.float32))
    world = World(seed=0, num_identities=12)
    (d / "context_faces").mkdir()
    for i in range(10):  # the context database: one face per identity, sorted by name
        cv2.imwrite(str(d / "context_faces" / f"{i:05d}.png"), cv2.cvtColor(world.render(i, 0, size=32), cv2.COLOR_RGB2BGR))
    names = []
    for i in range(4):  # CASIA-WebFace style training images and their contexts (.npz: names + embeddings)
        (d / "casia" / f"{i:07d}").mkdir(parents=True)
        for j in range(3):
            cv2.imwrite(str(d / "casia" / f"{i:07d}" / f"{j:03d}.jpg"),
                        cv2.cvtColor(world.render(i, j, size=32), cv2.COLOR_RGB2BGR))
            names.append(f"{i:07d}/{j:03d}.jpg")
    np.savez(d / "casia_elastic_embed.npz", names=np.array(names), embeddings=rng.standard_normal((12, CTX)).astype(np.float32))
    from synray.models.cfsm import CFSMGenerator

    torch.save({"G_state_dict": CFSMGenerator().state_dict()}, d / "WiderFace70K.pth")
    world.write_verification_bins(d / "verification", num_pairs=20, size=32, sets={"lfw": 1.0})
    return d


def check(capsys, command: str, config: Path, *overrides: str) -> tuple[int, str]:
    code = main([command, str(config), *(a for o in overrides for a in ("--set", o)), "--check"])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_uiface_synthesis_recipe(published, capsys):
    d = published
    files = [f"generator.unet={d / 'uiface' / 'ema_averaged_model_200000.ckpt'}",
             f"generator.vq_decoder={d / 'first_stage_decoder_state_dict.pt'}", f"generator.vq_config={VQ_SMALL}",
             f"contexts.path={d / 'uiface_context_embeddings.npy'}", f"contexts.dim={CTX}", "identities.count=10",
             "identities.unit_size=2", "generator.latent_shape=[3,16,16]"]
    code, out = check(capsys, "synth", CONF / "synth" / "uiface.yaml", *files)
    assert (code, out.strip()) == (0, "ok")
    # four things wrong at once: every one is reported, each under its key (the latent channels against both the
    # UNet and the first stage)
    code, out = check(capsys, "synth", CONF / "synth" / "uiface.yaml", *files, "contexts.dim=64",
                      "generator.latent_shape=[4,16,16]", f"generator.vq_decoder={d / 'first_stage_encoder_state_dict.pt'}",
                      "identities.count=12")
    assert code == 2 and "5 problems" in out, out
    lines = [line.strip() for line in out.splitlines()[1:]]
    assert [line.split(":")[0] for line in lines] == ["- generator.latent_shape", "- contexts.dim", "- generator.vq_decoder",
                                                      "- generator.latent_shape", "- contexts.path"], out
    assert "the UNet" in lines[0] and "takes 32-d" in lines[1] and "missing keys" in lines[2]
    assert "embed_dim is 3" in lines[3] and "dimension 32" in lines[4]


def test_admis_synthesis_recipe_with_its_context_database(published, capsys):
    d = published
    files = [f"generator.unet={d / 'admis' / 'ema_averaged_model_200000.ckpt'}",
             f"generator.vq_decoder={d / 'first_stage_decoder_state_dict.pt'}", f"generator.vq_config={VQ_SMALL}",
             f"contexts.path={d / 'context_faces'}", f"contexts.embedder={d / 'elasticface_embedder.pt'}",
             f"quality.embedder={d / 'elasticface_embedder.pt'}", f"contexts.dim={CTX}", "identities.count=10",
             "identities.unit_size=2", "generator.latent_shape=[3,16,16]"]
    code, out = check(capsys, "synth", CONF / "synth" / "admis.yaml", *files)
    assert (code, out.strip()) == (0, "ok")
    code, out = check(capsys, "synth", CONF / "synth" / "admis.yaml", *files, "identities.count=12",
                      f"generator.unet={d / 'uiface' / 'missing.ckpt'}")
    assert code == 2 and "generator.unet:" in out and "does not exist" in out
    assert "contexts.path:" in out and "has 10 images" in out


def test_admis_ldm_training_recipe(published, capsys):
    d = published
    files = [f"data.path={d / 'casia'}", "data.image_size=[32,32]", f"contexts.path={d / 'casia_elastic_embed.npz'}",
             f"vq.encoder={d / 'first_stage_encoder_state_dict.pt'}", f"vq.decoder={d / 'first_stage_decoder_state_dict.pt'}",
             f"vq.config={VQ_SMALL}", "unet.architecture={initial_channels: 32, channel_multipliers: [1, 2], "
             "is_attention: [false, true], n_blocks_per_resolution: 1, context_channels: 32}"]
    code, out = check(capsys, "train-ldm", CONF / "ldm" / "admis_casia.yaml", *files)
    assert (code, out.strip()) == (0, "ok")
    code, out = check(capsys, "train-ldm", CONF / "ldm" / "admis_casia.yaml", *files, "vq.config=null",
                      f"contexts.path={d / 'uiface_context_embeddings.npy'}")
    assert code == 2
    assert "vq.encoder:" in out and "vq.decoder:" in out  # small files against the published VQ-f4 architecture
    assert "contexts.path:" in out and "10 rows for 12 images" in out


def test_cfsm_training_recipe(published, tmp_path, capsys):
    d = published
    files = [f"cfsm.checkpoint={d / 'WiderFace70K.pth'}", f"eval.bins=[{d / 'verification'}]"]
    code, out = check(capsys, "train", CONF / "train" / "cfsm_r50.yaml", *files, f"data.train={tmp_path / 'none'}",
                      f"eval.bins=[{tmp_path / 'no-bins'}]", "cfsm.generator={style_dim: 64}")
    assert code == 2 and "3 problems" in out, out
    assert "data.train:" in out and "eval.bins:" in out and "cfsm.checkpoint:" in out


def test_synthdistill_recipe_reports_every_missing_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative weights/... paths: nothing there
    code, out = check(capsys, "distill", CONF / "distill" / "synthdistill_tinyfar_a.yaml",
                      f"eval.bins=[{tmp_path / 'no-bins'}]")
    assert code == 2 and "3 problems" in out, out
    assert "teacher:" in out and "iresnet100-73e07ba7.pth" in out
    assert "generator.path:" in out and "stylegan2-ffhq-256x256.pkl" in out and "eval.bins:" in out
    assert not os.listdir(tmp_path)  # nothing written


def test_a_recipe_path_typed_in_another_directory_is_the_projects(tmp_path, capsys, monkeypatch):
    """``synray study conf/study/world.yaml`` typed outside the clone reads the project's recipe (as nested config
    references do); a path that is neither here nor a recipe is still a clear error."""
    from types import SimpleNamespace

    from synray.cli import _config_path

    monkeypatch.chdir(tmp_path)
    job = SimpleNamespace(command="study")
    assert _config_path(SimpleNamespace(config="conf/study/world.yaml", job=job)) == str(CONF / "study" / "world.yaml")
    (tmp_path / "conf" / "study").mkdir(parents=True)  # a file of that name here wins
    (tmp_path / "conf" / "study" / "world.yaml").write_text("kind: study\n")
    assert _config_path(SimpleNamespace(config="conf/study/world.yaml", job=job)) == str(tmp_path / "conf/study/world.yaml")
    assert main(["study", "conf/study/no_such.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err
