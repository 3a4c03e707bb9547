"""Face-recognition backbones by name, and strict loading of their published checkpoints.

Every backbone built here exposes ``input_size`` (H, W), ``embedding_dim``, ``channel_order``
(``"RGB"``, or ``"BGR"`` for AdaFace weights), ``pixel_mean``/``pixel_std`` on the 0..255 scale and
``returns_norm`` (AdaFace's forward returns ``(x/|x|, |x|)`` instead of the raw embedding);
:mod:`synray.models.inputs` brings images to what a given backbone expects.

:func:`load_backbone` reads a checkpoint with ``weights_only=True``, unwraps the known containers
(insightface resume ``state_dict_backbone``, Lightning/SynFace ``state_dict``), keeps only the
backbone of an AdaFace Lightning checkpoint (``model.*``; its ``head.*`` margin-head entries are
dropped), strips ``module.``/``model.`` wrapper prefixes, converts between the TFace and insightface IR
layouts when the file has the other one (:mod:`synray.models.keymap`), and loads strictly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from synray.models.checkpoint import (
    WRAPPER_PREFIXES,
    CheckpointError,
    load_strict,
    normalize_keys,
    read_checkpoint,
)
from synray.models.iresnet import (
    elasticface_iresnet,
    iresnet,
    synthdistill_teacher_iresnet100,
)
from synray.models.irse import adaface_ir, tface_ir
from synray.models.keymap import (
    insightface_to_tface,
    state_layout,
    tface_to_insightface,
)
from synray.models.lresnet import lresnet50e_ir
from synray.models.tinyfar import tinyfar

# nested containers a backbone state dict is found under, most specific first
CONTAINER_KEYS = ("state_dict_backbone", "state_dict", "model_state_dict", "backbone")


@dataclass(frozen=True)
class BackboneInfo:
    """What a registry name builds: ``layout`` is the tensor-name family (``insightface``, ``tface``,
    ``tinyfar``, ``lresnet``); ``manifest`` the reference state-dict manifest, if one exists."""

    name: str
    builder: Callable[..., nn.Module]
    layout: str
    manifest: str | None
    source: str


def _entries() -> dict[str, BackboneInfo]:
    e: list[BackboneInfo] = []
    for depth in (18, 34, 50, 100, 200):
        e.append(BackboneInfo(f"iresnet{depth}", partial(iresnet, depth), "insightface",
                              f"insightface_iresnet{depth}" if depth in (18, 50, 100) else None,
                              f"insightface arcface_torch iresnet{depth}"))
    for depth in (50, 100):
        e.append(BackboneInfo(f"elasticface_iresnet{depth}", partial(elasticface_iresnet, depth), "insightface",
                              f"elasticface_iresnet{depth}", f"ElasticFace iresnet{depth} (dropout 0.4)"))
    e.append(BackboneInfo("synthdistill_teacher_iresnet100", synthdistill_teacher_iresnet100, "insightface",
                          "synthdistill_teacher_iresnet100_nizhib",
                          "SynthDistill teacher: nizhib/bob.bio.face iresnet100 (BN eps 2e-5)"))
    for depth in (18, 34, 50, 101):
        e.append(BackboneInfo(f"tface_ir{depth}", partial(tface_ir, depth), "tface",
                              f"tface_ir_{depth}" if depth in (18, 50, 101) else None, f"TFace IR_{depth}"))
    for depth in (18, 50, 101):
        e.append(BackboneInfo(f"adaface_ir{depth}", partial(adaface_ir, depth), "tface",
                              "adaface_ir_50" if depth == 50 else None,
                              f"AdaFace IR_{depth} (BGR input, returns (x/|x|, |x|))"))
    for v in "abc":
        e.append(BackboneInfo(f"tinyfar_{v}", partial(tinyfar, v), "tinyfar", f"synthdistill_tinyfar_{v}",
                              f"SynthDistill TinyFaR-{v.upper()} (timm 0.6.13 tinynet_{v} + Linear(1280, 512))"))
    e.append(BackboneInfo("lresnet50e_ir_112x96", lresnet50e_ir, "lresnet", "synface_lresnet50e_ir_112x96",
                          "SynFace LResNet50E-IR, 112x96 input"))
    return {i.name: i for i in e}


BACKBONES: dict[str, BackboneInfo] = _entries()


def register_backbone(name: str, builder: Callable[..., nn.Module], source: str = "", layout: str = "custom") -> None:
    """Add a backbone: ``builder(**backbone.kwargs)`` returns the ``nn.Module`` (with ``embedding_dim`` and
    ``input_size`` attributes, as the built-in ones have). Configs name it once its module is imported (``plugins``)."""
    BACKBONES[name] = BackboneInfo(name, builder, layout, None, source or name)


def list_backbones() -> list[str]:
    """All registry names, sorted."""
    return sorted(BACKBONES)


def backbone_info(name: str) -> BackboneInfo:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    return BACKBONES[name]


def build_backbone(name: str, **kw) -> nn.Module:
    """Build a fresh backbone. Keyword arguments go to its constructor, e.g. ``layers=(1, 1, 1, 1)``,
    ``widths=(8, 16, 32, 64)``, ``embedding_dim=64``, ``input_size=(56, 56)`` for a tiny iresnet or
    IR, ``width_multiplier``/``depth_multiplier`` for TinyFaR, ``dropout``, ``fp16``, ``use_se``."""
    info = backbone_info(name)
    try:
        return info.builder(**kw)
    except TypeError as exc:
        raise TypeError(f"backbone {name!r}: {exc}") from exc


def backbone_state(obj: Mapping, what: str = "checkpoint") -> dict[str, Tensor]:
    """The backbone tensors of a loaded checkpoint object, normalised (containers, prefixes, heads)."""
    state: Mapping = obj
    if not all(isinstance(v, Tensor) for v in state.values()):
        for key in CONTAINER_KEYS:
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                state = inner
                break
        else:
            raise CheckpointError(
                f"{what} holds no backbone state dict: top-level entries {list(obj)[:12]} are not all tensors "
                f"and none of {list(CONTAINER_KEYS)} is a tensor dict"
            )
    keys = list(state)
    if any(k.startswith("model.") for k in keys) and any(k.startswith("head.") for k in keys):
        # AdaFace Lightning checkpoint: backbone under model., margin head (kernel, t, batch stats) under head.
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return normalize_keys(state, strip=(*WRAPPER_PREFIXES, "model."))


def load_backbone(
    name: str,
    path: str | os.PathLike,
    *,
    container_key: str | None = None,
    convert: bool = True,
    source_bn_eps: float = 1e-5,
    **kw,
) -> nn.Module:
    """Build ``name`` and load a published checkpoint into it strictly; returns the model in eval mode.

    Args:
        container_key: pick this nested entry explicitly (otherwise :data:`CONTAINER_KEYS` are tried).
        convert: convert a TFace/AdaFace-layout file for an insightface-layout model and vice versa.
        source_bn_eps: BatchNorm eps of the model that wrote an insightface-layout file being converted
            to TFace layout (only affects folding its ``features`` BN).
        kw: constructor arguments, as for :func:`build_backbone`.

    Raises:
        CheckpointError: unreadable file, no state dict inside, an inconvertible layout, or a mismatch
            (the message names missing, unexpected and mis-shaped keys).
    """
    info = backbone_info(name)
    what = f"checkpoint {os.fspath(path)}"
    state = backbone_state(read_checkpoint(path, container_key), what)
    model = build_backbone(name, **kw)
    found = state_layout(state)
    if convert and found != info.layout and found in ("tface", "insightface"):
        if info.layout == "insightface" and found == "tface":
            state = tface_to_insightface(state, eps=model.bn1.eps)
        elif info.layout == "tface" and found == "insightface":
            state = insightface_to_tface(state, eps=source_bn_eps)
    load_strict(model, state, what=what)
    return model.eval()


__all__ = [
    "BACKBONES",
    "BackboneInfo",
    "CONTAINER_KEYS",
    "backbone_info",
    "backbone_state",
    "build_backbone",
    "register_backbone",
    "list_backbones",
    "load_backbone",
]
