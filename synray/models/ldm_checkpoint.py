"""Strict loading and writing of the published IDiff-Face / ADMIS / UIFace diffusion checkpoints.

Published ``ema_averaged_model*.ckpt`` / ``model*.ckpt`` files are flat state dicts of the reference
DDPM wrapper: the UNet under ``eps_model.`` plus eight schedule buffers, with an optional leading
``module.`` / ``_module.`` / ``_forward_module.`` from Lightning and DDP. The reference samplers strip
these by substring replacement and load with ``strict=False``; here the keys are normalised and then
loaded strictly, so a wrong or truncated file is an error naming the keys. The VQ first-stage files
(``first_stage_{encoder,decoder}_state_dict.pt``) load strictly into :mod:`synray.models.vq`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from synray.diffusion.schedule import BUFFER_NAMES
from synray.models.checkpoint import (
    WRAPPER_PREFIXES,
    CheckpointError,
    check_state_dict,
    normalize_keys,
    read_checkpoint,
)
from synray.models.unet import FLAVOURS, ConditionalUNet, UNetConfig
from synray.models.vq import VQConfig, VQDecoder, VQEncoder

__all__ = [
    "SCHEDULE_BUFFERS",
    "UNET_PREFIX",
    "normalize_unet_state",
    "infer_unet_config",
    "load_unet",
    "save_unet_checkpoint",
    "load_vq_encoder",
    "load_vq_decoder",
]

UNET_PREFIX = "eps_model."

# The DDPM wrapper's buffers stored beside the UNet (ddpm_checkpoint_layout.json), in wrapper order.
SCHEDULE_BUFFERS: tuple[str, ...] = BUFFER_NAMES


def normalize_unet_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (repeatedly), then ``eps_model.``; drop the eight schedule buffers."""
    state = normalize_keys(state, strip=WRAPPER_PREFIXES)
    return normalize_keys(state, strip=(UNET_PREFIX,), drop=SCHEDULE_BUFFERS)


def _need(state: Mapping[str, torch.Tensor], key: str, path: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{path}: cannot infer the UNet config, key '{key}' is missing "
                              f"(first keys: {list(state)[:5]})")
    return state[key]


