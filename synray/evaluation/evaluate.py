"""Run a backbone over insightface ``.bin`` verification sets and print the usual accuracy table."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from synray.evaluation.binset import read_bin
from synray.evaluation.roc import pair_distances
from synray.evaluation.verification import evaluate, fuse_flip

__all__ = ["embed", "embed_faces", "find_bins", "fit_images", "evaluate_bins", "format_table", "STANDARD_ORDER"]

#: the customary reporting order; other sets follow alphabetically.
STANDARD_ORDER = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")


def _raw_output(out) -> torch.Tensor:
    """A backbone's raw embedding; AdaFace-style ``(x / |x|, |x|)`` outputs are multiplied back."""
    if isinstance(out, (tuple, list)):
        if len(out) == 2 and out[1].dim() in (1, 2):
            return out[0] * out[1].reshape(-1, 1)
        return out[0]
    return out


def _normalise(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """insightface's ``(x/255 - 0.5)/0.5``, unless the model declares other ``pixel_mean``/``pixel_std``
    (on the 0..255 scale, e.g. 127.5/128 for SynthDistill's teacher)."""
    mean, std = getattr(model, "pixel_mean", 127.5), getattr(model, "pixel_std", 127.5)
    if mean == 127.5 and std == 127.5:
        return ((x / 255) - 0.5) / 0.5
    return (x - mean) / std


@torch.inference_mode()
def embed(
    model: nn.Module, images_uint8_rgb: np.ndarray, batch_size: int = 64, flip: bool = True,
    bgr: bool = False, device: str | torch.device | None = None,
) -> np.ndarray:
    """L2-normalised float64 embeddings of RGB uint8 images [N, H, W, 3].

    Pixels are normalised as insightface does, ``(x/255 - 0.5)/0.5``, NCHW (or with the model's own
    ``pixel_mean``/``pixel_std`` when it declares others). With ``flip`` the raw
    outputs of each image and its mirror image are summed before normalising (the flip test of
    insightface, TFace and AdaFace). ``bgr`` feeds channels in BGR order (AdaFace's released models).
    """
    images = np.asarray(images_uint8_rgb)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3] RGB, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    raw, raw_flip = [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]
            if bgr:
                batch = batch[..., ::-1]
            x = _normalise(model, torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float())
            raw.append(_raw_output(model(x)).float().cpu().numpy().astype(np.float64))
            if flip:
                raw_flip.append(_raw_output(model(torch.flip(x, dims=[3]))).float().cpu().numpy().astype(np.float64))
    finally:
        model.train(was_training)
    emb = np.concatenate(raw) if raw else np.zeros((0, 0))
    return fuse_flip(emb, np.concatenate(raw_flip) if flip else None)


def fit_images(images: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Bring [N, H, W, 3] images to ``image_size`` (H, W).

    112x112 ArcFace-aligned faces become SynFace's 112x96 by cutting 8 columns each side: the
    ArcFace template is the 96x112 face.evoLVe template shifted by 8 px. Other sizes are resized
    (area averaging when shrinking, as the training loader does, so a small model sees what it learnt on).
    """
    h, w = image_size
    if images.shape[1:3] == (h, w):
        return images
    if images.shape[1:3] == (112, 112) and (h, w) == (112, 96):
        return np.ascontiguousarray(images[:, :, 8:104])
    interp = cv2.INTER_AREA if images.shape[1] > h else cv2.INTER_LINEAR
    return np.stack([cv2.resize(im, (w, h), interpolation=interp) for im in images])


def embed_faces(model: nn.Module, images_uint8_rgb: np.ndarray, **kwargs: Any) -> np.ndarray:
    """:func:`embed` after bringing the faces to the model's ``input_size`` (112x112 if it has none)."""
    size = tuple(getattr(model, "input_size", (112, 112)))
    return embed(model, fit_images(np.asarray(images_uint8_rgb), size), **kwargs)


def _order_key(path: Path) -> tuple[int, str]:
    name = path.stem.lower()
    return (STANDARD_ORDER.index(name) if name in STANDARD_ORDER else len(STANDARD_ORDER), name)


def find_bins(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (their ``*.bin``) into an ordered list of ``.bin`` files."""
    found: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found.extend(sorted(path.glob("*.bin"), key=_order_key))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"verification set not found: {path}")
    if not found:
        raise FileNotFoundError(f"no .bin verification sets in {[os.fspath(p) for p in paths]}")
    seen, unique = set(), []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def evaluate_bins(
    model: nn.Module, paths: Sequence[str | os.PathLike] | str | os.PathLike, batch_size: int = 64,
    flip: bool = True, bgr: bool | None = None, image_size: tuple[int, int] | None = None, n_folds: int = 10,
    scores: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate every ``.bin`` set; returns ``{set: metrics}`` plus ``"average"`` (mean accuracy).

    Per set: ``accuracy`` and ``std`` over the 10 folds, ``best_threshold`` (mean squared-L2
    threshold), ``tar_at_far`` / ``far`` (insightface TAR@FAR=1e-3) and ``pairs``. ``bgr`` and
    ``image_size`` default to the model's ``channel_order`` and ``input_size`` (else RGB, 112x112);
    see :func:`fit_images` for how images reach that size. ``scores``, when given, receives each set's pair
    distances and labels (:func:`synray.evaluation.roc.pair_distances`) for ROC curves.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if bgr is None:
        bgr = getattr(model, "channel_order", "RGB") == "BGR"
    if image_size is None:
        image_size = tuple(getattr(model, "input_size", (112, 112)))
    results: dict[str, dict[str, float]] = {}
    for path in find_bins(paths):
        images, issame = read_bin(path, image_size=None if tuple(image_size) == (112, 96) else image_size)
        images = fit_images(images, tuple(image_size))
        emb = embed(model, images, batch_size=batch_size, flip=flip, bgr=bgr)
        res = evaluate(emb, issame, n_folds=n_folds)
        if scores is not None:
            scores[path.stem] = pair_distances(emb, issame)
        results[path.stem] = {
            "accuracy": res.acc_mean,
            "std": res.acc_std,
            "best_threshold": res.best_threshold_mean,
            "tar_at_far": res.val,
            "far": res.far,
            "pairs": float(len(issame)),
        }
    results["average"] = {"accuracy": float(np.mean([r["accuracy"] for r in results.values()]))}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per set (accuracy ± std in %, threshold, pairs), then the average."""
    width = max([len(k) for k in results] + [8])
    lines = [f"{'set':<{width}}  {'pairs':>6}  {'accuracy %':>10}  {'std %':>6}  {'threshold':>9}"]
    lines.append("-" * len(lines[0]))
    for name, r in results.items():
        if name == "average":
            continue
        lines.append(
            f"{name:<{width}}  {int(r['pairs']):>6d}  {100 * r['accuracy']:>10.3f}  {100 * r['std']:>6.3f}  {r['best_threshold']:>9.3f}"
        )
    if "average" in results:
        lines.append("-" * len(lines[0]))
        lines.append(f"{'average':<{width}}  {'':>6}  {100 * results['average']['accuracy']:>10.3f}")
    return "\n".join(lines)
