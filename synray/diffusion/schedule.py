"""The discrete DDPM noise schedule shared by IDiff-Face, ADMIS and UIFace.

T = 1000, betas linear from 1e-4 to 0.02 (not the LDM "scaled-linear"), and alpha_bar computed as
exp(cumsum(log alpha)) rather than cumprod: the two differ by up to ~5e-7 relative, and the reference
buffers (and the goldens) use the former. The eight buffers below are exactly the ones the reference
checkpoints store next to the UNet weights, so a checkpoint writer can emit a compatible file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

T_DEFAULT = 1000

# Names and order of the schedule buffers in the reference checkpoints (ddpm_checkpoint_layout.json).
BUFFER_NAMES: tuple[str, ...] = (
    "betas",
    "alphas",
    "sigmas",
    "sqrt_alphas_inv",
    "alpha_bars",
    "sqrt_alpha_bars",
    "sqrt_one_minus_alpha_bars",
    "one_minus_alphas_over_sqrt_one_minus_alpha_bars",
)

# Called once per sampler step with (t, x_t, eps used for the update, x after the update).
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]


def linear_betas(T: int = T_DEFAULT, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    """Reference linear betas; the endpoints are scaled by 1000/T so other T keep the same process."""
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"T must be an int >= 2, got {T!r}")
    scale = 1000 / T
    return torch.linspace(scale * beta_1, scale * beta_T, T, dtype=torch.float32)


@dataclass(frozen=True)
class DiffusionSchedule:
    """The reference schedule buffers (float32, shape [T]); indices are the integer timesteps 0..T-1."""

    betas: Tensor
    alphas: Tensor
    sigmas: Tensor
    sqrt_alphas_inv: Tensor
    alpha_bars: Tensor
    sqrt_alpha_bars: Tensor
    sqrt_one_minus_alpha_bars: Tensor
    one_minus_alphas_over_sqrt_one_minus_alpha_bars: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiffusionSchedule:
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor of length >= 2, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie strictly between 0 and 1")
        betas = betas.to(torch.float32)
        alphas = 1 - betas
        alpha_bars = torch.cumsum(torch.log(alphas), dim=0).exp()
        sqrt_one_minus_alpha_bars = (1 - alpha_bars).sqrt()
        return cls(
            betas=betas,
            alphas=alphas,
            sigmas=betas.sqrt(),
            sqrt_alphas_inv=1 / alphas.sqrt(),
            alpha_bars=alpha_bars,
            sqrt_alpha_bars=alpha_bars.sqrt(),
            sqrt_one_minus_alpha_bars=sqrt_one_minus_alpha_bars,
            one_minus_alphas_over_sqrt_one_minus_alpha_bars=(1 - alphas) / sqrt_one_minus_alpha_bars,
        )

    @property
    def T(self) -> int:
        return int(self.betas.numel())

    @property
    def alphas_prev(self) -> Tensor:
        """[1, alpha_bar[0], ..., alpha_bar[T-2]]: the table the ADMIS/UIFace DDIM indexes (not a buffer)."""
        return torch.cat([torch.ones(1, dtype=self.alpha_bars.dtype), self.alpha_bars[:-1]])

    def buffers(self) -> dict[str, Tensor]:
        """The eight buffers in reference checkpoint order, for writing `ema_averaged_model*.ckpt` files."""
        return {name: getattr(self, name) for name in BUFFER_NAMES}

    def to(self, device: torch.device | str) -> DiffusionSchedule:
        return DiffusionSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def check_timesteps(self, t: Tensor) -> None:
        if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"timesteps must be integer indices, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"timesteps must lie in [0, {self.T - 1}], got range [{int(t.min())}, {int(t.max())}]")


def linear_schedule(T: int = T_DEFAULT) -> DiffusionSchedule:
    """The IDiff-Face/ADMIS/UIFace schedule (T=1000, linear 1e-4..0.02)."""
    return DiffusionSchedule.from_betas(linear_betas(T))


def q_sample(schedule: DiffusionSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, per sample (t is [B] integer)."""
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape [B]={x0.shape[0]}, got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    schedule.check_timesteps(t)
    idx = t.to("cpu", torch.long)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    mean = schedule.sqrt_alpha_bars[idx].to(x0).view(shape)
    sd = schedule.sqrt_one_minus_alpha_bars[idx].to(x0).view(shape)
    return mean * x0 + sd * noise
