"""SynthDistill pure math: the fixed StyleGAN face crop, latent resampling and the KD loss.

SynthDistill trains a small student to reproduce a teacher's raw embeddings on StyleGAN2 faces.
Each iteration has two optimiser steps: one on fresh latents, and one on latents *resampled* around
the first batch. The resampling moves every latent ``w`` by Gaussian noise scaled by how well the
student already matched the teacher on it, ``c = (cos(e_s, e_t) + 1) / 2``:

    w' = w + resampling_coef * c * n,   n ~ N(0, I)

so easy samples (c near 1) are pushed further away and hard ones (c near 0) stay close, keeping the
student on the faces it still gets wrong. ``resampling_coef`` is therefore the standard deviation of
the W-space step for a perfectly matched sample.

FFHQ-aligned StyleGAN output needs no landmarks: :func:`crop_and_resize` cuts a fixed box around the
eye positions of the FFHQ alignment and resizes it to 112x112, like SynthDistill's ``Crop_and_resize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CropGeometry", "crop_geometry", "crop_and_resize", "resampling_weights", "resample_latents",
    "kd_loss", "kd_metrics",
]

#: Eye centres (row, col) in a 1024x1024 FFHQ-aligned frame, and their targets in the 112 crop.
FFHQ_EYES_1024 = {"reye": (480, 380), "leye": (480, 650)}
CROP_EYES_112 = {"reye": (51.6, 38.2946), "leye": (51.6, 73.5318)}
CROP_SIZE = (112, 112)


@dataclass(frozen=True)
class CropGeometry:
    alpha: float  #: scale from source pixels to crop pixels
    c0: tuple[float, float]  #: (row, col) of the crop's top-left corner in the source
    c1: tuple[float, float]  #: (row, col) of the crop's bottom-right corner
    rows: tuple[int, int]  #: integer slice actually cut (truncated, as the reference does)
    cols: tuple[int, int]


def crop_geometry(height: int, width: int) -> CropGeometry:
    """The crop box for a ``height`` x ``width`` image (eye positions scaled with ``int()``)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    reye = (int(FFHQ_EYES_1024["reye"][0] / 1024 * height), int(FFHQ_EYES_1024["reye"][1] / 1024 * width))
    leye = (int(FFHQ_EYES_1024["leye"][0] / 1024 * height), int(FFHQ_EYES_1024["leye"][1] / 1024 * width))
    if leye[1] == reye[1]:
        raise ValueError(f"image of width {width} is too small for the fixed eye crop")
    alpha = (CROP_EYES_112["leye"][1] - CROP_EYES_112["reye"][1]) / (leye[1] - reye[1])
    c0 = np.array(reye) - 1 / alpha * np.array(CROP_EYES_112["reye"])
    c1 = c0 + np.array(CROP_SIZE) / alpha
    return CropGeometry(
        alpha=float(alpha), c0=(float(c0[0]), float(c0[1])), c1=(float(c1[0]), float(c1[1])),
        rows=(int(c0[0]), int(c1[0])), cols=(int(c0[1]), int(c1[1])),
    )


def crop_and_resize(images: Tensor) -> Tensor:
    """Crop [N, C, H, W] images (values in [0, 1]) around the FFHQ eyes and resize to 112x112.

    Bilinear ``F.interpolate(align_corners=False)``; for 256 input the box is rows 21:234, cols 22:235.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    g = crop_geometry(images.shape[2], images.shape[3])
    crop = images[:, :, g.rows[0]:g.rows[1], g.cols[0]:g.cols[1]]
    return F.interpolate(crop, mode="bilinear", size=CROP_SIZE, align_corners=False)


def resampling_weights(emb_student: Tensor, emb_teacher: Tensor) -> Tensor:
    """c = (cos(e_s, e_t) + 1) / 2 per sample, in [0, 1]."""
    if emb_student.shape != emb_teacher.shape or emb_student.dim() != 2:
        raise ValueError(
            f"student {tuple(emb_student.shape)} and teacher {tuple(emb_teacher.shape)} embeddings must both be [B, D]"
        )
    return (F.cosine_similarity(emb_student, emb_teacher) + 1) / 2.0


def resample_latents(
    w: Tensor, emb_student: Tensor, emb_teacher: Tensor, resampling_coef: float = 1.0,
    noise: Tensor | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """New latents w' [B, num_ws, D] from the first of the (identical) ws and a N(0, I) draw.

    ``noise`` ([B, D]) injects the draw; otherwise it comes from ``generator``. Use the student's
    embeddings from *before* the optimiser step on ``w``, as the reference does.
    """
    if w.dim() != 3:
        raise ValueError(f"w must be [B, num_ws, D], got shape {tuple(w.shape)}")
    b, num_ws, dim = w.shape
    coef = resampling_weights(emb_student, emb_teacher).detach()
    if coef.shape[0] != b:
        raise ValueError(f"{coef.shape[0]} embeddings for {b} latents")
    if noise is None:
        noise = torch.randn(b, dim, generator=generator, device=w.device, dtype=w.dtype)
    elif noise.shape != (b, dim):
        raise ValueError(f"noise must have shape [{b}, {dim}], got {tuple(noise.shape)}")
    w_ = w[:, 0, :] + coef.unsqueeze(1) * resampling_coef * noise
    return w_.unsqueeze(1).repeat([1, num_ws, 1])


def kd_loss(emb_student: Tensor, emb_teacher: Tensor) -> Tensor:
    """SynthDistill's loss: MSE between raw student and teacher embeddings (mean over B x D)."""
    if emb_student.shape != emb_teacher.shape:
        raise ValueError(f"student {tuple(emb_student.shape)} and teacher {tuple(emb_teacher.shape)} embeddings differ in shape")
    return F.mse_loss(emb_student, emb_teacher, reduction="mean")


def kd_metrics(emb_student: Tensor, emb_teacher: Tensor) -> dict[str, float]:
    """The logged pair: ``mse`` (the loss) and mean cosine ``cos``."""
    with torch.no_grad():
        return {
            "mse": float(kd_loss(emb_student, emb_teacher)),
            "cos": float(F.cosine_similarity(emb_student, emb_teacher).mean()),
        }
