"""Dataset figures of a labelled face set, from FR embeddings (and, for diversity, the images' nuisance factors).

Plain numpy functions of embeddings ``[N, D]`` (any norm; they are L2-normalised here) and identity labels
``[N]``. What each measures:

* :func:`identity_consistency`: mean cosine of each image to its identity's centroid (are the images of one
  label the same person?);
* :func:`fisher_ratio`: Fisher discriminant ratio of the genuine and impostor cosine distributions,
  ``(mu_g - mu_i)^2 / (var_g + var_i)`` (the separability figure of the IDiff-Face line of work, e.g.
  NegFaceDiff's FDR): high when genuine pairs score well above impostors with little overlap;
* :func:`nearest_other_identity`: mean over identities of the highest cosine between its centroid and any
  other identity's centroid (are two labels the same person?);
* :func:`embedding_spread`: mean within-identity pairwise cosine distance, ``1 - cos`` (how varied the images
  of one identity look to the FR model);
* :func:`factor_spread`: mean within-identity standard deviation of per-image nuisance factors (pose,
  expression, light: known for world renders, read off generated images by a regressor);
* :func:`nearest_training_identity`: mean over identities of the highest cosine between its centroid and the
  centroids of a reference set, e.g. the LDM's training identities (identity leakage).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["normalize", "centroids", "identity_consistency", "fisher_ratio", "nearest_other_identity",
           "embedding_spread", "factor_spread", "nearest_training_identity", "dataset_figures"]


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _groups(labels: np.ndarray, need: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = np.asarray(labels)
    ids = np.unique(labels)
    rows = [np.flatnonzero(labels == i) for i in ids]
    if len(ids) < 1 or min(len(r) for r in rows) < need:
        raise ValueError(f"every identity needs at least {need} images")
    return ids, rows


def centroids(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(identities, unit centroids [K, D])`` of L2-normalised embeddings grouped by label."""
    emb = normalize(embeddings)
    ids, rows = _groups(labels)
    return ids, normalize(np.stack([emb[r].mean(0) for r in rows]))


def identity_consistency(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Mean cosine of every image to its identity's centroid."""
    emb = normalize(embeddings)
    ids, cent = centroids(emb, labels)
    index = {int(i): k for k, i in enumerate(ids)}
    return float(np.mean(np.sum(emb * cent[[index[int(i)] for i in labels]], axis=1)))


def _pair_scores(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = normalize(embeddings)
    labels = np.asarray(labels)
    sim = emb @ emb.T
    upper = np.triu(np.ones(sim.shape, bool), 1)
    same = labels[:, None] == labels[None, :]
    return sim[same & upper], sim[~same & upper]


def fisher_ratio(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """``(mean genuine - mean impostor)^2 / (var genuine + var impostor)`` over all image pairs."""
    genuine, impostor = _pair_scores(embeddings, labels)
    if genuine.size < 2 or impostor.size < 2:
        raise ValueError("the Fisher ratio needs at least two genuine and two impostor pairs")
    return float((genuine.mean() - impostor.mean()) ** 2 / max(genuine.var() + impostor.var(), 1e-12))


def nearest_other_identity(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Mean over identities of the highest centroid cosine to another identity."""
    _, cent = centroids(embeddings, labels)
    if len(cent) < 2:
        raise ValueError("nearest other identity needs at least two identities")
    sim = cent @ cent.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(sim.max(axis=1)))


def embedding_spread(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Mean within-identity pairwise cosine distance ``1 - cos`` (identities weighted equally)."""
    emb = normalize(embeddings)
    _, rows = _groups(labels, need=2)
    out = []
    for r in rows:
        sim = emb[r] @ emb[r].T
        out.append(1.0 - sim[np.triu_indices(len(r), 1)].mean())
    return float(np.mean(out))


def factor_spread(factors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per factor (columns of ``factors [N, F]``), the mean over identities of its within-identity std."""
    f = np.asarray(factors, np.float64)
    _, rows = _groups(labels, need=2)
    return np.mean(np.stack([f[r].std(axis=0, ddof=1) for r in rows]), axis=0)


def nearest_training_identity(embeddings: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> float:
    """Mean over identities of the highest cosine between its centroid and a reference centroid ``[M, D]``."""
    _, cent = centroids(embeddings, labels)
    return float(np.mean((cent @ normalize(reference).T).max(axis=1)))


def dataset_figures(embeddings: np.ndarray, labels: np.ndarray, factors: Mapping[str, np.ndarray] | None = None,
                    training_centroids: np.ndarray | None = None) -> dict[str, float]:
    """Every figure above for one set; ``factors``: name -> per-image values (spread reported per name)."""
    out = {"consistency": identity_consistency(embeddings, labels), "fdr": fisher_ratio(embeddings, labels),
           "nearest_other": nearest_other_identity(embeddings, labels),
           "embedding_spread": embedding_spread(embeddings, labels)}
    for name, values in (factors or {}).items():
        out[f"spread/{name}"] = float(factor_spread(np.asarray(values)[:, None], labels)[0])
    if training_centroids is not None:
        out["nearest_training"] = nearest_training_identity(embeddings, labels, training_centroids)
    return out
