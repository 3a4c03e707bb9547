"""The layers of the LDM denoiser, as the reference names them: time embedding, residual blocks (AdaGN or
additive conditioning), multi-head self/cross attention with UIFace's injection hooks, down/upsampling.

Parameter names and registration order follow the reference, so :class:`~synray.models.unet.ConditionalUNet`
built from them has the published checkpoints' ``state_dict`` key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from synray.models.unet_config import UNetConfig

__all__ = [
    "zero_init", "TimeEmbedding", "AdaptiveGroupNorm", "ResidualBlock", "MultiHeadAttention", "CrossAttentionBlock",
    "SelfAttentionBlock", "ResAttnBlock", "MiddleBlock", "Downsample", "Upsample",
]


def zero_init(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (the reference's zero-initialised output convolutions)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimeEmbedding(nn.Module):
    """[cos(t f), sin(t f)] with n/8 frequencies (48 for n = 384), then Linear-SiLU-Linear.

    The frequency table is a float32 constant rebuilt on the fly (the reference keeps it out of
    checkpoints). The arguments t*f are computed in float32, or float64 for a float64 model, never in
    half precision: at t ~ 1000 half precision would shift the phases noticeably.
    """

    def __init__(self, channels: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.half = channels // 8
        self.max_period = max_period
        self.lin1 = nn.Linear(channels // 4, channels)
        self.lin2 = nn.Linear(channels, channels)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.lin1.weight.dtype, torch.float32)
        k = torch.arange(self.half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * k / self.half).to(dtype)
        args = t.to(dtype)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.lin1.weight.dtype)
        return self.lin2(F.silu(self.lin1(emb)))


class AdaptiveGroupNorm(nn.Module):
    """(1 + scale) * GN(x) + shift."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, channels)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(shift, 1 + scale, self.norm(x))


class ResidualBlock(nn.Module):
    """Conv, AdaGN from the time embedding (plus the context in AdaGN mode), zero-initialised conv."""

    def __init__(self, in_ch: int, out_ch: int, time_ch: int, context_ch: int, adagn: bool) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb = nn.Sequential(nn.SiLU(), nn.Linear(time_ch, out_ch))
        if adagn:
            self.context_emb = nn.Sequential(nn.SiLU(), nn.Linear(context_ch, out_ch))
        self.scale_emb = nn.Linear(out_ch, out_ch)
        self.shift_emb = nn.Linear(out_ch, out_ch)
        self.norm2 = AdaptiveGroupNorm(out_ch)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.adagn = adagn

    def forward(self, x: torch.Tensor, temb: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.time_emb(temb)
        if self.adagn:
            e = e + self.context_emb(c)
        scale = self.scale_emb(e)[:, :, None, None]
        shift = self.shift_emb(e)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h, scale, shift)))
        return h + self.shortcut(x)


