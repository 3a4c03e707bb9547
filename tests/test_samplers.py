"""Schedules and samplers against `generation/sampler_small_golden.pt`.

Replay tests feed the recorded eps back through a fake model, so they pin the update formulas,
timesteps, alpha_bar indexing, guidance, flags and switch bookkeeping without any network. The
end-to-end tests run the real small ConditionalUNet (golden weights and config) through the samplers.
Step counts, thresholds, guidance scales, seeds and the schedule are read from the golden file.
Trajectory tolerance: atol = 1e-4 * max|ref| (README section 3).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import golden_key, golden_unet

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
from synray.diffusion.uiface import (
    aggregate_cross_attention,
    attention_change,
    uiface_sample,
)

torch.set_num_threads(1)

UIFACE_CASES = ("default", "mixed_switch")


@pytest.fixture(scope="module")
def golden(reference):
    return torch.load(reference / "generation" / "sampler_small_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def unet_golden(reference):
    """The forward golden whose weights and config the sampler runs used."""
    return torch.load(reference / "generation" / "unet_small_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def schedule(golden):
    """The diffusion schedule of the golden runs, rebuilt from its stored betas."""
    return DiffusionSchedule.from_betas(golden["schedule"]["betas"])


def admis(golden: dict) -> dict:
    """The ADMIS DDIM run (its key names the step count)."""
    return golden[golden_key(golden, "admis_ddim{steps}")[0]]


def ddpm(golden: dict) -> dict:
    """The IDiff-Face ancestral run over all T steps (its key names T)."""
    return golden[golden_key(golden, "idiff_ddpm_ancestral_T{T}")[0]]


def uiface_case(golden: dict, case: str) -> dict:
    """A UIFace two-stage run: ``default`` or ``mixed_switch`` (its key names the step count)."""
    return golden[golden_key(golden, f"uiface_2stage_ddim{{steps}}_{case}")[0]]


def ddim_skip(schedule: DiffusionSchedule, g: dict) -> int:
    """Timestep spacing of a DDIM run with the golden's ``ddim_step`` steps."""
    return schedule.T // g["ddim_step"]


def close(actual, ref, rel=1e-4):
    torch.testing.assert_close(actual, ref, rtol=0, atol=rel * float(ref.abs().max()))


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------


def test_schedule_buffers_match_reference(golden):
    """The library's linear schedule, at the golden's T, is the reference schedule stored in the file."""
    T = golden["schedule"]["betas"].numel()
    sched = linear_schedule(T)
    buffers = sched.buffers()
    assert tuple(buffers) == BUFFER_NAMES
    for name in BUFFER_NAMES:
        torch.testing.assert_close(buffers[name], golden["schedule"][name], rtol=1e-6, atol=0)
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (T,)
    torch.testing.assert_close(sched.alphas_prev, golden["schedule"]["alphas_prev_nonbuffer"], rtol=1e-6, atol=0)


def test_linear_schedule_published_values(reference):
    """The default schedule is the published one: linear 1e-4..0.02 over T=1000, as the checkpoints store it."""
    sched = linear_schedule()
    layout = json.loads((reference / "generation" / "ddpm_checkpoint_layout.json").read_text())
    assert {k: tuple(v) for k, v in layout["non_unet_entries"].items()} == {k: (sched.T,) for k in BUFFER_NAMES}
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


def test_ddim_timesteps_and_alpha_bar_indices(golden, schedule):
    g = admis(golden)
    skip = ddim_skip(schedule, g)
    assert ddim_timesteps(g["ddim_step"], schedule.T) == g["timesteps"]
    assert len(ddim_timesteps(50)) == 50 and ddim_timesteps(50)[:2] == [980, 960]
    ref = [ddim_alpha_bars(schedule, t, skip, "reference") for t in g["timesteps"]]
    torch.testing.assert_close(torch.stack([a for a, _ in ref]), g["alpha_bar_t_used"], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.stack([p for _, p in ref]), g["alpha_bar_prev_used"], rtol=1e-6, atol=0)
    # textbook DDIM targets alpha_bar[t - skip] (so alpha_bar[0] before the final 1.0)
    ab = schedule.alpha_bars
    text = torch.stack([ddim_alpha_bars(schedule, t, skip, "textbook")[1] for t in g["timesteps"]])
    torch.testing.assert_close(text, torch.stack([ab[t - skip] if t >= skip else torch.tensor(1.0)
                                                  for t in g["timesteps"]]))
    with pytest.raises(ValueError, match="valid"):
        ddim_alpha_bars(schedule, g["timesteps"][0], skip, "diffusers")


