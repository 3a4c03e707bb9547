"""Synthesis stages as plain callables on one work unit (no Ray here).

A work unit travels as one row: its identities, contexts and, after generation, all its images. The
Ray pipeline maps these callables over units (``batch_size=1``); the plain loop in
:func:`synray.synthesis.pipeline.run_local` calls the very same objects, which keeps the two backends
comparable and the stages testable without Ray.

The FR embedders (torch) are imported by the stages that use them, when they are built: every synthesis
worker imports this module, and the world generator's workers (generate, finish, write) then start
without loading torch, seconds per process that an actor's start-up would otherwise add to a run.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

from synray.align import resize
from synray.config.synth import SynthConfig
from synray.io import shards
from synray.io.images import decode_image, encode_image
from synray.seeds import sample_seed
from synray.synthesis.contexts import check_rows
from synray.synthesis.detectors import align_faces, build_detector
from synray.synthesis.generators import build_generator

Unit = dict[str, np.ndarray]


def unbatch(batch: dict[str, Any]) -> Unit:
    n = len(next(iter(batch.values())))
    if n != 1:
        raise ValueError(f"synthesis stages take one work unit per batch, got {n}")
    return {k: np.asarray(v[0]) if not isinstance(v, list) else v[0] for k, v in batch.items()}


def rebatch(unit: Unit) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[None] for k, v in unit.items()}


class ContextFaceStage:
    """ADMIS context-enhanced sampling: contexts are FR embeddings of the unit's context faces."""

    def __init__(self, cfg: dict):
        from synray.synthesis.embedders import (
            Embedder,  # torch: see the module docstring
        )

        self.cfg = SynthConfig.model_validate(cfg)
        self.embedder = Embedder(self.cfg.contexts.embedder, flip=self.cfg.contexts.flip)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        unit = unbatch(batch)
        emb = self.embedder.embed(unit["context_faces"])
        if emb.shape[1] != self.cfg.contexts.dim:
            raise ValueError(f"embedder {self.embedder.spec} gives {emb.shape[1]}-d embeddings; contexts.dim is {self.cfg.contexts.dim}")
        check_rows(emb, unit["ids"], f"contexts.embedder {self.embedder.spec} (embeddings of the context faces)")
        unit["contexts"] = emb.astype(np.float32)
        return rebatch(unit)


def _actor_name() -> str:
    """Which generator made a unit: the Ray actor's id, or the process in a plain loop."""
    import ray

    actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    return actor or f"local-{os.getpid()}"


class GenerateStage:
    """Loads the generator once (per actor) and renders every image of a unit."""

    def __init__(self, cfg: dict):
        self.cfg = SynthConfig.model_validate(cfg)
        self.generator = build_generator(self.cfg)
        self.actor = _actor_name()

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        unit = unbatch(batch)
        n = self.cfg.generator.images_per_identity
        ids = unit["ids"].astype(np.int64)
        started, t0 = time.time(), time.perf_counter()
        images = self.generator.generate(ids, unit["contexts"], np.full(len(ids), n))
        unit["gen_seconds"] = np.float64(time.perf_counter() - t0)
        unit["gen_started"] = np.float64(started)
        unit["gen_actor"] = np.array(self.actor)
        unit["images"] = images
        unit["identity"] = np.repeat(ids, n)
        unit["sample"] = np.tile(np.arange(n, dtype=np.int32), len(ids))
        unit["seed"] = np.array([sample_seed(self.cfg.seed, i, s) for i, s in zip(unit["identity"], unit["sample"])], np.int64)
        # soft labels per identity, or per image (identity mixup draws a partner and a weight for every image)
        per_image = unit["partner"].ndim == 2
        unit["identity_b"] = unit["partner"].astype(np.int64).reshape(-1) if per_image else np.repeat(unit["partner"].astype(np.int64), n)
        unit["mix_weight"] = unit["weight"].astype(np.float32).reshape(-1) if per_image else np.repeat(unit["weight"].astype(np.float32), n)
        return rebatch(unit)


class AlignStage:
    """Resize-only (ADMIS/UIFace), 5-point similarity alignment with a landmark detector, or none."""

    def __init__(self, cfg: dict):
        self.cfg = SynthConfig.model_validate(cfg)
        self.detector = None
        if self.cfg.alignment.mode == "landmarks":
            self.detector = build_detector(self.cfg.alignment.detector)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        unit = unbatch(batch)
        a = self.cfg.alignment
        images = unit["images"]
        if a.mode == "resize":
            images = resize(images, a.size)
        elif a.mode == "landmarks":
            images, found = align_faces(self.detector, images, a.size)
            unit["aligned"] = found
        unit["images"] = images
        return rebatch(unit)


