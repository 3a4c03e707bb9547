"""SynthDistill's TinyFaR students: timm 0.6.13 ``tinynet_a|b|c`` (``num_classes=0``) + Linear(1280, 512).

timm cannot be installed beside this torch, so the EfficientNet trunk is rebuilt here with timm's
exact tensor names and numerics (the TinyFaR-A golden pins them to 1e-6):

* block string of EfficientNet-B0 (``ds`` then ``ir`` stages, kernels 3/5, expansion 6, SE 0.25),
  SiLU everywhere, BatchNorm eps 1e-5, **symmetric** padding ``((s-1) + (k-1)) // 2`` (tinynet is not
  a ``tf_`` model, so no TF "same" padding), stem fixed at 32 channels, head 1280;
* width multiplier -> ``round_channels`` (multiple of 8, never more than 10% below), depth multiplier
  -> ``max(1, round(repeats * d))`` per stage (timm's ``depth_trunc='round'``);
* SE squeeze width ``round(mid * 0.25 / expansion)`` (i.e. from the block input), SiLU inside,
  sigmoid gate; no skip when the stride or the channel count changes.

Published students start from ImageNet-pretrained tinynet weights, which cannot be fetched here; a
fresh model uses timm's "goog" init for the trunk and torch's default init for ``fc``. The trunk ends
in global average pooling, so any input size works; SynthDistill feeds 112x112 ``(img - 0.5) / 0.5``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from synray.models.iresnet import check_image_batch

# (block type, repeats, kernel, stride, expansion, out channels); every block has SE ratio 0.25
TINYNET_ARCH: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
# variant -> (width multiplier, depth multiplier), timm ``_gen_tinynet``
TINYNET_VARIANTS: dict[str, tuple[float, float]] = {"a": (1.0, 1.2), "b": (0.75, 1.1), "c": (0.54, 0.85)}
SE_RATIO = 0.25


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor``, bumped up if it lost more than 10%."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def round_channels(channels: int, multiplier: float = 1.0, divisor: int = 8) -> int:
    return make_divisible(channels * multiplier, divisor) if multiplier else channels


def _pad(kernel: int, stride: int) -> int:
    return ((stride - 1) + (kernel - 1)) // 2


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by SiLU (or nothing); same tensors as a plain BatchNorm2d."""

    def __init__(self, num_features: int, apply_act: bool = True, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class DepthwiseSeparableConv(nn.Module):
    """timm ``ds`` block: dw conv -> BN+SiLU -> SE -> pw conv -> BN (+ skip)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = nn.Conv2d(in_chs, in_chs, kernel, stride, _pad(kernel, stride), groups=in_chs, bias=False)
        self.bn1 = BatchNormAct2d(in_chs)
        self.se = SqueezeExcite(in_chs, round(in_chs * SE_RATIO))
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = BatchNormAct2d(out_chs, apply_act=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """timm ``ir`` block: pw expand -> BN+SiLU -> dw conv -> BN+SiLU -> SE -> pw linear -> BN (+ skip)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, exp_ratio: float) -> None:
        super().__init__()
        mid = make_divisible(in_chs * exp_ratio)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, kernel, stride, _pad(kernel, stride), groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.se = SqueezeExcite(mid, round(mid * SE_RATIO / exp_ratio))
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.se(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x)))))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_skip else out


class EfficientNet(nn.Module):
    """The timm EfficientNet trunk as ``tinynet_*`` builds it, with ``num_classes=0`` (pooled features)."""

    def __init__(
        self,
        width_multiplier: float,
        depth_multiplier: float,
        *,
        stem_size: int = 32,
        num_features: int = 1280,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        # timm: max(1280, round_channels(1280, width)); the head never shrinks with the width
        self.num_features = max(num_features, round_channels(num_features, width_multiplier))
        self.drop_rate = drop_rate
        self.conv_stem = nn.Conv2d(3, stem_size, 3, 2, _pad(3, 2), bias=False)
        self.bn1 = BatchNormAct2d(stem_size)
        stages: list[nn.Module] = []
        in_chs = stem_size
        for kind, repeats, kernel, stride, exp, chs in TINYNET_ARCH:
            out_chs = round_channels(chs, width_multiplier)
            blocks: list[nn.Module] = []
            for i in range(max(1, round(repeats * depth_multiplier))):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out_chs, kernel, s))
                else:
                    blocks.append(InvertedResidual(in_chs, out_chs, kernel, s, exp))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(in_chs, self.num_features, 1, bias=False)
        self.bn2 = BatchNormAct2d(self.num_features)
        self.apply(_init_goog)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        x = x.mean((2, 3))
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x


def _init_goog(m: nn.Module) -> None:
    """timm ``_init_weight_goog`` (fan-out normal for convs, group-corrected)."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class TinyFaR(nn.Module):
    """SynthDistill ``LightNetwork``: ``cnn`` (tinynet trunk) then ``fc`` to the embedding; no norm.

    Args:
        variant: ``"a"``, ``"b"`` or ``"c"``; ``width_multiplier``/``depth_multiplier`` override it
            (e.g. 0.25/0.3 gives a very small net for tests).
        embedding_dim: output size (512 in SynthDistill).
        input_size: nominal (H, W); the trunk pools globally so other sizes also work.
        num_features: trunk head width (1280; smaller only for tests).
    """

    returns_norm = False
    channel_order = "RGB"

    def __init__(
        self,
        variant: str = "a",
        *,
        width_multiplier: float | None = None,
        depth_multiplier: float | None = None,
        embedding_dim: int = 512,
        input_size: tuple[int, int] = (112, 112),
        num_features: int = 1280,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in TINYNET_VARIANTS:
            raise ValueError(f"TinyFaR variant must be one of {sorted(TINYNET_VARIANTS)}, got {variant!r}")
        wm, dm = TINYNET_VARIANTS[variant]
        wm = wm if width_multiplier is None else float(width_multiplier)
        dm = dm if depth_multiplier is None else float(depth_multiplier)
        if wm <= 0 or dm <= 0:
            raise ValueError(f"width/depth multipliers must be positive, got {wm}, {dm}")
        self.variant = variant
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.embedding_dim = int(embedding_dim)
        self.pixel_mean, self.pixel_std = 127.5, 127.5
        self.cnn = EfficientNet(wm, dm, num_features=num_features, drop_rate=drop_rate)
        self.fc = nn.Linear(self.cnn.num_features, self.embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_image_batch(x, 3, None, type(self).__name__)
        return self.fc(self.cnn(x))


def tinyfar(variant: str, **kw) -> TinyFaR:
    return TinyFaR(variant, **kw)
