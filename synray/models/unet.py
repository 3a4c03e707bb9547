"""Identity-conditioned denoiser of IDiff-Face, ADMIS and UIFace (the labml-style ``ConditionalUNet``).

One class serves all three published models. Parameter names, registration order and shapes follow
the reference so that ``state_dict()`` equals the published checkpoints key for key: that is what lets
synray load the released weights strictly and lets the original code load weights synray trains.

The identity (a 512-d, L2-normalised embedding) is projected to a ``context_channels`` vector. In CA mode
it enters only through cross-attention, where each block expands it into ``attention_head_channels``
tokens. The empty context is zeros (IDiff-Face, ADMIS) or a learnable vector (UIFace). The forward also
carries UIFace's attention-injection hooks, which the two-stage sampler needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["UNetConfig", "ConditionalUNet", "FLAVOURS"]

CONDITION_TYPES = ("CA", "AdaGN")

# Training-time flags of each published model; the architecture is the same for all three.
FLAVOURS: dict[str, dict[str, Any]] = {
    "idiff_face": dict(learn_empty_context=False, context_dropout=0.25, unconditioned_probability=0.0),
    "admis": dict(learn_empty_context=False, context_dropout=0.25, unconditioned_probability=0.0),
    "uiface": dict(learn_empty_context=True, context_dropout=0.25, unconditioned_probability=0.2),
}


@dataclass(frozen=True)
class UNetConfig:
    """Constructor config; the defaults are the published IDiff-Face/ADMIS CPD25 model.

    ``channel_multipliers`` are cumulative as in the reference: (1, 2, 2, 2) gives 96/192/384/768.
    ``context_dropout`` is CPD: element-wise dropout on the projected context, train mode only.
    ``unconditioned_probability`` is UIFace's "uncond20": in train mode each sample's context is
    replaced by the empty one with this probability, and sample 0 always is.
    """

    input_channels: int = 3
    initial_channels: int = 96
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 2)
    is_attention: tuple[bool, ...] = (False, True, True, True)
    attention_heads: int = -1
    attention_head_channels: int = 32
    n_blocks_per_resolution: int = 2
    condition_type: str = "CA"
    context_input_channels: int = 512
    context_channels: int = 256
    learn_empty_context: bool = False
    context_dropout: float = 0.25
    unconditioned_probability: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        object.__setattr__(self, "is_attention", tuple(bool(a) for a in self.is_attention))
        if self.condition_type not in CONDITION_TYPES:
            raise ValueError(
                f"UNetConfig.condition_type must be one of {CONDITION_TYPES}, got {self.condition_type!r}")
        if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(
                f"UNetConfig.channel_multipliers must be positive integers, got {self.channel_multipliers}")
        if len(self.is_attention) != len(self.channel_multipliers):
            raise ValueError(
                f"UNetConfig.is_attention has {len(self.is_attention)} entries but channel_multipliers has "
                f"{len(self.channel_multipliers)}"
            )
        for name in ("input_channels", "initial_channels", "attention_head_channels", "n_blocks_per_resolution",
                     "context_input_channels", "context_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        # Every GroupNorm in the network has 32 groups.
        if self.initial_channels % 32:
            raise ValueError(f"UNetConfig.initial_channels must be a multiple of 32, got {self.initial_channels}")
        if self.context_channels % 32:
            raise ValueError(f"UNetConfig.context_channels must be a multiple of 32, got {self.context_channels}")
        for name in ("context_dropout", "unconditioned_probability"):
            p = float(getattr(self, name))
            if not 0.0 <= p < 1.0:
                raise ValueError(f"UNetConfig.{name} must be in [0, 1), got {p}")
        for width in (self.initial_channels, *self.level_channels):
            heads = self.heads_for(width)
            if heads < 1 or (heads * self.attention_head_channels) % 32:
                raise ValueError(
                    f"UNetConfig: attention on {width} channels would have {heads} heads of "
                    f"{self.attention_head_channels} channels; need >= 1 head and a multiple of 32 in total"
                )

    @property
    def level_channels(self) -> tuple[int, ...]:
        widths, w = [], self.initial_channels
        for m in self.channel_multipliers:
            w *= m
            widths.append(w)
        return tuple(widths)

    @property
    def time_channels(self) -> int:
        return 4 * self.initial_channels

    def heads_for(self, channels: int) -> int:
        """Heads of an attention block on ``channels`` (``attention_heads <= 0``: one per 32 channels)."""
        if self.attention_heads > 0:
            return self.attention_heads
        return channels // self.attention_head_channels

    @classmethod
    def published(cls, flavour: str = "idiff_face", **overrides: Any) -> UNetConfig:
        """The published config of ``idiff_face``, ``admis`` or ``uiface`` (CPD25), with overrides."""
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown UNet flavour {flavour!r}; expected one of {sorted(FLAVOURS)}")
        return cls(**{**FLAVOURS[flavour], **overrides})

    @classmethod
    def small(cls, flavour: str = "idiff_face", **overrides: Any) -> UNetConfig:
        """The small config of the forward goldens (32/32/64 channels, context width 32)."""
        base = dict(initial_channels=32, channel_multipliers=(1, 1, 2), is_attention=(False, True, True),
                    context_channels=32)
        return cls.published(flavour, **{**base, **overrides})

    @classmethod
    def from_reference(cls, cfg: Mapping[str, Any]) -> UNetConfig:
        """Build from the reference YAML keys (``configs/model/unet_cond_*.yaml``)."""
        cfg = dict(cfg)
        if not cfg.pop("is_context_conditional", True):
            raise ValueError("only context-conditional UNets are supported (is_context_conditional=True)")
        if cfg.pop("n_context_classes", 0):
            raise ValueError("class-embedding contexts (n_context_classes > 0) are not supported")
        if "context_dropout_probability" in cfg:
            cfg["context_dropout"] = cfg.pop("context_dropout_probability")
        return cls.from_dict(cfg)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig key(s): {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    def replace(self, **overrides: Any) -> UNetConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown UNetConfig key(s): {unknown}")
        return dataclasses.replace(self, **overrides)

    def to_reference(self) -> dict[str, Any]:
        """The reference YAML keys, e.g. to instantiate the original class on synray weights."""
        out = dataclasses.asdict(self)
        out["channel_multipliers"] = list(self.channel_multipliers)
        out["is_attention"] = list(self.is_attention)
        out["context_dropout_probability"] = out.pop("context_dropout")
        out.update(is_context_conditional=True, n_context_classes=0)
        return out


def _zero(module: nn.Module) -> nn.Module:
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
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
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
        self.x_proj_out = _zero(nn.Conv2d(inner, channels, 1))
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


AttnLists = Sequence[torch.Tensor | None]


class ConditionalUNet(nn.Module):
    """ε-prediction UNet conditioned on a timestep and an identity context.

    ``ConditionalUNet()`` is the published IDiff-Face/ADMIS model; ``ConditionalUNet(uiface_config)`` or
    ``ConditionalUNet(learn_empty_context=True, unconditioned_probability=0.2)`` the UIFace one. Keyword
    overrides are applied on top of ``config``.
    """

    def __init__(self, config: UNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = config if config is not None else UNetConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        if cfg.learn_empty_context:
            self.empty_context_embedding = nn.Parameter(torch.randn(cfg.context_channels))
        self.image_proj = nn.Conv2d(cfg.input_channels, cfg.initial_channels, 3, padding=1)
        self.time_emb = TimeEmbedding(cfg.time_channels)
        self.context_emb = nn.Linear(cfg.context_input_channels, cfg.context_channels)

        widths = cfg.level_channels
        n_levels = len(widths)
        down: list[nn.Module] = []
        ch = cfg.initial_channels
        for level, width in enumerate(widths):
            for _ in range(cfg.n_blocks_per_resolution):
                down.append(ResAttnBlock(cfg, ch, width, cfg.is_attention[level]))
                ch = width
            if level < n_levels - 1:
                down.append(Downsample(ch))
        self.down = nn.ModuleList(down)
        self.middle = MiddleBlock(cfg, ch)
        up: list[nn.Module] = []
        for level in reversed(range(n_levels)):
            for _ in range(cfg.n_blocks_per_resolution):
                up.append(ResAttnBlock(cfg, 2 * ch, ch, cfg.is_attention[level]))
            out = ch // cfg.channel_multipliers[level]
            up.append(ResAttnBlock(cfg, ch + out, out, cfg.is_attention[level]))
            ch = out
            if level > 0:
                up.append(Upsample(ch))
        self.up = nn.ModuleList(up)
        self.norm = nn.GroupNorm(32, cfg.initial_channels)
        self.final = _zero(nn.Conv2d(ch, cfg.input_channels, 3, padding=1))
        self._downsamples = n_levels - 1
        self._n_slots = len(self.attention_slots)

    # ------------------------------------------------------------------ introspection
    @property
    def attention_slots(self) -> list[int | None]:
        """Per entry of the attention-logit lists: the head count, or None for a block without attention."""
        blocks = [m for m in self.down if isinstance(m, ResAttnBlock)] + [self.middle]
        blocks += [m for m in self.up if isinstance(m, ResAttnBlock)]
        out: list[int | None] = []
        for m in blocks:
            attn = getattr(m, "attn", None)
            if attn is None:
                out.append(None)
            else:
                mha = attn.self_attention if isinstance(attn, CrossAttentionBlock) else attn.attention
                out.append(mha.heads)
        return out

    @property
    def n_attention_slots(self) -> int:
        """Length of the attention-logit lists: down blocks + middle + up blocks (21 published, 16 small)."""
        return self._n_slots

    def set_gradient_checkpointing(self, enabled: bool = True) -> ConditionalUNet:
        """Recompute every attention in the backward pass (as the IDiff-Face trainer does) to save memory."""
        for m in self.modules():
            if isinstance(m, MultiHeadAttention):
                m.use_checkpoint = bool(enabled)
        return self

    # ------------------------------------------------------------------ context path
    def empty_context(self, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[batch, context_channels] empty context: the learnable vector (UIFace) or zeros."""
        if self.config.learn_empty_context:
            return self.empty_context_embedding.to(dtype).unsqueeze(0).expand(batch, -1)
        return torch.zeros(batch, self.config.context_channels, dtype=dtype, device=device)

    def project_context(
        self,
        context: torch.Tensor | None,
        batch: int,
        dropout_mask: torch.Tensor | None = None,
        condition_flag: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-sample context vector c: project, dropout_mask, CPD, uncond (train), condition_flag.

        This order is the reference's, so the empty vector is never rescaled by CPD; in train mode the
        random draws are CPD's Bernoulli mask first, then ``torch.rand(batch)`` for the uncond mask.
        """
        w = self.context_emb.weight
        if context is None:
            return self.empty_context(batch, w.dtype, w.device)
        c = self.context_emb(context.to(w.dtype))
        if dropout_mask is not None:
            c = torch.where(dropout_mask[:, None], self.empty_context(batch, c.dtype, c.device), c)
        if self.config.context_dropout > 0:
            c = F.dropout(c, self.config.context_dropout, self.training)
        if self.training and self.config.unconditioned_probability > 0:
            uncond = torch.rand(batch) < self.config.unconditioned_probability
            uncond[0] = True
            c = torch.where(uncond.to(c.device)[:, None], self.empty_context(batch, c.dtype, c.device), c)
        if condition_flag is not None:
            c = torch.where(condition_flag[:, None], c, self.empty_context(batch, c.dtype, c.device))
        return c

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x, t, context, dropout_mask, condition_flag, self_attn_logits, cross_attn_logits):
        cfg = self.config
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != cfg.input_channels:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be [B, {cfg.input_channels}, H, W], got {shape}")
        b, _, hh, ww = x.shape
        f = 2 ** self._downsamples
        if hh % f or ww % f:
            raise ValueError(f"x spatial size {hh}x{ww} must be divisible by {f} (the UNet downsamples "
                             f"{self._downsamples} times)")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if tuple(t.shape) != (b,):
            raise ValueError(f"t must be [B] = [{b}] timesteps, got shape {tuple(t.shape)}")
        ctx_shape = (b, cfg.context_input_channels)
        if context is not None and (not torch.is_tensor(context) or tuple(context.shape) != ctx_shape):
            shape = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
            raise ValueError(f"context must be [B, {cfg.context_input_channels}] = [{b}, "
                             f"{cfg.context_input_channels}], got {shape}")
        masks = []
        for name, m in (("dropout_mask", dropout_mask), ("condition_flag", condition_flag)):
            if m is not None:
                m = torch.as_tensor(m, device=x.device)
                if m.dtype != torch.bool or tuple(m.shape) != (b,):
                    raise ValueError(
                        f"{name} must be a bool tensor of shape [{b}], got {m.dtype} {tuple(m.shape)}")
            masks.append(m)
        n = self._n_slots
        lists = []
        for name, lst in (("self_attn_logits", self_attn_logits), ("cross_attn_logits", cross_attn_logits)):
            if lst is not None and (isinstance(lst, torch.Tensor) or len(lst) != n):
                got = "a tensor" if isinstance(lst, torch.Tensor) else f"{len(lst)} entries"
                raise ValueError(
                    f"{name} must be a list of {n} entries (None for blocks without attention), got {got}")
            lists.append(lst)
        return t, masks[0], masks[1], lists[0], lists[1]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        dropout_mask: torch.Tensor | None = None,
        condition_flag: torch.Tensor | None = None,
        self_attn_logits: AttnLists | None = None,
        cross_attn_logits: AttnLists | None = None,
        return_attn: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Predict ε for latents ``x`` [B, C, H, W] at integer timesteps ``t`` [B] (unscaled, 0..T-1).

        ``context`` [B, 512] (None: the empty context for every sample); ``dropout_mask`` [B] bool, True
        uses the empty context; ``condition_flag`` [B] bool, False uses the empty context (UIFace
        sampler). ``self_attn_logits`` / ``cross_attn_logits``: one entry per block (``n_attention_slots``;
        None for blocks without attention or to skip a block) of logits to inject: self logits replace
        the current ones, cross logits are blended by mean/std. ``return_attn=True`` returns
        ``(eps, self_logits, cross_logits)`` with this pass's pre-softmax scaled q.k logits.
        """
        t, dropout_mask, condition_flag, src_self, src_cross = self._check_inputs(
            x, t, context, dropout_mask, condition_flag, self_attn_logits, cross_attn_logits)
        b = x.shape[0]
        temb = self.time_emb(t)
        c = self.project_context(context, b, dropout_mask, condition_flag)

        self_out: list[torch.Tensor | None] = []
        cross_out: list[torch.Tensor | None] = []
        slot = 0

        def run(block: nn.Module, h: torch.Tensor, name: str) -> torch.Tensor:
            nonlocal slot
            ss = src_self[slot] if src_self is not None else None
            sc = src_cross[slot] if src_cross is not None else None
            h, s, cr = block(h, temb, c, ss, sc, return_attn, f"{name} (attention slot {slot})")
            self_out.append(s)
            cross_out.append(cr)
            slot += 1
            return h

        h = self.image_proj(x)
        skips = [h]
        for i, m in enumerate(self.down):
            h = m(h) if isinstance(m, Downsample) else run(m, h, f"down.{i}")
            skips.append(h)
        h = run(self.middle, h, "middle")
        for i, m in enumerate(self.up):
            if isinstance(m, Upsample):
                h = m(h)
            else:
                h = run(m, torch.cat([h, skips.pop()], dim=1), f"up.{i}")
        eps = self.final(F.silu(self.norm(h)))
        if return_attn:
            return eps, self_out, cross_out
        return eps