def infer_unet_config(state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> UNetConfig:
    """Read the architecture off a normalised UNet state dict.

    Widths, levels, attention placement, context sizes and the condition type follow from the key
    names and shapes; the flavour (UIFace or IDiff-Face/ADMIS) from ``empty_context_embedding``, which
    also selects the published training flags. ``attention_heads`` cannot be told from shapes (the
    reference's one-head-per-32-channels is assumed); override it if a checkpoint differs.
    """
    proj = _need(state, "image_proj.weight", what)
    ctx = _need(state, "context_emb.weight", what)
    initial, input_channels = int(proj.shape[0]), int(proj.shape[1])
    context_channels, context_input = int(ctx.shape[0]), int(ctx.shape[1])
    pat = re.compile(r"^down\.(\d+)\.")
    indices = sorted({int(m.group(1)) for k in state if (m := pat.match(k))})
    if not indices or indices != list(range(len(indices))):
        raise CheckpointError(
            f"{what}: cannot infer the UNet config, 'down.*' modules are missing or not contiguous")
    levels: list[list[int]] = [[]]
    for i in indices:
        if f"down.{i}.conv.weight" in state:
            levels.append([])
        else:
            levels[-1].append(i)
    n_blocks = len(levels[0])
    if n_blocks == 0 or any(len(lv) != n_blocks for lv in levels):
        raise CheckpointError(f"{what}: cannot infer the UNet config, uneven blocks per level "
                              f"{[len(lv) for lv in levels]}")
    widths = [int(_need(state, f"down.{lv[-1]}.res.conv1.weight", what).shape[0]) for lv in levels]
    mults, prev = [], initial
    for w in widths:
        if w % prev:
            raise CheckpointError(f"{what}: level widths {widths} are not cumulative multiples of {initial}")
        mults.append(w // prev)
        prev = w
    attention = [any(_prefixed(state, f"down.{i}.attn.") for i in lv) for lv in levels]
    adagn = any(".res.context_emb." in k for k in state)
    head_channels = 32
    if not adagn:
        # Tokens per context = head channels; a corrupt shape keeps the default and fails the strict check.
        c_proj = next((v for k, v in state.items() if k.endswith(".attn.c_proj_in.weight")), None)
        if c_proj is not None and c_proj.dim() == 2 and int(c_proj.shape[0]) % context_channels == 0:
            head_channels = int(c_proj.shape[0]) // context_channels or head_channels
    flavour = "uiface" if "empty_context_embedding" in state else "idiff_face"
    try:
        return UNetConfig(
            input_channels=input_channels,
            initial_channels=initial,
            channel_multipliers=tuple(mults),
            is_attention=tuple(attention),
            attention_head_channels=head_channels,
            n_blocks_per_resolution=n_blocks,
            condition_type="AdaGN" if adagn else "CA",
            context_input_channels=context_input,
            context_channels=context_channels,
            **FLAVOURS[flavour],
        )
    except ValueError as exc:
        raise CheckpointError(f"{what}: cannot infer the UNet config: {exc}") from exc


def _prefixed(state: Mapping[str, Any], prefix: str) -> list[str]:
    return [k for k in state if k.startswith(prefix)]


def _materialize(model: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                 device: str | torch.device) -> nn.Module:
    """Strict check, then adopt the checkpoint tensors (the model was built on the meta device)."""
    check_state_dict(model, state, what)
    state = {k: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_unet(path: str | os.PathLike, config: UNetConfig | None = None, *,
              device: str | torch.device = "cpu", **overrides: Any) -> ConditionalUNet:
    """Load a published (or synray-written) diffusion checkpoint strictly into a :class:`ConditionalUNet`.

    Without ``config`` the architecture is read off the checkpoint and the flavour picked by the
    presence of ``empty_context_embedding`` (UIFace) or its absence (IDiff-Face/ADMIS, zeros as the empty
    context). ``overrides`` are :class:`UNetConfig` fields (e.g. ``context_dropout=0.5``). The model is
    returned in eval mode: CPD and UIFace's uncond replacement are training-only and random.
    """
    what = f"UNet checkpoint {os.fspath(path)}"
    state = normalize_unet_state(read_checkpoint(path))
    cfg = config if config is not None else infer_unet_config(state, what)
    try:
        cfg = cfg.replace(**overrides) if overrides else cfg
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_unet: {exc}") from exc
    with torch.device("meta"):
        model = ConditionalUNet(cfg)
    return _materialize(model, state, what, device)


def save_unet_checkpoint(model: ConditionalUNet, path: str | os.PathLike,
                         schedule_buffers: Mapping[str, torch.Tensor] | Any) -> None:
    """Write ``model`` in the published layout: the eight schedule buffers plus ``eps_model.*`` weights.

    ``schedule_buffers`` is a mapping with exactly the eight reference names (or an object with a
    ``buffers()`` method returning one, such as a diffusion schedule). The file is written atomically
    and loads in the reference samplers as well as with :func:`load_unet`.
    """
    if not isinstance(schedule_buffers, Mapping) and callable(getattr(schedule_buffers, "buffers", None)):
        schedule_buffers = schedule_buffers.buffers()
    if not isinstance(schedule_buffers, Mapping):
        raise TypeError(f"schedule_buffers must be a mapping of the {len(SCHEDULE_BUFFERS)} schedule tensors, "
                        f"got {type(schedule_buffers).__name__}")
    missing = [k for k in SCHEDULE_BUFFERS if k not in schedule_buffers]
    unexpected = [k for k in schedule_buffers if k not in SCHEDULE_BUFFERS]
    if missing or unexpected:
        raise ValueError(f"schedule_buffers must hold exactly {list(SCHEDULE_BUFFERS)}; "
                         f"missing {missing}, unexpected {unexpected}")
    lengths = {k: tuple(torch.as_tensor(schedule_buffers[k]).shape) for k in SCHEDULE_BUFFERS}
    if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
        raise ValueError(f"schedule buffers must all be 1-D of the same length, got {lengths}")
    out: dict[str, torch.Tensor] = {
        k: torch.as_tensor(schedule_buffers[k]).detach().to("cpu", torch.float32).contiguous().clone()
        for k in SCHEDULE_BUFFERS
    }
    for k, v in model.state_dict().items():  # published weights are float32 whatever the training precision
        v = v.detach().to("cpu")
        out[UNET_PREFIX + k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
    os.close(fd)
    try:
        torch.save(out, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_vq(cls: type[nn.Module], path: str | os.PathLike, config: VQConfig | None,
             device: str | torch.device, kind: str) -> nn.Module:
    what = f"VQ {kind} checkpoint {os.fspath(path)}"
    state = normalize_keys(read_checkpoint(path))
    with torch.device("meta"):
        model = cls(config or VQConfig())
    return _materialize(model, state, what, device)


def load_vq_encoder(path: str | os.PathLike, config: VQConfig | None = None, *,
                    device: str | torch.device = "cpu") -> VQEncoder:
    """``first_stage_encoder_state_dict.pt`` (``encoder.*``, ``quant_conv.*``) -> :class:`VQEncoder`."""
    return _load_vq(VQEncoder, path, config, device, "encoder")


def load_vq_decoder(path: str | os.PathLike, config: VQConfig | None = None, *,
                    device: str | torch.device = "cpu") -> VQDecoder:
    """``first_stage_decoder_state_dict.pt`` (``decoder.*``, ``quantize.*``, ``post_quant_conv.*``)."""
    return _load_vq(VQDecoder, path, config, device, "decoder")
