"""Work units and their input rows, a pure function of the config (numpy only, no Ray, no torch).

A run's identities ``start .. start+count-1`` fall into fixed units of ``identities.unit_size`` (one shard
each). A unit's row holds its identities, contexts and soft labels (and, for ADMIS-style sampling, its
context faces); it is made where it is consumed, a unit at a time: the driver never holds the rows of a
run, which keeps its memory flat in the number of identities.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from synray.align import resize
from synray.config.synth import SynthConfig
from synray.io.images import decode_image
from synray.synthesis import contexts as C
from synray.world.world import World

__all__ = ["CONTEXT_FACE_SAMPLE", "unit_range", "unit_identities", "units_of", "all_identities", "needs_base",
           "base_contexts", "base_task", "context_faces", "unit_row", "unit_rows", "rows_batch"]

CONTEXT_FACE_SAMPLE = 10**6  # world sample index reserved for an identity's context face


def unit_range(cfg: SynthConfig) -> range:
    """The fixed work units' numbers: unit u holds identities ``u*size .. (u+1)*size - 1`` within the run's range."""
    size, start, count = cfg.identities.unit_size, cfg.identities.start, cfg.identities.count
    return range(start // size, start // size + (count + size - 1) // size)


def unit_identities(cfg: SynthConfig, unit: int) -> np.ndarray:
    """The identities of work unit ``unit`` (the last unit may be short)."""
    size, end = cfg.identities.unit_size, cfg.identities.start + cfg.identities.count
    return np.arange(unit * size, min((unit + 1) * size, end), dtype=np.int64)


def units_of(cfg: SynthConfig) -> dict[int, np.ndarray]:
    """Every unit's identities (a dict over the whole run: for small runs and tests; jobs use :func:`unit_range`)."""
    return {u: unit_identities(cfg, u) for u in unit_range(cfg)}


def all_identities(cfg: SynthConfig) -> np.ndarray:
    return np.arange(cfg.identities.start, cfg.identities.start + cfg.identities.count, dtype=np.int64)


def needs_base(cfg: SynthConfig) -> bool:
    """Whether a unit's contexts depend on other identities' (a file's table, separation, mixup partners)."""
    c = cfg.contexts
    return c.source in ("embeddings_file", "mixup") or (c.source == "gaussian" and c.separation.max_cosine is not None)


def base_contexts(cfg: SynthConfig) -> np.ndarray:
    """The unmixed contexts of every identity of the run, for the sources of :func:`needs_base`."""
    c, all_ids = cfg.contexts, all_identities(cfg)
    if c.source == "embeddings_file" or (c.source == "mixup" and c.path):  # mixup blends the file's rows
        return C.from_table(C.load_embeddings(c.path), all_ids, c.dim, c.path)
    if c.separation.max_cosine is not None:
        return C.separated_gaussian(cfg.seed, all_ids, c.dim, c.separation.max_cosine, c.separation.max_tries)
    return C.gaussian(cfg.seed, all_ids, c.dim)


@functools.lru_cache(maxsize=4)
def _face_files(folder: str) -> list[str]:
    """The image files of a context-face folder, sorted (listed once per process: rows are made unit by unit)."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))


def context_faces(cfg: SynthConfig, ids: np.ndarray) -> np.ndarray:
    """Context face images: the i-th image of ``contexts.path`` (sorted) or the world's render of i."""
    size = tuple(cfg.alignment.size)
    if cfg.contexts.path:
        names = _face_files(cfg.contexts.path)
        if len(ids) and int(ids.max()) >= len(names):
            raise C.ContextError(f"contexts.path {cfg.contexts.path} has {len(names)} images; identity {int(ids.max())} requested")
        faces = []
        for i in ids:
            p = os.path.join(cfg.contexts.path, names[int(i)])
            with open(p, "rb") as fh:
                faces.append(decode_image(fh.read(), p))
        return np.stack([resize(f, size) for f in faces])

    world = World(seed=cfg.seed, num_identities=int(ids.max()) + 1 if len(ids) else 1,
                  difficulty=cfg.generator.world_difficulty)
    return np.stack([world.render(int(i), CONTEXT_FACE_SAMPLE) for i in ids])


def unit_row(cfg: SynthConfig, unit: int, base: np.ndarray | None = None) -> dict[str, Any]:
    """One unit's input row: identities, contexts, soft labels (and context faces).

    A pure function of the config and the unit (``base``: :func:`base_contexts`, for the sources that need it),
    so the rows are made where they are consumed, a unit at a time, and the driver never holds them.
    """
    ids = unit_identities(cfg, unit)
    src = cfg.contexts.source
    if needs_base(cfg) and base is None:
        raise ValueError(f"contexts.source {src!r} needs the run's base contexts (base_contexts)")
    if src == "mixup":
        mixed = C.mixup(cfg.seed, ids, all_identities(cfg), base, cfg.generator.images_per_identity, cfg.contexts.mixup.weights)
        ctx, partner, weight = mixed.vectors, mixed.partner, mixed.weight
    else:
        if src in ("face_embeddings", "empty"):  # filled by ContextFaceStage / none: the model's empty context
            ctx = np.zeros((len(ids), cfg.contexts.dim), np.float32)
        elif base is not None:
            ctx = base[ids - cfg.identities.start]
        else:
            ctx = C.gaussian(cfg.seed, ids, cfg.contexts.dim)  # per identity: the same rows as over the whole run
        partner, weight = np.full(len(ids), -1, np.int64), np.ones(len(ids), np.float32)
    if src not in ("face_embeddings", "empty"):  # those are checked where the embedder computes them
        C.check_rows(ctx, ids, f"contexts ({src})")
    row = {"unit": np.int64(unit), "ids": ids, "contexts": ctx.astype(np.float32), "partner": partner, "weight": weight}
    if src == "face_embeddings":
        row["context_faces"] = context_faces(cfg, ids)
    return row


def unit_rows(cfg: SynthConfig, only: list[int]) -> Iterator[dict[str, Any]]:
    """The input rows of the units ``only``, one at a time (the base contexts computed once, when needed)."""
    base = base_contexts(cfg) if needs_base(cfg) else None
    for u in only:
        yield unit_row(cfg, u, base)


def rows_batch(batch: dict[str, np.ndarray], cfg: dict, pending: list[int], base: Any = None) -> dict[str, np.ndarray]:
    """Ray Data: row ``k`` of ``range(len(pending))`` -> the input row of unit ``pending[k]`` (``base``: an object
    ref to :func:`base_contexts`, or None)."""
    import ray

    (k,) = batch["id"]
    base_arr = ray.get(base) if base is not None else None
    row = unit_row(SynthConfig.model_validate(cfg), pending[int(k)], base_arr)
    return {name: np.asarray(v)[None] for name, v in row.items()}


def base_task(cfg: dict) -> np.ndarray:
    """:func:`base_contexts` of a config given as a dict (a Ray task's argument)."""
    return base_contexts(SynthConfig.model_validate(cfg))
