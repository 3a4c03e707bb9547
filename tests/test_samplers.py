"""Schedules and samplers against `generation/sampler_small_golden.pt`.

Replay tests feed the recorded eps back through a fake model, so they pin the update formulas,
timesteps, alpha_bar indexing, guidance, flags and switch bookkeeping without any network. The
end-to-end tests run the real small ConditionalUNet (golden weights) through the samplers.
Trajectory tolerance: atol = 1e-4 * max|ref| (README section 3).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from synray.diffusion.ddim import (
    ddim_alpha_bars,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    guided_eps_idiff,
    guided_eps_uiface,
    predict_eps,
)
from synray.diffusion.ddpm import ddpm_sample, ddpm_step
from synray.diffusion.dpm_solver import dpmpp_2m_sample, dpmpp_timesteps
from synray.diffusion.sampling import METHODS, sample
from synray.diffusion.schedule import BUFFER_NAMES, DiffusionSchedule, linear_schedule
from synray.diffusion.uiface import aggregate_cross_attention, attention_change, uiface_sample

torch.set_num_threads(1)

UIFACE_CASES = ("uiface_2stage_ddim5_default", "uiface_2stage_ddim5_mixed_switch")


@pytest.fixture(scope="module")
def golden(reference):
    return torch.load(reference / "generation" / "sampler_small_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def unet_weights(reference):
    return torch.load(reference / "generation" / "unet_small_golden.pt", weights_only=True)["state_dict"]


def small_unet(weights, flavour: str):
    unet = pytest.importorskip("synray.models.unet", reason="synray.models.unet is not available yet")
    state = dict(weights)
    if flavour != "uiface":
        state.pop("empty_context_embedding")  # IDiff-Face/ADMIS keep a zero empty context, not stored
    model = unet.ConditionalUNet(unet.UNetConfig.small(flavour))
    model.load_state_dict(state, strict=True)
    return model.eval()


def close(actual, ref, rel=1e-4):
    torch.testing.assert_close(actual, ref, rtol=0, atol=rel * float(ref.abs().max()))


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------


def test_schedule_buffers_match_reference(golden, reference):
    sched = linear_schedule()
    buffers = sched.buffers()
    assert tuple(buffers) == BUFFER_NAMES
    layout = json.loads((reference / "generation" / "ddpm_checkpoint_layout.json").read_text())
    assert {k: tuple(v) for k, v in layout["non_unet_entries"].items()} == {k: (1000,) for k in BUFFER_NAMES}
    for name in BUFFER_NAMES:
        torch.testing.assert_close(buffers[name], golden["schedule"][name], rtol=1e-6, atol=0)
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (1000,)
    torch.testing.assert_close(sched.alphas_prev, golden["schedule"]["alphas_prev_nonbuffer"], rtol=1e-6, atol=0)
    ab = sched.alpha_bars
    assert math.isclose(float(ab[0]), 0.9999, rel_tol=1e-6)
    assert math.isclose(float(ab[599]), 0.025879, rel_tol=1e-4)
    assert math.isclose(float(ab[999]), 4.036e-5, rel_tol=1e-3)
    # exp-cumsum-log, not cumprod: the two differ slightly, and the buffer is the former
    assert not torch.equal(ab, torch.cumprod(sched.alphas, 0))


# ----------------------------------------------------------------------------------------------
# DDIM (ADMIS) and the reference/textbook difference
# ----------------------------------------------------------------------------------------------


class Replay:
    """Fake eps-model returning recorded eps in order, checking each call's timestep and context."""

    def __init__(self, eps_list, timesteps, context):
        self.eps, self.timesteps, self.context, self.n = list(eps_list), list(timesteps), context, 0

    def __call__(self, x, t, context=None, **extra):
        assert extra == {}, extra
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        assert torch.all(t == self.timesteps[self.n])
        assert context is self.context
        out = self.eps[self.n]
        self.n += 1
        return out


