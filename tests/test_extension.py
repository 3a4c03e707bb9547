"""Adding a method from outside the package: a generator, a sampler, a backbone and a margin head, each one class,
one registry entry and (where it has settings) one config type, named by a config through ``plugins``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from synray.config import ConfigError
from synray.io import shards
from synray.io.images import decode_image
from synray.jobs import load_job

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent('''
    """A toy plugin: a flat-colour generator, a sampler that halves its input, a tiny backbone and head."""
    from typing import Literal

    import numpy as np
    import torch
    from pydantic import BaseModel, Field
    from torch import nn

    from synray.config.base import StrictModel
    from synray.diffusion.sampling import register_sampler
    from synray.models.heads import CosFace, register_head
    from synray.models.registry import register_backbone
    from synray.synthesis.registry import register_generator


    class FlatOptions(BaseModel):
        model_config = {"extra": "forbid"}
        shade: int = Field(10, ge=0, le=100)


    class FlatFaces:
        """Identity i, image k: a 32x32 image of grey level (i * shade + k) % 256."""

        def __init__(self, cfg):
            self.shade = cfg.generator.options["shade"]

        def generate(self, ids, contexts, samples):
            return np.stack([np.full((32, 32, 3), (int(i) * self.shade + k) % 256, np.uint8)
                             for i, n in zip(ids, samples) for k in range(int(n))])


    register_generator("flat", FlatFaces, FlatOptions)


    class HalveSampler(StrictModel):
        method: Literal["halve"] = "halve"
        times: int = Field(1, ge=1)


    register_sampler(HalveSampler, lambda cfg, model, x_T, context, generator, schedule: x_T / 2 ** cfg.times)


    class Flat(nn.Module):
        embedding_dim, input_size = 8, (16, 16)

        def __init__(self, embedding_dim=8):
            super().__init__()
            self.embedding_dim = embedding_dim
            self.fc = nn.Linear(3 * 16 * 16, embedding_dim)

        def forward(self, x):
            return self.fc(x.flatten(1))


    register_backbone("flat_net", Flat, "a linear layer on 16x16 pixels")
    register_head("cos_small", lambda d, c, **kw: CosFace(d, c, **{"s": 16.0, "m": 0.2, **kw}))
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "toy_synray_plugin.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))


def test_a_plugin_generator_runs_through_the_ray_pipeline(plugin, tmp_path):
    """``synray synth`` as typed, with the plugin on PYTHONPATH: Ray's workers import it from the config."""
    out = tmp_path / "ds"
    cmd = ["synray", "synth", str(ROOT / "conf/synth/world.yaml"), "--quiet", "--set", "plugins=[toy_synray_plugin]",
           "--set", "generator.type=flat", "--set", "generator.options={shade: 40}", "--set", "identities.count=8",
           "--set", "identities.unit_size=4", "--set", "generator.images_per_identity=2", "--set", f"output.uri={out}",
           "--set", "tracking.enabled=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert '"backend": "ray"' in run.stdout
    rows = [r for uri in shards.list_shards(str(out)).values() for r in shards.read_shard(uri).to_pylist()]
    assert len(rows) == 16 and {r["identity"] for r in rows} == set(range(8))
    for r in rows:  # what the plugin drew, through generation, alignment and the shard writer
        assert np.all(decode_image(r["image"]) == (r["identity"] * 40 + r["sample"]) % 256)
    bad = subprocess.run([*cmd, "--set", "generator.options={shade: 400}"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "generator.options.shade" in bad.stderr, bad.stderr[-2000:]


def test_plugin_sampler_backbone_and_head_are_named_by_configs(plugin):
    import torch

    from synray.diffusion.sampling import sample
    from synray.models.heads import build_head
    from synray.models.registry import build_backbone

    cfg = load_job(ROOT / "conf/synth/world.yaml", [
        "plugins=[toy_synray_plugin]", "generator.type=ldm", "generator.unet=u.ckpt", "generator.vq_decoder=v.pt",
        "generator.sampler={method: halve, times: 2}"])
    assert cfg.generator.sampler.times == 2
    x = torch.ones(2, 3, 4, 4)
    assert torch.equal(sample(cfg.generator.sampler, torch.nn.Identity().eval(), x), x / 4)
    with pytest.raises(ConfigError, match="generator.sampler.eta: unknown key"):
        load_job(ROOT / "conf/synth/world.yaml", ["plugins=[toy_synray_plugin]", "generator.sampler={method: halve, eta: 1}"])
    train = load_job(ROOT / "conf/train/world_tiny.yaml", [
        "plugins=[toy_synray_plugin]", "backbone.name=flat_net", "backbone.kwargs={embedding_dim: 8}", "head.name=cos_small",
        "head.kwargs={}"])
    net = build_backbone(train.backbone.name, **train.backbone.kwargs)
    head = build_head(train.head.name, net.embedding_dim, 5)
    assert net(torch.zeros(3, 3, 16, 16)).shape == (3, 8) and head.kernel.shape == (8, 5)
    with pytest.raises(ConfigError, match="unknown backbone 'flat_nett'"):
        load_job(ROOT / "conf/train/world_tiny.yaml", ["plugins=[toy_synray_plugin]", "backbone.name=flat_nett"])
