"""The configuration of the LDM denoiser (:class:`~synray.models.unet.ConditionalUNet`) and its published flavours.

Apart from the network because it needs no torch: configs check an architecture when they load
(:mod:`synray.config.ldm`) without importing the model code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CONDITION_TYPES", "FLAVOURS", "UNetConfig"]

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
