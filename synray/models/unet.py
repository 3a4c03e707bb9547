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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synray.models.unet_config import FLAVOURS, UNetConfig
from synray.models.unet_layers import (
    CrossAttentionBlock,
    Downsample,
    MiddleBlock,
    MultiHeadAttention,
    ResAttnBlock,
    TimeEmbedding,
    Upsample,
    zero_init,
)

__all__ = ["UNetConfig", "ConditionalUNet", "FLAVOURS"]

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
        self.final = zero_init(nn.Conv2d(ch, cfg.input_channels, 3, padding=1))
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
