"""Per-identity randomness: every draw derives from ``(run_seed, identity, ...)``.

Never from worker rank, batch position or retry count, so the same config regenerates the same
dataset on one machine or a hundred, and a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Streams of one identity, kept apart so adding a feature never shifts another's draws.
CONTEXT, PARTNER, SAMPLE = 0, 1, 2


def rng(run_seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(run_seed, spawn_key=tuple(int(k) for k in key)))


def sample_seed(run_seed: int, identity: int, sample: int) -> int:
    """The 63-bit seed recorded in the shard for image ``(identity, sample)``."""
    state = np.random.SeedSequence(run_seed, spawn_key=(int(identity), SAMPLE, int(sample))).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def derive(*parts: int) -> int:
    """A 62-bit seed for a stream keyed by integers (run seed, step, rank, ...), for torch and numpy alike."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] & ((1 << 62) - 1))


def torch_generator(seed: int) -> torch.Generator:
    import torch  # here, not with the module: numpy-only workers (world synthesis) never load torch

    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g
