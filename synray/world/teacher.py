"""A small face-recognition model trained in one process: the mini world's teacher, and a quick probe.

:func:`fit_identity_model` trains a tiny backbone with a CosFace head on labelled images in this
process (SGD, cosine LR, flips), for when a Ray Train job is more than the task needs: the world
teacher of the tests and benchmarks (:func:`fit_world_teacher`) and the LDM sweep objective, which
trains one on generated identities. Real training runs use :mod:`synray.training.recognition`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synray.models.export import save_backbone
from synray.models.heads import build_head
from synray.models.inputs import model_input, raw_embedding
from synray.models.registry import build_backbone
from synray.world.world import World

__all__ = ["TINY_IRESNET", "fit_identity_model", "fit_world_teacher"]

#: the default backbone: a one-block-per-stage iresnet with 64-d embeddings on 56x56 faces
TINY_IRESNET: dict[str, Any] = {"layers": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "embedding_dim": 64,
                                "input_size": (56, 56)}


def fit_identity_model(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    backbone: str = "iresnet18",
    kwargs: dict[str, Any] | None = None,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """Train a small FR model on labelled uint8 RGB images [N, H, W, 3] (CosFace, SGD, cosine LR, flips).

    Returns the model (eval mode) and its training accuracy (nearest class centre, last 10 batches) and loss.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    classes, y_all = np.unique(labels, return_inverse=True)
    kwargs = dict(kwargs or TINY_IRESNET)
    torch.manual_seed(seed)
    model = build_backbone(backbone, **kwargs)
    crops = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    x_all = model_input(model, crops)
    y_all = torch.from_numpy(y_all.astype(np.int64))
    head = build_head("cosface", model.embedding_dim, len(classes), s=30.0, m=0.35)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    loss = torch.zeros(())
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(y_all), (batch_size,), generator=gen)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x_all[idx].flip(3), x_all[idx])
        y = y_all[idx]
        loss = F.cross_entropy(head(raw_embedding(model(x)), y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - 10:  # accuracy of the nearest class centre over the last batches
            with torch.no_grad():
                cos = F.normalize(raw_embedding(model(x)), dim=1) @ F.normalize(head.kernel, dim=0)
                correct += int((cos.argmax(1) == y).sum())
                total += batch_size
    return model.eval(), {"train_accuracy": correct / max(total, 1), "loss": float(loss.detach())}


def fit_world_teacher(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    num_identities: int = 64,
    images_per_identity: int = 8,
    render_size: int = 64,
    difficulty: float = 0.5,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 0.1,
    backbone: str = "iresnet18",
    kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train a small FR model on world identities and save it as a synray checkpoint at ``path``.

    This is the mini world's stand-in for a pretrained teacher: it has learnt which rendered factors
    make an identity, so its embeddings carry real identity information for a student to distil.
    Returns the training accuracy and loss.
    """
    kwargs = dict(kwargs or TINY_IRESNET)
    world = World(seed=seed, num_identities=num_identities, difficulty=difficulty)
    images = np.stack([world.render(i, s, size=render_size) for i in range(num_identities)
                       for s in range(images_per_identity)])
    labels = np.repeat(np.arange(num_identities), images_per_identity)
    model, stats = fit_identity_model(images, labels, backbone=backbone, kwargs=kwargs, steps=steps,
                                      batch_size=batch_size, lr=lr, seed=seed)
    save_backbone(path, backbone, model, kwargs, extra={"trained_on": f"world seed={seed} ids={num_identities}"})
    return stats