def test_ddim_timesteps_and_alpha_bar_indices(golden):
    g = golden["admis_ddim5"]
    sched = linear_schedule()
    assert ddim_timesteps(5) == g["timesteps"] == [800, 600, 400, 200, 0]
    assert len(ddim_timesteps(50)) == 50 and ddim_timesteps(50)[:2] == [980, 960]
    ref = [ddim_alpha_bars(sched, t, 200, "reference") for t in g["timesteps"]]
    torch.testing.assert_close(torch.stack([a for a, _ in ref]), g["alpha_bar_t_used"], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.stack([p for _, p in ref]), g["alpha_bar_prev_used"], rtol=1e-6, atol=0)
    # textbook DDIM targets alpha_bar[t - skip] (and alpha_bar[0] before the final 1.0)
    ab = sched.alpha_bars
    text = torch.stack([ddim_alpha_bars(sched, t, 200, "textbook")[1] for t in g["timesteps"]])
    torch.testing.assert_close(text, torch.stack([ab[600], ab[400], ab[200], ab[0], torch.tensor(1.0)]))
    with pytest.raises(ValueError, match="valid"):
        ddim_alpha_bars(sched, 800, 200, "diffusers")


def test_ddim_reference_replay_matches_golden(golden):
    g, inputs = golden["admis_ddim5"], golden["inputs"]
    model = Replay(g["eps_per_step"], g["timesteps"], inputs["context"])
    traj = [inputs["x_T"]]
    x = ddim_sample(model, inputs["x_T"], inputs["context"], steps=5, mode="reference",
                    callback=lambda t, x_t, eps, x_next: traj.append(x_next))
    assert model.n == 5
    close(torch.stack(traj), g["x_traj"])
    close(x, g["x_final"])


def test_ddim_textbook_differs_from_reference(golden):
    """Same eps, same timesteps; only alpha_bar_prev differs (t - skip vs t - skip - 1, ab[0] vs 1 at t=200)."""
    g, inputs = golden["admis_ddim5"], golden["inputs"]
    x_ref = g["x_traj"][:-1]
    sched = linear_schedule()
    for i, t in enumerate(g["timesteps"]):
        ab_t, ab_prev = ddim_alpha_bars(sched, t, 200, "textbook")
        step = ddim_step(x_ref[i], g["eps_per_step"][i], ab_t, ab_prev)
        if t == 0:  # the last step targets alpha_bar = 1 in both modes
            close(step, g["x_traj"][i + 1])
        else:
            assert (step - g["x_traj"][i + 1]).abs().max() > 3e-4 * g["x_traj"][i + 1].abs().max()  # > 3x the tolerance
    model = Replay(g["eps_per_step"], g["timesteps"], inputs["context"])
    x_text = ddim_sample(model, inputs["x_T"], inputs["context"], steps=5, mode="textbook")
    assert (x_text - g["x_final"]).abs().max() > 1e-2 * g["x_final"].abs().max()


def test_ddim_real_unet_matches_golden(golden, unet_weights):
    g, inputs = golden["admis_ddim5"], golden["inputs"]
    model = small_unet(unet_weights, "idiff_face")
    traj, eps = [inputs["x_T"]], []
    x = ddim_sample(model, inputs["x_T"], inputs["context"], steps=5,
                    callback=lambda t, x_t, e, x_next: (traj.append(x_next), eps.append(e)))
    close(torch.stack(eps), g["eps_per_step"])
    close(torch.stack(traj), g["x_traj"])
    close(x, g["x_final"])


# ----------------------------------------------------------------------------------------------
# guidance helpers
# ----------------------------------------------------------------------------------------------


