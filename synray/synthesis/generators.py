"""Image generators behind one interface: identities + contexts -> uint8 RGB images.

Each image ``(identity, sample)`` gets its own seed from ``(run_seed, identity, sample)``, so results do
not depend on how identities are batched, which actor runs them, or whether the run was resumed.

The world generator needs numpy only. The neural ones (:class:`LDMGenerator`, :class:`DCGANGenerator`,
in :mod:`synray.synthesis.neural_generators`) bring torch and are loaded when first named, so a world
synthesis worker starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from synray.config.synth import SynthConfig
from synray.synthesis.registry import generator_entry

#: names served by :mod:`synray.synthesis.neural_generators` (loaded on first use)
_NEURAL = ("LDMGenerator", "DCGANGenerator", "to_uint8", "auto_batch_size", "CPU_BATCH", "MAX_GPU_BATCH")


def __getattr__(name: str) -> Any:
    if name in _NEURAL:
        return getattr(importlib.import_module("synray.synthesis.neural_generators"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Generator(Protocol):
    name: str

    def generate(self, ids: np.ndarray, contexts: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """``samples[k]`` images for ``ids[k]`` -> uint8 ``[sum, H, W, 3]``, identity-major order.

        ``contexts`` is ``[ids, D]`` (one per identity) or ``[ids, images, D]`` (one per image: identity mixup).
        """


class WorldGenerator:
    """The built-in parametric world: a cheap, exact-identity generator (contexts are unused)."""

    name = "world"

    def __init__(self, cfg: SynthConfig):
        from synray.world.world import World

        self.world = World(seed=cfg.seed, num_identities=cfg.identities.start + cfg.identities.count,
                           difficulty=cfg.generator.world_difficulty)

    def generate(self, ids: np.ndarray, contexts: np.ndarray, samples: np.ndarray) -> np.ndarray:
        return np.stack([self.world.render(int(i), int(s)) for i, n in zip(ids, samples) for s in range(int(n))])


def build_generator(cfg: SynthConfig) -> Generator:
    """The generator ``generator.type`` names (:mod:`synray.synthesis.registry`)."""
    return generator_entry(cfg.generator.type).build(cfg)
