"""Generators by name: the built-in ones and any a plugin adds.

Adding a generator is one class (``__init__(cfg: SynthConfig)`` and ``generate(ids, contexts, samples)``, see
:class:`synray.synthesis.generators.Generator`), one :func:`register_generator` call, and, if it takes settings,
one pydantic model for them (``generator.options`` in the config, validated when the config loads). A config
names the module that registers it under ``plugins`` so that every process that reads the config imports it.
This module imports nothing heavy: configs check ``generator.type`` against it without loading models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

__all__ = ["GeneratorEntry", "GENERATORS", "register_generator", "generator_entry"]


@dataclass(frozen=True)
class GeneratorEntry:
    factory: str | Callable[[Any], Any]  # a class/callable, or "module:attr" (imported when first built)
    options: type[BaseModel] | None = None  # the model of ``generator.options``; None: no options

    def build(self, cfg: Any) -> Any:
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory(cfg)


GENERATORS: dict[str, GeneratorEntry] = {
    "ldm": GeneratorEntry("synray.synthesis.neural_generators:LDMGenerator"),
    "world": GeneratorEntry("synray.synthesis.generators:WorldGenerator"),  # numpy only: world workers skip torch
    "dcgan": GeneratorEntry("synray.synthesis.neural_generators:DCGANGenerator"),
}


def register_generator(name: str, factory: str | Callable[[Any], Any], options: type[BaseModel] | None = None) -> None:
    """Make ``generator.type: name`` build ``factory(cfg)``; ``options`` validates ``generator.options``."""
    GENERATORS[name] = GeneratorEntry(factory, options)


def generator_entry(name: str) -> GeneratorEntry:
    if name not in GENERATORS:
        raise ValueError(f"unknown generator type {name!r}; valid: {', '.join(sorted(GENERATORS))} (a generator of a "
                         "plugin needs its module under `plugins`)")
    return GENERATORS[name]
