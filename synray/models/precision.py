"""How a model runs on its device: autocast precision, memory format and ``torch.compile``.

One rule for every job (synthesis, LDM training, FR training): ``auto`` is bf16 on a CUDA device that
supports it, fp16 on other CUDA devices (with loss scaling when training) and fp32 on CPU, so a CPU run
computes exactly what it computed before these settings existed. Models stay plain float32 modules:
autocast runs their matmuls and convolutions in the low precision while the samplers' update
arithmetic, GroupNorm statistics, softmax and the VQ codebook search stay in float32
(:class:`AutocastModel` hands eps back as float32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["PRECISIONS", "resolve_precision", "precision_name", "autocast", "AutocastModel", "with_precision",
           "use_channels_last", "to_channels_last", "maybe_compile", "needs_loss_scaling"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(setting: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``setting`` on ``device`` (None: plain float32, no autocast).

    ``auto``: bf16 on CUDA with bf16 support, fp16 on other CUDA devices, fp32 elsewhere; ``mixed`` (the
    older ``amp: true``): as auto on CUDA, bf16 on CPU. Explicit ``bf16``/``fp16`` apply on CPU too (CPU
    autocast has both), which is how the numerics are checked without a GPU.
    """
    device = torch.device(device)
    if setting in ("auto", "mixed"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if setting == "mixed" else None
    try:
        return _DTYPES[setting]
    except KeyError:
        raise ValueError(f"unknown precision {setting!r}; valid: {', '.join(PRECISIONS)}") from None


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def needs_loss_scaling(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without a loss scale; bf16 has float32's exponent range and needs none."""
    return dtype == torch.float16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``, or a no-op context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class AutocastModel:
    """An eps-model called under autocast; eps comes back as float32 so the sampler's arithmetic stays float32.

    Extra outputs (UIFace's attention-logit lists) pass through as computed: they are fed back into the model,
    and the sampler's attention map promotes them to float32 itself. ``training`` mirrors the wrapped model,
    so :func:`synray.diffusion.sampling.sample` still refuses a model left in train mode.
    """

    def __init__(self, model: Callable, device: torch.device | str, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, torch.device(device), dtype

    @property
    def training(self) -> bool:
        return bool(getattr(self.model, "training", False))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=self.dtype):
            out = self.model(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].float(), *out[1:])
        return out.float()


def with_precision(model: Callable, device: torch.device | str, dtype: torch.dtype | None) -> Callable:
    """``model`` itself for float32 (bit-identical to calling it), else wrapped in :class:`AutocastModel`."""
    return model if dtype is None else AutocastModel(model, device, dtype)


def use_channels_last(setting: bool | None, device: torch.device | str, default_on_cuda: bool) -> bool:
    """``channels_last`` resolved: an explicit setting wins; None is ``default_on_cuda`` on CUDA, off elsewhere."""
    if setting is not None:
        return bool(setting)
    return default_on_cuda and torch.device(device).type == "cuda"


def to_channels_last(module: nn.Module, enabled: bool) -> nn.Module:
    """Convert 4-D parameters to NHWC in place (inputs follow: convolutions keep the layout they are given)."""
    return module.to(memory_format=torch.channels_last) if enabled else module


def maybe_compile(module: nn.Module, enabled: bool, **kwargs: Any) -> nn.Module:
    """``torch.compile(module)`` when enabled; the compiled module shares the parameters (saving ``module``
    keeps the plain state-dict keys)."""
    return torch.compile(module, **kwargs) if enabled else module
