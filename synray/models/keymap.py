"""Checkpoint conversion between TFace/AdaFace IR (``input_layer/body/output_layer``) and insightface
IResNet (``conv1/layer1..4/fc/features``) state dicts.

Every tensor has a same-shaped partner (the mapping in ``manifests/keymap_tface_ir_*_to_insightface_*``
is what :func:`tface_to_insightface_keys` generates), except:

* ``layer1.0.downsample.{0,1}.*`` exists only in insightface: TFace's first unit keeps 64 channels
  and subsamples its shortcut with ``MaxPool2d(1, 2)``;
* ``features.weight``/``features.bias`` exist only in insightface: TFace's BN1d is ``affine=False``.

(Reduced-width test nets map too, provided stages 2-4 each change the channel count: TFace puts a
max-pool shortcut wherever a stage keeps it, which insightface never does.) IR-SE / SE variants are
not converted.

TFace -> insightface is exact (in eval mode): the stride-2 max-pool shortcut is written as an
identity 1x1 conv + a BN with mean 0, var ``1 - eps``, gamma 1, beta 0, and the features BN gets
gamma 1, beta 0. Dropout differs (TFace 0.4, insightface 0) but only in training.

insightface -> TFace is exact only when ``layer1.0.downsample`` (conv then BN, in eval) is the
identity map, e.g. for weights that came from TFace; a trained insightface model has a learned stage-1
shortcut, which a max-pool cannot represent, and the conversion raises :class:`KeymapError` naming
those tensors. The affine ``features`` BN1d is always folded exactly: its scale into ``fc`` and its
shift into the running mean.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from synray.models.checkpoint import CheckpointError

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
INSIGHTFACE_ONLY_PREFIX = "layer1.0.downsample."


class KeymapError(CheckpointError):
    """A state dict cannot be converted between the two IR layouts."""


def tface_to_insightface_keys(layers: Sequence[int]) -> dict[str, str]:
    """Name map TFace IR -> insightface iresnet for stage depths ``layers`` (e.g. (2, 2, 2, 2))."""
    m: dict[str, str] = {"input_layer.0.weight": "conv1.weight", "input_layer.2.weight": "prelu.weight"}
    m.update({f"input_layer.1.{s}": f"bn1.{s}" for s in BN})
    m.update({f"output_layer.0.{s}": f"bn2.{s}" for s in BN})
    m.update({"output_layer.3.weight": "fc.weight", "output_layer.3.bias": "fc.bias"})
    m.update({f"output_layer.4.{s}": f"features.{s}" for s in BN_STATS})
    unit = 0
    for stage, count in enumerate(layers, start=1):
        for j in range(count):
            src, dst = f"body.{unit}.", f"layer{stage}.{j}."
            for idx, name in ((0, "bn1"), (2, "bn2"), (5, "bn3")):
                m.update({f"{src}res_layer.{idx}.{s}": f"{dst}{name}.{s}" for s in BN})
            m[f"{src}res_layer.1.weight"] = f"{dst}conv1.weight"
            m[f"{src}res_layer.3.weight"] = f"{dst}prelu.weight"
            m[f"{src}res_layer.4.weight"] = f"{dst}conv2.weight"
            if j == 0 and stage > 1:
                m[f"{src}shortcut_layer.0.weight"] = f"{dst}downsample.0.weight"
                m.update({f"{src}shortcut_layer.1.{s}": f"{dst}downsample.1.{s}" for s in BN})
            unit += 1
    return m


def tface_layers(state: Mapping[str, Tensor]) -> tuple[int, int, int, int]:
    """Stage depths of a TFace IR state dict: stages 2-4 start at the units with a conv shortcut."""
    units = sorted({int(k.split(".")[1]) for k in state if re.match(r"body\.\d+\.", k)})
    if not units or units != list(range(len(units))):
        raise KeymapError("not a TFace IR state dict: no contiguous body.<i> units")
    starts = [0] + [i for i in units if f"body.{i}.shortcut_layer.0.weight" in state]
    if len(starts) != 4:
        raise KeymapError(
            f"TFace IR state dict has {len(starts)} stages (units starting them: {starts}), expected 4; "
            "the layouts map only when every stage after the first changes the channel count "
            "(TFace uses a max-pool shortcut wherever it does not), as in all published IR models"
        )
    bounds = starts + [len(units)]
    return tuple(bounds[i + 1] - bounds[i] for i in range(4))  # type: ignore[return-value]


def insightface_layers(state: Mapping[str, Tensor]) -> tuple[int, int, int, int]:
    """Stage depths of an insightface iresnet state dict."""
    depths = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks or blocks != set(range(len(blocks))):
            raise KeymapError(f"not an insightface iresnet state dict: layer{stage} blocks {sorted(blocks)}")
        depths.append(len(blocks))
    return tuple(depths)  # type: ignore[return-value]


def _check_complete(state: Mapping[str, Tensor], expected: set[str], what: str) -> None:
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise KeymapError(
            f"{what} state dict does not have the expected IR tensors: missing {missing[:20]}, "
            f"unexpected {unexpected[:20]}"
        )


def tface_to_insightface(state: Mapping[str, Tensor], eps: float = 1e-5) -> dict[str, Tensor]:
    """TFace/AdaFace IR state dict -> insightface iresnet state dict, functionally identical in eval.

    ``eps`` is the BatchNorm eps of the target model (1e-5 for arcface_torch/ElasticFace, 2e-5 for
    the SynthDistill teacher); it makes the inserted stage-1 shortcut BN an exact identity.
    """
    layers = tface_layers(state)
    keymap = tface_to_insightface_keys(layers)
    _check_complete(state, set(keymap), "TFace IR")
    out = {keymap[k]: v for k, v in state.items()}
    ref = out["layer1.0.conv1.weight"]
    c, dtype = ref.shape[1], out["fc.weight"].dtype
    eye = torch.eye(c, dtype=ref.dtype, device=ref.device).view(c, c, 1, 1)
    out[INSIGHTFACE_ONLY_PREFIX + "0.weight"] = eye
    out[INSIGHTFACE_ONLY_PREFIX + "1.weight"] = torch.ones(c, dtype=dtype, device=ref.device)
    out[INSIGHTFACE_ONLY_PREFIX + "1.bias"] = torch.zeros(c, dtype=dtype, device=ref.device)
    out[INSIGHTFACE_ONLY_PREFIX + "1.running_mean"] = torch.zeros(c, dtype=dtype, device=ref.device)
    out[INSIGHTFACE_ONLY_PREFIX + "1.running_var"] = torch.full((c,), 1.0 - eps, dtype=dtype, device=ref.device)
    out[INSIGHTFACE_ONLY_PREFIX + "1.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    d = out["fc.bias"].shape[0]
    out["features.weight"] = torch.ones(d, dtype=dtype, device=ref.device)
    out["features.bias"] = torch.zeros(d, dtype=dtype, device=ref.device)
    return {k: out[k] for k in insightface_keys(layers)}


def insightface_keys(layers: Sequence[int]) -> list[str]:
    """insightface iresnet state-dict keys for stage depths ``layers``, in ``state_dict()`` order."""
    keys = ["conv1.weight", *(f"bn1.{s}" for s in BN), "prelu.weight"]
    for stage, count in enumerate(layers, start=1):
        for j in range(count):
            p = f"layer{stage}.{j}."
            keys += [*(f"{p}bn1.{s}" for s in BN), f"{p}conv1.weight", *(f"{p}bn2.{s}" for s in BN),
                     f"{p}prelu.weight", f"{p}conv2.weight", *(f"{p}bn3.{s}" for s in BN)]
            if j == 0:
                keys += [f"{p}downsample.0.weight", *(f"{p}downsample.1.{s}" for s in BN)]
    return keys + [*(f"bn2.{s}" for s in BN), "fc.weight", "fc.bias", *(f"features.{s}" for s in BN)]


def tface_keys(layers: Sequence[int]) -> list[str]:
    """TFace IR state-dict keys for stage depths ``layers``, in ``state_dict()`` order."""
    keys = ["input_layer.0.weight", *(f"input_layer.1.{s}" for s in BN), "input_layer.2.weight",
            *(f"output_layer.0.{s}" for s in BN), "output_layer.3.weight", "output_layer.3.bias",
            *(f"output_layer.4.{s}" for s in BN_STATS)]
    unit = 0
    for stage, count in enumerate(layers, start=1):
        for j in range(count):
            p = f"body.{unit}."
            if j == 0 and stage > 1:
                keys += [f"{p}shortcut_layer.0.weight", *(f"{p}shortcut_layer.1.{s}" for s in BN)]
            keys += [*(f"{p}res_layer.0.{s}" for s in BN), f"{p}res_layer.1.weight",
                     *(f"{p}res_layer.2.{s}" for s in BN), f"{p}res_layer.3.weight", f"{p}res_layer.4.weight",
                     *(f"{p}res_layer.5.{s}" for s in BN)]
            unit += 1
    return keys


def insightface_to_tface(state: Mapping[str, Tensor], eps: float = 1e-5, atol: float = 1e-5) -> dict[str, Tensor]:
    """insightface iresnet state dict -> TFace IR state dict, or :class:`KeymapError` if not exact.

    ``eps`` is the BatchNorm eps of the *source* model. The stage-1 shortcut must be the identity map
    (within ``atol``) because TFace has only a max-pool there. ``features`` (BN1d with scale g and shift
    b) becomes TFace's affine-free BN1d with ``fc`` scaled by g and ``running_mean`` set to
    ``g * mean - b * sqrt(var + eps)``, which gives the same output.
    """
    layers = insightface_layers(state)
    keymap = tface_to_insightface_keys(layers)
    inverse = {v: k for k, v in keymap.items()}
    extra = {INSIGHTFACE_ONLY_PREFIX + "0.weight"} | {INSIGHTFACE_ONLY_PREFIX + f"1.{s}" for s in BN}
    _check_complete(state, set(inverse) | extra | {"features.weight", "features.bias"}, "insightface iresnet")

    w = state[INSIGHTFACE_ONLY_PREFIX + "0.weight"].double()
    if w.shape[0] != w.shape[1] or w.shape[2:] != (1, 1):
        raise KeymapError(
            f"cannot convert to TFace IR: layer1.0.downsample.0.weight has shape {tuple(w.shape)}, "
            "TFace's stage-1 shortcut keeps the channel count"
        )
    bn = {s: state[INSIGHTFACE_ONLY_PREFIX + f"1.{s}"].double() for s in BN[:4]}
    scale = bn["weight"] / torch.sqrt(bn["running_var"] + eps)
    effective = scale[:, None] * w[:, :, 0, 0]
    shift = bn["bias"] - scale * bn["running_mean"]
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    err = max((effective - eye).abs().max().item(), shift.abs().max().item())
    if err > atol:
        raise KeymapError(
            "cannot convert to TFace IR exactly: layer1.0.downsample.0.weight / layer1.0.downsample.1.* "
            f"form a learned stage-1 shortcut (max deviation from identity {err:.3g}); TFace uses "
            "MaxPool2d(1, 2) there, which has no weights"
        )

    out = {inverse[k]: v for k, v in state.items() if k in inverse}
    g, b = state["features.weight"].double(), state["features.bias"].double()
    mean, var = state["features.running_mean"].double(), state["features.running_var"].double()
    std = torch.sqrt(var + eps)
    fc_w, fc_b = state["fc.weight"], state["fc.bias"]
    out["output_layer.3.weight"] = (fc_w.double() * g[:, None]).to(fc_w.dtype)
    out["output_layer.3.bias"] = (fc_b.double() * g).to(fc_b.dtype)
    out["output_layer.4.running_mean"] = (g * mean - b * std).to(state["features.running_mean"].dtype)
    return {k: out[k] for k in tface_keys(layers)}


def state_layout(state: Mapping[str, Tensor]) -> str:
    """``"tface"``, ``"insightface"`` or ``"other"`` from the tensor names."""
    keys = set(state)
    if "input_layer.0.weight" in keys and any(k.startswith("body.") for k in keys):
        return "tface"
    if "conv1.weight" in keys and "prelu.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "insightface"
    return "other"
