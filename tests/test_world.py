"""The built-in mini world: determinism, identity vs nuisance, landmarks, verification sets."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from synray.align import ARCFACE_TEMPLATE, similarity_matrix
from synray.evaluation.binset import read_bin
from synray.world.factors import (
    RANGES,
    NuisanceFactors,
    identity_factors,
    nuisance_factors,
    perturb_identity,
)
from synray.world.render import render_face
from synray.world.world import BIN_SETS, HELDOUT_OFFSET, World

cv2.setNumThreads(1)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=7, num_identities=50, num_heldout=60)


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _pixel_feature(images: np.ndarray) -> np.ndarray:
    """A fixed, untrained descriptor: 12x12 colour thumbnail, mean-removed and L2-normalised."""
    f = np.stack([cv2.resize(im, (12, 12), interpolation=cv2.INTER_AREA) for im in images]).reshape(len(images), -1)
    f = f.astype(np.float64) - f.mean(1, keepdims=True)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a genuine pair scores above an impostor pair (Mann-Whitney U / n1 n2)."""
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def test_same_seed_identity_sample_gives_identical_bytes(world):
    a = world.render(3, 11)
    assert a.dtype == np.uint8 and a.shape == (112, 112, 3)
    assert a.tobytes() == world.render(3, 11).tobytes()
    # A fresh world object (as on another worker) regenerates the same bytes.
    assert a.tobytes() == World(seed=7, num_identities=50, num_heldout=60).render(3, 11).tobytes()
    assert not np.array_equal(a, world.render(4, 11)), "different identities must differ"
    assert not np.array_equal(a, world.render(3, 12)), "different samples must differ"
    assert not np.array_equal(a, World(seed=8).render(3, 11)), "different world seeds must differ"
    batch = world.render_batch([3, 4, 3], [11, 11, 12])
    assert batch.shape == (3, 112, 112, 3)
    assert np.array_equal(batch[0], a) and np.array_equal(batch[1], world.render(4, 11))
    # Factors derive from (seed, identity[, sample]) alone.
    assert identity_factors(7, 3) == identity_factors(7, 3) != identity_factors(7, 4)
    assert nuisance_factors(7, 3, 11) == nuisance_factors(7, 3, 11) != nuisance_factors(7, 3, 12)


def test_difficulty_zero_is_the_canonical_photo_and_difficulty_scales_nuisance(world):
    assert np.array_equal(world.render(5, 0, difficulty=0.0), world.render(5, 9, difficulty=0.0))
    assert nuisance_factors(7, 5, 9, 0.0) == NuisanceFactors()
    lo, hi = nuisance_factors(7, 5, 9, 0.5), nuisance_factors(7, 5, 9, 1.5)
    # Same draws pushed further: pose angles scale linearly (below the clip).
    assert hi.yaw == pytest.approx(3 * lo.yaw) or abs(hi.yaw) == 60.0
    assert hi.pitch == pytest.approx(3 * lo.pitch) or abs(hi.pitch) == 35.0
    yaws = np.array([abs(nuisance_factors(7, 1, s, 1.0).yaw) for s in range(200)])
    assert 10.0 < np.median(yaws) < 20.0  # |N(0, 20 deg)| has median 13.5 deg


def test_same_identity_is_closer_than_different_identities_under_a_fixed_pixel_feature(world):
    aucs = {}
    for d in (0.4, 1.0, 1.6):
        images, issame = world.verification_pairs("heldout", num_pairs=120, seed=3, size=64, difficulty=d)
        f = _pixel_feature(images)
        sim = (f[0::2] * f[1::2]).sum(1)
        aucs[d] = _auc(sim[issame], sim[~issame])
        assert sim[issame].mean() > sim[~issame].mean() + 0.05, f"difficulty {d}: genuine {sim[issame].mean():.3f} vs impostor {sim[~issame].mean():.3f}"
    # Identity survives nuisance, but nuisance is strong enough that raw pixels do not solve the task,
    # and more difficulty means less identity signal.
    assert aucs[0.4] > 0.8
    assert 0.55 < aucs[1.0] < 0.85
    assert aucs[1.6] < aucs[1.0] - 0.03 < aucs[0.4] - 0.06


def test_identity_drift_is_small_relative_to_identity_spread():
    base = identity_factors(0, 1)
    nuis = nuisance_factors(0, 1, 2, 1.0)
    drifted = perturb_identity(base, nuis.drift)
    others = [identity_factors(0, i) for i in range(2, 40)]
    for name, (lo, hi) in RANGES.items():
        step = abs(getattr(drifted, name) - getattr(base, name)) / (hi - lo)
        assert step <= 0.3 + 1e-9
    spread = np.mean([[abs(getattr(o, n) - getattr(base, n)) / (hi - lo) for n, (lo, hi) in RANGES.items()] for o in others])
    drift = np.mean([abs(getattr(drifted, n) - getattr(base, n)) / (hi - lo) for n, (lo, hi) in RANGES.items()])
    assert drift < 0.25 * spread
    with pytest.raises(ValueError, match="drift has 3 entries"):
        perturb_identity(base, (0.1, 0.2, 0.3))