def test_ddim_reference_replay_matches_golden(golden, schedule):
    g, inputs = admis(golden), golden["inputs"]
    model = Replay(g["eps_per_step"], g["timesteps"], inputs["context"])
    traj = [inputs["x_T"]]
    x = ddim_sample(model, inputs["x_T"], inputs["context"], steps=g["ddim_step"], mode="reference", eta=g["eta"],
                    schedule=schedule, callback=lambda t, x_t, eps, x_next: traj.append(x_next))
    assert model.n == len(g["timesteps"])
    close(torch.stack(traj), g["x_traj"])
    close(x, g["x_final"])


def test_ddim_textbook_differs_from_reference(golden, schedule):
    """Same eps, same timesteps; only alpha_bar_prev differs (t - skip vs t - skip - 1, ab[0] vs 1 at t=skip).

    The margins are properties of the golden's data, not of the code: the step at t=skip differs only by
    ab[0] vs 1, which shrinks as the step count grows (about 2.7x the tolerance at 8 steps, 5.8x at 5).
    """
    g, inputs = admis(golden), golden["inputs"]
    x_ref = g["x_traj"][:-1]
    skip = ddim_skip(schedule, g)
    for i, t in enumerate(g["timesteps"]):
        ab_t, ab_prev = ddim_alpha_bars(schedule, t, skip, "textbook")
        step = ddim_step(x_ref[i], g["eps_per_step"][i], ab_t, ab_prev)
        if t < skip:  # the last step targets alpha_bar = 1 in both modes
            close(step, g["x_traj"][i + 1])
        else:
            assert (step - g["x_traj"][i + 1]).abs().max() > 3e-4 * g["x_traj"][i + 1].abs().max()  # > 3x the tolerance
    model = Replay(g["eps_per_step"], g["timesteps"], inputs["context"])
    x_text = ddim_sample(model, inputs["x_T"], inputs["context"], steps=g["ddim_step"], mode="textbook",
                         eta=g["eta"], schedule=schedule)
    assert (x_text - g["x_final"]).abs().max() > 1e-2 * g["x_final"].abs().max()


