"""Dataset figures of a labelled face set, from FR embeddings (and, for diversity, the images' nuisance factors).

Plain numpy functions of embeddings ``[N, D]`` (any norm) and identity labels ``[N]``, on top of
:mod:`synray.evaluation.identity_stats` (what ``synray report`` measures):

* ``consistency``: mean cosine of each image to its identity's centroid (are the images of one label the same
  person?);
* ``fdr``: Fisher discriminant ratio of the genuine and impostor cosine distributions,
  ``(mu_g - mu_i)^2 / (var_g + var_i)`` (NegFaceDiff's separability figure);
* ``nearest_other``: mean over identities of the highest cosine between its centroid and another identity's
  (are two labels the same person?);
* :func:`embedding_spread`: mean within-identity pairwise cosine distance, ``1 - cos`` (how varied the images
  of one identity look to the FR model);
* :func:`factor_spread`: mean within-identity standard deviation of per-image nuisance factors (pose,
  expression, light: known for world renders, read off generated images by a regressor);
* ``nearest_training``: mean over identities of the highest cosine between its centroid and the centroids of
  a reference set, the LDM's training identities (identity leakage).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from synray.evaluation import identity_stats as S

__all__ = ["embedding_spread", "factor_spread", "dataset_figures"]


def _groups(labels: np.ndarray, need: int = 1) -> list[np.ndarray]:
    labels = np.asarray(labels)
    rows = [np.flatnonzero(labels == i) for i in np.unique(labels)]
    if not rows or min(len(r) for r in rows) < need:
        raise ValueError(f"every identity needs at least {need} images")
    return rows


def embedding_spread(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Mean within-identity pairwise cosine distance ``1 - cos`` (identities weighted equally)."""
    emb = S.normalize(embeddings)
    out = []
    for r in _groups(labels, need=2):
        sim = emb[r] @ emb[r].T
        out.append(1.0 - sim[np.triu_indices(len(r), 1)].mean())
    return float(np.mean(out))


def factor_spread(factors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per factor (columns of ``factors [N, F]``), the mean over identities of its within-identity std."""
    f = np.asarray(factors, np.float64)
    return np.mean(np.stack([f[r].std(axis=0, ddof=1) for r in _groups(labels, need=2)]), axis=0)


def dataset_figures(embeddings: np.ndarray, labels: np.ndarray, factors: Mapping[str, np.ndarray] | None = None,
                    training_centroids: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """Every figure above for one set; ``factors``: name -> per-image values (spread reported per name)."""
    labels, embeddings = np.asarray(labels), S.normalize(embeddings)  # identity_stats takes unit embeddings
    ids, c = S.centres(embeddings, labels)
    if len(ids) < 2:
        raise ValueError("dataset figures need at least two identities")
    genuine, impostor = S.pair_cosines(embeddings, labels, seed=seed)
    out = {"consistency": float(np.mean(S.consistency(embeddings, labels))),
           "fdr": S.fisher_ratio(genuine, impostor), "nearest_other": float(np.mean(S.nearest_other(c)[1])),
           "embedding_spread": embedding_spread(embeddings, labels)}
    for name, values in (factors or {}).items():
        out[f"spread/{name}"] = float(factor_spread(np.asarray(values)[:, None], labels)[0])
    if training_centroids is not None:
        out["nearest_training"] = float(np.mean(S.nearest_reference(c, training_centroids)[1]))
    return out
