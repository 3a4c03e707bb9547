"""The study's dataset figures on constructed embeddings whose answers are known in closed form."""

import math

import numpy as np
import pytest

from synray.evaluation import identity_stats as S
from synray.study import figures as F


def _set(k: int, m: int, angle: float, dim: int = 8, seed: int = 0):
    """k identities on orthogonal axes e_i, m images each at ``angle`` from the axis, spread evenly around it."""
    rng = np.random.default_rng(seed)
    emb, labels = [], []
    for i in range(k):
        axis = np.eye(dim)[i]
        for j in range(m):
            # a unit direction orthogonal to every identity axis: the spread lives in the last dims
            off = np.zeros(dim)
            off[k + (j % (dim - k))] = 1.0 if j < dim - k else -1.0
            emb.append(math.cos(angle) * axis + math.sin(angle) * off)
            labels.append(i)
    emb = np.array(emb) * rng.uniform(0.5, 3.0, (len(emb), 1))  # norms do not matter
    return emb, np.array(labels)


def test_consistency_and_spread_of_a_known_set():
    # 2 identities, 4 images each: +-e_2, +-e_3 offsets at 60 degrees; centroid = the axis
    emb, labels = _set(2, 4, math.radians(60), dim=4)
    out = F.dataset_figures(emb, labels)
    assert out["consistency"] == pytest.approx(0.5)
    # pairs of one identity: cos = cos^2 + sin^2 * <o_a, o_b>; offsets +-e2, +-e3 -> <.,.> = -1 (2 pairs) or 0 (4 pairs)
    c2, s2 = 0.25, 0.75
    assert out["embedding_spread"] == pytest.approx(1 - (2 * (c2 - s2) + 4 * c2) / 6)
    assert F.embedding_spread(emb, labels) == pytest.approx(out["embedding_spread"])
    assert out["nearest_other"] == pytest.approx(0.0, abs=1e-12)


def test_fisher_ratio_orders_sets_and_collapses_without_identity():
    emb, labels = _set(3, 4, math.radians(30), dim=8)
    g, i = S.pair_cosines(emb, labels, seed=0)
    fdr = F.dataset_figures(emb, labels)["fdr"]
    assert fdr == pytest.approx((g.mean() - i.mean()) ** 2 / (g.var() + i.var()))
    tight, _ = _set(3, 4, math.radians(10), dim=8)
    loose, _ = _set(3, 4, math.radians(70), dim=8)
    assert F.dataset_figures(tight, labels)["fdr"] > fdr > F.dataset_figures(loose, labels)["fdr"]
    # labels that do not follow the identities: genuine and impostor scores are alike
    shuffled = np.random.default_rng(0).permutation(labels)
    assert F.dataset_figures(emb, shuffled)["fdr"] < 0.1 * fdr


def test_nearest_other_and_training_identity():
    axes = np.eye(4)
    emb = np.concatenate([np.repeat(axes[:1], 3, 0), np.repeat((axes[0] + axes[1])[None], 3, 0),
                          np.repeat(axes[2:3], 3, 0)]) + 1e-3 * np.arange(9)[:, None] * axes[3]
    labels = np.repeat([0, 1, 2], 3)
    out = F.dataset_figures(emb, labels, training_centroids=np.stack([axes[0], axes[3]]))
    # identities 0 and 1 are 45 degrees apart, 2 is orthogonal to both
    assert out["nearest_other"] == pytest.approx((2 * math.cos(math.pi / 4) + 0) / 3, abs=1e-4)
    assert out["nearest_training"] == pytest.approx((1 + math.cos(math.pi / 4) + 0) / 3, abs=1e-2)


def test_factor_spread_is_the_mean_within_identity_std():
    labels = np.array([0, 0, 0, 1, 1, 1])
    factors = np.array([[0.0, 1], [10, 1], [20, 1], [5, 2], [5, 4], [5, 6]])
    np.testing.assert_allclose(F.factor_spread(factors, labels), [(10 + 0) / 2, (0 + 2) / 2])
    emb = np.eye(6)[[0, 0, 1, 2, 2, 3]] + 0.1
    out = F.dataset_figures(emb, labels, factors={"yaw": factors[:, 0]}, training_centroids=np.eye(6)[:1])
    assert out["spread/yaw"] == pytest.approx(5.0)
    assert set(out) == {"consistency", "fdr", "nearest_other", "embedding_spread", "spread/yaw", "nearest_training"}


def test_figures_refuse_sets_they_cannot_measure():
    with pytest.raises(ValueError, match="at least 2 images"):
        F.embedding_spread(np.eye(3), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="two identities"):
        F.dataset_figures(np.eye(3), np.array([0, 0, 0]))
