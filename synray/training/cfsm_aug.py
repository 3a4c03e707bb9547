"""CFSM adversarial augmentation: a style step that *raises* the FR loss, and the 75/25 batch mix.

CFSM (ECCV 2022, ``GuidedFaceRecognition/adversarial_regu.py``) keeps its synthesis network G frozen
and, for each batch of normalised images x with labels y, draws style coefficients o0 ~ N(0, I),
takes k (=1) signed-gradient ascent steps on the FR loss of G(x, o),
``o <- o + alpha·sign(grad_o L)`` projected to the box [o0 - eps, o0 + eps] (alpha = eps = 0.314), and
synthesises x_syn = G(x, o). The FR model then trains on a random ``floor(0.75·B)`` subset of the
real images concatenated with an independent random ``floor(0.25·B)`` subset of the synthesised ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["adversarial_styles", "real_synth_indices", "CFSM_EPSILON", "CFSM_ALPHA", "CFSM_REAL_RATIO"]

#: ``configs/arcface_ms1mv2_r50_ours.py``: step size and box radius in style space, real share of a batch.
CFSM_EPSILON = 0.314
CFSM_ALPHA = 0.314
CFSM_REAL_RATIO = 0.75


def adversarial_styles(
    generator: nn.Module,
    images: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    epsilon: float = CFSM_EPSILON,
    alpha: float = CFSM_ALPHA,
    steps: int = 1,
    styles: Tensor | None = None,
    rng: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(styles, synthesised images)`` after ``steps`` signed-gradient ascent steps.

    ``generator`` maps ``(images, styles)`` to ``(code, image, regu)`` (:class:`~synray.models.cfsm.CFSMGenerator`);
    ``loss_fn`` is the FR loss of a batch of synthesised images; ``styles`` (N, style_dim) are the
    starting coefficients o0 (drawn N(0, I) from ``rng`` when omitted). Only the styles are
    differentiated: no gradient reaches the FR model's or the generator's parameters.
    """
    if epsilon < 0 or alpha < 0 or steps < 0:
        raise ValueError(f"epsilon, alpha and steps must be >= 0, got {epsilon}, {alpha}, {steps}")
    n = images.shape[0]
    if styles is None:
        styles = torch.randn(n, generator.style_dim, generator=rng).to(images.device, images.dtype)
    if styles.shape != (n, generator.style_dim):
        raise ValueError(f"styles must have shape ({n}, {generator.style_dim}), got {tuple(styles.shape)}")
    o0 = styles.detach()
    o = o0.clone()
    for _ in range(steps):
        o.requires_grad_(True)
        loss = loss_fn(generator(images, o)[1])
        (grad,) = torch.autograd.grad(loss, o)
        o = o.detach() + alpha * grad.sign()
        o = torch.min(torch.max(o, o0 - epsilon), o0 + epsilon)
    with torch.no_grad():
        synth = generator(images, o)[1]
    return o.detach(), synth


def real_synth_indices(batch_size: int, real_ratio: float = CFSM_REAL_RATIO, rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Independent random row subsets: ``floor(real_ratio·B)`` real rows, ``floor((1-real_ratio)·B)`` synthesised."""
    if not 0.0 <= real_ratio <= 1.0:
        raise ValueError(f"real_ratio must lie in [0, 1], got {real_ratio}")
    n_real = int(math.floor(real_ratio * batch_size))
    n_syn = int(math.floor((1.0 - real_ratio) * batch_size))
    real = torch.randperm(batch_size, generator=rng)[:n_real]
    syn = torch.randperm(batch_size, generator=rng)[:n_syn]
    return real, syn
