"""First-stage VQ-f4 autoencoder (CompVis LDM ffhq256) used by IDiff-Face, ADMIS and UIFace.

The published models ship it as two files that load strictly into these modules:
``first_stage_encoder_state_dict.pt`` (``encoder.*``, ``quant_conv.*``) -> :class:`VQEncoder` and
``first_stage_decoder_state_dict.pt`` (``decoder.*``, ``quantize.embedding.weight``,
``post_quant_conv.*``) -> :class:`VQDecoder`. A 128x128 image in [-1, 1] encodes to a 3x32x32
latent; no scale factor is applied. Diffusion runs on the unquantised latent; sampling decodes with
quantisation (nearest codebook entry by squared L2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synray.config.base import build_dataclass

__all__ = ["VQConfig", "VQEncoder", "VQDecoder"]


@dataclass(frozen=True)
class VQConfig:
    """``ddconfig`` plus the interface constants; the defaults are the published ffhq256 VQ-f4."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 3
    resolution: int = 256
    dropout: float = 0.0
    embed_dim: int = 3
    n_embed: int = 8192

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"VQConfig.ch_mult must be positive integers, got {self.ch_mult}")
        for name in ("ch", "num_res_blocks", "in_channels", "out_ch", "z_channels", "resolution", "embed_dim",
                     "n_embed"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VQConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.ch % 32:
            raise ValueError(f"VQConfig.ch must be a multiple of 32 (GroupNorm with 32 groups), got {self.ch}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsampling(self) -> int:
        """Spatial reduction factor (4 for the published f4 model)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def small(cls, **overrides: Any) -> VQConfig:
        """The small config of ``vq_small_golden.pt``."""
        return cls(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32), **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], key: str = "vq_config") -> VQConfig:
        """From a config or JSON mapping of field names (lists stand for tuples), as configs and
        ``vq_config.json`` hold it. A bad entry is a ``ValueError`` naming its dotted key under ``key``
        (``vq.config.ch_mult.0: ...``)."""
        return build_dataclass(cls, values, key)

    @classmethod
    def from_reference(cls, cfg: Mapping[str, Any]) -> VQConfig:
        """From the reference ``first_stage_config.yaml`` (the whole file, its ``params`` or ``ddconfig``)."""
        cfg = dict(cfg)
        if "params" in cfg:
            cfg = dict(cfg["params"])
        extra = {k: cfg[k] for k in ("embed_dim", "n_embed") if k in cfg}
        dd = dict(cfg.get("ddconfig", cfg))
        for k in ("embed_dim", "n_embed", "lossconfig", "ddconfig"):
            dd.pop(k, None)
        if dd.pop("double_z", False):
            raise ValueError("double_z=True is a KL-autoencoder setting; the VQ interfaces need double_z=False")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(dd) - known)
        if unknown:
            raise ValueError(f"unknown VQ ddconfig key(s): {unknown}")
        return cls(**dd, **extra)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.norm2(h))
        h = self.conv2(F.dropout(h, self.dropout, self.training) if self.dropout else h)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v (softmax in float32)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        logits = torch.bmm(q.reshape(b, c, hh * ww).transpose(1, 2), k.reshape(b, c, hh * ww)) * (c ** -0.5)
        w = torch.softmax(logits.float(), dim=2).to(logits.dtype)
        out = torch.bmm(v.reshape(b, c, hh * ww), w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Container that only fixes the ``block`` / ``attn`` / ``down|upsample`` key names."""


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, ch = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(ch, cfg.ch * mult, cfg.dropout))
                ch = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(ch))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(ch, cfg.dropout)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        ch = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, cfg.dropout)
        levels: list[_Level] = []
        for i in reversed(range(n)):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch, cfg.ch * cfg.ch_mult[i], cfg.dropout))
                ch = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(ch))
            if i != 0:
                level.upsample = Upsample(ch)
                res *= 2
            levels.append(level)
        # Index 0 is the full-resolution level, as in the reference (which prepends).
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook snap (VectorQuantizer2, legacy, no remap); only the codebook is stored."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_q [B, D, h, w], code indices [B, h, w]) for a latent z [B, D, h, w]."""
        _check_image("z", z, self.embedding.embedding_dim, 1)
        b, d, hh, ww = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        # Distances in at least float32 (autocast off: a bf16 matmul would pick other codes), in row chunks:
        # at batch 50 the full [N, 8192] matrix is 1.6 GB.
        cd = torch.promote_types(flat.dtype, torch.float32)
        idx = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        with torch.autocast(z.device.type, enabled=False) if z.device.type in ("cpu", "cuda") else nullcontext():
            codes = self.embedding.weight.to(cd)
            code_sq = (codes ** 2).sum(dim=1)
            for s in range(0, flat.shape[0], chunk):
                f = flat[s:s + chunk].to(cd)
                dist = (f ** 2).sum(dim=1, keepdim=True) + code_sq - 2 * (f @ codes.t())
                idx[s:s + chunk] = dist.argmin(dim=1)
        zq = self.embedding(idx).to(z.dtype).reshape(b, hh, ww, d).permute(0, 3, 1, 2)
        # Straight-through estimator, as in the reference.
        zq = z + (zq - z).detach()
        return zq.contiguous(), idx.reshape(b, hh, ww)


def _check_image(name: str, x: torch.Tensor, channels: int, factor: int) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be [B, {channels}, H, W], got {shape}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"{name} spatial size {x.shape[2]}x{x.shape[3]} must be divisible by {factor}")


class VQEncoder(nn.Module):
    """Image in [-1, 1] -> pre-quantisation latent (``quant_conv(encoder(x))``)."""

    def __init__(self, config: VQConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or VQConfig(), **overrides)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        _check_image("image", image, self.config.in_channels, self.config.downsampling)
        return self.quant_conv(self.encoder(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode(image)


class VQDecoder(nn.Module):
    """Latent -> image in about [-1, 1]; quantises first unless ``quantize=False``.

    ``decoder.quantize(z)`` returns ``(z_q, indices)``: the submodule name is fixed by the checkpoint
    key ``quantize.embedding.weight``.
    """

    def __init__(self, config: VQConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or VQConfig(), **overrides)
        self.config = cfg
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        _check_image("z", z, self.config.embed_dim, 1)
        if quantize:
            z = self.quantize(z)[0]
        return self.decoder(self.post_quant_conv(z))

    def forward(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        return self.decode(z, quantize)
