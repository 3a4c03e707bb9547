"""1:N identification as AdaFace scores TinyFace (``DIR_FAR`` from Probabilistic-Face-Embeddings).

Closed set (``fars=(1.0,)``, the TinyFace protocol): only probes with at least one mate in the
gallery count; a probe succeeds at rank r if a mate is among its r highest-scoring gallery entries.
Gallery distractors carry a label that no probe has (TinyFace uses -100). Open set (FAR < 1): a
probe must also score its mate above the threshold that lets the given fraction of non-mate probes
through. Scores are inner products of L2-normalised (flip-fused) features.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dir_far", "find_thresholds_by_far", "rank_accuracy", "TINYFACE_RANKS"]

TINYFACE_RANKS = (1, 5, 20)


def find_thresholds_by_far(score_vec: np.ndarray, fars: np.ndarray, epsilon: float = 1e-5) -> np.ndarray:
    """Thresholds letting ``round(n·FAR)`` of the (negative) scores through."""
    score_neg = np.sort(np.asarray(score_vec, dtype=np.float64))[::-1]
    if score_neg.size < 1:
        raise ValueError("open-set identification needs at least one probe without a mate in the gallery")
    n_false = np.round(score_neg.size * np.asarray(fars)).astype(np.int32)
    return np.array([score_neg[0] + epsilon if k == 0 else score_neg[k - 1] for k in n_false])


def dir_far(
    score_mat: np.ndarray, label_mat: np.ndarray, ranks: tuple[int, ...] = (1,), fars: tuple[float, ...] = (1.0,)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(DIRs [F x R], measured FARs [F], thresholds [F]); DIRs are flattened when F or R is 1."""
    score_mat = np.asarray(score_mat)
    label_mat = np.asarray(label_mat, dtype=bool)
    if score_mat.ndim != 2 or score_mat.shape != label_mat.shape:
        raise ValueError(f"score_mat {score_mat.shape} and label_mat {label_mat.shape} must be the same P x G shape")
    match = label_mat.any(axis=1)
    score_m, label_m = score_mat[match], label_mat[match]
    score_nm = score_mat[~match]
    max_score_nm = np.max(score_nm, axis=1) if score_nm.shape[0] else np.zeros(0)
    openset = not (len(fars) == 1 and fars[0] >= 1.0)
    if openset:
        thresholds = find_thresholds_by_far(max_score_nm, np.asarray(fars))
    else:
        thresholds = np.array([np.min(score_mat) - 1e-10])
    order = np.argsort(score_m, axis=1)[:, ::-1]  # default sort kind, like the reference
    sorted_labels = np.take_along_axis(label_m, order, axis=1)
    dirs = np.zeros((len(thresholds), len(ranks)), dtype=np.float32)
    far_out = np.zeros(len(thresholds), dtype=np.float32)
    gt_score = score_m[label_m] if openset else None
    if openset and gt_score.size != score_m.shape[0]:
        raise ValueError("open-set identification needs exactly one mate per matched probe")
    for i, threshold in enumerate(thresholds):
        for j, rank in enumerate(ranks):
            success = sorted_labels[:, :rank].any(axis=1)
            if openset:
                success = success & (gt_score >= threshold)
            dirs[i, j] = success.astype(np.float32).mean()
        if score_nm.shape[0] > 0:
            far_out[i] = (max_score_nm >= threshold).astype(np.float32).mean()
    if dirs.shape[0] == 1 or dirs.shape[1] == 1:
        dirs = dirs.flatten()
    return dirs, far_out, thresholds


def rank_accuracy(
    probe_feats: np.ndarray, probe_labels: np.ndarray, gallery_feats: np.ndarray, gallery_labels: np.ndarray,
    ranks: tuple[int, ...] = TINYFACE_RANKS,
) -> dict[int, float]:
    """Closed-set rank-k identification rate (TinyFace protocol) from normalised features."""
    probe_feats, gallery_feats = np.asarray(probe_feats), np.asarray(gallery_feats)
    if probe_feats.ndim != 2 or gallery_feats.ndim != 2 or probe_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"probe {probe_feats.shape} and gallery {gallery_feats.shape} features must be [N, D] with equal D")
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    if probe_labels.shape != (probe_feats.shape[0],) or gallery_labels.shape != (gallery_feats.shape[0],):
        raise ValueError("need one label per probe and per gallery feature")
    scores = np.dot(probe_feats, gallery_feats.T)
    label_mat = probe_labels[:, None] == gallery_labels[None, :]
    dirs, _, _ = dir_far(scores, label_mat, tuple(ranks))
    return {int(r): float(v) for r, v in zip(ranks, np.atleast_1d(dirs))}
