"""UniPC: a multistep predictor-corrector ODE sampler for eps-models on the discrete schedule.

Not used by any reference; with DPM-Solver++ it is synray's fast sampler, for 3-10 model evaluations
(Zhao et al. 2023, "UniPC", data-prediction form with the B(h) variants, as diffusers'
``UniPCMultistepScheduler`` with ``final_sigmas_type="zero"``; checked against it by
``tests/data/unipc_golden.pt``). With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t),
lambda_t = log(alpha_t / sigma_t) and x0_i = (x_i - sigma_i eps_i) / alpha_i, a step s -> t
(h = lambda_t - lambda_s) of order p is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s - alpha_t B(h) sum_k rho_k D_k,
    D_k = (x0_{s_k} - x0_s) / r_k,  r_k = (lambda_{s_k} - lambda_s) / h,

with B(h) = -h ("bh1") or e^{-h} - 1 ("bh2") and rho solving the order conditions
sum_k rho_k r_k^(j-1) = g_j(h) j! / B(h) (rho = 1/2 for a 2nd-order predictor). The predictor (UniP)
uses the p - 1 earlier evaluations; once the model has been evaluated at x_t, the corrector (UniC)
re-does the step s -> t with that evaluation included (one order higher) and the corrected x_t is
carried on, while the evaluation itself is reused for the next predictor: one model evaluation per
step. Orders warm up (1, 2, ...) and decrease towards the end ("lower order final"); the last step
goes from the last evaluated timestep to sigma = 0, i.e. returns x0 predicted there.

Timesteps: ``steps`` integers from T - 1, the first ``steps`` of ``steps + 1`` points uniform in t
(``time_uniform``, diffusers' "linspace", the default) or in log-SNR (``logsnr``, nearest discrete
timestep). Which is better depends on the model: on the world LDM, whose x0 prediction hardly moves
below t ~ 300, time-uniform steps stay 2-3x closer to the ODE solution at 3-5 steps, while the last
log-SNR steps crowd near t = 0 (``benchmarks/samplers.py``); for data with a wide spread (the Gaussian
test) log-SNR is the better one. Coefficients are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from synray.diffusion.ddim import check_sampler_inputs, predict_eps
from synray.diffusion.schedule import DiffusionSchedule, StepCallback, linear_schedule

SPACINGS: tuple[str, ...] = ("time_uniform", "logsnr")
VARIANTS: tuple[str, ...] = ("bh1", "bh2")
MAX_ORDER = 3


def _log_snr(alpha_bar: float) -> float:
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def unipc_timesteps(steps: int, schedule: DiffusionSchedule, spacing: str = "time_uniform") -> list[int]:
    """The ``steps`` decreasing integer timesteps at which the model is evaluated (the solver then ends at sigma 0)."""
    T = schedule.T
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {list(SPACINGS)}")
    if spacing == "time_uniform":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()
    else:
        lam = np.array([_log_snr(a) for a in schedule.alpha_bars.double().tolist()])
        targets = np.linspace(lam[-1], lam[0], steps + 1)[:-1]
        ts = [int(np.argmin(np.abs(lam - v))) for v in targets]  # lambda decreases with t
    out: list[int] = []
    for t in ts:
        if not out or t < out[-1]:
            out.append(int(t))
    return out


def _coefficients(lam_s: float, lam_t: float, lam_prev: list[float], variant: str) -> tuple[float, float, list[float], list[float]]:
    """(e^{-h} - 1, B(h), r_k, b_j for j = 1..len(lam_prev)+1) of a step s -> t (lambda_t may be +inf)."""
    h = lam_t - lam_s
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(lp - lam_s) / h for lp in lam_prev]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for j in range(1, len(lam_prev) + 2):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, rks, b


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """rho with sum_k rho_k r_k^(j-1) = b_j, j = 1..len(b) (r includes the final r = 1 when len(b) > len(rks))."""
    r = np.asarray(rks, dtype=np.float64)
    R = np.stack([r ** (j - 1) for j in range(1, len(b) + 1)])
    return np.linalg.solve(R, np.asarray(b, dtype=np.float64)).tolist()


def _step(x: Tensor, x0_s: Tensor, hist: list[Tensor], a_t: float, s_t: float, s_s: float, h_phi_1: float,
          b_h: float, rks: list[float], rhos: list[float], x0_t: Tensor | None = None) -> Tensor:
    """x_t from x_s: the first-order part plus B(h)-weighted differences (and the corrector's own term)."""
    out = (s_t / s_s) * x - (a_t * h_phi_1) * x0_s if s_t > 0 else x0_s.clone()
    res = None
    for rho, rk, m in zip(rhos, rks, hist):
        term = (rho / rk) * (m - x0_s)
        res = term if res is None else res + term
    if x0_t is not None:
        term = rhos[-1] * (x0_t - x0_s)
        res = term if res is None else res + term
    if res is not None:
        out = out - (a_t * b_h) * res
    return out


@torch.no_grad()
def unipc_sample(
    model: Callable,
    x_T: Tensor,
    context: Tensor | None = None,
    *,
    steps: int = 5,
    order: int = 3,
    variant: str = "bh2",
    spacing: str = "time_uniform",
    guidance_scale: float | None = None,
    guidance_rule_name: str = "idiff",
    schedule: DiffusionSchedule | None = None,
    timesteps: list[int] | None = None,
    dropout_mask: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Deterministic UniPC from x_T with one (guided) model evaluation per timestep.

    `timesteps` (decreasing integers) replaces the spacing rule when given. `callback(t, x_t, eps, x_next)`
    sees x_t after the corrector and x_next before the next one.
    """
    check_sampler_inputs(x_T, context)
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an int in [1, {MAX_ORDER}], got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {list(VARIANTS)}")
    schedule = schedule or linear_schedule()
    if timesteps is None:
        timesteps = unipc_timesteps(steps, schedule, spacing)
    elif not timesteps or any(not 0 <= t < schedule.T for t in timesteps) or \
            any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be decreasing integers in [0, {schedule.T - 1}], got {timesteps}")
    ab = schedule.alpha_bars.double()
    alpha = [math.sqrt(float(ab[t])) for t in timesteps] + [1.0]
    sigma = [math.sqrt(1 - float(ab[t])) for t in timesteps] + [0.0]
    lam = [_log_snr(float(ab[t])) for t in timesteps] + [math.inf]
    n = len(timesteps)
    x = x_T
    hist: list[Tensor] = []  # x0 at earlier points, most recent last (at most `order`)
    hist_idx: list[int] = []
    last_x: Tensor | None = None
    last_order = 0
    for i, t in enumerate(timesteps):
        eps = predict_eps(model, x, t, context, guidance_scale=guidance_scale, rule=guidance_rule_name,
                          dropout_mask=dropout_mask)
        x0 = (x - sigma[i] * eps) / alpha[i]
        if last_x is not None:  # UniC: redo the step into t_i with the evaluation at t_i
            s = i - 1
            prev = hist_idx[-last_order:-1] if last_order > 1 else []
            h_phi_1, b_h, rks, b = _coefficients(lam[s], lam[i], [lam[k] for k in reversed(prev)], variant)
            rhos = [0.5] if last_order == 1 else _solve(rks + [1.0], b)
            x = _step(last_x, hist[-1], [hist[hist_idx.index(k)] for k in reversed(prev)], alpha[i], sigma[i],
                      sigma[s], h_phi_1, b_h, rks, rhos, x0_t=x0)
        hist.append(x0)
        hist_idx.append(i)
        hist, hist_idx = hist[-order:], hist_idx[-order:]
        this_order = min(order, n - i, i + 1)
        prev = hist_idx[-this_order:-1] if this_order > 1 else []
        h_phi_1, b_h, rks, b = _coefficients(lam[i], lam[i + 1], [lam[k] for k in reversed(prev)], variant)
        if this_order == 1:
            rhos = []
        elif this_order == 2:
            rhos = [0.5]
        else:
            rhos = _solve(rks, b[:-1])
        last_x, last_order = x, this_order
        x_next = _step(x, x0, [hist[hist_idx.index(k)] for k in reversed(prev)], alpha[i + 1], sigma[i + 1],
                       sigma[i], h_phi_1, b_h, rks, rhos)
        if callback is not None:
            callback(t, x, eps, x_next)
        x = x_next
    return x
