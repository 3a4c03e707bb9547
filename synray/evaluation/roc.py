"""ROC curves (TAR vs FAR) and threshold tables from verification pair scores, saved beside a model.

Scores are what the 10-fold protocol (:mod:`synray.evaluation.verification`) thresholds: the squared L2
distance of the normalised, flip-fused pair embeddings, "same" iff ``dist < threshold``. For unit vectors
``dist = 2 - 2 cos``, so every threshold is also given as a cosine. The table's TAR at a FAR target follows
insightface's ``calculate_val`` (threshold interpolated on the training folds' FAR curve, TAR and FAR measured
on the held-out fold, averaged over 10 folds); a target below ``1 / impostor pairs`` cannot be measured and is
marked so rather than reported as 0.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from synray.evaluation.verification import VAL_THRESHOLDS, kfold, slinear_interp

__all__ = ["FAR_TARGETS", "pair_distances", "roc_curve", "threshold_table", "format_threshold_table",
           "save_scores", "load_scores", "SCORES_FILE"]

FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
SCORES_FILE = "verification_scores.npz"


def pair_distances(embeddings: np.ndarray, issame: np.ndarray) -> dict[str, np.ndarray]:
    """``{"dist", "issame"}`` of L2-normalised embeddings in pair order (a0, b0, a1, b1, ...)."""
    emb = np.asarray(embeddings, np.float64)
    issame = np.asarray(issame, bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * issame.size:
        raise ValueError(f"expected 2N embeddings for N={issame.size} pairs, got shape {emb.shape}")
    return {"dist": np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1), "issame": issame}


def roc_curve(dist: np.ndarray, issame: np.ndarray) -> dict[str, np.ndarray]:
    """TAR and FAR at every distinct threshold (accept ``dist <= t``), from (0, 0) to (1, 1)."""
    dist, issame = np.asarray(dist, np.float64), np.asarray(issame, bool)
    n_same, n_diff = int(issame.sum()), int((~issame).sum())
    if not n_same or not n_diff:
        raise ValueError(f"an ROC needs genuine and impostor pairs, got {n_same} and {n_diff}")
    order = np.argsort(dist, kind="mergesort")
    d, s = dist[order], issame[order]
    last = np.r_[np.flatnonzero(np.diff(d)), d.size - 1]  # the last pair of each distinct distance
    tar = np.cumsum(s)[last] / n_same
    far = np.cumsum(~s)[last] / n_diff
    return {"far": np.r_[0.0, far], "tar": np.r_[0.0, tar], "threshold": np.r_[d[0] - 1e-12, d[last]]}


def _far_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    diff = np.sort(dist[~issame])
    return np.searchsorted(diff, thresholds, side="left") / max(diff.size, 1)


def _threshold_at(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    return slinear_interp(far, thresholds, target) if np.max(far) >= target else 0.0


def threshold_table(dist: np.ndarray, issame: np.ndarray, targets: Sequence[float] = FAR_TARGETS,
                    n_folds: int = 10) -> list[dict[str, float]]:
    """Per FAR target: the threshold on all pairs (squared L2 and cosine), and the 10-fold TAR (mean, std) and FAR."""
    dist, issame = np.asarray(dist, np.float64), np.asarray(issame, bool)
    n_diff = int((~issame).sum())
    rows = []
    for target in targets:
        row: dict[str, float] = {"far_target": float(target), "measurable": bool(target * n_diff >= 1)}
        t_all = _threshold_at(_far_curve(dist, issame, VAL_THRESHOLDS), VAL_THRESHOLDS, target)
        row.update(threshold=t_all, cosine=1.0 - t_all / 2.0)
        tars, fars = [], []
        for train, test in kfold(issame.size, n_folds):
            t = _threshold_at(_far_curve(dist[train], issame[train], VAL_THRESHOLDS), VAL_THRESHOLDS, target)
            accept = dist[test] < t
            same, diff = issame[test], ~issame[test]
            tars.append(float((accept & same).sum() / max(same.sum(), 1)))
            fars.append(float((accept & diff).sum() / max(diff.sum(), 1)))
        row.update(tar=float(np.mean(tars)), tar_std=float(np.std(tars)), far=float(np.mean(fars)))
        rows.append(row)
    return rows


def format_threshold_table(tables: Mapping[str, list[dict[str, float]]]) -> str:
    """One block per verification set: FAR target, threshold (squared L2 / cosine), TAR ± std, FAR reached."""
    lines = []
    for name, rows in tables.items():
        lines.append(f"{name}")
        lines.append(f"  {'FAR target':>10}  {'threshold':>9}  {'cosine':>7}  {'TAR %':>7}  {'std %':>6}  {'FAR':>9}")
        for r in rows:
            if not r["measurable"]:
                lines.append(f"  {r['far_target']:>10.0e}  {'(too few impostor pairs to measure)':>45}")
                continue
            lines.append(f"  {r['far_target']:>10.0e}  {r['threshold']:>9.4f}  {r['cosine']:>7.4f}  "
                         f"{100 * r['tar']:>7.2f}  {100 * r['tar_std']:>6.2f}  {r['far']:>9.2e}")
    return "\n".join(lines)


def save_scores(scores: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """``{set: {"dist", "issame"}}`` as ``.npz`` bytes (stored beside a checkpoint)."""
    buf = io.BytesIO()
    np.savez(buf, **{f"{name}/{k}": np.asarray(v) for name, s in scores.items() for k, v in s.items()})
    return buf.getvalue()


def load_scores(data: bytes) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as blob:
        for key in blob.files:
            name, _, k = key.rpartition("/")
            out.setdefault(name, {})[k] = blob[key]
    return out