def test_guidance_rules_and_call_order():
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(guided_eps_idiff(c, u, 3.0), 3.0 * c - 2.0 * u)
    torch.testing.assert_close(guided_eps_idiff(c, u, 1.0), c)
    torch.testing.assert_close(guided_eps_uiface(c, u, 1.0), 2.0 * c - u)
    torch.testing.assert_close(guided_eps_uiface(c, u, 0.0), c)

    calls = []

    def model(x, t, context=None):
        calls.append(context is None)
        return u if context is None else c

    ctx = torch.randn(2, 4)
    torch.testing.assert_close(predict_eps(model, c, 5, ctx, guidance_scale=2.0, rule="idiff"), 2 * c - u)
    torch.testing.assert_close(predict_eps(model, c, 5, ctx, guidance_scale=2.0, rule="uiface"), 3 * c - 2 * u)
    assert calls == [True, False, True, False]  # unconditional pass first
    with pytest.raises(ValueError, match="valid"):
        predict_eps(model, c, 5, ctx, guidance_scale=2.0, rule="cfgpp")
    with pytest.raises(ValueError, match="context"):
        predict_eps(model, c, 5, None, guidance_scale=2.0)


# ----------------------------------------------------------------------------------------------
# DDPM (IDiff-Face)
# ----------------------------------------------------------------------------------------------


def test_ddpm_noise_free_last_two_updates(golden):
    d = golden["idiff_ddpm_ancestral_T1000"]
    sched = linear_schedule()
    close(ddpm_step(sched, d["x_in_at"][1], d["eps_at"][1], 1), d["x_in_at"][0], rel=1e-6)
    close(ddpm_step(sched, d["x_in_at"][0], d["eps_at"][0], 0), d["x_final"], rel=1e-6)


class Stop(Exception):
    pass


def test_ddpm_first_step_noise_convention(golden):
    """Seeding the generator 777 reproduces the first noisy step x_999 -> x_998 of the golden."""
    d, inputs = golden["idiff_ddpm_ancestral_T1000"], golden["inputs"]
    seen = {}

    def model(x, t, context=None):
        step = int(t[0])
        seen[step] = x
        if step == 998:
            raise Stop
        return d["eps_at"][step]

    with pytest.raises(Stop):
        ddpm_sample(model, inputs["x_T"], inputs["context"], generator=torch.Generator().manual_seed(777))
    close(seen[999], d["x_in_at"][999])
    close(seen[998], d["x_in_at"][998])


def test_ddpm_reference_vs_textbook_noise():
    """Reference: noise for t > 1 only; textbook: for every t > 0. Checked on a short 10-step schedule."""
    sched = DiffusionSchedule.from_betas(torch.linspace(1e-3, 0.2, 10))
    x_T = torch.randn(2, 3)

    def zero(x, t, context=None):
        return torch.zeros_like(x)

    def manual(noisy_from: int):
        g, x = torch.Generator().manual_seed(5), x_T
        for t in reversed(range(10)):
            z = torch.randn(2, 3, generator=g) if t >= noisy_from else None
            x = ddpm_step(sched, x, torch.zeros_like(x), t, z)
        return x

    ref = ddpm_sample(zero, x_T, schedule=sched, generator=torch.Generator().manual_seed(5), mode="reference")
    text = ddpm_sample(zero, x_T, schedule=sched, generator=torch.Generator().manual_seed(5), mode="textbook")
    torch.testing.assert_close(ref, manual(2))
    torch.testing.assert_close(text, manual(1))
    assert not torch.allclose(ref, text)
    with pytest.raises(ValueError, match="valid"):
        ddpm_sample(zero, x_T, schedule=sched, mode="posterior")


def test_per_sample_generators_make_noise_independent_of_batch():
    """A list of generators (one per sample) gives each sample its own stream, as the synthesis pipeline needs."""
    sched = DiffusionSchedule.from_betas(torch.linspace(1e-3, 0.2, 10))
    x_T = torch.randn(3, 2, 4)

    def zero(x, t, context=None):
        return torch.zeros_like(x)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = ddpm_sample(zero, x_T, schedule=sched, generator=gens([1, 2, 3]))
    alone = ddpm_sample(zero, x_T[1:2], schedule=sched, generator=gens([2]))
    torch.testing.assert_close(batch[1:2], alone)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        ddpm_sample(zero, x_T, schedule=sched, generator=gens([1, 2]))


