"""Self-describing backbone checkpoints written by synray (what to build + its weights).

A synray-trained model is saved as ``{"synray_format": 1, "backbone": name, "kwargs": {...},
"state_dict": {...}}``: plain tensors, strings and numbers, so it loads with ``weights_only=True`` and
strictly, without the user repeating the architecture.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from synray.models.checkpoint import CheckpointError, load_strict
from synray.models.registry import build_backbone, list_backbones, load_backbone

FORMAT = 1


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_backbone(path: str | os.PathLike, name: str, model: nn.Module, kwargs: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (unwrapped from DDP if needed) atomically with its registry name and kwargs."""
    model = getattr(model, "module", model)
    blob = {"synray_format": FORMAT, "backbone": name, "kwargs": _plain(kwargs or {}),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **(extra or {})}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def read_exported(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("synray_format") != FORMAT:
        raise CheckpointError(f"{path} is not a synray backbone checkpoint (give '<backbone name>:{path}' for published weights)")
    return blob


def load_exported_backbone(path: str | os.PathLike) -> nn.Module:
    blob = read_exported(path)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in blob["kwargs"].items()}
    model = build_backbone(blob["backbone"], **kwargs)
    return load_strict(model, blob["state_dict"], what=f"checkpoint {os.fspath(path)}").eval()


def load_any_backbone(spec: str) -> nn.Module:
    """``"<registry name>:<published checkpoint>"`` or the path of a synray checkpoint."""
    name, sep, path = spec.partition(":")
    if sep and name in list_backbones():
        return load_backbone(name, path)
    return load_exported_backbone(spec)
