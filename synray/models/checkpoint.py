"""Strict checkpoint loading shared by every model family.

Published checkpoints differ only in wrappers (``module.``, ``_forward_module.``, ``eps_model.``,
Lightning's ``model.``) and containers (``state_dict``, ``G_state_dict``, ...). We normalise those and
then load strictly: a mismatch is an error naming the keys, never a silent ``strict=False``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from synray.errors import UserError

WRAPPER_PREFIXES = ("module.", "_module.", "_forward_module.")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model."""


def read_checkpoint(path: str | os.PathLike, container_key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a tensor dict with ``weights_only=True``; ``container_key`` picks a nested state dict."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-weights objects
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if container_key is not None:
        if not isinstance(obj, Mapping) or container_key not in obj:
            keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"checkpoint {path} has no '{container_key}' entry (top level: {keys})")
        obj = obj[container_key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds {type(obj).__name__}, not a state dict")
    return dict(obj)


def normalize_keys(
    state: Mapping[str, torch.Tensor],
    strip: Iterable[str] = WRAPPER_PREFIXES,
    drop: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Repeatedly strip leading wrapper prefixes and drop the named entries (e.g. schedule buffers)."""
    strip, drop = tuple(strip), set(drop)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in strip:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        if key in drop:
            continue
        if key in out:
            raise CheckpointError(f"two checkpoint entries normalise to the same key '{key}'")
        out[key] = value
    return out


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and shape-mismatched keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        def fmt(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f" ... (+{len(items) - 20} more)" if len(items) > 20 else "")
        parts = [f"{what} does not match {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {fmt(shapes)}")
        raise CheckpointError("; ".join(parts))


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """Check then ``load_state_dict(strict=True)``; returns the model."""
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True)
    return model
