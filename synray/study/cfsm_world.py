"""Fitting a CFSM synthesis model on the built-in world (CFSM's stage 1, at the world's 32x32 scale).

CFSM (ECCV 2022, ``CFSM/train.py``) learns a style space of a *target* domain (WiderFace: low quality, wild
pose and light) on top of *source* faces, so that FR training can move its inputs towards that domain
adversarially. On the world the target domain is the hard end of the world's own nuisance (the renders of
``world-hard``: difficulty x1.6, strong pose, light and occlusion), the source the ordinary training renders.
Alternating iterations, as the reference does:

* random style ``o ~ N(0, I)``: least-squares GAN loss of ``G(x, o)`` against a discriminator of target
  images, plus ``lambda_id * (d_id(x, G(x, o)) - d(|o|))^2``, where ``d_id`` is the cosine distance of a
  frozen FR model's embeddings (the world teacher here, IR-SE-50 in CFSM) and ``d(|o|)`` maps ``|o|`` in
  [0, 6] linearly onto [0.05, 0.65]: a larger style moves the identity further, by a known amount;
* ``o = 0``: L1 reconstruction of the source image;
* both with the basis orthogonality term; the discriminator is trained on target vs synthesised images.

Differences from the reference, for the world's size: a smaller generator (``dim``, residual blocks, code
width) and one discriminator scale instead of three at 32x32. Adam 1e-4, betas (0.5, 0.999), lambda_id 8, as
published. Plain torch; the result is a ``G_state_dict`` checkpoint that ``cfsm.checkpoint`` loads.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synray.models.cfsm import CFSMGenerator

__all__ = ["WORLD_GENERATOR", "Discriminator", "target_distance", "fit_cfsm"]

#: the generator the world's CFSM model uses (``cfsm.generator`` of a train config)
WORLD_GENERATOR: dict[str, Any] = {"dim": 16, "n_residual": 2, "n_downsample": 2, "latent_dim": 32, "style_dim": 10}
#: CFSM/train.py: |o| in [la, ua] -> identity cosine distance in [lm, um]; identity loss weight
LA, UA, LM, UM, LAMBDA_ID = 0.0, 6.0, 0.05, 0.65, 8.0


def target_distance(style: torch.Tensor) -> torch.Tensor:
    """The identity distance a style of norm |o| should cause: linear from (la, lm) to (ua, um)."""
    norm = torch.norm(style, dim=1, keepdim=True)
    return (norm - LA) * (UM - LM) / (UA - LA) + LM


class Discriminator(nn.Module):
    """PatchGAN scores of [-1, 1] images (MUNIT's discriminator at one scale)."""

    def __init__(self, dim: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, dim, 4, 2, 1), nn.LeakyReLU(0.2)]
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(dim, dim * 2, 4, 2, 1), nn.InstanceNorm2d(dim * 2), nn.LeakyReLU(0.2)]
            dim *= 2
        blocks += [nn.Conv2d(dim, 1, 3, 1, 1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, target: float) -> torch.Tensor:
        """Least-squares GAN loss: mean((D(x) - target)^2)."""
        return torch.mean((self(x) - target) ** 2)


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (CFSM's normalisation)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def fit_cfsm(source: np.ndarray, target: np.ndarray, embed: nn.Module, steps: int = 2000, batch_size: int = 32,
             lr: float = 1e-4, seed: int = 0, log_every: int = 0, log=print) -> tuple[CFSMGenerator, dict[str, float]]:
    """Train a :class:`CFSMGenerator` (:data:`WORLD_GENERATOR`) mapping ``source`` images towards ``target``'s domain.

    ``embed``: a frozen FR model taking [-1, 1] images of the generator's size and returning embeddings.
    Returns the generator (eval, frozen) and its losses: each the mean over the last quarter of the steps that
    computed it (one batch's value swings several-fold with its random styles), plus ``first/<name>``, the mean
    over the first quarter, to show what the fit learnt.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G, D = CFSMGenerator(**WORLD_GENERATOR), Discriminator()
    embed = embed.eval().requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    src, tgt = _to_input(source), _to_input(target)
    last: dict[str, float] = {}
    history: dict[str, list[float]] = {}
    for it in range(steps):
        x = src[torch.randint(0, len(src), (batch_size,), generator=gen)]
        y = tgt[torch.randint(0, len(tgt), (batch_size,), generator=gen)]
        G.train()
        if it % 2 == 0:
            o = torch.randn(batch_size, G.style_dim, generator=gen)
            _, fake, regu = G(x, o)
            d_id = 1.0 - F.cosine_similarity(embed(x), embed(fake)).unsqueeze(1)
            loss_id = torch.mean((d_id - target_distance(o)) ** 2)
            loss_gan = D.loss(fake, 1.0)
            loss_g = loss_gan + LAMBDA_ID * loss_id + regu
            values = {"gan": float(loss_gan.detach()), "identity": float(loss_id.detach())}
        else:
            _, fake, regu = G(x, torch.zeros(batch_size, G.style_dim))
            loss_pix = torch.mean(torch.abs(x - fake))
            loss_g = loss_pix + regu
            values = {"pixel": float(loss_pix.detach())}
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        loss_d = D.loss(y, 1.0) + D.loss(fake.detach(), 0.0)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        values.update(discriminator=float(loss_d.detach()), regu=float(torch.as_tensor(regu).detach()))
        last.update(values)
        for k, v in values.items():
            history.setdefault(k, []).append(v)
        if log_every and (it + 1) % log_every == 0:
            log(f"[synray study] CFSM step {it + 1}/{steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(last.items())))
    return G.eval().requires_grad_(False), _summary(history)


def _summary(history: dict[str, list[float]]) -> dict[str, float]:
    """Each loss's mean over the last quarter of its values, and ``first/<name>`` over the first quarter."""
    out: dict[str, float] = {}
    for k, values in sorted(history.items()):
        n = max(1, len(values) // 4)
        out[k] = float(np.mean(values[-n:]))
        out[f"first/{k}"] = float(np.mean(values[:n]))
    return out


def save_cfsm(G: CFSMGenerator, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """A ``G_state_dict`` checkpoint (what ``cfsm.checkpoint`` and :func:`synray.models.cfsm.load_generator` read)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"G_state_dict": {k: v.detach().cpu() for k, v in G.state_dict().items()}, "fit": meta}, tmp)
    os.replace(tmp, path)
