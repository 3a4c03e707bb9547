"""insightface-style IResNet (arcface_torch), with the ElasticFace and SynthDistill-teacher variants.

One class covers three published families whose checkpoints share the same tensor names
(``conv1``, ``bn1``, ``prelu``, ``layer1..4``, ``bn2``, ``fc``, ``features``):

* insightface arcface_torch ``iresnet18/34/50/100/200``: BN eps 1e-5, dropout 0 before ``fc``,
  ``features`` BN1d whose weight is fixed at 1 and frozen (still in the state dict), optional fp16
  trunk under autocast, conv weights ~ N(0, 0.1).
* ElasticFace: the same network (its default ``dropout=0.4``), optionally with an SE block after
  ``bn3`` (``use_se``; the released models are built without it).
* SynthDistill's teacher (nizhib port of the MXNet LResNet100E-IR, used through bob.bio.face): BN eps
  2e-5 (and the port's torch ``momentum=0.9``), a fully affine ``features`` BN1d, ``Dropout2d(0.4)``
  after ``bn2`` (before flattening), kaiming init; it expects ``(x - 127.5) / 128`` of 0..255 RGB.

Unlike TFace's IR, the first block of ``layer1`` always has a 1x1-conv + BN shortcut, because every
stage starts with stride 2 (see :mod:`synray.models.keymap`).

Input size: every stage halves the resolution with ``ceil`` rounding (3x3/1x1 convs with stride 2),
so any ``input_size`` works; it only fixes the ``fc`` input width (channels x ceil(H/16) x ceil(W/16)).
112x112 gives the published 7x7 grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
DEFAULT_WIDTHS = (64, 128, 256, 512)


def downsampled_size(size: int, stages: int = 4) -> int:
    """Spatial size after ``stages`` stride-2 stages (3x3 pad 1 or 1x1 pad 0 convs: ceil(n/2))."""
    for _ in range(stages):
        size = (size + 1) // 2
    return size


def check_image_batch(x: Tensor, channels: int, size: tuple[int, int] | None, model: str) -> None:
    """Raise a ValueError naming the problem if ``x`` is not an (N, channels, H, W) batch of the expected size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{model} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{model} expects a (N, {channels}, H, W) batch, got shape {tuple(x.shape)}")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{model} was built for {size[0]}x{size[1]} input (input_size), got {x.shape[-2]}x{x.shape[-1]}"
        )