def test_frontal_landmarks_land_on_the_arcface_template(world):
    errors = []
    for identity in range(25):
        img, lm = world.render(identity, 0, difficulty=0.0, return_landmarks=True)
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        errors.append(np.linalg.norm(lm - ARCFACE_TEMPLATE, axis=1))
    errors = np.array(errors)
    assert errors.mean() < 2.5 and errors.max() < 6.0, (errors.mean(), errors.max())
    # At another output size the landmarks scale with the image.
    img64, lm64 = world.render(3, 0, size=64, difficulty=0.0, return_landmarks=True)
    _, lm112 = world.render(3, 0, difficulty=0.0, return_landmarks=True)
    assert img64.shape == (64, 64, 3)
    np.testing.assert_allclose(lm64, lm112 * 64 / 112, atol=1e-3)


@pytest.mark.parametrize("yaw,pitch,roll", [(0.0, 0.0, 0.0), (28.0, 8.0, 6.0), (-30.0, -10.0, -8.0), (15.0, -15.0, 12.0)])
def test_landmarks_follow_the_drawn_eyes_under_pose(yaw, pitch, roll):
    nuis = NuisanceFactors(yaw=yaw, pitch=pitch, roll=roll, scale=1.08, shift=(3.0, -2.0))
    for identity in range(6):
        ident = identity_factors(11, identity)
        img, lm = render_face(ident, nuis, 112, return_landmarks=True)
        luma = _luma(img)
        for eye in lm[:2]:
            x, y = int(round(eye[0])), int(round(eye[1]))
            # The pupil (near-black) is drawn at the eye landmark.
            assert luma[y - 1 : y + 2, x - 1 : x + 2].min() < 45, (identity, eye)
        # Re-aligning the landmarks onto the template undoes exactly the aligner error (roll, scale).
        m = similarity_matrix(lm.astype(np.float64), ARCFACE_TEMPLATE)
        assert np.degrees(np.arctan2(m[1, 0], m[0, 0])) == pytest.approx(-roll, abs=1e-3)
        assert np.hypot(m[0, 0], m[1, 0]) == pytest.approx(1 / 1.08, rel=1e-5)
        if abs(yaw) > 20:
            # Turning moves the nose tip further than the eyes, towards the turn.
            aligned = lm @ m[:2, :2].T + m[:2, 2]
            offset = aligned[2, 0] - aligned[:2, 0].mean()
            assert np.sign(offset) == np.sign(yaw) and abs(offset) > 4.0, offset


def test_splits_are_disjoint_and_pairs_are_balanced_and_deterministic(world):
    train, held = world.identity_split("train"), world.identity_split("heldout")
    assert list(train) == list(range(50)) and held.start == HELDOUT_OFFSET and len(held) == 60
    assert not set(train) & set(held)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        world.identity_split("test")
    ids, issame = world.pair_ids("heldout", 100, seed=1)
    assert ids.shape == (200, 2) and issame.sum() == 50
    for k in range(100):
        (ia, sa), (ib, sb) = ids[2 * k], ids[2 * k + 1]
        assert ia in held and ib in held
        assert (ia == ib) == issame[k] and (ia, sa) != (ib, sb)
    for fold in np.array_split(issame, 10):  # insightface folds are contiguous tenths
        assert fold.mean() == 0.5
    again, _ = world.pair_ids("heldout", 100, seed=1)
    other, _ = world.pair_ids("heldout", 100, seed=2)
    assert np.array_equal(ids, again) and not np.array_equal(ids, other)
    images, same = world.verification_pairs("heldout", 4, seed=1, size=48)
    assert images.shape == (8, 48, 48, 3) and np.array_equal(same, issame[:4])
    train_images = list(world.iter_split("train", 2, size=32))
    assert len(train_images) == 100 and [(i, s) for _, i, s in train_images[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert np.array_equal(train_images[3][0], world.render(1, 1, size=32))


def test_verification_bins_round_trip(world, tmp_path):
    paths = world.write_verification_bins(tmp_path, num_pairs=20, seed=5)
    assert set(paths) == set(BIN_SETS) == {"world-frontal", "world-hard"}
    frontal, hard = read_bin(paths["world-frontal"]), read_bin(paths["world-hard"])
    expected, issame = world.verification_pairs("heldout", 20, seed=5, difficulty=world.difficulty * BIN_SETS["world-frontal"])
    for images, same in (frontal, hard):
        assert images.shape == (40, 112, 112, 3) and images.dtype == np.uint8
        assert np.array_equal(same, issame) and same.sum() == 10
    # JPEG at quality 95: close to the rendered pixels.
    assert np.abs(frontal[0].astype(np.int16) - expected.astype(np.int16)).mean() < 3.0
    # The hard set shows the same pairs under stronger nuisance.
    assert np.abs(hard[0].astype(np.int16) - frontal[0].astype(np.int16)).mean() > 10.0


def test_bad_input_is_a_clear_error(world):
    with pytest.raises(ValueError, match="difficulty"):
        World(difficulty=-1.0)
    with pytest.raises(ValueError, match="num_identities"):
        World(num_identities=0)
    with pytest.raises(ValueError, match="identity must be a non-negative integer"):
        world.render(-1, 0)
    with pytest.raises(ValueError, match="size must be an integer >= 16"):
        world.render(0, 0, size=8)
    with pytest.raises(ValueError, match="images_per_identity"):
        next(world.iter_split("train", 0))
    with pytest.raises(TypeError, match="nuisance must be NuisanceFactors"):
        render_face(identity_factors(0, 0), {"yaw": 3.0})
    with pytest.raises(ValueError, match="1-D"):
        world.render_batch([[1, 2]], [[0, 0]])


def test_factor_dataclasses_are_plain_and_frozen():
    ident = identity_factors(0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.face_width = 1.0  # type: ignore[misc]
    assert 0 <= ident.hair_style and 0 <= ident.facial_hair