class FinishStage:
    """ID augmentation (context face repeated k times, ``kind=context``), consistency scores, filtering."""

    def __init__(self, cfg: dict):
        self.cfg = SynthConfig.model_validate(cfg)
        self.embedder = None
        if self.cfg.quality.embedder:
            from synray.synthesis.embedders import (
                Embedder,  # torch: see the module docstring
            )

            c = self.cfg.contexts
            # scored against the contexts when they come from the same model: embed the images the same way
            same = c.source == "face_embeddings" and c.embedder == self.cfg.quality.embedder
            self.embedder = Embedder(self.cfg.quality.embedder, flip=c.flip if same else True)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        unit = unbatch(batch)
        n = len(unit["identity"])
        kinds = np.array([self.cfg.label_kind] * n, dtype=object)
        reps = self.cfg.augment.context_repeats
        if reps:
            # at the generated images' size: alignment.size when they were aligned, the generator's own otherwise
            faces = resize(unit["context_faces"], tuple(unit["images"].shape[1:3]))
            ids = unit["ids"].astype(np.int64)
            m = len(ids) * reps
            unit["images"] = np.concatenate([unit["images"], np.repeat(faces, reps, axis=0)])
            unit["identity"] = np.concatenate([unit["identity"], np.repeat(ids, reps)])
            unit["sample"] = np.concatenate([unit["sample"], np.tile(np.arange(reps, dtype=np.int32), len(ids)) + 10**6])
            unit["seed"] = np.concatenate([unit["seed"], np.full(m, -1, np.int64)])
            unit["identity_b"] = np.concatenate([unit["identity_b"], np.full(m, -1, np.int64)])
            unit["mix_weight"] = np.concatenate([unit["mix_weight"], np.ones(m, np.float32)])
            kinds = np.concatenate([kinds, np.array(["context"] * m, dtype=object)])
        quality = np.full(len(unit["identity"]), np.nan, np.float32)
        if self.embedder is not None:
            from synray.synthesis.embedders import consistency

            emb = self.embedder.embed(unit["images"])
            anchors = None
            if self.cfg.contexts.source == "face_embeddings" and self.cfg.contexts.embedder == self.cfg.quality.embedder:
                anchors = {int(i): c for i, c in zip(unit["ids"], unit["contexts"])}
            quality = consistency(emb, unit["identity"], anchors)
        keep = np.ones(len(quality), bool)
        if self.cfg.quality.threshold is not None and self.embedder is not None:
            keep = quality >= self.cfg.quality.threshold
        unit["filtered"] = np.int64((~keep).sum())
        if not keep.all():  # a unit's images are tens of MB: copied only when some are dropped
            for k in ("images", "identity", "sample", "seed", "identity_b", "mix_weight"):
                unit[k] = unit[k][keep]
        unit["quality"] = quality[keep]
        unit["kind"] = kinds[keep].astype(str)
        return rebatch(unit)


@functools.lru_cache(maxsize=1)
def _encoders() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="encode")


def encode_all(images: np.ndarray, fmt: str) -> list[bytes]:
    """Every image encoded, in order, on a few threads (the codec releases the GIL): the last unit's write, done
    after the generator has finished, uses the cores the generator leaves, which shortens a run's drain."""
    if len(images) < 64:
        return [encode_image(im, fmt) for im in images]
    return list(_encoders().map(lambda im: encode_image(im, fmt), images, chunksize=1))


class WriteStage:
    """Encode and publish the unit's shard atomically; returns a small summary row (no pixels)."""

    def __init__(self, cfg: dict, dataset_uri: str, metadata: dict):
        self.cfg = SynthConfig.model_validate(cfg)
        self.uri, self.metadata = dataset_uri, metadata
        self.fmt = "." + self.cfg.image_format

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        unit = unbatch(batch)
        images = unit["images"]
        t0 = time.perf_counter()
        cols = {
            "image": encode_all(images, self.fmt),
            "identity": unit["identity"], "sample": unit["sample"], "kind": list(unit["kind"]),
            "seed": unit["seed"], "height": np.full(len(images), images.shape[1] if len(images) else 0, np.int32),
            "width": np.full(len(images), images.shape[2] if len(images) else 0, np.int32),
            "quality": unit["quality"], "identity_b": unit["identity_b"], "mix_weight": unit["mix_weight"],
        }
        shards.write_shard(self.uri, int(unit["unit"]), cols, self.metadata)
        q = unit["quality"]
        return {
            "unit": np.array([int(unit["unit"])]), "rows": np.array([len(images)]),
            "identities": np.array([len(unit["ids"])]), "filtered": np.array([int(unit.get("filtered", 0))]),
            "gen_seconds": np.array([float(unit.get("gen_seconds", 0.0))]),
            "gen_started": np.array([float(unit.get("gen_started", time.time()))]),
            "gen_actor": np.array([str(unit.get("gen_actor", ""))]),
            "write_seconds": np.array([time.perf_counter() - t0]),
            "quality_sum": np.array([float(np.nansum(q))]), "quality_n": np.array([int(np.isfinite(q).sum())]),
        }


def preview_grid(previews: list[bytes], cols: int = 8) -> np.ndarray:
    """One tile per unit (its first image) in a grid, for the MLflow sample-grid artifact."""
    tiles = [decode_image(p) for p in previews if p]
    if not tiles:
        return np.zeros((8, 8, 3), np.uint8)
    h, w = tiles[0].shape[:2]
    tiles = [cv2.resize(t, (w, h)) if t.shape[:2] != (h, w) else t for t in tiles]
    rows = (len(tiles) + cols - 1) // cols
    grid = np.zeros((rows * h, min(cols, len(tiles)) * w, 3), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    return grid
