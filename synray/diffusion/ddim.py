"""DDIM sampling, classifier-free guidance, and the shared eps-model calling convention.

Two DDIM modes:

- ``"reference"`` (ADMIS / UIFace): the "previous" alpha_bar is read from ``[1, alpha_bar[:-1]]`` at
  index t - skip, i.e. alpha_bar[t - skip - 1], and 1.0 once t - skip <= 0, so the last *two* steps
  both target alpha_bar = 1. Pinned by ``sampler_small_golden.pt`` (``admis_ddim5``).
- ``"textbook"`` (DDIM paper / diffusers with ``set_alpha_to_one``): alpha_bar_prev = alpha_bar[t - skip],
  and 1.0 only after the t = 0 step. With 5 steps the reference targets [ab599, ab399, ab199, 1, 1]
  where the textbook targets [ab600, ab400, ab200, ab0, 1].

Both use the same timesteps, ``reversed(range(0, T, T // steps))`` (e.g. [800, 600, 400, 200, 0]), and
the same update arithmetic (including the reference's re-derivation of eps from x0_hat, a numerical
no-op kept so float32 results track the reference bit for bit as closely as possible).

A model is any callable ``model(x, t, context=..., **extras)`` returning eps, with ``t`` a [B] int64
tensor of raw timesteps; only extras that are set are passed, so plain eps functions work too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from synray.diffusion.schedule import DiffusionSchedule, StepCallback, linear_schedule

DDIM_MODES: tuple[str, ...] = ("reference", "textbook")


# ----------------------------------------------------------------------------------------------
# classifier-free guidance
# ----------------------------------------------------------------------------------------------


def guided_eps_idiff(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """IDiff-Face/ADMIS rule: w*cond - (w-1)*uncond (so w = 1 is plain conditional sampling)."""
    return (1 - scale) * eps_uncond + scale * eps_cond


def guided_eps_uiface(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """UIFace rule: (1+w)*cond - w*uncond (so w = 0 is plain conditional; the published w = 1 means 2c - u)."""
    return (1 + scale) * eps_cond - scale * eps_uncond


GUIDANCE_RULES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "idiff": guided_eps_idiff,
    "uiface": guided_eps_uiface,
}


def guidance_rule(name: str) -> Callable[[Tensor, Tensor, float], Tensor]:
    try:
        return GUIDANCE_RULES[name]
    except KeyError:
        raise ValueError(f"unknown guidance rule {name!r}; valid: {sorted(GUIDANCE_RULES)}") from None


# ----------------------------------------------------------------------------------------------
# model calls and inputs
# ----------------------------------------------------------------------------------------------


def timestep_batch(t: int, x: Tensor) -> Tensor:
    """The [B] int64 timestep tensor the UNet expects (raw index, no rescaling)."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def call_model(model: Callable, x: Tensor, t: int, context: Tensor | None, **extras) -> object:
    """Call ``model(x, t, context=..., **extras)`` passing only the extras that are set."""
    kwargs = {k: v for k, v in extras.items() if v is not None and v is not False}
    return model(x, timestep_batch(t, x), context=context, **kwargs)


def check_sampler_inputs(x_T: Tensor, context: Tensor | None) -> None:
    if not isinstance(x_T, Tensor) or x_T.ndim < 2:
        raise ValueError(f"x_T must be a tensor [B, ...], got {type(x_T).__name__} "
                         f"{tuple(x_T.shape) if isinstance(x_T, Tensor) else ''}")
    if not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating tensor, got dtype {x_T.dtype}")
    if context is not None:
        if not isinstance(context, Tensor) or context.ndim != 2 or context.shape[0] != x_T.shape[0]:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be [B, D] with B = {x_T.shape[0]} (batch of x_T), got {shape}")