def test_ddpm_1000_steps_real_unet_matches_golden(golden, unet_weights):
    """1000 UNet calls on a 3x3x16x16 batch: about 17 s on one CPU thread."""
    d, inputs = golden["idiff_ddpm_ancestral_T1000"], golden["inputs"]
    model = small_unet(unet_weights, "idiff_face")
    seen = {}

    def record(t, x_t, eps, x_next):
        if t in d["x_in_at"]:
            seen[t] = (x_t, eps)

    x = ddpm_sample(model, inputs["x_T"], inputs["context"], generator=torch.Generator().manual_seed(777),
                    callback=record)
    for t in d["x_in_at"]:
        close(seen[t][0], d["x_in_at"][t])
        close(seen[t][1], d["eps_at"][t])
    close(x, d["x_final"])


# ----------------------------------------------------------------------------------------------
# UIFace two-stage
# ----------------------------------------------------------------------------------------------


class UIFaceReplay:
    """Replays the golden `unet_calls`, checking every call's timestep, context, injections and flag."""

    def __init__(self, calls, context, n_slots=16):
        self.calls, self.context, self.n, self.n_slots = calls, context, 0, n_slots

    def __call__(self, x, t, context=None, condition_flag=None, self_attn_logits=None, cross_attn_logits=None,
                 return_attn=False, **extra):
        assert extra == {}, extra
        call = self.calls[self.n]
        self.n += 1
        assert torch.all(t == call["t"])
        assert (context is None) == call["context_is_none"]
        if context is not None:
            assert context is self.context
        assert (self_attn_logits is not None) == call["self_injected"]
        assert (cross_attn_logits is not None) == call["cross_injected"]
        if "condition_flag" in call:
            assert torch.equal(condition_flag, call["condition_flag"])
        else:
            assert condition_flag is None
        if return_attn:
            return call["eps"], [f"self{self.n}"] * self.n_slots, [f"cross{self.n}"] * self.n_slots
        return call["eps"]


@pytest.mark.parametrize("case", UIFACE_CASES)
def test_uiface_replay_matches_golden(golden, case):
    g, inputs = golden[case], golden["inputs"]
    model = UIFaceReplay(g["unet_calls"], inputs["context"])
    maps = iter(g["attn_map_traj"])  # the stage-1 maps, in order, stand in for the aggregated logits

    def attention_map(cross_logits, batch):
        assert batch == 3 and len(cross_logits) == 16
        return next(maps)

    res = uiface_sample(model, inputs["x_T"], inputs["context"], steps=5, step_th=g["step_th"], mse_th=g["MSE_th"],
                        cfg_scale=g["cfg_scale"], attention_map=attention_map, record=True)
    assert model.n == len(g["unet_calls"]) == 10
    close(torch.stack(res.trajectory), g["x_traj"])
    close(res.x, g["x_final"])
    torch.testing.assert_close(torch.stack(res.criterion), g["rmse_checks"], rtol=0, atol=1e-6)
    n_stage1 = sum(t >= g["step_th"] for t in res.timesteps)
    assert res.stage == [1] * n_stage1 + [2] * (5 - n_stage1)
    close(torch.stack(res.attention_maps), g["attn_map_traj"])  # stage 2 repeats the last stage-1 map
    if case.endswith("mixed_switch"):
        assert res.switched_at.tolist() == [600, 400, 400]
    else:
        assert res.switched_at.tolist() == [-1, -1, -1]


