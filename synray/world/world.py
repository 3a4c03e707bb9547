"""The built-in labelled mini world: identities, splits, images and verification sets.

A ``World`` is fully described by ``(seed, num_identities, num_heldout, difficulty)``: image
``(identity, sample)`` is rendered from factors drawn from ``(seed, identity)`` and
``(seed, identity, sample)`` only, so any worker on any machine produces the same bytes. Held-out
identities live in their own id range, far above the training ids, so growing the training split
never changes the held-out benchmark.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from synray.evaluation.binset import write_bin
from synray.world.factors import (
    IdentityFactors,
    NuisanceFactors,
    _check_int,
    identity_factors,
    nuisance_factors,
)
from synray.world.render import render_face

# Default world difficulty, chosen with benchmarks/world_difficulty.py: its small CNN (300 train
# identities x 12 photos, 8 epochs, CosFace) reaches ~83-86% held-out 10-fold accuracy here, against
# ~96% at 0.5, so the world is learnable without saturating and leaves room to show gains.
DEFAULT_DIFFICULTY = 1.0
HELDOUT_OFFSET = 10_000_000  # first held-out identity id
PAIR_SAMPLE_OFFSET = 1_000_000  # verification photos use sample ids no training recipe uses
# Verification sets written by ``write_verification_bins``: name -> difficulty relative to the world's.
BIN_SETS: dict[str, float] = {"world-frontal": 0.4, "world-hard": 1.6}
SPLITS = ("train", "heldout")


class World:
    """A deterministic population of rendered identities with train / held-out splits."""

    def __init__(
        self,
        seed: int = 0,
        num_identities: int = 1000,
        difficulty: float = DEFAULT_DIFFICULTY,
        num_heldout: int = 500,
        size: int = 112,
    ):
        for name, value, low in (("seed", seed, 0), ("num_identities", num_identities, 1), ("num_heldout", num_heldout, 1), ("size", size, 16)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"World {name} must be an integer >= {low}, got {value!r}")
        if num_identities > HELDOUT_OFFSET:
            raise ValueError(f"World num_identities must be <= {HELDOUT_OFFSET} (held-out ids start there), got {num_identities}")
        self.difficulty = _check_difficulty(difficulty)
        self.seed = int(seed)
        self.num_identities = int(num_identities)
        self.num_heldout = int(num_heldout)
        self.size = int(size)
        self._identity = lru_cache(maxsize=4096)(self._make_identity)

    def __repr__(self) -> str:
        return (
            f"World(seed={self.seed}, num_identities={self.num_identities}, difficulty={self.difficulty}, "
            f"num_heldout={self.num_heldout}, size={self.size})"
        )

    # -- identities ---------------------------------------------------------------------------
    def identity_split(self, split: str) -> range:
        """Identity ids of ``"train"`` (0..num_identities-1) or ``"heldout"`` (a disjoint range)."""
        if split == "train":
            return range(self.num_identities)
        if split == "heldout":
            return range(HELDOUT_OFFSET, HELDOUT_OFFSET + self.num_heldout)
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def _make_identity(self, identity: int) -> IdentityFactors:
        return identity_factors(self.seed, identity)

    def identity(self, identity: int) -> IdentityFactors:
        """Identity factors of ``identity`` (cached)."""
        return self._identity(_check_int("identity", identity))

    def nuisance(self, identity: int, sample: int, difficulty: float | None = None) -> NuisanceFactors:
        """Nuisance factors of photo ``sample`` of ``identity``."""
        d = self.difficulty if difficulty is None else _check_difficulty(difficulty)
        return nuisance_factors(self.seed, _check_int("identity", identity), _check_int("sample", sample), d)

    # -- images -------------------------------------------------------------------------------
    def render(
        self,
        identity: int,
        sample: int,
        size: int | None = None,
        difficulty: float | None = None,
        return_landmarks: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """uint8 RGB image [size, size, 3] of photo ``sample`` of ``identity`` (and its 5 landmarks if asked)."""
        return render_face(
            self.identity(identity),
            self.nuisance(identity, sample, difficulty),
            self.size if size is None else size,
            return_landmarks=return_landmarks,
        )

    def render_batch(
        self,
        identities: Sequence[int] | np.ndarray | int,
        samples: Sequence[int] | np.ndarray | int,
        size: int | None = None,
        difficulty: float | None = None,
    ) -> np.ndarray:
        """uint8 [N, size, size, 3] for paired ``identities[i], samples[i]`` (a scalar broadcasts)."""
        ids, smp = np.broadcast_arrays(np.asarray(identities, np.int64), np.asarray(samples, np.int64))
        if ids.ndim != 1:
            raise ValueError(f"identities and samples must be 1-D (or scalars), got shapes {np.shape(identities)} and {np.shape(samples)}")
        s = self.size if size is None else size
        out = np.empty((len(ids), s, s, 3), np.uint8)
        for k, (i, j) in enumerate(zip(ids.tolist(), smp.tolist())):
            out[k] = self.render(i, j, s, difficulty)
        return out

    def iter_split(
        self,
        split: str,
        images_per_identity: int,
        size: int | None = None,
        difficulty: float | None = None,
    ) -> Iterator[tuple[np.ndarray, int, int]]:
        """Yield ``(image, identity, sample)`` for samples 0..images_per_identity-1 of every identity in ``split``."""
        if isinstance(images_per_identity, bool) or not isinstance(images_per_identity, (int, np.integer)) or images_per_identity < 1:
            raise ValueError(f"images_per_identity must be an integer >= 1, got {images_per_identity!r}")
        for identity in self.identity_split(split):
            for sample in range(int(images_per_identity)):
                yield self.render(identity, sample, size, difficulty), identity, sample

    # -- verification -------------------------------------------------------------------------
    def pair_ids(self, split: str = "heldout", num_pairs: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [2N, 2] of (identity, sample) in pair order, issame [N])``; genuine and impostor alternate.

        Alternating labels keep every contiguous tenth (the insightface 10-fold split) exactly balanced.
        """
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs < 1:
            raise ValueError(f"num_pairs must be an integer >= 1, got {num_pairs!r}")
        ids = self.identity_split(split)
        if len(ids) < 2:
            raise ValueError(f"split {split!r} has {len(ids)} identities; verification pairs need at least 2")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5A1F, int(seed)]))
        n = len(ids)
        issame = np.arange(num_pairs) % 2 == 0
        a = rng.integers(0, n, num_pairs)
        b = (a + rng.integers(1, n, num_pairs)) % n  # always a different identity
        b = np.where(issame, a, b)
        sa = rng.integers(0, PAIR_SAMPLE_OFFSET, num_pairs)
        sb = (sa + rng.integers(1, PAIR_SAMPLE_OFFSET, num_pairs)) % PAIR_SAMPLE_OFFSET  # never the same photo
        out = np.empty((2 * num_pairs, 2), np.int64)
        out[0::2, 0], out[1::2, 0] = ids.start + a, ids.start + b
        out[0::2, 1], out[1::2, 1] = PAIR_SAMPLE_OFFSET + sa, PAIR_SAMPLE_OFFSET + sb
        return out, issame

    def verification_pairs(
        self,
        split: str = "heldout",
        num_pairs: int = 3000,
        seed: int = 0,
        size: int | None = None,
        difficulty: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8 [2N, size, size, 3] in order a0, b0, a1, b1, ..., issame bool [N])``, 50% genuine."""
        ids, issame = self.pair_ids(split, num_pairs, seed)
        return self.render_batch(ids[:, 0], ids[:, 1], size, difficulty), issame

    def write_verification_bins(
        self,
        out_dir: str | os.PathLike,
        num_pairs: int = 3000,
        seed: int = 0,
        size: int = 112,
        sets: dict[str, float] | None = None,
    ) -> dict[str, Path]:
        """Write insightface ``.bin`` sets of held-out pairs; returns ``{name: path}``.

        ``sets`` maps a name to a difficulty relative to the world's; the default writes
        ``world-frontal.bin`` (mild nuisance, LFW-like) and ``world-hard.bin`` (strong pose, light
        and occlusion, CFP-FP-like). Both use the same pairs, so their gap measures nuisance alone.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, rel in (BIN_SETS if sets is None else sets).items():
            images, issame = self.verification_pairs("heldout", num_pairs, seed, size, self.difficulty * rel)
            path = out / f"{name}.bin"
            write_bin(path, images, issame)
            paths[name] = path
        return paths


def _check_difficulty(difficulty: float) -> float:
    try:
        d = float(difficulty)
    except (TypeError, ValueError):
        raise ValueError(f"difficulty must be a number >= 0, got {difficulty!r}") from None
    if not np.isfinite(d) or d < 0:
        raise ValueError(f"difficulty must be a finite number >= 0, got {difficulty!r}")
    return d
