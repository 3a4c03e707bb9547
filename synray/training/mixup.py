"""SynFace identity mixup (soft labels) and domain mixup (blending a few real images in), as maths.

Identity mixup: a synthetic image rendered from the blend ``phi·id_a + (1-phi)·id_b`` carries the soft
label (a, phi, b, 1-phi); shards store it as ``identity``, ``mix_weight`` = phi and ``identity_b``
(-1 when unmixed). Domain mixup: each synthetic batch is blended pixel-wise with a batch of
real-labelled images (classes offset after the synthetic ones), ``x = lam·x_syn + (1-lam)·x_real`` with
``lam`` drawn per batch from SynFace's 21-value grid {0, 0.05, ..., 1}.

Both become per-row targets with weights ``alpha``: ``lam·w_a`` on a, ``lam·w_b`` on b, ``1-lam`` on
the real class. The logits mix the margin head run once per target (the margin lands on that target's
column) with the same weights, and the loss is ``sum_k mean_i(alpha_ik · CE(logits_i, c_ik))``
(SynFace ``lib/core/functions.py``). ``lam=1`` with unmixed rows is ordinary margin-softmax training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from synray.synthesis.contexts import SYNFACE_LAMBDAS

__all__ = [
    "Target", "SYNFACE_LAMBDAS", "sample_lambda", "mix_images", "synface_targets", "mixed_logits", "soft_cross_entropy",
]

@dataclass
class Target:
    """One target per row: class ids (-1: none) and the weight ``alpha`` of that target's CE term."""

    labels: Tensor
    weights: Tensor

    def index(self, idx: Tensor) -> Target:
        return Target(self.labels[idx], self.weights[idx])


def sample_lambda(rng: np.random.Generator, grid: Sequence[float] = SYNFACE_LAMBDAS) -> float:
    """One ``lam`` drawn uniformly from ``grid`` (one per batch, as SynFace does)."""
    if len(grid) == 0:
        raise ValueError("the lambda grid is empty")
    return float(grid[int(rng.integers(0, len(grid)))])


def mix_images(x_syn: Tensor, x_real: Tensor, lam: float) -> Tensor:
    """``lam·x_syn + (1-lam)·x_real`` on normalised image batches of equal shape."""
    if x_syn.shape != x_real.shape:
        raise ValueError(f"domain mixup needs equal batches, got synthetic {tuple(x_syn.shape)} and real {tuple(x_real.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    return lam * x_syn + (1.0 - lam) * x_real


def synface_targets(
    label_a: Tensor, weight_a: Tensor | None = None, label_b: Tensor | None = None,
    real_label: Tensor | None = None, lam: float = 1.0,
) -> list[Target]:
    """Per-row targets of a (mixed) batch.

    ``label_a``/``weight_a``/``label_b`` are the identity soft labels (``label_b`` -1 where the image
    is unmixed, whose ``weight_a`` is then taken as 1); ``real_label`` the classes of the real images
    blended in with weight ``1-lam``. Rows of one target share the tensor; weights are ``alpha``.

    The list's length depends only on which arguments are given, never on their values (a target
    may have all-zero weights): class-sharded training runs collectives per target, and every worker
    must run the same ones.
    """
    n = label_a.shape[0]
    if weight_a is None:
        weight_a = torch.ones(n, dtype=torch.float32, device=label_a.device)
    for name, t in (("weight_a", weight_a), ("label_b", label_b), ("real_label", real_label)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if real_label is None and lam != 1.0:
        raise ValueError("lam < 1 needs the real labels of the blended images")
    w_a = weight_a.float() if label_b is None else torch.where(label_b >= 0, weight_a.float(), torch.ones_like(weight_a, dtype=torch.float32))
    targets = [Target(label_a, lam * w_a)]
    if label_b is not None:
        targets.append(Target(label_b, torch.where(label_b >= 0, lam * (1.0 - w_a), torch.zeros_like(w_a))))
    if real_label is not None:
        targets.append(Target(real_label, torch.full_like(w_a, 1.0 - lam)))
    return targets


def mixed_logits(head: Callable[[Tensor, Tensor], Tensor], embeddings: Tensor, targets: Sequence[Target]) -> Tensor:
    """``sum_k alpha_k · head(embeddings, labels_k)``: the margin sits on each target's own column."""
    out = None
    for t in targets:
        logits = head(embeddings, t.labels)
        part = t.weights.view(-1, 1).to(logits.dtype) * logits
        out = part if out is None else out + part
    if out is None:
        raise ValueError("at least one target is needed")
    return out


def soft_cross_entropy(logits: Tensor, targets: Sequence[Target]) -> Tensor:
    """``sum_k mean_i(alpha_ik · CE(logits_i, c_ik))``; rows whose label is -1 contribute nothing."""
    loss = logits.new_zeros(())
    for t in targets:
        ce = F.cross_entropy(logits, t.labels.clamp(min=0), reduction="none")
        w = torch.where(t.labels >= 0, t.weights.to(logits.dtype), torch.zeros_like(ce))
        loss = loss + (w * ce).mean()
    return loss
