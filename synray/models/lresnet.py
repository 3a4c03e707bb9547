"""SynFace's LResNet50E-IR on 112x96 (H x W) face crops.

The unit is insightface's IR block (BN-conv-BN-PReLU-conv(stride)-BN, conv+BN shortcut on the first
unit of every stage) with SynFace's tensor names (``prelu1``); the head ``fc`` is BN2d -> Dropout(0.5)
-> Flatten -> Linear(512*7*6 -> 512) -> BN1d (affine, trainable). Conv/Linear weights are
xavier-uniform, BN gamma 1 / beta 0. Input is normalised with mean/std 0.5 (``(x - 127.5) / 127.5``).

SynFace sizes the Linear layer as ``input // 16`` per side, which equals the real grid only when the
side is a multiple of 16 (112 -> 7, 96 -> 6); other sizes are rejected here rather than failing in
the first forward.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from synray.models.iresnet import check_image_batch, downsampled_size

LRESNET50E_LAYERS = (3, 4, 14, 3)
LRESNET_WIDTHS = (64, 64, 128, 256, 512)


class BlockIR(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dim_match: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu1 = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = None if dim_match else nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu1(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class LResNet(nn.Module):
    """SynFace ``LResNet(BlockIR, layers, filter_list, fmap_size)``.

    Args:
        layers: units per stage (``(3, 4, 14, 3)`` for LResNet50E-IR).
        widths: ``filter_list``: stem channels then the 4 stage channels.
        input_size: (H, W), each side a multiple of 16 (SynFace: 112 x 96).
        embedding_dim: output size (512).
        dropout: head dropout (0.5).
    """

    returns_norm = False
    channel_order = "RGB"

    def __init__(
        self,
        layers: Sequence[int] = LRESNET50E_LAYERS,
        *,
        widths: Sequence[int] = LRESNET_WIDTHS,
        input_size: tuple[int, int] = (112, 96),
        embedding_dim: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers, widths = tuple(int(n) for n in layers), tuple(int(c) for c in widths)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive unit counts, got {layers}")
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths must be 5 positive channel counts (stem + 4 stages), got {widths}")
        if len(input_size) != 2 or min(input_size) < 16 or any(s % 16 for s in input_size):
            raise ValueError(f"input_size must be (H, W) with multiples of 16 (SynFace: 112x96), got {input_size}")
        self.layers_spec = layers
        self.widths = widths
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.embedding_dim = int(embedding_dim)
        self.pixel_mean, self.pixel_std = 127.5, 127.5

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu1 = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], widths[1], layers[0])
        self.layer2 = self._make_layer(widths[1], widths[2], layers[1])
        self.layer3 = self._make_layer(widths[2], widths[3], layers[2])
        self.layer4 = self._make_layer(widths[3], widths[4], layers[3])
        fh, fw = downsampled_size(self.input_size[0]), downsampled_size(self.input_size[1])
        self.fc = nn.Sequential(
            nn.BatchNorm2d(widths[4]),
            nn.Dropout(p=dropout),
            nn.Flatten(),
            nn.Linear(widths[4] * fh * fw, self.embedding_dim),
            nn.BatchNorm1d(self.embedding_dim),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
        units = [BlockIR(inplanes, planes, 2, False)]
        units += [BlockIR(planes, planes, 1, True) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        check_image_batch(x, 3, self.input_size, type(self).__name__)
        x = self.prelu1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x)


def lresnet50e_ir(**kw) -> LResNet:
    """SynFace ``LResNet50E_IR([112, 96])``; ``layers=`` / ``widths=`` shrink it for tests."""
    return LResNet(**kw)
