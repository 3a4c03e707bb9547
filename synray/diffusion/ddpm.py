"""Ancestral DDPM sampling (IDiff-Face: 1000 steps, sigma^2 = beta, no guidance).

Modes:

- ``"reference"`` (IDiff-Face / ADMIS ``sample``): noise is added only for t > 1, so both the t = 1 and the
  t = 0 updates are noise-free. Per-step noise is drawn as ``randn(x.shape)`` on the CPU generator for
  t = 999 .. 2 (998 draws), so a generator seeded 777 reproduces the golden that seeded the global RNG
  with 777.
- ``"textbook"`` (DDPM Algorithm 2): noise for every t > 0 (999 draws), none at t = 0.

The update is x <- (x - eps * beta_t / sqrt(1 - alpha_bar_t)) / sqrt(alpha_t) + sqrt(beta_t) z; x0 is
never clipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from synray.diffusion.ddim import (
    Generators,
    check_sampler_inputs,
    gaussian_noise,
    predict_eps,
)
from synray.diffusion.schedule import DiffusionSchedule, StepCallback, linear_schedule

DDPM_MODES: tuple[str, ...] = ("reference", "textbook")


def ddpm_step(schedule: DiffusionSchedule, x: Tensor, eps: Tensor, t: int, noise: Tensor | None = None) -> Tensor:
    """One ancestral update at timestep t (noise None means a noise-free step)."""
    x_prev = schedule.sqrt_alphas_inv[t] * (x - eps * schedule.one_minus_alphas_over_sqrt_one_minus_alpha_bars[t])
    if noise is not None:
        x_prev = x_prev + schedule.sigmas[t] * noise
    return x_prev


def adds_noise(t: int, mode: str) -> bool:
    """Whether the step at t is stochastic: t > 1 in the reference, t > 0 in the textbook."""
    if mode not in DDPM_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {list(DDPM_MODES)}")
    return t > 1 if mode == "reference" else t > 0


@torch.no_grad()
def ddpm_sample(
    model: Callable,
    x_T: Tensor,
    context: Tensor | None = None,
    *,
    mode: str = "reference",
    generator: Generators = None,
    guidance_scale: float | None = None,
    guidance_rule_name: str = "idiff",
    schedule: DiffusionSchedule | None = None,
    dropout_mask: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run all T ancestral steps from x_T.

    `generator` None uses torch's global RNG, like the reference; a list of generators (one per sample)
    gives each sample its own noise stream, independent of its batch mates.
    """
    adds_noise(0, mode)  # validates mode
    check_sampler_inputs(x_T, context)
    schedule = schedule or linear_schedule()
    x = x_T
    for t in reversed(range(schedule.T)):
        # The reference draws z before calling the model; the order only matters for the global RNG.
        z = gaussian_noise(x, generator) if adds_noise(t, mode) else None
        eps = predict_eps(model, x, t, context, guidance_scale=guidance_scale, rule=guidance_rule_name,
                          dropout_mask=dropout_mask)
        x_next = ddpm_step(schedule, x, eps, t, z)
        if callback is not None:
            callback(t, x, eps, x_next)
        x = x_next
    return x
