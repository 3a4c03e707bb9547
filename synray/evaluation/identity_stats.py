"""Identity statistics of a labelled face set under an FR model (pure numpy on L2-normalised embeddings).

* consistency: cosine of each image to its identity's centre (the synthesis quality score, over a whole set);
* separability: genuine (same identity) vs impostor (different identities) image-pair cosines and their Fisher
  discriminant ratio ``(mu_g - mu_i)^2 / (var_g + var_i)`` (NegFaceDiff's FDR), and each identity's nearest other
  identity (centre cosine);
* near-duplicate identities: centre pairs above a cosine threshold (one person under two labels);
* leakage: each identity's nearest identity of a reference set (e.g. the generator's training identities).
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalize", "centres", "consistency", "pair_cosines", "fisher_ratio", "nearest_other", "duplicate_pairs",
           "nearest_reference"]


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centres(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(identities, unit centres [K, D])``: each identity's mean embedding, re-normalised."""
    labels = np.asarray(labels)
    ids, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((ids.size, emb.shape[1]))
    np.add.at(sums, inverse, np.asarray(emb, np.float64))
    return ids, normalize(sums)


def consistency(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: cosine to its own identity's centre."""
    ids, c = centres(emb, labels)
    return np.einsum("ij,ij->i", normalize(emb), c[np.searchsorted(ids, labels)])


def pair_cosines(emb: np.ndarray, labels: np.ndarray, max_pairs: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(genuine, impostor)`` cosines: every same-identity pair (up to ``max_pairs``, sampled beyond) and as many
    random different-identity pairs."""
    emb, labels = normalize(emb), np.asarray(labels)
    rng = np.random.default_rng(seed)
    gi, gj = [], []
    for i in np.unique(labels):
        idx = np.flatnonzero(labels == i)
        a, b = np.triu_indices(idx.size, 1)
        gi.append(idx[a])
        gj.append(idx[b])
    gi, gj = (np.concatenate(gi), np.concatenate(gj)) if gi else (np.zeros(0, int), np.zeros(0, int))
    if gi.size > max_pairs:
        keep = rng.choice(gi.size, max_pairs, replace=False)
        gi, gj = gi[keep], gj[keep]
    n = max(gi.size, min(max_pairs, emb.shape[0] * 10))
    ii, jj = rng.integers(0, emb.shape[0], n), rng.integers(0, emb.shape[0], n)
    diff = labels[ii] != labels[jj]
    genuine = np.einsum("ij,ij->i", emb[gi], emb[gj])
    impostor = np.einsum("ij,ij->i", emb[ii[diff]], emb[jj[diff]])
    return genuine, impostor


def fisher_ratio(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """``(mean_g - mean_i)^2 / (var_g + var_i)``: larger is better separated; NaN without both kinds of pairs."""
    if genuine.size < 2 or impostor.size < 2:
        return float("nan")
    return float((genuine.mean() - impostor.mean()) ** 2 / max(genuine.var() + impostor.var(), 1e-12))


def nearest_other(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each unit centre, the index of the nearest other centre and their cosine."""
    sim = c @ c.T
    np.fill_diagonal(sim, -np.inf)
    j = np.argmax(sim, axis=1)
    return j, sim[np.arange(len(c)), j]


def duplicate_pairs(ids: np.ndarray, c: np.ndarray, threshold: float, limit: int = 50) -> list[tuple[int, int, float]]:
    """Identity pairs whose centres' cosine exceeds ``threshold``, most similar first (at most ``limit``)."""
    sim = c @ c.T
    a, b = np.triu_indices(len(c), 1)
    s = sim[a, b]
    keep = np.flatnonzero(s > threshold)
    keep = keep[np.argsort(-s[keep], kind="stable")][:limit]
    return [(int(ids[a[k]]), int(ids[b[k]]), float(s[k])) for k in keep]


def nearest_reference(c: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each centre, the index of the nearest reference row (normalised) and their cosine."""
    r = normalize(reference)
    sim = c @ r.T
    j = np.argmax(sim, axis=1)
    return j, sim[np.arange(len(c)), j]
