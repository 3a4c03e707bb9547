"""The encoding pre-stage: contexts and VQ latents computed once per image, before training.

Its own module because it is the run's only Ray task fan-out and its resume unit: each unit of images
(``data.unit_size``) becomes one Parquet file with a deterministic name, written atomically, and a
re-run skips the files that exist. Each row holds the unquantised latent of the image *and of its
mirror image* (the references flip the image and keep its context, so both are needed) and the
L2-normalised context (a frozen FR embedder's output, or a row of an embeddings file). The encoder is
frozen, so this equals encoding on the fly.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from synray.config.base import config_hash
from synray.config.ldm import LDMConfig
from synray.io import storage
from synray.io.shards import shard_name
from synray.ldm.data import (
    ImageItems,
    LDMDataError,
    list_images,
    load_context_file,
    load_images,
)
from synray.ldm.first_stage import (
    ENCODER_FILE,
    load_stage,
    prepare_first_stage,
    to_unit,
)
from synray.models.export import load_any_backbone
from synray.models.inputs import embed_faces

__all__ = ["LATENT_SCHEMA_VERSION", "LatentsInfo", "encode_unit", "run_bounded", "prepare_latents"]

LATENT_SCHEMA_VERSION = 1


@dataclass
class LatentsInfo:
    """The encoded training set: ``files`` of ``latent``/``latent_flip`` (float16 bytes) and ``context``."""

    uri: str
    rows: int
    latent_shape: tuple[int, int, int]
    context_dim: int
    files: list[str]
    first_stage: str
    vq_config: dict[str, Any]
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latent_shape": list(self.latent_shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentsInfo:
        return cls(**{**d, "latent_shape": tuple(d["latent_shape"])})


def _fingerprint(cfg: LDMConfig) -> str:
    """What the latents depend on: data, contexts, first stage (``data.latents`` only says where they are)."""
    return config_hash(cfg, exclude={"name": True, "unet": True, "training": True, "scaling": True, "encode": True,
                                      "checkpoint": True, "output": True, "tracking": True, "ray": True, "kind": True,
                                      "data": {"latents"}})


def _stored_latents(meta_uri: str, fingerprint: str, where: str, hint: str) -> LatentsInfo:
    """A finished encoding's ``latents.json``, refused when it was made from another data/contexts/vq config."""
    info = LatentsInfo.from_dict(json.loads(storage.read_bytes(meta_uri)))
    if info.fingerprint != fingerprint:
        raise LDMDataError(f"{where} was encoded from another data/contexts/vq config (fingerprint {info.fingerprint}, "
                           f"this config's {fingerprint}){hint}")
    return info


