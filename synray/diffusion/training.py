"""LDM training step (eps-prediction MSE on unquantised latents) and the reference EMA.

Conditioning regularisers live in the model, not here:

- CPD (contextual partial dropout) is the UNet's ``context_dropout``: element-wise dropout on the
  projected context, active only in ``model.train()``. The training step therefore only has to put the
  model in train mode.
- UIFace's "uncond20" is the UNet's ``unconditioned_probability`` (train mode only): each sample's
  context is replaced by the learnable empty one with that probability, and sample 0 always is.
- The trainer-level whole-sample ``context_dropout`` of the references (a ``dropout_mask``) is off (0)
  in every published config; `context_dropout_mask` offers it for ablations.

The EMA follows the references' warm-up schedule decay(n) = clamp(1 - (1 + n/inv_gamma)^-power,
min, max) with n = max(0, step - update_after_step - 1) and decay 0 while n <= 0 (IDiff-Face, ADMIS,
UIFace: inv_gamma 1, power 0.75, max 0.9999). Note: the reference ``EMAModel.step`` assigns the decay
to an attribute of a tensor buffer (``self.decay.value = ...``) instead of the buffer itself, so the
buffer stays 0 and its "averaged" weights are a plain copy of the live weights after every step.
``EMA(reference_compat=True)`` reproduces that; the default applies the intended schedule.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synray.diffusion.schedule import DiffusionSchedule, linear_schedule, q_sample


def ldm_loss(
    model: Callable,
    x0: Tensor,
    context: Tensor | None = None,
    *,
    schedule: DiffusionSchedule | None = None,
    generator: torch.Generator | None = None,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """MSE(eps, eps_theta(x_t, t, c)) with t ~ U{0..T-1} per sample and x_t = q_sample(x0, t, eps).

    x0 are the *unquantised* VQ encoder latents (no scale factor). Draw order is t then eps, as in the
    references; with a generator both come from it (on its device), otherwise from torch's global RNG.
    """
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating tensor [B, ...], got {getattr(x0, 'shape', type(x0).__name__)}")
    if context is not None and (context.ndim != 2 or context.shape[0] != x0.shape[0]):
        raise ValueError(f"context must be [B, D] with B = {x0.shape[0]}, got {tuple(context.shape)}")
    schedule = schedule or linear_schedule()
    b = x0.shape[0]
    if generator is not None:
        t = torch.randint(0, schedule.T, (b,), generator=generator, device=generator.device).to(x0.device)
        eps = torch.randn(tuple(x0.shape), generator=generator, device=generator.device).to(x0)
    else:
        t = torch.randint(0, schedule.T, (b,)).to(x0.device)
        eps = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, t, eps)
    kwargs = {} if dropout_mask is None else {"dropout_mask": dropout_mask}
    return F.mse_loss(model(x_t, t, context=context, **kwargs).float(), eps)  # float32 loss under autocast too


def context_dropout_mask(
    batch: int, p: float, *, generator: torch.Generator | None = None, force_one: bool = False
) -> Tensor | None:
    """Trainer-side whole-sample context dropout (None when p = 0, as in every published config).

    ``force_one`` (reference behaviour with a learnable empty context) drops sample 0 when nothing was
    dropped, so the empty embedding always receives a gradient.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"context dropout probability must be in [0, 1), got {p}")
    if p == 0:
        return None
    mask = torch.rand(batch, generator=generator) < p
    if force_one and not bool(mask.any()):
        mask[0] = True
    return mask


def reference_optimizer(
    model: nn.Module, lr: float = 1e-4, restart_period: int = 10_000, restart_mult: int = 2, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam(lr 1e-4, default betas, no weight decay) + CosineAnnealingWarmRestarts(10k, x2), stepped per iteration.

    ``fused``: one kernel for all parameters (CUDA), the same update up to rounding."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=restart_period, T_mult=restart_mult)
    return opt, sched


class EMA:
    """Exponential moving average of a model's weights with the references' warm-up schedule.

    ``step`` counts optimiser steps from 0 (the reference's ``optimization_step``: the number of earlier
    updates, offset by the restored global step). Parameters that require grad are averaged; frozen
    parameters and buffers (e.g. schedule tables) are copied.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inv_gamma: float = 1.0,
        power: float = 0.75,
        min_decay: float = 0.0,
        max_decay: float = 0.9999,
        update_after_step: int = 0,
        reference_compat: bool = False,
    ) -> None:
        if inv_gamma <= 0 or power <= 0:
            raise ValueError(f"inv_gamma and power must be > 0, got {inv_gamma}, {power}")
        if not 0.0 <= min_decay <= max_decay <= 1.0:
            raise ValueError(f"need 0 <= min_decay <= max_decay <= 1, got {min_decay}, {max_decay}")
        self.averaged_model = copy.deepcopy(model).eval()
        self.averaged_model.requires_grad_(False)
        self.inv_gamma, self.power = float(inv_gamma), float(power)
        self.min_decay, self.max_decay = float(min_decay), float(max_decay)
        self.update_after_step = int(update_after_step)
        self.reference_compat = reference_compat
        self.optimization_step = 0

    def decay_at(self, step: int) -> float:
        """The scheduled decay for the update made at optimiser step `step` (0-based)."""
        n = max(0, int(step) - self.update_after_step - 1)
        if n <= 0:
            return 0.0
        value = 1 - (1 + n / self.inv_gamma) ** -self.power
        return max(self.min_decay, min(value, self.max_decay))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> float:
        """Fold `model`'s current weights in; returns the decay actually applied."""
        step = self.optimization_step if step is None else int(step)
        decay = 0.0 if self.reference_compat else self.decay_at(step)
        ema_params = dict(self.averaged_model.named_parameters())
        for name, param in model.named_parameters():
            if name not in ema_params:
                raise KeyError(f"EMA: parameter '{name}' is not in the averaged model")
            target = ema_params[name]
            if not param.requires_grad:
                target.copy_(param.detach())
            else:
                target.mul_(decay).add_(param.detach().to(target.dtype), alpha=1 - decay)
        ema_buffers = dict(self.averaged_model.named_buffers())
        for name, buf in model.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(buf)
        self.optimization_step = step + 1
        return decay

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights (what the references save as ``ema_averaged_model*.ckpt``)."""
        return self.averaged_model.state_dict()


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x0: Tensor,
    context: Tensor | None = None,
    *,
    schedule: DiffusionSchedule | None = None,
    ema: EMA | None = None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator | None = None,
    dropout_mask: Tensor | None = None,
    precision: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One optimiser step of the LDM objective in train mode (so CPD / uncond20 are active), then LR and EMA.

    ``precision``: the forward under autocast in that dtype (None: float32); ``scaler`` scales the loss
    (fp16). The loss itself is float32 either way.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with contextlib.nullcontext() if precision is None else torch.autocast(x0.device.type, dtype=precision):
        loss = ldm_loss(model, x0, context, schedule=schedule, generator=generator, dropout_mask=dropout_mask)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    if ema is not None:
        ema.update(model)
    return float(loss.detach())