class SEModule(nn.Module):
    """ElasticFace's squeeze-and-excitation (1x1 convs without bias, ReLU, sigmoid)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (downsampled) identity."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=bn_eps, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=bn_eps, momentum=bn_momentum)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=bn_eps, momentum=bn_momentum)
        self.downsample = downsample  # registered before se_block: state-dict order as in ElasticFace
        self.stride = stride
        self.se_block = SEModule(planes, 16) if use_se else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.se_block is not None:
            out = self.se_block(out)
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    """insightface IResNet; defaults reproduce arcface_torch ``iresnet*`` (see module docstring).

    Args:
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for r18; any 4 positive ints (tiny test nets).
        widths: channels of the 4 stages; the stem uses ``widths[0]``.
        embedding_dim: output size (insightface ``num_features``).
        input_size: (H, W) the ``fc`` layer is sized for; forward checks it.
        dropout: dropout probability (flattened features before ``fc``; with ``spatial_dropout``
            a ``Dropout2d`` right after ``bn2`` as in the nizhib port).
        fp16: run the trunk under autocast (``fc``/``features`` stay float32), as arcface_torch does.
        bn_eps, bn_momentum: every BatchNorm's eps/momentum (torch convention for momentum).
        frozen_features_weight: arcface_torch fixes ``features.weight`` at 1 with ``requires_grad=False``.
        use_se: ElasticFace's optional SE block in every unit.
        init: ``"insightface"`` (conv ~ N(0, 0.1)) or ``"kaiming"`` (fan_out/relu, the nizhib port).
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        embedding_dim: int = 512,
        input_size: tuple[int, int] = (112, 112),
        dropout: float = 0.0,
        fp16: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        frozen_features_weight: bool = True,
        spatial_dropout: bool = False,
        use_se: bool = False,
        init: str = "insightface",
    ) -> None:
        super().__init__()
        layers, widths = tuple(int(n) for n in layers), tuple(int(c) for c in widths)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {layers}")
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts, got {widths}")
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (H, W), got {input_size}")
        if init not in ("insightface", "kaiming"):
            raise ValueError(f"init must be 'insightface' or 'kaiming', got {init!r}")
        self.layers_spec = layers
        self.widths = widths
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.embedding_dim = int(embedding_dim)
        self.fp16 = fp16
        self.spatial_dropout = spatial_dropout
        self.channel_order = "RGB"
        self.pixel_mean, self.pixel_std = 127.5, 127.5
        self.returns_norm = False

        self._inplanes = widths[0]
        bn = dict(eps=bn_eps, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], **bn)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0], bn_eps, bn_momentum, use_se)
        self.layer2 = self._make_layer(widths[1], layers[1], bn_eps, bn_momentum, use_se)
        self.layer3 = self._make_layer(widths[2], layers[2], bn_eps, bn_momentum, use_se)
        self.layer4 = self._make_layer(widths[3], layers[3], bn_eps, bn_momentum, use_se)
        self.bn2 = nn.BatchNorm2d(widths[3], **bn)
        self.dropout = nn.Dropout2d(p=dropout) if spatial_dropout else nn.Dropout(p=dropout)
        fh, fw = downsampled_size(self.input_size[0]), downsampled_size(self.input_size[1])
        self.fc = nn.Linear(widths[3] * fh * fw, self.embedding_dim)
        self.features = nn.BatchNorm1d(self.embedding_dim, **bn)
        nn.init.constant_(self.features.weight, 1.0)
        if frozen_features_weight:
            self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "insightface":
                    nn.init.normal_(m.weight, 0, 0.1)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, eps: float, momentum: float, use_se: bool) -> nn.Sequential:
        # every stage starts with stride 2, so the first block always gets a conv shortcut
        downsample = nn.Sequential(
            nn.Conv2d(self._inplanes, planes, 1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=eps, momentum=momentum),
        )
        units = [IBasicBlock(self._inplanes, planes, 2, downsample, eps, momentum, use_se)]
        self._inplanes = planes
        units += [IBasicBlock(planes, planes, 1, None, eps, momentum, use_se) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        check_image_batch(x, 3, self.input_size, type(self).__name__)
        # fp16: the trunk under autocast, as arcface_torch runs it; otherwise whatever precision the caller set
        # (an ``enabled=False`` here would switch off the caller's autocast for the trunk)
        with torch.autocast(device_type=x.device.type) if self.fp16 else nullcontext():
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.bn2(x)
            if self.spatial_dropout:
                x = torch.flatten(self.dropout(x), 1)
            else:
                x = self.dropout(torch.flatten(x, 1))
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


def iresnet(depth: int, **kw) -> IResNet:
    """arcface_torch ``iresnet{depth}`` (18, 34, 50, 100, 200); ``layers=`` overrides the depth."""
    if "layers" not in kw and depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
    layers = kw.pop("layers", None) or IRESNET_LAYERS[depth]
    return IResNet(layers, **kw)


def elasticface_iresnet(depth: int, **kw) -> IResNet:
    """ElasticFace's iresnet: same graph and keys; its train.py uses ``dropout=0.4``."""
    kw.setdefault("dropout", 0.4)
    return iresnet(depth, **kw)


def synthdistill_teacher_iresnet100(**kw) -> IResNet:
    """nizhib/bob.bio.face IResNet100 teacher: eps 2e-5, affine ``features``, Dropout2d(0.4).

    Preprocessing differs from arcface_torch: ``(x - 127.5) / 128`` on 0..255 RGB (``pixel_std=128``).
    ``bn_momentum=0.9`` is what the port passes to torch (an MXNet-style value); it only matters if
    the teacher is ever trained, which SynthDistill never does.
    """
    kw.setdefault("bn_eps", 2e-5)
    kw.setdefault("bn_momentum", 0.9)
    kw.setdefault("dropout", 0.4)
    kw.setdefault("spatial_dropout", True)
    kw.setdefault("frozen_features_weight", False)
    kw.setdefault("init", "kaiming")
    model = iresnet(100, **kw)
    model.pixel_std = 128.0
    return model
