"""Measuring a row's dataset: read its shards, embed with the teacher, read or look up nuisance factors.

The figures themselves are :mod:`synray.study.figures`; this module feeds them from a finished synthesis
output (no Ray: the shards are read in this process) and makes the row's sample grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synray.io.images import decode_image
from synray.io.shards import open_dataset, read_shard
from synray.study import figures as F

__all__ = ["Measurer", "read_images", "sample_grid", "FACTOR_GROUPS", "MIN_R2"]

#: spreads reported, each the root of the summed variances of its factors' within-identity spreads
FACTOR_GROUPS: dict[str, tuple[str, ...]] = {"pose": ("yaw", "pitch"), "expression": ("smile", "mouth_open"),
                                             "light": ("light_x", "light_y")}
#: a spread read off generated images is reported only if the regressor's held-out R^2 reaches this for each factor
MIN_R2 = 0.3


def read_images(uri: str, per_identity: int | None = None, kinds: tuple[str, ...] = ("generated", "real"),
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uint8 images, identities, samples)`` of a complete dataset, rows of ``kinds`` only, the first
    ``per_identity`` samples of each identity (all when None), in identity then sample order."""
    ds = open_dataset(uri)
    images, ids, samples = [], [], []
    for f in ds.files:
        t = read_shard(f).select(["image", "identity", "sample", "kind"]).to_pydict()
        for im, i, s, k in zip(t["image"], t["identity"], t["sample"], t["kind"]):
            if k in kinds:
                images.append(im)
                ids.append(i)
                samples.append(s)
    ids_a, smp = np.asarray(ids, np.int64), np.asarray(samples, np.int64)
    order = np.lexsort((smp, ids_a))
    keep = order
    if per_identity is not None:
        rank = np.zeros(len(order), np.int64)
        prev, n = None, 0
        for k, r in enumerate(order):
            n = n + 1 if ids_a[r] == prev else 0
            prev = ids_a[r]
            rank[k] = n
        keep = order[rank < per_identity]
    decoded = np.stack([decode_image(images[r], f"{uri} identity {ids_a[r]} sample {smp[r]}") for r in keep])
    return decoded, ids_a[keep], smp[keep]


def sample_grid(images: np.ndarray, labels: np.ndarray, identities: int = 8, per_identity: int = 8) -> np.ndarray:
    """One row per identity (the first ``identities``), its first ``per_identity`` images side by side."""
    ids = list(dict.fromkeys(labels.tolist()))[:identities]
    h, w = images.shape[1:3]
    grid = np.zeros((len(ids) * h, per_identity * w, 3), np.uint8)
    for r, i in enumerate(ids):
        for c, k in enumerate(np.flatnonzero(labels == i)[:per_identity]):
            grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[k]
    return grid


@dataclass
class Measurer:
    """The teacher (embeddings), the nuisance regressor and the LDMs' training centroids, loaded once."""

    teacher: str
    nuisance: str
    training_centroids: np.ndarray

    def __post_init__(self) -> None:
        from synray.study.nuisance import FACTORS, NuisanceRegressor
        from synray.synthesis.embedders import Embedder

        self.embedder = Embedder(self.teacher, flip=False)
        self.regressor = NuisanceRegressor.load(self.nuisance)
        self.factor_names = FACTORS

    def figures(self, images: np.ndarray, labels: np.ndarray, factors: np.ndarray | None = None) -> dict[str, float]:
        """Dataset figures of ``images``; ``factors`` ``[N, F]`` when known (world renders), else read off the images."""
        emb = self.embedder.embed(images)
        read = factors is None
        if read:
            factors = self.regressor.predict(images)
        spread = F.factor_spread(factors, labels)
        col = {n: k for k, n in enumerate(self.factor_names)}
        out = F.dataset_figures(emb, labels, training_centroids=self.training_centroids)
        r2 = (self.regressor.meta or {}).get("heldout_r2", {})
        for group, names in FACTOR_GROUPS.items():
            if read and any(r2.get(n, -1.0) < MIN_R2 for n in names):
                continue  # the regressor does not read these factors back: no figure rather than noise
            out[f"spread/{group}"] = float(np.sqrt(sum(spread[col[n]] ** 2 for n in names)))
        out["images"] = float(len(images))
        out["identities"] = float(len(np.unique(labels)))
        return out