def encode_unit(unit: int, indices: list[int], items: ImageItems, first_stage: str, vq_dict: dict,
                image_size: tuple[int, int], embedder: str | None, contexts: np.ndarray | None,
                out_uri: str, device: str = "cpu", batch_size: int = 64) -> dict[str, Any]:
    """Encode one unit of images into ``<out_uri>/part-<unit>.parquet`` (skipped if it exists)."""
    uri = storage.join(out_uri, shard_name(unit))
    if storage.exists(uri):
        return {"unit": unit, "skipped": True}
    enc = load_stage(first_stage, ENCODER_FILE, vq_dict, device)
    model = None
    if embedder is not None:
        model = load_any_backbone(embedder).eval().to(device)
    lat, lat_f, ctx = [], [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        images = load_images(items, idx, image_size)
        with torch.no_grad():
            x = to_unit(images).to(device)
            lat.append(enc.encode(x).cpu())
            lat_f.append(enc.encode(x.flip(3)).cpu())
        if model is not None:
            ctx.append(np.asarray(embed_faces(model, images, flip=False), np.float32))
    z, zf = torch.cat(lat).to(torch.float16).numpy(), torch.cat(lat_f).to(torch.float16).numpy()
    c = np.concatenate(ctx) if model is not None else np.asarray(contexts, np.float32)
    if len(c) != len(indices):
        raise LDMDataError(f"unit {unit}: {len(c)} contexts for {len(indices)} images")
    table = pa.table({
        "index": pa.array(np.asarray(indices, np.int64)),
        "identity": pa.array(items.identities[np.asarray(indices)].astype(np.int64)),
        "latent": pa.array([r.tobytes() for r in z], pa.binary()),
        "latent_flip": pa.array([r.tobytes() for r in zf], pa.binary()),
        "context": pa.array([r.astype(np.float32).tobytes() for r in c], pa.binary()),
    }).replace_schema_metadata({"synray.latents_version": str(LATENT_SCHEMA_VERSION),
                                "synray.latent_shape": json.dumps(list(z.shape[1:])),
                                "synray.context_dim": str(c.shape[1])})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return {"unit": unit, "rows": len(indices), "latent_shape": list(z.shape[1:]), "context_dim": int(c.shape[1])}


def run_bounded(submit: Callable[[Any], Any], items: Iterable[Any], max_in_flight: int) -> list[Any]:
    """``ray.get(submit(item))`` for every item, with at most ``max_in_flight`` of the tasks unfinished at a time.

    Results come in completion order; the first task error is raised (after Ray's own retries).
    """
    results, pending = [], []
    for item in items:
        if len(pending) >= max_in_flight:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
        pending.append(submit(item))
    return results + ray.get(pending)


def prepare_latents(cfg: LDMConfig, run_uri: str | None = None, use_ray: bool | None = None) -> LatentsInfo:
    """First stage + encoding of every unit not yet on disk; returns what training needs.

    With Ray running (or ``use_ray``) units are Ray tasks (``encode.num_cpus``/``num_gpus``, at most
    ``encode.max_in_flight`` at a time), else a loop.
    """
    run_uri = run_uri or storage.join(cfg.output.uri, cfg.name)
    fp = _fingerprint(cfg)
    if cfg.data.latents:
        meta_uri = storage.join(cfg.data.latents, "latents.json")
        if not storage.exists(meta_uri):
            raise LDMDataError(f"data.latents: {meta_uri} does not exist (give the latents/ folder of a finished "
                               "train-ldm run's encoding)")
        info = _stored_latents(meta_uri, fp, f"data.latents: {cfg.data.latents}", "")
        missing = [f for f in info.files if not storage.exists(f)]
        if missing:
            raise LDMDataError(f"data.latents: {len(missing)} latent file(s) missing, e.g. {missing[0]}")
        return info
    out = storage.join(run_uri, "latents")
    meta_uri = storage.join(out, "latents.json")
    if storage.exists(meta_uri):
        return _stored_latents(meta_uri, fp, out, "; choose another name or output.uri")
    items = list_images(cfg)
    contexts = load_context_file(cfg.contexts.path, items) if cfg.contexts.source == "file" else None
    first_stage, vq_dict = prepare_first_stage(cfg, run_uri, items)
    size = tuple(cfg.data.image_size)
    embedder = cfg.contexts.embedder if cfg.contexts.source == "embedder" else None
    n, u = len(items), cfg.data.unit_size
    units = {k: list(range(k * u, min(n, (k + 1) * u))) for k in range((n + u - 1) // u)}
    todo = [k for k in sorted(units) if not storage.exists(storage.join(out, shard_name(k)))]
    args = dict(items=items, first_stage=first_stage, vq_dict=vq_dict, image_size=size, embedder=embedder,
                out_uri=out, batch_size=cfg.contexts.batch_size)
    if use_ray is None:
        use_ray = ray.is_initialized()
    if use_ray:
        e = cfg.encode
        task = ray.remote(encode_unit).options(num_cpus=e.num_cpus, num_gpus=e.num_gpus, max_retries=2)
        device = "cuda" if e.num_gpus > 0 else "cpu"
        items_ref = ray.put(items)
        run_bounded(lambda k: task.remote(k, units[k], **{**args, "items": items_ref}, device=device,
                                          contexts=contexts[units[k]] if contexts is not None else None),
                    todo, e.max_in_flight)
    else:
        for k in todo:
            encode_unit(k, units[k], contexts=contexts[units[k]] if contexts is not None else None, **args)
    first = pq.read_schema(storage.resolve(storage.join(out, shard_name(0))).fs.open_input_file(
        storage.resolve(storage.join(out, shard_name(0))).path)).metadata
    info = LatentsInfo(
        uri=out, rows=n, latent_shape=tuple(json.loads(first[b"synray.latent_shape"])),
        context_dim=int(first[b"synray.context_dim"]), files=[storage.join(out, shard_name(k)) for k in sorted(units)],
        first_stage=first_stage, vq_config=vq_dict, fingerprint=fp,
    )
    storage.write_bytes_atomic(meta_uri, json.dumps(info.to_dict(), indent=2).encode())
    return info
