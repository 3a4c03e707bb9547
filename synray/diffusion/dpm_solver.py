"""DPM-Solver++(2M): a second-order multistep ODE sampler for eps-models on the discrete schedule.

Not used by any reference; it is synray's fast sampler (Lu et al. 2022, "DPM-Solver++", Alg. 2 with
data prediction). With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and
lambda_t = log(alpha_t / sigma_t), each evaluation gives x0_i = (x - sigma_i eps) / alpha_i and the
step t_i -> t_{i+1} (h = lambda_{i+1} - lambda_i) is

    x <- (sigma_{i+1} / sigma_i) x - alpha_{i+1} (exp(-h) - 1) D,
    D = x0_i                                            (first order, i.e. a DDIM step)
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_{i-1} / h   (second order).

The model is evaluated at `steps` timesteps ending at t = 0, then x0 predicted at t = 0 is returned
(the step to sigma = 0). The first step and the last interval (into t = 0) are first order: the last
interval is long in lambda and the 2M extrapolation there amplifies errors ("lower order final").
The default spacing is uniform in log-SNR (the DPM-Solver recommendation for low-resolution data such
as these 32x32 latents); "time_uniform" is uniform in t. Coefficients are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from synray.diffusion.ddim import check_sampler_inputs, predict_eps
from synray.diffusion.schedule import DiffusionSchedule, StepCallback, linear_schedule

SPACINGS: tuple[str, ...] = ("time_uniform", "logsnr")


def _log_snr(alpha_bar: float) -> float:
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def dpmpp_timesteps(steps: int, schedule: DiffusionSchedule, spacing: str = "logsnr") -> list[int]:
    """`steps` decreasing integer timesteps from T-1 to 0, uniform in t or in log-SNR (duplicates removed)."""
    T = schedule.T
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {list(SPACINGS)}")
    if steps == 1:
        return [T - 1]
    if spacing == "time_uniform":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    else:
        lam = torch.tensor([_log_snr(a) for a in schedule.alpha_bars.double().tolist()], dtype=torch.float64)
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
        # lambda decreases with t: pick the nearest discrete timestep for each target.
        ts = [int(torch.argmin((lam - v).abs())) for v in targets]
    out: list[int] = []
    for t in ts:
        if not out or t < out[-1]:
            out.append(int(t))
    return out


@torch.no_grad()
def dpmpp_2m_sample(
    model: Callable,
    x_T: Tensor,
    context: Tensor | None = None,
    *,
    steps: int = 20,
    spacing: str = "logsnr",
    guidance_scale: float | None = None,
    guidance_rule_name: str = "idiff",
    schedule: DiffusionSchedule | None = None,
    dropout_mask: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Deterministic DPM-Solver++(2M) from x_T with `steps` model evaluations (guidance as in `ddim`)."""
    check_sampler_inputs(x_T, context)
    schedule = schedule or linear_schedule()
    timesteps = dpmpp_timesteps(steps, schedule, spacing)
    ab = schedule.alpha_bars.double()
    x = x_T
    x0_prev: Tensor | None = None
    h_prev: float | None = None
    for i, t in enumerate(timesteps):
        a_t, s_t = math.sqrt(float(ab[t])), math.sqrt(1 - float(ab[t]))
        eps = predict_eps(model, x, t, context, guidance_scale=guidance_scale, rule=guidance_rule_name,
                          dropout_mask=dropout_mask)
        x0 = (x - s_t * eps) / a_t
        if i + 1 == len(timesteps):
            x_next = x0  # sigma -> 0: the first-order step lands on the data prediction
        else:
            s = timesteps[i + 1]
            a_s, s_s = math.sqrt(float(ab[s])), math.sqrt(1 - float(ab[s]))
            h = math.log(a_s / s_s) - math.log(a_t / s_t)
            if x0_prev is None or h_prev is None or i + 2 == len(timesteps):
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x_next = (s_s / s_t) * x - a_s * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(t, x, eps, x_next)
        x = x_next
    return x
