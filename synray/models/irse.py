"""TFace / face.evoLVe IR backbones (``input_layer``, ``body``, ``output_layer``) and AdaFace's IR.

Differences from insightface's IResNet (:mod:`synray.models.iresnet`) that matter for weights:
the first unit of stage 1 keeps 64 channels and its stride-2 shortcut is ``MaxPool2d(1, 2)`` (pure
subsampling, no tensors); the head is BN2d -> Dropout(0.4) -> Flatten -> Linear -> BN1d(affine=False);
init is kaiming (fan_out) for Conv and Linear. State-dict order is ``input_layer``, ``output_layer``,
``body`` (attribute definition order of the reference).

AdaFace's ``net.py`` IR is key-identical to TFace's, but its forward returns ``(x/|x|, |x|)`` and its
released weights were trained on **BGR** images: :class:`AdaFaceIR` says so (``channel_order="BGR"``)
and offers :meth:`AdaFaceIR.forward_rgb` / :func:`rgb_to_bgr` for RGB batches.

Any ``input_size`` works (stride-2 stages round up); it sets the Linear input width. TFace itself only
accepts 112 (7x7 grid) and 224 (14x14), which this reproduces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from synray.models.iresnet import DEFAULT_WIDTHS, check_image_batch, downsampled_size

IR_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),  # TFace's IR_101 is built with num_layers=100
    101: (3, 13, 30, 3),
}


class SEModule(nn.Module):
    """TFace's squeeze-and-excitation (reduction 16, convs without bias)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()
        nn.init.xavier_uniform_(self.fc1.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BasicBlockIR(nn.Module):
    """Residual BN-conv-BN-PReLU-conv(stride)-BN branch; max-pool or conv+BN shortcut; no final act."""

    def __init__(self, in_channel: int, depth: int, stride: int, use_se: bool = False) -> None:
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )
        if use_se:
            self.res_layer.add_module("se_block", SEModule(depth, 16))

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """TFace ``Backbone(input_size, num_layers, mode='ir'|'ir_se')`` for the basic-block depths.

    Args:
        layers: units per stage, e.g. ``(3, 4, 14, 3)`` for IR-50; any 4 positive ints.
        widths: stage channels; the stem uses ``widths[0]`` so stage 1 keeps the max-pool shortcut.
        embedding_dim: output size (512 in all released models).
        input_size: (H, W) the Linear layer is sized for; forward checks it.
        dropout: probability of the Dropout in ``output_layer`` (0.4 in TFace and AdaFace).
        use_se: IR-SE units (TFace ``mode='ir_se'``).
    """

    returns_norm = False
    channel_order = "RGB"

    def __init__(
        self,
        layers: Sequence[int],
        *,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        embedding_dim: int = 512,
        input_size: tuple[int, int] = (112, 112),
        dropout: float = 0.4,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        layers, widths = tuple(int(n) for n in layers), tuple(int(c) for c in widths)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive unit counts, got {layers}")
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts, got {widths}")
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (H, W), got {input_size}")
        self.layers_spec = layers
        self.widths = widths
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.embedding_dim = int(embedding_dim)
        self.pixel_mean, self.pixel_std = 127.5, 127.5

        self.input_layer = nn.Sequential(
            nn.Conv2d(3, widths[0], (3, 3), 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0])
        )
        fh, fw = downsampled_size(self.input_size[0]), downsampled_size(self.input_size[1])
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[3]),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(widths[3] * fh * fw, self.embedding_dim),
            nn.BatchNorm1d(self.embedding_dim, affine=False),
        )
        units: list[nn.Module] = []
        in_channel = widths[0]
        for depth, count in zip(widths, layers):
            units.append(BasicBlockIR(in_channel, depth, 2, use_se))
            units += [BasicBlockIR(depth, depth, 1, use_se) for _ in range(count - 1)]
            in_channel = depth
        self.body = nn.Sequential(*units)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # SE convs too: TFace re-inits after building
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def embed(self, x: Tensor) -> Tensor:
        """Raw (un-normalised) embedding."""
        check_image_batch(x, 3, self.input_size, type(self).__name__)
        return self.output_layer(self.body(self.input_layer(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)


def rgb_to_bgr(x: Tensor) -> Tensor:
    """Reverse the channel axis of an (N, 3, H, W) batch (RGB <-> BGR; it is its own inverse)."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected an (N, 3, H, W) image batch, got {shape}")
    return x.flip(1)


class AdaFaceIR(IRBackbone):
    """AdaFace ``net.py`` IR: TFace weights layout, forward returns ``(x / |x|, |x|)``.

    The released AdaFace checkpoints expect **BGR** channel order (normalised with mean/std 0.5):
    feed BGR batches to :meth:`forward`, or RGB batches to :meth:`forward_rgb`. The raw embedding is
    ``emb * norm`` (flip-fusion "pre-norm vector add" uses exactly that).
    """

    channel_order = "BGR"

    def __init__(self, layers: Sequence[int], *, return_norm: bool = True, **kw) -> None:
        super().__init__(layers, **kw)
        self.returns_norm = bool(return_norm)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.embed(x)
        if not self.returns_norm:
            return x
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm

    def forward_rgb(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Forward an RGB batch (converted to the BGR order the weights were trained on)."""
        return self.forward(rgb_to_bgr(x))


def _layers(depth: int, kw: dict) -> tuple[int, ...]:
    layers = kw.pop("layers", None)
    if layers is not None:
        return tuple(layers)
    if depth not in IR_LAYERS:
        raise ValueError(f"IR depth must be one of {sorted(IR_LAYERS)}, got {depth}")
    return IR_LAYERS[depth]


def tface_ir(depth: int, **kw) -> IRBackbone:
    """TFace ``IR_{depth}`` (18, 34, 50, 101); ``use_se=True`` gives ``IR_SE_*``; ``layers=`` overrides."""
    return IRBackbone(_layers(depth, kw), **kw)


def adaface_ir(depth: int, **kw) -> AdaFaceIR:
    """AdaFace ``IR_{depth}`` (BGR input, returns normalised embedding and its norm)."""
    return AdaFaceIR(_layers(depth, kw), **kw)
