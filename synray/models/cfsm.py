"""CFSM's controllable face synthesis network, used as a frozen adversarial augmenter in FR training.

MUNIT-style generator (CFSM ``GuidedFaceRecognition/synthesis_network.py``, ``Generator(dim=64,
n_downsample=2, n_residual=3, style_dim=10, latent_dim=128)``) with the reference tensor names:

* ``encoder``: reflect-pad 7x7 conv 3->64 + InstanceNorm + ReLU, two 4x4 stride-2 convs (+IN+ReLU)
  to 256 channels, 3 residual blocks with InstanceNorm;
* ``decoder``: 3 residual blocks with AdaIN, two (nearest x2 upsample, 5x5 conv, per-sample
  LayerNorm, ReLU), reflect-pad 7x7 conv -> 3 channels, tanh; ``decoder.mlp`` maps the 128-d style
  code to all AdaIN (bias, scale) pairs (3072 numbers);
* ``pca``: learned basis ``U`` (10x128, orthogonal init) and mean ``mu``: code = o @ U + mu.

``forward(x, o)`` returns ``(code, image, regu)`` with ``regu = mean((U U^T - I)^2)``; ``x`` is a
normalised [-1, 1] image batch (112x112 in CFSM), ``o`` the (N, 10) style coefficients. Everything is
differentiable in ``o``, which is what the adversarial step (one signed-gradient ascent step on the FR
loss, projected to a box around the sampled ``o``) needs. AdaIN parameters are passed through the
forward call instead of being stored on the modules, so concurrent calls cannot mix styles; the
AdaIN ``running_mean``/``running_var`` buffers are kept only because the checkpoints contain them (the
reference never uses them: AdaIN always normalises with instance statistics).

Released checkpoint: ``WiderFace70K.pth`` with the generator under ``G_state_dict``
(:func:`load_generator`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synray.models.checkpoint import (
    CheckpointError,
    load_strict,
    normalize_keys,
    read_checkpoint,
)


class AdaptiveInstanceNorm2d(nn.Module):
    """Instance norm whose per-sample scale/bias come from the style MLP (MUNIT)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``weight``/``bias``: (N, C) scale and shift for each sample and channel."""
        b, c, h, w = x.shape
        out = F.batch_norm(
            x.contiguous().view(1, b * c, h, w), None, None,
            weight.contiguous().view(-1), bias.contiguous().view(-1), True, self.momentum, self.eps,
        )
        return out.view(b, c, h, w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features})"


class LayerNorm(nn.Module):
    """CFSM's LayerNorm: per-sample mean and *unbiased* std over (C, H, W), ``(x - m) / (s + eps)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.affine = affine
        self.eps = eps
        if affine:
            self.gamma = nn.Parameter(torch.empty(num_features).uniform_())
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = [-1] + [1] * (x.dim() - 1)
        flat = x.reshape(x.size(0), -1)
        x = (x - flat.mean(1).view(*shape)) / (flat.std(1).view(*shape) + self.eps)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            x = x * self.gamma.view(*shape) + self.beta.view(*shape)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, features: int, norm: str = "in") -> None:
        super().__init__()
        norm_layer = AdaptiveInstanceNorm2d if norm == "adain" else nn.InstanceNorm2d
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(features, features, 3),
            norm_layer(features),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(features, features, 3),
            norm_layer(features),
        )

    def adain_layers(self) -> list[AdaptiveInstanceNorm2d]:
        return [m for m in self.block if isinstance(m, AdaptiveInstanceNorm2d)]

    def forward(self, x: Tensor, adain: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        out, k = x, 0
        for m in self.block:
            if isinstance(m, AdaptiveInstanceNorm2d):
                if adain is None:
                    raise ValueError("an AdaIN residual block needs style parameters")
                out = m(out, *adain[k])
                k += 1
            else:
                out = m(out)
        return x + out


class MLP(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, dim: int = 256, n_blk: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(input_dim, dim), nn.ReLU()]
        for _ in range(n_blk - 2):
            layers += [nn.Linear(dim, dim), nn.ReLU()]
        layers += [nn.Linear(dim, output_dim)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.view(x.size(0), -1))


class Encoder(nn.Module):
    def __init__(self, in_channels: int = 3, dim: int = 64, n_residual: int = 3, n_downsample: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, dim, 7), nn.InstanceNorm2d(dim), nn.ReLU()
        ]
        for _ in range(n_downsample):
            layers += [nn.Conv2d(dim, dim * 2, 4, stride=2, padding=1), nn.InstanceNorm2d(dim * 2), nn.ReLU()]
            dim *= 2
        layers += [ResidualBlock(dim, norm="in") for _ in range(n_residual)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class Decoder(nn.Module):
    def __init__(
        self, out_channels: int = 3, dim: int = 64, n_residual: int = 3, n_upsample: int = 2, latent_dim: int = 128
    ) -> None:
        super().__init__()
        dim = dim * 2**n_upsample
        layers: list[nn.Module] = [ResidualBlock(dim, norm="adain") for _ in range(n_residual)]
        for _ in range(n_upsample):
            layers += [
                nn.Upsample(scale_factor=2),
                nn.Conv2d(dim, dim // 2, 5, stride=1, padding=2),
                LayerNorm(dim // 2),
                nn.ReLU(),
            ]
            dim //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(dim, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.mlp = MLP(latent_dim, self.num_adain_params())

    def adain_layers(self) -> list[AdaptiveInstanceNorm2d]:
        return [m for m in self.modules() if isinstance(m, AdaptiveInstanceNorm2d)]

    def num_adain_params(self) -> int:
        return sum(2 * m.num_features for m in self.adain_layers())

    def forward(self, content: Tensor, style_code: Tensor) -> Tensor:
        params = self.mlp(style_code)
        # per AdaIN layer, in module order: first C numbers are the bias (mean), next C the scale (std)
        pairs: list[tuple[Tensor, Tensor]] = []
        offset = 0
        for m in self.adain_layers():
            c = m.num_features
            pairs.append((params[:, offset + c: offset + 2 * c], params[:, offset: offset + c]))
            offset += 2 * c
        x, k = content, 0
        for m in self.model:
            if isinstance(m, ResidualBlock):
                n = len(m.adain_layers())
                x = m(x, pairs[k: k + n])
                k += n
            else:
                x = m(x)
        return x


class SubspaceLayer(nn.Module):
    """Style code = o @ U + mu with a learned (n_basis x dim) basis, orthogonally initialised."""

    def __init__(self, dim: int = 128, n_basis: int = 10) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.empty(n_basis, dim))
        nn.init.orthogonal_(self.U)
        self.mu = nn.Parameter(torch.zeros(dim))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.U + self.mu


class CFSMGenerator(nn.Module):
    """CFSM ``Generator``; ``forward(x, o) -> (code, image, regu)`` (see module docstring)."""

    def __init__(
        self,
        in_channels: int = 3,
        dim: int = 64,
        n_residual: int = 3,
        n_downsample: int = 2,
        latent_dim: int = 128,
        style_dim: int = 10,
    ) -> None:
        super().__init__()
        self.style_dim = style_dim
        self.latent_dim = latent_dim
        self.n_downsample = n_downsample
        self.input_size = (112, 112)
        self.encoder = Encoder(in_channels=in_channels, dim=dim, n_residual=n_residual, n_downsample=n_downsample)
        self.decoder = Decoder(out_channels=3, dim=dim, n_upsample=n_downsample, n_residual=n_residual,
                               latent_dim=latent_dim)
        self.pca = SubspaceLayer(dim=latent_dim, n_basis=style_dim)
        for m in self.modules():  # CFSM's weights_init_normal (conv weights only)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def _check(self, x: Tensor, style: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(getattr(x, "shape", ()))
            raise ValueError(f"CFSM generator expects an (N, 3, H, W) image batch, got {shape}")
        f = 2**self.n_downsample
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"CFSM generator needs H and W divisible by {f}, got {x.shape[2]}x{x.shape[3]}")
        if not isinstance(style, Tensor) or style.shape != (x.shape[0], self.style_dim):
            raise ValueError(
                f"style coefficients must have shape ({x.shape[0]}, {self.style_dim}), "
                f"got {tuple(getattr(style, 'shape', ()))}"
            )

    def orthogonality(self) -> Tensor:
        """mean((U U^T - I)^2), the basis regulariser returned by forward."""
        uut = self.pca.U @ self.pca.U.t()
        return ((uut - torch.eye(uut.shape[0], device=uut.device, dtype=uut.dtype)) ** 2).mean()

    def forward(self, x: Tensor, style: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check(x, style)
        code = self.pca(style)
        out = self.decoder(self.encoder(x), code)
        return code, out, self.orthogonality()

    def generate(self, x: Tensor, style: Tensor) -> Tensor:
        """Only the synthesised image (normalised [-1, 1], same size as ``x``)."""
        return self.forward(x, style)[1]

    def sample_style(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """o ~ N(0, I) as CFSM draws it for each augmented image."""
        p = self.pca.U
        return torch.randn(batch, self.style_dim, generator=generator, dtype=p.dtype).to(p.device)


def load_generator(path: str | os.PathLike, freeze: bool = True, **kw) -> CFSMGenerator:
    """Read a CFSM checkpoint (``G_state_dict`` container or a plain state dict) strictly.

    The model is returned in eval mode; with ``freeze`` its parameters do not require grad (CFSM
    keeps the generator fixed while training the FR model; gradients still flow to the style input).
    """
    raw = read_checkpoint(path)
    state = raw.get("G_state_dict", raw) if isinstance(raw, dict) else raw
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {os.fspath(path)} has no CFSM generator state dict (keys: {list(raw)[:10]})")
    model = CFSMGenerator(**kw)
    load_strict(model, normalize_keys(state), what=f"checkpoint {os.fspath(path)}")
    model.eval()
    if freeze:
        model.requires_grad_(False)
    return model
