"""Run a backbone over insightface ``.bin`` verification sets and print the usual accuracy table."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from synray.evaluation.binset import read_bin
from synray.evaluation.roc import pair_distances
from synray.evaluation.verification import evaluate
from synray.models.inputs import embed, fit_images, input_size

__all__ = ["find_bins", "evaluate_bins", "format_table", "STANDARD_ORDER"]

#: the customary reporting order; other sets follow alphabetically.
STANDARD_ORDER = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")


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
    see :func:`synray.models.inputs.fit_images` for how images reach that size. ``scores``, when given, receives each
    set's pair distances and labels (:func:`synray.evaluation.roc.pair_distances`) for ROC curves.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if bgr is None:
        bgr = getattr(model, "channel_order", "RGB") == "BGR"
    if image_size is None:
        image_size = input_size(model)
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