@pytest.mark.parametrize("case", UIFACE_CASES)
def test_uiface_real_unet_matches_golden(golden, unet_weights, case):
    g, inputs = golden[case], golden["inputs"]
    model = small_unet(unet_weights, "uiface")
    res = uiface_sample(model, inputs["x_T"], inputs["context"], steps=5, step_th=g["step_th"], mse_th=g["MSE_th"],
                        cfg_scale=g["cfg_scale"], record=True)
    assert len(res.calls) == len(g["unet_calls"])
    for mine, ref in zip(res.calls, g["unet_calls"]):
        assert mine.t == ref["t"]
        assert mine.context_is_none == ref["context_is_none"]
        assert mine.self_injected == ref["self_injected"] and mine.cross_injected == ref["cross_injected"]
        if "condition_flag" in ref:
            assert torch.equal(mine.condition_flag, ref["condition_flag"])
        else:
            assert mine.condition_flag is None
        close(mine.eps, ref["eps"])
    torch.testing.assert_close(torch.stack(res.attention_maps), g["attn_map_traj"], rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.stack(res.criterion), g["rmse_checks"], rtol=0, atol=1e-5)
    close(torch.stack(res.trajectory), g["x_traj"])
    close(res.x, g["x_final"])
    if case.endswith("default"):  # the entry point's defaults are the published settings used here
        close(sample({"method": "uiface", "steps": 5}, model, inputs["x_T"], inputs["context"]), g["x_final"])


def test_attention_aggregation_properties():
    torch.manual_seed(0)
    logits = [None, torch.randn(2 * 3, 64, 32), torch.randn(2 * 6, 16, 32), None]
    m = aggregate_cross_attention(logits, batch_size=2)
    assert m.shape == (2, 32, 32)
    assert torch.allclose(m.flatten(1).amin(1), torch.zeros(2)) and torch.allclose(m.flatten(1).amax(1), torch.ones(2))
    # constant logits give a constant map, which normalises to 0 (not NaN)
    assert torch.equal(aggregate_cross_attention([torch.zeros(2, 64, 32)], 2), torch.zeros(2, 32, 32))
    torch.testing.assert_close(attention_change(m, 1 - m), (2 * m - 1).abs().mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="non-square"):
        aggregate_cross_attention([torch.randn(2, 60, 32)], 2)
    with pytest.raises(ValueError, match="None"):
        aggregate_cross_attention([None, None], 2)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ on an analytic eps-model
# ----------------------------------------------------------------------------------------------


def gaussian_mixture_eps(means, stds, weights):
    """Exact eps-prediction E[eps | x_t] for data ~ sum_k w_k N(mu_k, s_k^2 I) under the linear schedule."""
    ab = linear_schedule().alpha_bars.double()
    mu = torch.tensor(means, dtype=torch.float64)
    s2 = torch.tensor(stds, dtype=torch.float64) ** 2
    logw = torch.tensor(weights, dtype=torch.float64).log()

    def model(x, t, context=None):
        a = ab[t].view(-1, 1)
        var = a * s2 + (1 - a)  # [B, K]
        diff = x[:, None, :] - a.sqrt()[:, :, None] * mu  # [B, K, D]
        logp = logw - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * mu.shape[1] * var.log()
        resp = torch.softmax(logp, dim=-1)
        return (1 - a).sqrt() * (resp[:, :, None] * diff / var[:, :, None]).sum(1)

    return model


def test_dpmpp_timesteps():
    sched = linear_schedule()
    for spacing in ("logsnr", "time_uniform"):
        ts = dpmpp_timesteps(20, sched, spacing)
        assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 20
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="valid"):
        dpmpp_timesteps(20, sched, "karras")


def test_dpmpp_gaussian_matches_exact_flow():
    """For Gaussian data the probability-flow ODE map is closed-form.

    x0 = mu + s (x_T - a mu) / sqrt(a^2 s^2 + 1 - a^2), with a = sqrt(alpha_bar[999]).
    """
    mu, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    model = gaussian_mixture_eps([[1.0, -0.5]], [s], [1.0])
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab = float(linear_schedule().alpha_bars[999])
    exact = mu + s * (x_T - math.sqrt(ab) * mu) / math.sqrt(ab * s * s + 1 - ab)

    def err(x):
        return float((x - exact).norm(dim=1).mean())

    e_dpm = err(dpmpp_2m_sample(model, x_T, steps=15))
    e_ddim15 = err(ddim_sample(model, x_T, steps=15, mode="textbook"))
    e_ddim200 = err(ddim_sample(model, x_T, steps=200, mode="textbook"))
    assert e_dpm < 0.03, e_dpm
    assert e_dpm < e_ddim15 / 4, (e_dpm, e_ddim15)
    assert e_ddim200 < 0.01  # the fine DDIM is accurate, so it is a fair yardstick below