def test_ddim_real_unet_matches_golden(golden, unet_golden, schedule):
    g, inputs = admis(golden), golden["inputs"]
    model = golden_unet(unet_golden, "idiff_face")
    traj, eps = [inputs["x_T"]], []
    x = ddim_sample(model, inputs["x_T"], inputs["context"], steps=g["ddim_step"], eta=g["eta"], schedule=schedule,
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


def test_ddpm_noise_free_last_two_updates(golden, schedule):
    d = ddpm(golden)
    close(ddpm_step(schedule, d["x_in_at"][1], d["eps_at"][1], 1), d["x_in_at"][0], rel=1e-6)
    close(ddpm_step(schedule, d["x_in_at"][0], d["eps_at"][0], 0), d["x_final"], rel=1e-6)


class Stop(Exception):
    pass


def test_ddpm_first_step_noise_convention(golden, schedule):
    """Seeding the generator with the golden's noise_seed reproduces its first noisy step x_{T-1} -> x_{T-2}."""
    d, inputs = ddpm(golden), golden["inputs"]
    first, second = schedule.T - 1, schedule.T - 2
    seen = {}

    def model(x, t, context=None):
        step = int(t[0])
        seen[step] = x
        if step == second:
            raise Stop
        return d["eps_at"][step]

    with pytest.raises(Stop):
        ddpm_sample(model, inputs["x_T"], inputs["context"], schedule=schedule,
                    generator=torch.Generator().manual_seed(d["noise_seed"]))
    close(seen[first], d["x_in_at"][first])
    close(seen[second], d["x_in_at"][second])


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


def test_ddpm_1000_steps_real_unet_matches_golden(golden, unet_golden, schedule):
    """All T UNet calls (1000 on a 3x3x16x16 batch: about 17 s on one idle CPU thread)."""
    d, inputs = ddpm(golden), golden["inputs"]
    model = golden_unet(unet_golden, "idiff_face")
    seen = {}

    def record(t, x_t, eps, x_next):
        if t in d["x_in_at"]:
            seen[t] = (x_t, eps)

    x = ddpm_sample(model, inputs["x_T"], inputs["context"], schedule=schedule,
                    generator=torch.Generator().manual_seed(d["noise_seed"]), callback=record)
    assert seen.keys() == d["x_in_at"].keys()
    for t in d["x_in_at"]:
        close(seen[t][0], d["x_in_at"][t])
        close(seen[t][1], d["eps_at"][t])
    close(x, d["x_final"])


# ----------------------------------------------------------------------------------------------
# UIFace two-stage
# ----------------------------------------------------------------------------------------------


class UIFaceReplay:
    """Replays the golden `unet_calls`, checking every call's timestep, context, injections and flag."""

    def __init__(self, calls, context, n_slots):
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


def uiface_settings(g: dict) -> dict:
    """The keyword arguments of ``uiface_sample`` that a golden case was run with."""
    return dict(steps=g["ddim_step"], step_th=g["step_th"], mse_th=g["MSE_th"], cfg_scale=g["cfg_scale"], eta=g["eta"])


def expected_switches(g: dict, timesteps: list[int]) -> list[int]:
    """Per sample, the timestep of the first stage-1 check whose stored criterion is below MSE_th (-1: none).

    Checks run at every stage-1 step after the first, one row of ``rmse_checks`` each.
    """
    checks = [t for t in timesteps if t >= g["step_th"]][1:]
    assert len(checks) == len(g["rmse_checks"])
    out = []
    for b in range(g["rmse_checks"].shape[1]):
        below = [t for t, row in zip(checks, g["rmse_checks"]) if float(row[b]) < g["MSE_th"]]
        out.append(below[0] if below else -1)
    return out


@pytest.mark.parametrize("case", UIFACE_CASES)
def test_uiface_replay_matches_golden(golden, unet_golden, schedule, case):
    g, inputs = uiface_case(golden, case), golden["inputs"]
    n_slots = len(unet_golden["uiface"]["cross_attn_logits_cond"])
    model = UIFaceReplay(g["unet_calls"], inputs["context"], n_slots)
    maps = iter(g["attn_map_traj"])  # the stage-1 maps, in order, stand in for the aggregated logits

    def attention_map(cross_logits, batch):
        assert batch == inputs["x_T"].shape[0] and len(cross_logits) == n_slots
        return next(maps)

    res = uiface_sample(model, inputs["x_T"], inputs["context"], **uiface_settings(g), schedule=schedule,
                        attention_map=attention_map, record=True)
    assert model.n == len(g["unet_calls"]) == 2 * len(res.timesteps)  # an empty and an identity pass per step
    close(torch.stack(res.trajectory), g["x_traj"])
    close(res.x, g["x_final"])
    torch.testing.assert_close(torch.stack(res.criterion), g["rmse_checks"], rtol=0, atol=1e-6)
    n_stage1 = sum(t >= g["step_th"] for t in res.timesteps)
    assert res.stage == [1] * n_stage1 + [2] * (len(res.timesteps) - n_stage1)
    close(torch.stack(res.attention_maps), g["attn_map_traj"])  # stage 2 repeats the last stage-1 map
    assert res.switched_at.tolist() == expected_switches(g, res.timesteps)


@pytest.mark.parametrize("case", UIFACE_CASES)
def test_uiface_real_unet_matches_golden(golden, unet_golden, schedule, case):
    g, inputs = uiface_case(golden, case), golden["inputs"]
    model = golden_unet(unet_golden, "uiface")
    res = uiface_sample(model, inputs["x_T"], inputs["context"], **uiface_settings(g), schedule=schedule, record=True)
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
    assert res.switched_at.tolist() == expected_switches(g, res.timesteps)
    # the entry point forwards the same settings
    cfg = {"method": "uiface", "steps": g["ddim_step"], "eta": g["eta"], "guidance": g["cfg_scale"],
           "two_stage": {"step_th": g["step_th"], "mse_th": g["MSE_th"]}}
    close(sample(cfg, model, inputs["x_T"], inputs["context"], schedule=schedule), g["x_final"])


def test_uiface_entry_point_defaults_are_the_published_settings(golden, unet_golden):
    """The "default" golden case was run with the published config, which is what ``sample`` uses unasked."""
    g, inputs = uiface_case(golden, "default"), golden["inputs"]
    model = golden_unet(unet_golden, "uiface")
    close(sample({"method": "uiface", "steps": g["ddim_step"]}, model, inputs["x_T"], inputs["context"]), g["x_final"])


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


def test_sample_entry_point_dispatch_and_errors(golden, schedule):
    g, inputs = admis(golden), golden["inputs"]
    x = sample({"method": "ddim", "steps": g["ddim_step"], "eta": g["eta"]},
               Replay(g["eps_per_step"], g["timesteps"], inputs["context"]), inputs["x_T"], inputs["context"],
               schedule=schedule)
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
