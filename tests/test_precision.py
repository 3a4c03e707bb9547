"""The GPU fast path's numerics, checked on CPU: bf16 autocast against the float32 goldens and results.

CPU autocast runs the same bf16 matmuls and convolutions a GPU's autocast would, so these tests pin what
``precision: auto`` does on a GPU without one. Tolerances (stated here, observed values beside them):

* UNet forward (``unet_small_golden.pt``): max |eps_bf16 - eps_golden| <= 4e-2 * max |eps_golden| (1.5-2.1e-2);
* sampler trajectories (``sampler_small_golden.pt``, real small UNet): <= 3e-2 * max |x| (1.0-1.5e-2), the
  UIFace switch criterion within 5e-3 of the golden (<= 1.8e-3) and the same switch decisions;
* VQ decode (``vq_small_golden.pt``): the same code indices (the codebook search stays float32), images
  within 4e-2 * max |x| (2.0e-2);
* the shipped world LDM, UniPC 5 (the fast sampler): the mean identity consistency of bf16 samples within
  0.01 of float32's, the paired difference's 95% interval included (observed -0.002 +- 0.003 on 64 x 2).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import golden_key, golden_unet
from test_samplers import expected_switches, uiface_settings

from synray.config.base import ConfigError, load_config
from synray.config.run import ScalingConfig
from synray.config.synth import SynthConfig
from synray.diffusion.ddim import ddim_sample
from synray.diffusion.schedule import DiffusionSchedule, linear_schedule
from synray.diffusion.training import training_step
from synray.diffusion.uiface import uiface_sample
from synray.models.precision import (
    AutocastModel,
    needs_loss_scaling,
    resolve_precision,
    use_channels_last,
    with_precision,
)
from synray.models.vq import VQConfig, VQDecoder

torch.set_num_threads(1)

BF16 = torch.bfloat16
FORWARD_TOL, TRAJECTORY_TOL, CRITERION_TOL, VQ_TOL = 4e-2, 3e-2, 5e-3, 4e-2
CONSISTENCY_MARGIN = 0.01


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    return float((actual.float() - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def unet_golden(reference):
    return torch.load(reference / "generation" / "unet_small_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def sampler_golden(reference):
    return torch.load(reference / "generation" / "sampler_small_golden.pt", weights_only=True)


# --- the settings ---------------------------------------------------------------------------------

def test_precision_rules_and_settings():
    assert resolve_precision("auto", "cpu") is None  # CPU runs stay float32
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is BF16 and resolve_precision("fp16", "cpu") is torch.float16
    assert resolve_precision("mixed", "cpu") is BF16  # the older amp: true on CPU
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        resolve_precision("fp64", "cpu")
    assert needs_loss_scaling(torch.float16) and not needs_loss_scaling(BF16) and not needs_loss_scaling(None)
    model = torch.nn.Linear(2, 2)
    assert with_precision(model, "cpu", None) is model  # float32: the model itself, nothing wrapped
    assert use_channels_last(None, "cpu", default_on_cuda=True) is False and use_channels_last(True, "cpu", False)
    assert ScalingConfig(amp=False).precision_setting == "fp32" and ScalingConfig(amp=True).precision_setting == "mixed"
    with pytest.raises(ValueError, match="scaling.amp and scaling.precision both set"):
        ScalingConfig(amp=True, precision="bf16")
    base = "conf/synth/admis.yaml"
    cfg = load_config(base, SynthConfig, ["generator.unet=u", "generator.vq_decoder=v"])
    assert cfg.generator.batch_size == "auto" and cfg.generator.precision == "auto" and not cfg.generator.compile
    for bad, msg in (("generator.batch_size=0", "generator.batch_size: .*integer >= 1 or 'auto'"),
                     ("generator.precision=fp64", "generator.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'")):
        with pytest.raises(ConfigError, match=msg):
            load_config(base, SynthConfig, [bad])
    from synray.config.distill import DistillConfig

    with pytest.raises(ValueError, match="distillation runs in float32"):
        DistillConfig.model_validate({"scaling": {"precision": "bf16"}})


def test_autocast_model_hands_back_float32_and_mirrors_train_mode(unet_golden):
    model = golden_unet(unet_golden, "uiface")
    wrapped = AutocastModel(model, "cpu", BF16)
    inp = unet_golden["inputs"]
    eps, self_logits, cross_logits = wrapped(inp["x"], inp["t"], context=inp["context"], return_attn=True)
    assert eps.dtype == torch.float32
    assert {t.dtype for t in self_logits + cross_logits if t is not None} == {BF16}  # fed back as computed
    assert not wrapped.training
    model.train()
    assert wrapped.training
    from synray.diffusion.sampling import sample

    with pytest.raises(ValueError, match="train mode"):
        sample({"method": "ddim", "steps": 2}, wrapped, inp["x"], inp["context"])


# --- goldens in bf16 ------------------------------------------------------------------------------

def test_golden_unet_forward_in_bf16(unet_golden):
    inp = unet_golden["inputs"]
    x, t, c = inp["x"], inp["t"], inp["context"]
    idiff = AutocastModel(golden_unet(unet_golden, "idiff_face"), "cpu", BF16)
    with torch.no_grad():
        cases = {"eps_cond": idiff(x, t, context=c), "eps_empty": idiff(x, t, context=None),
                 "eps_dropout_mask": idiff(x, t, context=c, dropout_mask=inp["dropout_mask"])}
        for name, eps in cases.items():
            ref = unet_golden["idiff"][name]
            assert 1e-3 < rel_err(eps, ref) <= FORWARD_TOL, name  # bf16 in effect, and close
        plain = golden_unet(unet_golden, "uiface")
        uiface = AutocastModel(plain, "cpu", BF16)
        _, s_u, c_u = plain(x, t, context=None, return_attn=True)  # the empty pass's logits, as the sampler has them
        eps = uiface(x, t, context=c, self_attn_logits=s_u, cross_attn_logits=c_u)
        assert rel_err(eps, unet_golden["uiface"]["eps_stage2_injected"]) <= FORWARD_TOL
        flag = torch.tensor([False, True, True])
        eps = uiface(x, t, context=c, condition_flag=flag)
        assert rel_err(eps, unet_golden["uiface"]["eps_condition_flag"]) <= FORWARD_TOL


def test_golden_ddim_trajectory_in_bf16(sampler_golden, unet_golden):
    g, inp = sampler_golden[golden_key(sampler_golden, "admis_ddim{steps}")[0]], sampler_golden["inputs"]
    schedule = DiffusionSchedule.from_betas(sampler_golden["schedule"]["betas"])
    model = AutocastModel(golden_unet(unet_golden, "idiff_face"), "cpu", BF16)
    traj = [inp["x_T"]]
    x = ddim_sample(model, inp["x_T"], inp["context"], steps=g["ddim_step"], eta=g["eta"], schedule=schedule,
                    callback=lambda t, x_t, e, x_next: traj.append(x_next))
    assert x.dtype == torch.float32  # the update arithmetic stays float32
    assert rel_err(torch.stack(traj), g["x_traj"]) <= TRAJECTORY_TOL
    assert 1e-4 < rel_err(x, g["x_final"]) <= TRAJECTORY_TOL


@pytest.mark.parametrize("case", ["default", "mixed_switch"])
def test_golden_uiface_two_stage_in_bf16(sampler_golden, unet_golden, case):
    g = sampler_golden[golden_key(sampler_golden, f"uiface_2stage_ddim{{steps}}_{case}")[0]]
    inp = sampler_golden["inputs"]
    schedule = DiffusionSchedule.from_betas(sampler_golden["schedule"]["betas"])
    model = AutocastModel(golden_unet(unet_golden, "uiface"), "cpu", BF16)
    res = uiface_sample(model, inp["x_T"], inp["context"], **uiface_settings(g), schedule=schedule, record=True)
    assert rel_err(torch.stack(res.trajectory), g["x_traj"]) <= TRAJECTORY_TOL
    assert rel_err(res.x, g["x_final"]) <= TRAJECTORY_TOL
    torch.testing.assert_close(torch.stack(res.criterion), g["rmse_checks"], rtol=0, atol=CRITERION_TOL)
    assert res.switched_at.tolist() == expected_switches(g, res.timesteps)  # the same switch decisions


def test_golden_vq_decode_in_bf16_keeps_the_codes(reference):
    golden = torch.load(reference / "generation" / "vq_small_golden.pt", weights_only=True)
    dec = VQDecoder(VQConfig.from_reference(golden["config"]))
    dec.load_state_dict(golden["decoder_state_dict"], strict=True)
    dec.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        _, idx = dec.quantize(golden["z"])
        x = dec(golden["z"])
    assert torch.equal(idx.reshape(-1), golden["code_indices"])
    assert x.dtype == BF16 and 1e-3 < rel_err(x, golden["x_rec"]) <= VQ_TOL


# --- the shipped world LDM: identity consistency of bf16 samples -----------------------------------

@pytest.fixture(scope="module")
def world_ldm():
    from synray.quickstart import load_assets, packaged_assets

    return load_assets(packaged_assets())


def world_config(assets, identities: int, start: int, precision: str) -> SynthConfig:
    from synray.world.world import DEFAULT_DIFFICULTY

    g, meta = assets["generator"], assets["meta"]
    return load_config(None, SynthConfig, [
        f"seed={meta['world']['seed']}", f"identities.start={start}", f"identities.count={identities}",
        "generator.type=ldm", f"generator.unet={g['unet']}", f"generator.vq_decoder={g['vq_decoder']}",
        f"generator.vq_config={json.dumps(g['vq_config'])}", f"generator.latent_shape={json.dumps(g['latent_shape'])}",
        "generator.images_per_identity=2", "generator.batch_size=64", f"generator.precision={precision}",
        "generator.sampler={method: unipc, steps: 5}",
        f"generator.world_difficulty={meta['world'].get('difficulty') or DEFAULT_DIFFICULTY}",
        "contexts.source=face_embeddings", f"contexts.dim={meta['context_dim']}"])


def test_world_ldm_bf16_identity_consistency_within_margin_of_fp32(world_ldm):
    from synray.synthesis.embedders import Embedder, consistency
    from synray.synthesis.neural_generators import LDMGenerator
    from synray.synthesis.pipeline import context_faces

    n, start = 64, 256  # novel identities (the LDM was trained on the first 256)
    teacher = Embedder(world_ldm["teacher"])
    ids = np.arange(start, start + n)
    contexts = teacher.embed(context_faces(world_config(world_ldm, n, start, "fp32"), ids)).astype(np.float32)
    anchors = {int(i): c for i, c in zip(ids, contexts)}
    out = {}
    for precision in ("fp32", "bf16"):
        gen = LDMGenerator(world_config(world_ldm, n, start, precision))
        assert (gen.model is gen.unet) == (precision == "fp32")
        images = gen.generate(ids, contexts, np.full(n, 2))
        out[precision] = (images, consistency(teacher.embed(images), np.repeat(ids, 2), anchors))
    diff = out["bf16"][1] - out["fp32"][1]
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert abs(diff.mean()) + half <= CONSISTENCY_MARGIN, (diff.mean(), half)
    pixels = np.abs(out["bf16"][0].astype(float) - out["fp32"][0])
    assert 0 < pixels.mean() < 3  # bf16 in effect; about 1.4 grey levels on average


def test_generator_auto_precision_on_cpu_is_the_float32_path(world_ldm):
    from synray.synthesis.neural_generators import CPU_BATCH, LDMGenerator

    cfg = world_config(world_ldm, 2, 256, "auto")
    cfg.generator.batch_size = "auto"
    gen = LDMGenerator(cfg)
    assert gen.dtype is None and gen.model is gen.unet and gen.batch_size == CPU_BATCH and gen.decode_stream is None
    ctx = np.random.default_rng(0).standard_normal((2, world_ldm["meta"]["context_dim"])).astype(np.float32)
    ctx /= np.linalg.norm(ctx, axis=1, keepdims=True)
    fp32 = LDMGenerator(world_config(world_ldm, 2, 256, "fp32"))
    np.testing.assert_array_equal(gen.generate(np.array([256, 257]), ctx, np.array([1, 1])),
                                  fp32.generate(np.array([256, 257]), ctx, np.array([1, 1])))


# --- training steps in bf16 ------------------------------------------------------------------------

def test_ldm_training_step_in_bf16_tracks_float32():
    from test_ldm_training import tiny_model, toy_latents

    x0, ctx = toy_latents()
    losses = {}
    # fp16 (older GPUs) goes through the loss scaler; its CPU kernels are slow, so it runs 3 steps
    for name, dtype, scaler, steps in (("fp32", None, None, 30), ("bf16", BF16, None, 30),
                                       ("fp16", torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**8), 3)):
        torch.manual_seed(0)
        model = tiny_model()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(1)
        losses[name] = [training_step(model, opt, x0, ctx, schedule=linear_schedule(), generator=g, precision=dtype,
                                      scaler=scaler) for _ in range(steps)]
    ref = losses["fp32"]
    for name in ("bf16", "fp16"):
        # the first step's loss is exact in any precision (the UNet's last conv starts at 0); then close, not equal
        later = losses[name][1:3]
        assert later != ref[1:3] and all(abs(a - b) <= 0.02 * b for a, b in zip(later, ref[1:3])), (name, losses[name])
    # the same descent: mean of the last 10 steps within 15% of float32's, and well below the start
    late, late32 = np.mean(losses["bf16"][-10:]), np.mean(ref[-10:])
    assert abs(late - late32) <= 0.15 * late32 and late < 0.6 * losses["bf16"][0], (late, late32)


def test_recognition_learner_in_bf16_tracks_float32(tmp_path):
    from test_training_math import _batch, _plan, _tiny_cfg

    from synray.training.learner import Learner

    gen = torch.Generator().manual_seed(0)
    batch = _batch(8, 6, gen)
    losses = {}
    for precision in ("fp32", "bf16"):
        learner = Learner(_tiny_cfg(tmp_path, scaling={"precision": precision}), _plan(6))
        assert learner.amp == (precision == "bf16") and not learner.scaler.is_enabled()
        seen = []  # the trunk's convolutions run in the step's precision (not switched off inside the backbone)
        learner.backbone_module.conv1.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
        losses[precision] = [learner.step(batch, 0, 0.05).loss for _ in range(8)]
        assert set(seen) == {BF16 if precision == "bf16" else torch.float32}
    assert losses["bf16"][0] != losses["fp32"][0]
    assert abs(losses["bf16"][0] - losses["fp32"][0]) <= 0.02 * losses["fp32"][0]
    assert losses["bf16"][-1] < losses["bf16"][0]
    assert Learner(_tiny_cfg(tmp_path, scaling={"precision": "fp16"}), _plan(6)).scaler.is_enabled()
