"""IJB-B/C style 1:1 template verification (insightface ``eval_ijbc.py``, TFace ``IJB_Evaluation.py``).

Image features are stored as ``[f(img) | f(flip)]``. They are combined per image (flip add or first
half, optional L2 normalisation, optional faceness weighting), then per template: images of one
media (video) are averaged, medias are summed, the sum is L2-normalised. A pair's score is the dot
product of its two template features. TPR@FPR uses sklearn's ROC with the reference rule: reverse the
curve and take the point whose FPR is nearest the target, ties going to the first point in the
reversed order (the highest-TPR point at that FPR).

Defaults: insightface evaluates F2/N1/D1 (add flip halves, keep the norm, multiply by the detector's
faceness score); TFace evaluates first half only, L2-normalised, no faceness.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "image_features", "template_features", "template_scores", "roc_curve", "auc", "tpr_at_fpr",
    "ijb_scores", "FPR_TARGETS", "MODES",
]

FPR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

#: (flip, normalize, faceness) of the two published evaluation scripts.
MODES = {
    "insightface": {"flip": True, "normalize": False, "faceness": True},
    "tface": {"flip": False, "normalize": True, "faceness": False},
}


def image_features(
    img_feats: np.ndarray, faceness: np.ndarray | None = None,
    flip: bool = True, normalize: bool = False, use_faceness: bool = True,
) -> np.ndarray:
    """Per-image features from ``[feature | flip feature]`` rows, kept in the input dtype."""
    img_feats = np.asarray(img_feats)
    if img_feats.ndim != 2 or img_feats.shape[1] % 2:
        raise ValueError(f"img_feats must be [N, 2*D] (feature | flip feature), got shape {img_feats.shape}")
    half = img_feats.shape[1] // 2
    feats = img_feats[:, :half] + img_feats[:, half:] if flip else img_feats[:, :half]
    if normalize:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if use_faceness:
        if faceness is None:
            raise ValueError("faceness weighting requested but no faceness scores given")
        faceness = np.asarray(faceness)
        if faceness.shape != (img_feats.shape[0],):
            raise ValueError(f"faceness must have shape [{img_feats.shape[0]}], got {faceness.shape}")
        feats = feats * faceness[:, np.newaxis]
    return feats


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised template features [T, D] float64, sorted unique template ids)."""
    templates, medias = np.asarray(templates), np.asarray(medias)
    if not (feats.shape[0] == templates.shape[0] == medias.shape[0]):
        raise ValueError(
            f"features ({feats.shape[0]}), templates ({templates.shape[0]}) and medias ({medias.shape[0]}) "
            "must have one entry per image"
        )
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), feats.shape[1]))
    for k, t in enumerate(unique_templates):
        (ind_t,) = np.where(templates == t)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        unique_medias, counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for u, ct in zip(unique_medias, counts):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(face_feats[ind_m] if ct == 1 else np.mean(face_feats[ind_m], 0, keepdims=True))
        out[k] = np.sum(np.array(media_feats), 0)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    norms[norms == 0.0] = 1.0
    return out / norms[:, None], unique_templates


def template_scores(template_feats: np.ndarray, unique_templates: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Dot product of the two template features of every pair (template ids ``p1[i]``, ``p2[i]``)."""
    p1, p2 = np.asarray(p1), np.asarray(p2)
    position = {int(t): i for i, t in enumerate(unique_templates)}
    missing = sorted({int(t) for t in np.concatenate([p1, p2])} - position.keys())
    if missing:
        raise ValueError(f"pairs refer to templates without images: {missing[:10]}")
    i1 = np.fromiter((position[int(t)] for t in p1), dtype=np.int64, count=len(p1))
    i2 = np.fromiter((position[int(t)] for t in p2), dtype=np.int64, count=len(p2))
    return np.sum(template_feats[i1] * template_feats[i2], -1)


def roc_curve(labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) exactly as ``sklearn.metrics.roc_curve`` (>= 1.3, first threshold inf)."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1")
    y = y == 1
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[idx]
    fps = 1 + idx - tps
    thresholds = s[idx]
    if drop_intermediate and len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    if fps[-1] <= 0 or tps[-1] <= 0:
        raise ValueError("ROC needs both genuine (1) and impostor (0) pairs")
    return fps / fps[-1], tps / tps[-1], thresholds


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under a monotone curve (``sklearn.metrics.auc``)."""
    dx = np.diff(fpr)
    direction = 1.0
    if np.any(dx < 0):
        if np.all(dx <= 0):
            direction = -1.0
        else:
            raise ValueError("x is neither increasing nor decreasing")
    return float(direction * np.trapezoid(tpr, fpr))


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, targets: tuple[float, ...] = FPR_TARGETS) -> list[dict[str, float]]:
    """TPR at each FPR target with the reference nearest-FPR rule; also the FPR and threshold used."""
    fpr, tpr, thr = roc_curve(labels, scores)
    fpr, tpr, thr = np.flipud(fpr), np.flipud(tpr), np.flipud(thr)
    rows = []
    for target in targets:
        i = int(np.argmin(np.abs(fpr - target)))  # first minimum == reference's min over (diff, index)
        rows.append({"fpr_target": float(target), "tpr": float(tpr[i]), "fpr_selected": float(fpr[i]), "threshold": float(thr[i])})
    return rows


def ijb_scores(
    img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray, p1: np.ndarray, p2: np.ndarray,
    faceness: np.ndarray | None = None, mode: str = "insightface",
) -> np.ndarray:
    """Pair scores with the defaults of ``mode`` ("insightface" F2/N1/D1 or "tface")."""
    if mode not in MODES:
        raise ValueError(f"unknown IJB mode {mode!r}; choose one of {sorted(MODES)}")
    m = MODES[mode]
    feats = image_features(img_feats, faceness, flip=m["flip"], normalize=m["normalize"], use_faceness=m["faceness"])
    tfeats, unique = template_features(feats, templates, medias)
    return template_scores(tfeats, unique, p1, p2)