def test_dpmpp_mixture_close_to_fine_ddim():
    """20 DPM-Solver++ steps are about as accurate as DDIM with 100 steps, and far better than DDIM with 20.

    Yardstick: the probability-flow ODE solution, approximated by DDIM with 1000 steps (which DDIM-200
    already matches to < 0.01 per sample). The data is a 2-D two-component Gaussian mixture.
    """
    model = gaussian_mixture_eps([[-1.5, 0.0], [1.5, 0.5]], [0.6, 0.8], [0.4, 0.6])
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ode = ddim_sample(model, x_T, steps=1000, mode="textbook")
    ddim200 = ddim_sample(model, x_T, steps=200, mode="textbook")
    ddim100 = ddim_sample(model, x_T, steps=100, mode="textbook")
    ddim20 = ddim_sample(model, x_T, steps=20, mode="textbook")
    dpm20 = dpmpp_2m_sample(model, x_T, steps=20)

    def dist(x):
        return float((x - ode).norm(dim=1).mean())

    def std_err(x):
        return float((x.std(0) - ode.std(0)).abs().max())

    assert dist(ddim200) < 0.01
    assert dist(dpm20) < 0.035 and dist(dpm20) < 1.5 * dist(ddim100), (dist(dpm20), dist(ddim100))
    assert dist(dpm20) < dist(ddim20) / 3, (dist(dpm20), dist(ddim20))
    torch.testing.assert_close(dpm20.mean(0), ddim200.mean(0), rtol=0, atol=0.01)
    assert std_err(dpm20) < 0.03 and std_err(ddim20) > 3 * std_err(dpm20), (std_err(dpm20), std_err(ddim20))


# ----------------------------------------------------------------------------------------------
# entry point and input errors
# ----------------------------------------------------------------------------------------------


def test_sample_entry_point_dispatch_and_errors(golden):
    g, inputs = golden["admis_ddim5"], golden["inputs"]
    x = sample({"method": "ddim", "steps": 5}, Replay(g["eps_per_step"], g["timesteps"], inputs["context"]),
               inputs["x_T"], inputs["context"])
    close(x, g["x_final"])
    model = gaussian_mixture_eps([[0.0, 0.0]], [0.5], [1.0])
    x_T = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(sample({"method": "dpmpp", "steps": 10}, model, x_T), dpmpp_2m_sample(model, x_T, steps=10))
    assert set(METHODS) == {"ddpm", "ddim", "uiface", "dpmpp", "unipc"}
    with pytest.raises(ValueError, match="ddpm.*ddim.*uiface.*dpmpp"):
        sample({"method": "euler"}, model, x_T)
    with pytest.raises(ValueError, match="all T=1000 steps"):
        sample({"method": "ddpm", "steps": 50}, model, x_T)
    with pytest.raises(ValueError, match="step_th"):
        sample({"method": "ddim", "step_th": 500}, model, x_T)
    with pytest.raises(ValueError, match="unknown key for method 'dpmpp'"):
        sample({"method": "dpmpp", "mode": "textbook"}, model, x_T)
    with pytest.raises(ValueError, match="context must be"):
        sample({"method": "ddim"}, model, x_T, torch.randn(3, 512))
    with pytest.raises(ValueError, match="steps"):
        sample({"method": "ddim", "steps": 0}, model, x_T)
    train_mode = torch.nn.Linear(2, 2).train()
    with pytest.raises(ValueError, match="train mode"):
        sample({"method": "ddim"}, train_mode, x_T)
