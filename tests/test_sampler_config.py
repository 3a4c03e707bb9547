"""The one sampler block (``synray.config.sampler``) and the one entry point (``sampling.sample``).

A foreign or bad option fails at config load naming the dotted key; the config's defaults are the
samplers' defaults and every field reaches the sampler; synthesis, distillation and the sweep
objective sample through the entry point with their own ``sampler:`` block (checked on the shipped
world LDM against the low-level sampler called by hand).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synray.config import ConfigError, load_config
from synray.config.distill import DistillConfig
from synray.config.sampler import METHODS, SAMPLERS, TRAIN_STEPS, DDIMSampler
from synray.config.sweep import ObjectiveConfig, SweepConfig
from synray.config.synth import SynthConfig
from synray.diffusion import sampling
from synray.diffusion.ddim import ddim_sample
from synray.diffusion.ddpm import ddpm_sample
from synray.diffusion.dpm_solver import dpmpp_2m_sample
from synray.diffusion.schedule import T_DEFAULT, linear_schedule
from synray.diffusion.uiface import uiface_sample
from synray.diffusion.unipc import unipc_sample

SWEEP_BASE = ["base=ldm.yaml", "space={unet.context_dropout: {grid: [0.0]}}"]
SYNTH_BASE = ["generator.type=world"]
DISTILL_BASE = ["generator.type=ldm", "generator.path=unet.ckpt", "generator.vq_decoder=vq.pt"]
BLOCKS = [(SynthConfig, "generator.sampler", SYNTH_BASE), (DistillConfig, "generator.sampler", DISTILL_BASE),
          (SweepConfig, "objective.sampler", SWEEP_BASE)]

#: per method: the low-level sampler, config field -> its keyword, and a config with no default value
LOW_LEVEL = {
    "ddpm": (ddpm_sample, {"mode": "mode", "guidance": "guidance_scale"}, {"mode": "textbook", "guidance": 2.0}),
    "ddim": (ddim_sample, {"steps": "steps", "mode": "mode", "eta": "eta", "guidance": "guidance_scale"},
             {"steps": 7, "mode": "textbook", "eta": 0.3, "guidance": 1.5}),
    "uiface": (uiface_sample, {"steps": "steps", "mode": "mode", "eta": "eta", "guidance": "cfg_scale",
                               "two_stage.step_th": "step_th", "two_stage.mse_th": "mse_th"},
               {"steps": 9, "mode": "textbook", "eta": 0.2, "guidance": 0.5, "two_stage": {"step_th": 300, "mse_th": 0.01}}),
    "dpmpp": (dpmpp_2m_sample, {"steps": "steps", "spacing": "spacing", "guidance": "guidance_scale"},
              {"steps": 11, "spacing": "time_uniform", "guidance": 3.0}),
    "unipc": (unipc_sample, {"steps": "steps", "order": "order", "variant": "variant", "spacing": "spacing",
                             "guidance": "guidance_scale"},
              {"steps": 4, "order": 2, "variant": "bh1", "spacing": "logsnr", "guidance": 2.5}),
}


def field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def leaf_fields(model_cls, prefix: str = "") -> set[str]:
    out = set()
    for name, info in model_cls.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            out |= leaf_fields(sub, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


# --- config load ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, prefix, base", BLOCKS)
@pytest.mark.parametrize("block, message", [
    ("{method: dpmpp, eta: 0.1}", "{p}.eta: unknown key"),
    ("{method: ddim, two_stage: {step_th: 300}}", "{p}.two_stage: unknown key"),
    ("{method: unipc, mode: textbook}", "{p}.mode: unknown key"),
    ("{method: uiface, spacing: logsnr}", "{p}.spacing: unknown key"),
    ("{method: euler}", "{p}.method: unknown sampler method 'euler'; valid: ddpm, ddim, uiface, dpmpp, unipc"),
    ("{method: unipc, order: 4}", "{p}.order: Input should be less than or equal to 3"),
    ("{method: ddpm, steps: 50}", "{p}.steps: Value error, method 'ddpm' always runs all T=1000 steps"),
    ("{method: uiface, two_stage: {mse_th: -1}}", "{p}.two_stage.mse_th: Input should be greater than or equal to 0"),
    ("7", "{p}: a sampler is a mapping with a 'method'"),
])
def test_foreign_or_bad_option_fails_at_load_naming_the_key(schema, prefix, base, block, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, schema, [*base, f"{prefix}={block}"])
    assert message.format(p=prefix) in str(err.value)


def test_blocks_default_per_job_and_take_overrides():
    assert SynthConfig().generator.sampler == DDIMSampler(steps=50)
    assert DistillConfig().generator.sampler == DDIMSampler(steps=20)
    assert load_config(None, SweepConfig, SWEEP_BASE).objective.sampler == DDIMSampler(steps=10)
    # a block without 'method' is DDIM; naming another method takes that method's own defaults
    cfg = load_config(None, SynthConfig, [*SYNTH_BASE, "generator.sampler.method=unipc"])
    assert cfg.generator.sampler == SAMPLERS["unipc"]()
    cfg = load_config(None, DistillConfig, [*DISTILL_BASE, "generator.sampler={steps: 30, eta: 0.5}"])
    assert cfg.generator.sampler == DDIMSampler(steps=30, eta=0.5) and cfg.generator.sampler.stochastic
    # switching the method of a written block keeps its keys, which the new method may not take
    with pytest.raises(ConfigError, match="generator.sampler.eta: unknown key"):
        load_config(None, SynthConfig, [*SYNTH_BASE, "generator.sampler={method: ddim, eta: 0.0}",
                                        "generator.sampler.method=dpmpp"])
    s = SynthConfig()
    s.generator.sampler = {"method": "dpmpp", "steps": 12}  # assignment validates too
    assert s.generator.sampler.method == "dpmpp" and s.generator.sampler.steps == 12
    assert SynthConfig().generator.sampler.steps == 50


# --- one place for defaults, every field used ----------------------------------------------------

def test_config_defaults_are_the_samplers_defaults_and_every_field_is_mapped():
    # METHODS: the built-in methods; SAMPLERS may also hold plugins registered by other tests in this process
    assert set(LOW_LEVEL) == set(METHODS) and set(METHODS) <= set(SAMPLERS)
    for method, (fn, names, _) in LOW_LEVEL.items():
        cfg = SAMPLERS[method]()
        params = inspect.signature(fn).parameters
        assert leaf_fields(SAMPLERS[method]) - {"method"} - ({"steps"} if method == "ddpm" else set()) == set(names)
        for name, arg in names.items():
            assert field(cfg, name) == params[arg].default, (method, name)
    assert SAMPLERS["ddpm"]().steps == TRAIN_STEPS == T_DEFAULT == linear_schedule().T


@pytest.mark.parametrize("method", list(LOW_LEVEL))
def test_sample_hands_every_option_to_the_sampler(monkeypatch, method):
    fn, names, values = LOW_LEVEL[method]
    cfg = sampling.sampler_config({"method": method, **values})
    default = SAMPLERS[method]()
    seen = {}

    class Result:
        x = torch.zeros(1, 2)

    def spy(model, x_T, context=None, **kwargs):
        seen.update(kwargs, x_T=x_T, context=context)
        return Result() if method == "uiface" else x_T

    monkeypatch.setattr(sampling, fn.__name__, spy)
    gen, x_T, ctx = torch.Generator(), torch.zeros(1, 2), torch.zeros(1, 4)
    sampling.sample(cfg, lambda x, t, context=None: x, x_T, ctx, generator=gen)
    assert seen["x_T"] is x_T and seen["context"] is ctx
    for name, arg in names.items():
        assert field(cfg, name) != field(default, name) and seen[arg] == field(cfg, name), (name, seen)
    if cfg.stochastic:
        assert seen["generator"] is gen
    else:
        assert "generator" not in seen


# --- the three jobs route through the entry point ------------------------------------------------

@pytest.fixture(scope="module")
def world_ldm():
    from synray.quickstart import load_assets, packaged_assets

    torch.set_num_threads(1)
    return load_assets(packaged_assets())


def test_synthesis_generator_samples_with_its_sampler_block(world_ldm):
    from synray.seeds import sample_seed, torch_generator
    from synray.synthesis.generators import LDMGenerator, to_uint8

    g = world_ldm["generator"]

    gen = LDMGenerator(SynthConfig.model_validate({"seed": 4, "generator": {**g, "images_per_identity": 2,
                                                                          "batch_size": 3}}))
    gen.cfg.generator.sampler = {"method": "unipc", "steps": 3, "order": 2}
    ids, n = np.array([5, 9]), np.array([2, 1])
    ctx = F.normalize(torch.randn(2, world_ldm["meta"]["context_dim"], generator=torch.Generator().manual_seed(0)))
    images = gen.generate(ids, ctx.numpy(), n)
    seeds = [sample_seed(4, 5, 0), sample_seed(4, 5, 1), sample_seed(4, 9, 0)]
    x_T = torch.stack([torch.randn(tuple(g["latent_shape"]), generator=torch_generator(s)) for s in seeds])
    z = unipc_sample(gen.unet, x_T, ctx[[0, 0, 1]], steps=3, order=2)
    np.testing.assert_array_equal(images, to_uint8(gen.vq.decode(z)))
    # a stochastic sampler gets one noise stream per image: the batch composition does not matter
    gen.cfg.generator.sampler = {"method": "ddim", "steps": 3, "eta": 0.8}
    batched = gen.generate(ids, ctx.numpy(), n)
    gen.batch_size = 1
    alone = gen.generate(ids, ctx.numpy(), n)
    assert np.abs(batched.astype(int) - alone).max() <= 1
    gen.cfg.generator.sampler = {"method": "ddim", "steps": 3}
    assert np.abs(gen.generate(ids, ctx.numpy(), n).astype(int) - alone).mean() > 1


def test_distill_ldm_generator_samples_with_its_sampler_block(world_ldm):
    from synray.distill.generators import LDMLatentGenerator

    g = world_ldm["generator"]
    base = {"type": "ldm", "path": g["unet"], "vq_decoder": g["vq_decoder"], "vq_config": g["vq_config"],
            "latent_shape": g["latent_shape"]}
    gen = LDMLatentGenerator(DistillConfig.model_validate(
        {"generator": {**base, "sampler": {"method": "unipc", "steps": 3, "order": 2}}}).generator)
    w = gen.map(torch.randn(2, gen.z_dim, generator=torch.Generator().manual_seed(1)))
    images = gen.synthesize(w, generator=torch.Generator().manual_seed(5))
    x_T = torch.randn((2, *g["latent_shape"]), generator=torch.Generator().manual_seed(5))
    z = unipc_sample(gen.unet, x_T, F.normalize(w[:, 0], dim=1), steps=3, order=2)
    torch.testing.assert_close(images, (gen.vq.decode(z).clamp(-1, 1) + 1) / 2, rtol=0, atol=0)
    default = LDMLatentGenerator(DistillConfig.model_validate({"generator": base}).generator)
    assert default.sampler == DDIMSampler(steps=20)
    assert float((default.synthesize(w, generator=torch.Generator().manual_seed(5)) - images).abs().mean()) > 1e-3


def test_sweep_objective_samples_with_its_sampler_block(world_ldm, monkeypatch):
    from synray.models.export import load_any_backbone
    from synray.models.ldm_checkpoint import load_unet, load_vq_decoder
    from synray.models.vq import VQConfig
    from synray.synthesis.generators import to_uint8
    from synray.tuning import objectives

    g = world_ldm["generator"]
    unet = load_unet(g["unet"]).eval()
    vq = load_vq_decoder(g["vq_decoder"], VQConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in g["vq_config"].items()})).eval()
    objective = ObjectiveConfig.model_validate({"name": "consistency", "identities": 2, "images_per_identity": 2,
                                                "sampler": {"method": "unipc", "steps": 3, "variant": "bh1"}})
    contexts = F.normalize(torch.randn(2, world_ldm["meta"]["context_dim"], generator=torch.Generator().manual_seed(2)))
    images = objectives.sample_identities(unet, vq, contexts.numpy(), 2, tuple(g["latent_shape"]), objective.sampler, seed=3)
    noise = torch.randn((4, *g["latent_shape"]), generator=torch.Generator().manual_seed(3))
    z = unipc_sample(unet, noise, contexts[[0, 0, 1, 1]], steps=3, variant="bh1")
    np.testing.assert_array_equal(images, to_uint8(vq.decode(z)))
    seen = []
    real = objectives.sample
    monkeypatch.setattr(objectives, "sample", lambda cfg, *a, **k: (seen.append(cfg), real(cfg, *a, **k))[1])
    out = objectives.ldm_objective(unet, vq, load_any_backbone(world_ldm["teacher"]).eval(), contexts.numpy(),
                                   tuple(g["latent_shape"]), objective, seed=3)
    assert seen == [objective.sampler] and -1 <= out["objective/consistency"] <= 1
