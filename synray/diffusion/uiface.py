"""UIFace two-stage DDIM: adaptive per-sample stage switch, attention injection and guidance.

Per DDIM step tau (same timesteps and alpha_bar indexing as `ddim`, mode "reference" by default):

Stage 1 (tau >= step_th):
  A. ``model(x, tau, context=None, return_attn=True)`` -> self logits S_A (eps discarded).
  B. ``model(x, tau, context, condition_flag=flag, self_attn_logits=S_A, return_attn=True)`` -> eps used
     as is (no guidance); samples whose flag is False use the empty context inside the model.
  The cross logits of B give an aggregated map M(tau) (`aggregate_cross_attention`). From the second
  stage-1 step on, the criterion d_b = mean |M_b(tau) - M_b(prev)| is computed and samples with
  d_b < mse_th switch their flag to True (permanently, effective from the next step).
Stage 2 (tau < step_th), every sample conditional:
  U. ``model(x, tau, context=None, return_attn=True)`` -> eps_U, S_U, C_U.
  C. ``model(x, tau, context, self_attn_logits=S_U, cross_attn_logits=C_U)`` -> eps_C (the model replaces
     its self logits and blends its cross logits towards C_U's statistics).
  eps = (1 + w) eps_C - w eps_U  (UIFace's rule, w = cfg_scale).

Like the reference, the attention-map trajectory repeats the last stage-1 map during stage 2, and
the criterion is named "RMSE/MSE" there although it is a mean absolute difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from synray.diffusion.ddim import (
    Generators,
    call_model,
    check_mode,
    check_sampler_inputs,
    ddim_alpha_bars,
    ddim_step,
    ddim_timesteps,
    gaussian_noise,
    guided_eps_uiface,
)
from synray.diffusion.schedule import DiffusionSchedule, linear_schedule

ATTN_MAP_SIZE = 32  # the reference aggregates maps at 32x32 (the latent size of the published model)


def aggregate_cross_attention(
    cross_logits: Sequence[Tensor | None], batch_size: int, size: int = ATTN_MAP_SIZE
) -> Tensor:
    """Aggregate per-block cross-attention logits [B*h, HW, K] into one [B, size, size] map per sample.

    Per block: softmax over *space* (HW, not the keys), mean over the K tokens and the heads, divide by
    the per-sample max, bilinear resize to size x size, clamp to [0, 1]. Then average the blocks and
    min-max normalise per sample (a constant map becomes 0 instead of the reference's NaN).
    """
    maps = []
    for logits in cross_logits:
        if logits is None:
            continue
        if logits.ndim != 3 or logits.shape[0] % batch_size:
            raise ValueError(f"cross-attention logits must be [B*heads, HW, K] with B={batch_size}, "
                             f"got {tuple(logits.shape)}")
        _, hw, k = logits.shape
        side = math.isqrt(hw)
        if side * side != hw:
            raise ValueError(f"cross-attention logits have a non-square number of positions ({hw})")
        a = logits.float().reshape(batch_size, -1, hw, k)  # logits of a low-precision pass: the map in float32
        a = torch.softmax(a, dim=-2).mean(dim=-1).mean(dim=1)  # [B, HW]
        a = a / a.max(dim=1, keepdim=True)[0]
        a = F.interpolate(a.reshape(batch_size, 1, side, side), size=(size, size), mode="bilinear",
                          align_corners=False).squeeze(1)
        maps.append(torch.clamp(a, min=0, max=1))
    if not maps:
        raise ValueError("no cross-attention logits to aggregate (every entry is None)")
    m = torch.stack(maps, dim=1).mean(dim=1)
    flat = m.reshape(batch_size, -1)
    lo = flat.min(dim=-1)[0].view(-1, 1, 1)
    span = (flat.max(dim=-1)[0].view(-1, 1, 1) - lo)
    return torch.where(span > 0, (m - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(m))


def attention_change(prev: Tensor, current: Tensor) -> Tensor:
    """Per-sample switch criterion mean_pixels sqrt((M - M_prev)^2), i.e. the mean absolute difference."""
    return torch.sqrt(F.mse_loss(prev, current, reduction="none")).mean(dim=(1, 2))


@dataclass
class UNetCall:
    """One recorded UNet evaluation (what the golden's ``unet_calls`` entries hold)."""

    t: int
    context_is_none: bool
    self_injected: bool
    cross_injected: bool
    condition_flag: Tensor | None
    eps: Tensor


@dataclass
class UIFaceResult:
    x: Tensor
    timesteps: list[int]
    stage: list[int]  # 1 or 2 per step
    criterion: list[Tensor] = field(default_factory=list)  # one [B] tensor per stage-1 step after the first
    condition_flag: Tensor | None = None  # final per-sample flags
    switched_at: Tensor | None = None  # per sample: the tau whose check switched it, -1 if never in stage 1
    trajectory: list[Tensor] = field(default_factory=list)  # x after each step (x_T excluded), if recorded
    attention_maps: list[Tensor | None] = field(default_factory=list)  # M per step (stale in stage 2), if recorded
    calls: list[UNetCall] = field(default_factory=list)  # if recorded


def _unpack(out: object, t: int) -> tuple[Tensor, list, list]:
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise ValueError(f"UIFace sampling needs a model that returns (eps, self_logits, cross_logits) with "
                         f"return_attn=True; got {type(out).__name__} at t={t}")
    return out[0], out[1], out[2]


@torch.no_grad()
def uiface_sample(
    model: Callable,
    x_T: Tensor,
    context: Tensor,
    *,
    steps: int = 50,
    step_th: int = 500,
    mse_th: float = 0.006,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    mode: str = "reference",
    generator: Generators = None,
    schedule: DiffusionSchedule | None = None,
    attention_map: Callable[[Sequence[Tensor | None], int], Tensor] = aggregate_cross_attention,
    record: bool = False,
) -> UIFaceResult:
    """Two-stage UIFace sampling. Defaults are the published config (50 steps, step_th 500, MSE_th 0.006, w 1).

    `attention_map` turns pass B's cross logits into the [B, 32, 32] maps the switch criterion compares.
    `record` keeps the trajectory, the map per step and every UNet call (with eps and flags at call time).
    """
    check_mode(mode)
    check_sampler_inputs(x_T, context)
    if context is None:
        raise ValueError("UIFace sampling needs an identity context [B, D]")
    schedule = schedule or linear_schedule()
    timesteps = ddim_timesteps(steps, schedule.T)
    skip = schedule.T // steps
    batch = x_T.shape[0]
    flag = torch.zeros(batch, dtype=torch.bool, device=x_T.device)
    switched_at = torch.full((batch,), -1, dtype=torch.long, device=x_T.device)  # on the device: no host sync per step
    result = UIFaceResult(x=x_T, timesteps=timesteps, stage=[])
    prev_map: Tensor | None = None
    last_map: Tensor | None = None

    def record_call(t: int, ctx: Tensor | None, s_inj: bool, c_inj: bool, cflag: Tensor | None, eps: Tensor) -> None:
        if record:
            result.calls.append(UNetCall(t, ctx is None, s_inj, c_inj, None if cflag is None else cflag.clone(), eps))

    x = x_T
    for t in timesteps:
        if t < step_th:
            result.stage.append(2)
            eps_u, self_u, cross_u = _unpack(call_model(model, x, t, None, return_attn=True), t)
            record_call(t, None, False, False, None, eps_u)
            out_c = call_model(model, x, t, context, self_attn_logits=self_u, cross_attn_logits=cross_u)
            eps_c = out_c[0] if isinstance(out_c, (tuple, list)) else out_c
            record_call(t, context, True, True, None, eps_c)
            eps = guided_eps_uiface(eps_c, eps_u, float(cfg_scale))
        else:
            result.stage.append(1)
            eps_a, self_a, _ = _unpack(call_model(model, x, t, None, return_attn=True), t)
            record_call(t, None, False, False, None, eps_a)
            passed_flag = flag.clone()
            eps, _, cross_b = _unpack(
                call_model(model, x, t, context, condition_flag=passed_flag, self_attn_logits=self_a,
                           return_attn=True), t)
            record_call(t, context, True, False, passed_flag, eps)
            last_map = attention_map(cross_b, batch)
            if prev_map is not None:
                change = attention_change(prev_map, last_map)
                result.criterion.append(change)
                switch = (change.to(flag.device) < mse_th) & ~flag
                switched_at = torch.where(switch, torch.full_like(switched_at, t), switched_at)
                flag = flag | switch
            prev_map = last_map
        ab_t, ab_prev = ddim_alpha_bars(schedule, t, skip, mode)
        noise = gaussian_noise(x, generator) if eta > 0 else None
        x = ddim_step(x, eps, ab_t, ab_prev, eta, noise)
        if record:
            result.trajectory.append(x)
            result.attention_maps.append(last_map)
    result.x = x
    result.condition_flag = flag
    result.switched_at = switched_at
    return result