def predict_eps(
    model: Callable,
    x: Tensor,
    t: int,
    context: Tensor | None,
    *,
    guidance_scale: float | None = None,
    rule: str = "idiff",
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """eps_theta(x, t, c), or its classifier-free guided combination.

    As in the references, the unconditional pass (context None) comes first and neither guided pass
    uses `dropout_mask`.
    """
    if guidance_scale is None:
        return call_model(model, x, t, context, dropout_mask=dropout_mask)
    if context is None:
        raise ValueError("classifier-free guidance needs a context (the unconditional pass uses the empty one)")
    combine = guidance_rule(rule)
    eps_uncond = call_model(model, x, t, None)
    eps_cond = call_model(model, x, t, context)
    return combine(eps_cond, eps_uncond, float(guidance_scale))


Generators = torch.Generator | Sequence[torch.Generator] | None


def gaussian_noise(x: Tensor, generator: Generators) -> Tensor:
    """N(0, I) shaped like x, drawn on the generator's device (CPU by default, as the references draw), moved to x.

    A sequence of generators (one per sample) gives each sample its own noise stream, so a sample's result
    does not depend on which other samples share its batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        draws = [torch.randn(tuple(x.shape[1:]), generator=g, device=g.device) for g in generator]
        return to_device(torch.stack(draws), x)
    device = generator.device if generator is not None else torch.device("cpu")
    return to_device(torch.randn(tuple(x.shape), generator=generator, device=device), x)


def to_device(t: Tensor, like: Tensor) -> Tensor:
    """``t.to(like)``; a CPU tensor bound for a GPU goes through pinned memory without blocking, so drawing the
    noise on the CPU never waits for the GPU to finish the steps already queued (a pageable copy would)."""
    if t.device.type == "cpu" and like.device.type == "cuda":
        return t.pin_memory().to(like.device, like.dtype, non_blocking=True)
    return t.to(like)


# ----------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------


def check_mode(mode: str) -> None:
    if mode not in DDIM_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {list(DDIM_MODES)}")


def ddim_timesteps(steps: int, T: int = 1000) -> list[int]:
    """``reversed(range(0, T, T // steps))``.

    When steps does not divide T this yields more than `steps` entries, exactly as the references do.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    return list(reversed(range(0, T, T // steps)))


def ddim_alpha_bars(schedule: DiffusionSchedule, t: int, skip: int, mode: str = "reference") -> tuple[Tensor, Tensor]:
    """(alpha_bar_t, alpha_bar_prev) as 0-d float32 tensors for the DDIM step at t (see module docstring)."""
    check_mode(mode)
    ab_t = schedule.alpha_bars[t]
    prev = t - skip
    one = torch.ones((), dtype=schedule.alpha_bars.dtype)
    if mode == "reference":
        ab_prev = schedule.alphas_prev[prev] if prev >= 0 else one
    else:
        ab_prev = schedule.alpha_bars[prev] if prev >= 0 else one
    return ab_t, ab_prev


def ddim_step(
    x: Tensor, eps: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """One DDIM update x_t -> x_prev (no x0 clipping), written in the references' operation order."""
    beta_t = 1 - alpha_bar_t
    beta_prev = 1 - alpha_bar_prev
    x0_hat = (x - beta_t ** 0.5 * eps) / alpha_bar_t ** 0.5
    variance = (beta_prev / beta_t) * (1 - alpha_bar_t / alpha_bar_prev)
    std = eta * variance ** 0.5
    eps = (x - alpha_bar_t ** 0.5 * x0_hat) / beta_t ** 0.5
    x_prev = alpha_bar_prev ** 0.5 * x0_hat + (1 - alpha_bar_prev - std ** 2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        x_prev = x_prev + std * noise
    return x_prev


@torch.no_grad()
def ddim_sample(
    model: Callable,
    x_T: Tensor,
    context: Tensor | None = None,
    *,
    steps: int = 50,
    mode: str = "reference",
    eta: float = 0.0,
    guidance_scale: float | None = None,
    guidance_rule_name: str = "idiff",
    generator: Generators = None,
    schedule: DiffusionSchedule | None = None,
    dropout_mask: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM from x_T (ADMIS: steps=50, eta=0, no guidance, mode="reference"); eta > 0 draws noise from `generator`."""
    check_mode(mode)
    check_sampler_inputs(x_T, context)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    schedule = schedule or linear_schedule()
    timesteps = ddim_timesteps(steps, schedule.T)
    skip = schedule.T // steps
    x = x_T
    for t in timesteps:
        eps = predict_eps(model, x, t, context, guidance_scale=guidance_scale, rule=guidance_rule_name,
                          dropout_mask=dropout_mask)
        ab_t, ab_prev = ddim_alpha_bars(schedule, t, skip, mode)
        noise = gaussian_noise(x, generator) if eta > 0 else None
        x_next = ddim_step(x, eps, ab_t, ab_prev, eta, noise)
        if callback is not None:
            callback(t, x, eps, x_next)
        x = x_next
    return x