def _check_injection(name: str, src: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(src.shape) != expected:
        raise ValueError(f"{name}: injected logits have shape {tuple(src.shape)}, expected {expected}")


class MultiHeadAttention(nn.Module):
    """1x1-Conv1d q/k/v/out; q and k are each scaled by d^-1/4; softmax over keys in float32.

    ``inject`` replaces the logits (self-attention) or, with ``blend=True``, moves the current logits'
    per-row mean/std halfway to those of ``inject`` (UIFace's "negative" cross-attention injection).
    Returned logits are always the current pass's raw q.k, never the injected ones.
    """

    def __init__(self, channels: int, heads: int, head_channels: int, kv_channels: int | None = None) -> None:
        super().__init__()
        inner = heads * head_channels
        kv = channels if kv_channels is None else kv_channels
        self.heads = heads
        self.use_checkpoint = False
        self.to_q = nn.Conv1d(channels, inner, 1)
        self.to_k = nn.Conv1d(kv, inner, 1)
        self.to_v = nn.Conv1d(kv, inner, 1)
        self.proj_out = nn.Conv1d(inner, channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        inject: torch.Tensor | None = None,
        blend: bool = False,
        want_logits: bool = False,
        name: str = "attention",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kv = x if kv is None else kv
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._attend, x, kv, inject, blend, want_logits, name, use_reentrant=False)
        return self._attend(x, kv, inject, blend, want_logits, name)

    def _attend(self, x, kv, inject, blend, want_logits, name):
        q, k, v = self.to_q(x), self.to_k(kv), self.to_v(kv)
        b, w, lq = q.shape
        lk = k.shape[-1]
        h = self.heads
        d = w // h
        q = q.reshape(b * h, d, lq)
        k = k.reshape(b * h, d, lk)
        v = v.reshape(b * h, d, lk)
        s = 1.0 / math.sqrt(math.sqrt(d))
        need_current = inject is None or blend or want_logits
        logits = torch.bmm((q * s).transpose(1, 2), k * s) if need_current else None
        if inject is None:
            used = logits
        else:
            _check_injection(name, inject, (b * h, lq, lk))
            src = inject.to(device=q.device, dtype=q.dtype)
            if blend:
                mean, std = logits.mean(dim=2, keepdim=True), logits.std(dim=2, keepdim=True)
                mean_s, std_s = src.mean(dim=2, keepdim=True), src.std(dim=2, keepdim=True)
                used = (logits - mean) / std * (0.5 * std_s + 0.5 * std) + (0.5 * mean_s + 0.5 * mean)
            else:
                used = src
        weight = torch.softmax(used.float(), dim=-1).to(used.dtype)
        out = torch.bmm(v, weight.transpose(1, 2)).reshape(b, w, lq)
        return self.proj_out(out), (logits if want_logits else None)


class CrossAttentionBlock(nn.Module):
    """Self-attention, cross-attention to context tokens, feed-forward; one shared GroupNorm ``x_norm``.

    The context vector becomes ``head_channels`` tokens of width ``context_channels``: a Linear to
    ``context_channels * head_channels`` read channel-major as [context_channels, tokens], then
    GroupNorm over that tensor.
    """

    def __init__(self, channels: int, context_channels: int, heads: int, head_channels: int) -> None:
        super().__init__()
        inner = heads * head_channels
        self.context_channels = context_channels
        self.n_tokens = head_channels
        self.x_proj_in = nn.Conv2d(channels, inner, 1)
        self.x_proj_out = zero_init(nn.Conv2d(inner, channels, 1))
        self.self_attention = MultiHeadAttention(inner, heads, head_channels)
        self.c_proj_in = nn.Linear(context_channels, context_channels * head_channels)
        self.cross_attention = MultiHeadAttention(inner, heads, head_channels, kv_channels=context_channels)
        self.x_norm = nn.GroupNorm(32, inner)
        self.c_norm = nn.GroupNorm(32, context_channels)
        self.ff = nn.Sequential(nn.Linear(inner, 4 * inner), nn.GELU(), nn.Linear(4 * inner, inner))

    def forward(self, x, c, src_self=None, src_cross=None, want_logits=False, name="block"):
        b, _, hh, ww = x.shape
        x_in = x
        x = self.x_proj_in(x).flatten(2)
        tokens = self.c_norm(self.c_proj_in(c).reshape(b, self.context_channels, self.n_tokens))
        a, self_logits = self.self_attention(self.x_norm(x), inject=src_self, want_logits=want_logits,
                                             name=f"{name} self-attention")
        x = x + a
        a, cross_logits = self.cross_attention(self.x_norm(x), tokens, inject=src_cross, blend=True,
                                               want_logits=want_logits, name=f"{name} cross-attention")
        x = x + a
        x = x + self.ff(self.x_norm(x).transpose(1, 2)).transpose(1, 2)
        x = self.x_proj_out(x.reshape(b, -1, hh, ww))
        return x + x_in, self_logits, cross_logits


class SelfAttentionBlock(nn.Module):
    """GroupNorm then multi-head self-attention (the attention block of the AdaGN variant)."""

    def __init__(self, channels: int, heads: int, head_channels: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(channels, heads, head_channels)
        self.norm = nn.GroupNorm(32, channels)

    def forward(self, x, c, src_self=None, src_cross=None, want_logits=False, name="block"):
        if src_cross is not None:
            raise ValueError(f"{name}: the AdaGN variant has no cross-attention to inject into")
        b, ch, hh, ww = x.shape
        a, logits = self.attention(self.norm(x).flatten(2), inject=src_self, want_logits=want_logits,
                                   name=f"{name} self-attention")
        return a.reshape(b, ch, hh, ww) + x, logits, None


def _attention(cfg: UNetConfig, channels: int) -> nn.Module:
    heads = cfg.heads_for(channels)
    if cfg.condition_type == "CA":
        return CrossAttentionBlock(channels, cfg.context_channels, heads, cfg.attention_head_channels)
    return SelfAttentionBlock(channels, heads, cfg.attention_head_channels)


class ResAttnBlock(nn.Module):
    """A residual block optionally followed by an attention block (the reference Down/UpBlock)."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, attention: bool) -> None:
        super().__init__()
        self.res = ResidualBlock(in_ch, out_ch, cfg.time_channels, cfg.context_channels,
                                 adagn=cfg.condition_type == "AdaGN")
        if attention:
            self.attn = _attention(cfg, out_ch)
        self.has_attention = attention

    def forward(self, x, temb, c, src_self=None, src_cross=None, want_logits=False, name="block"):
        x = self.res(x, temb, c)
        if not self.has_attention:
            if src_self is not None or src_cross is not None:
                raise ValueError(f"{name} has no attention, but injected logits were given for it")
            return x, None, None
        return self.attn(x, c, src_self, src_cross, want_logits, name)


class MiddleBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int) -> None:
        super().__init__()
        adagn = cfg.condition_type == "AdaGN"
        self.res1 = ResidualBlock(channels, channels, cfg.time_channels, cfg.context_channels, adagn)
        self.attn = _attention(cfg, channels)
        self.res2 = ResidualBlock(channels, channels, cfg.time_channels, cfg.context_channels, adagn)

    def forward(self, x, temb, c, src_self=None, src_cross=None, want_logits=False, name="middle"):
        x = self.res1(x, temb, c)
        x, s, cr = self.attn(x, c, src_self, src_cross, want_logits, name)
        return self.res2(x, temb, c), s, cr


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
