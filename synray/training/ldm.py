"""Identity-conditioned LDM training on Ray Train (DDP): images -> contexts + VQ latents -> ConditionalUNet.

Three stages, each resumable:

1. **First stage.** The published VQ-f4 files are copied beside the run (the sampler needs the
   decoder); without them a small autoencoder is fitted on the training images (reconstruction MSE,
   then a k-means codebook on the encoder outputs so that quantised decoding stays close), which is
   how the mini world gets its own LDM.
2. **Encoding** (once per image, one Ray task per unit of images, idempotent Parquet files). Each
   row holds the unquantised latent of the image *and of its mirror image* (the references flip the
   image and keep its context, so both latents are needed) and the L2-normalised context (a frozen FR
   embedder's output, or a row of an embeddings file). The encoder is frozen, so this equals encoding
   on the fly.
3. **Training** (:func:`ldm_loop`, used by Ray Train workers and by Tune trials): eps-MSE with CPD /
   UIFace's unconditioned probability inside the UNet (train mode), Adam + cosine warm restarts per
   step, the references' EMA, checkpoints every ``checkpoint_every`` steps in the published layout
   (``model.ckpt``, ``ema_averaged_model.ckpt``, ``optimization.ckpt``) plus the first stage, so
   synray's sampler and the original code load them.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synray.config.base import config_hash
from synray.config.ldm import LDMConfig
from synray.io import storage
from synray.models.unet import FLAVOURS, ConditionalUNet, UNetConfig
from synray.models.vq import VQConfig, VQDecoder, VQEncoder
from synray.training.hooks import RunnerHooks

__all__ = [
    "LDMDataError", "ImageItems", "list_images", "load_images", "load_context_file", "fit_first_stage",
    "prepare_first_stage", "LatentsInfo", "prepare_latents", "unet_config", "LDMLearner", "LDMHooks", "ldm_loop",
    "ldm_loop_per_worker", "LocalLatents", "local_batches", "run_train_ldm", "LDMOutcome", "ENCODER_FILE", "DECODER_FILE",
    "VQ_CONFIG_FILE",
]

ENCODER_FILE = "first_stage_encoder_state_dict.pt"
DECODER_FILE = "first_stage_decoder_state_dict.pt"
VQ_CONFIG_FILE = "vq_config.json"
MODEL_FILE, EMA_FILE, OPT_FILE, META_FILE = "model.ckpt", "ema_averaged_model.ckpt", "optimization.ckpt", "meta.json"
LATENT_SCHEMA_VERSION = 1


class LDMDataError(ValueError):
    """Training images, contexts or latents are missing or inconsistent with the config."""


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] & ((1 << 62) - 1))


# --------------------------------------------------------------------------------------------
# listing and loading images


@dataclass
class ImageItems:
    """The training images in canonical order: ``names`` (relative paths, or ``data/part-N.parquet#row``)."""

    source: str
    root: str
    names: list[str]
    identities: np.ndarray  # int64 label per image (folder index, or the shard's identity)

    def __len__(self) -> int:
        return len(self.names)


def list_images(cfg: LDMConfig) -> ImageItems:
    """List the images (folders: sorted sub-folders, then sorted files; shards: unit then row order)."""
    d = cfg.data
    if d.source == "folders":
        loc = storage.resolve(d.path)
        try:
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        except (FileNotFoundError, OSError) as exc:
            raise LDMDataError(f"data.path: cannot list image folders in {d.path}: {exc}") from None
        exts = tuple(e.lower() for e in d.extensions)
        by_dir: dict[str, list[str]] = {}
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.lower().endswith(exts):
                continue
            rel = posixpath.relpath(info.path.replace(os.sep, "/"), loc.path.replace(os.sep, "/"))
            parts = rel.split("/")
            if len(parts) != 2:
                continue  # CASIA layout: <identity>/<image>
            by_dir.setdefault(parts[0], []).append(rel)
        if not by_dir:
            raise LDMDataError(f"data.path: no images ({', '.join(exts)}) in identity sub-folders of {d.path}")
        names, ids = [], []
        for k, folder in enumerate(sorted(by_dir)):
            files = sorted(by_dir[folder])
            names += files
            ids += [k] * len(files)
        identities = np.asarray(ids, np.int64)
    else:
        from synray.io.shards import ShardError, list_shards, read_shard

        try:
            shards = list_shards(d.path)
        except (ShardError, OSError) as exc:
            raise LDMDataError(f"data.path: {exc}") from None
        if not shards:
            raise LDMDataError(f"data.path: no shards in {d.path}")
        names, ids_list = [], []
        for unit, uri in shards.items():
            t = read_shard(uri).select(["identity"])
            ident = t.column("identity").to_numpy()
            rel = uri[len(d.path.rstrip("/")):].lstrip("/")  # data/part-N.parquet (or part-N.parquet: old layout)
            names += [f"{rel}#{r}" for r in range(len(ident))]
            ids_list.append(ident)
        identities = np.concatenate(ids_list).astype(np.int64)
    if d.max_images is not None:
        names, identities = names[:d.max_images], identities[:d.max_images]
    return ImageItems(d.source, d.path, names, identities)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def load_images(items: ImageItems, indices: np.ndarray | list[int], size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [n, H, W, 3] of the given items, resized to ``size`` (the references' ``Resize``)."""
    from synray.io.images import decode_image

    out = np.empty((len(indices), size[0], size[1], 3), np.uint8)
    tables: dict[str, pa.Table] = {}
    for k, i in enumerate(indices):
        name = items.names[int(i)]
        if items.source == "folders":
            uri = storage.join(items.root, *name.split("/"))
            img = decode_image(storage.read_bytes(uri), uri)
        else:
            from synray.io.shards import read_shard

            shard, row = name.split("#")
            if shard not in tables:
                tables = {shard: read_shard(storage.join(items.root, shard)).select(["image"])}
            img = decode_image(tables[shard].column("image")[int(row)].as_py(), name)
        out[k] = _resize(img, size)
    return out


def load_context_file(path: str, items: ImageItems) -> np.ndarray:
    """L2-normalised contexts [N, D] aligned with ``items`` from ``.npy`` (ordered) or ``.npz`` (names + embeddings)."""
    try:
        data = storage.read_bytes(path)
    except Exception as exc:  # noqa: BLE001 - StorageError or a missing local file
        raise LDMDataError(f"contexts.path: cannot read {path}: {exc}") from None
    try:
        blob = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise LDMDataError(f"contexts.path: {path} is not a .npy/.npz array file: {exc}") from None
    if isinstance(blob, np.lib.npyio.NpzFile):
        if "embeddings" not in blob or "names" not in blob:
            raise LDMDataError(f"contexts.path: {path} must hold arrays 'names' and 'embeddings', has {list(blob)}")
        emb, names = np.asarray(blob["embeddings"], np.float32), [str(n) for n in blob["names"]]
        if emb.ndim != 2 or len(names) != len(emb):
            raise LDMDataError(f"contexts.path: {path}: {len(names)} names for embeddings of shape {emb.shape}")
        index = {n: k for k, n in enumerate(names)}
        missing = [n for n in items.names if n not in index]
        if missing:
            raise LDMDataError(f"contexts.path: {path} has no embedding for {len(missing)} images, e.g. {missing[:3]}")
        emb = emb[[index[n] for n in items.names]]
    else:
        emb = np.asarray(blob, np.float32)
        if emb.ndim != 2:
            raise LDMDataError(f"contexts.path: {path} must be a 2-D array [N, D], got shape {emb.shape}")
        if len(emb) < len(items):
            raise LDMDataError(f"contexts.path: {path} has {len(emb)} rows for {len(items)} images")
        emb = emb[:len(items)]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.all(np.isfinite(emb)) or np.any(norms == 0):
        raise LDMDataError(f"contexts.path: {path} holds non-finite or all-zero embeddings")
    return emb / norms


# --------------------------------------------------------------------------------------------
# first stage


def _to_unit(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def fit_first_stage(images: np.ndarray, vq_cfg: VQConfig, steps: int, batch_size: int = 32, lr: float = 1e-3,
                    kmeans_iters: int = 10, seed: int = 0) -> tuple[VQEncoder, VQDecoder, dict[str, float]]:
    """Fit encoder + decoder as an autoencoder (MSE on unquantised latents), then the codebook by k-means.

    The codebook is initialised from encoder outputs and refined with Lloyd iterations, so decoding with
    quantisation (what sampling does) reproduces decoding without it up to the codebook's resolution.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise LDMDataError(f"first-stage images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    torch.manual_seed(seed)
    enc, dec = VQEncoder(vq_cfg), VQDecoder(vq_cfg)
    x_all = _to_unit(images)
    params = list(enc.parameters()) + [p for n, p in dec.named_parameters() if not n.startswith("quantize.")]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (min(batch_size, len(x_all)),), generator=gen)
        x = x_all[idx]
        z = enc.encode(x)
        loss = F.mse_loss(dec.decode(z, quantize=False), x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    dec.eval()
    with torch.no_grad():
        z = torch.cat([enc.encode(x_all[i:i + 64]) for i in range(0, len(x_all), 64)])
        vecs = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        k = vq_cfg.n_embed
        pick = torch.randperm(len(vecs), generator=gen)[:k]
        book = vecs[pick].clone()
        if len(book) < k:  # fewer latent vectors than entries: repeat with a little jitter
            book = torch.cat([book, book[torch.randint(0, len(book), (k - len(book),), generator=gen)]
                              + 1e-3 * torch.randn(k - len(book), vecs.shape[1], generator=gen)])
        sub = vecs[torch.randperm(len(vecs), generator=gen)[:50_000]]
        for _ in range(kmeans_iters):
            assign = torch.cdist(sub, book).argmin(1)
            sums = torch.zeros_like(book).index_add_(0, assign, sub)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            book = torch.where(counts > 0, sums / counts.clamp(min=1), book)
        dec.quantize.embedding.weight.copy_(book)
        xs = x_all[:64]
        zz = enc.encode(xs)
        rec = float(F.mse_loss(dec.decode(zz, quantize=False), xs))
        rec_q = float(F.mse_loss(dec.decode(zz, quantize=True), xs))
    return enc, dec, {"fit_loss": float(loss.detach()), "reconstruction_mse": rec, "reconstruction_mse_quantized": rec_q}


def _vq_config(cfg: LDMConfig) -> VQConfig:
    base = dict(cfg.vq.config or {})
    if cfg.vq.fit.steps and "n_embed" not in base:
        base["n_embed"] = cfg.vq.fit.n_embed
    try:
        return VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in base.items()})
    except (TypeError, ValueError) as exc:
        raise LDMDataError(f"vq.config: {exc}") from None


def prepare_first_stage(cfg: LDMConfig, run_uri: str, items: ImageItems) -> tuple[str, dict[str, Any]]:
    """Copy (or fit) the first stage into ``<run>/first_stage``; returns that URI and the VQConfig dict.

    Existing files are reused, so a re-run never refits.
    """
    from synray.models.ldm_checkpoint import load_vq_decoder, load_vq_encoder

    out = storage.join(run_uri, "first_stage")
    vq_cfg = _vq_config(cfg)
    vq_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(vq_cfg).items()}
    names = (ENCODER_FILE, DECODER_FILE, VQ_CONFIG_FILE)
    if all(storage.exists(storage.join(out, n)) for n in names):
        stored = json.loads(storage.read_bytes(storage.join(out, VQ_CONFIG_FILE)))
        if stored.get("config") != vq_dict:
            raise LDMDataError(f"{out} holds a first stage with another VQ config {stored.get('config')}; "
                               "choose another run name or output")
        return out, vq_dict
    if cfg.vq.encoder:
        for src in (cfg.vq.encoder, cfg.vq.decoder):
            if not os.path.exists(src):
                raise LDMDataError(f"vq: first-stage file not found: {src}")
        enc = load_vq_encoder(cfg.vq.encoder, vq_cfg)  # strict: a wrong file or config fails here
        dec = load_vq_decoder(cfg.vq.decoder, vq_cfg)
        info: dict[str, Any] = {"source": "given", "encoder": cfg.vq.encoder, "decoder": cfg.vq.decoder}
    else:
        f = cfg.vq.fit
        n = min(f.images, len(items))
        images = load_images(items, np.arange(n), tuple(cfg.data.image_size))
        enc, dec, stats = fit_first_stage(images, vq_cfg, f.steps, f.batch_size, f.lr, f.kmeans_iters, cfg.seed)
        info = {"source": "fitted", "images": n, **stats}
    for name, module in ((ENCODER_FILE, enc), (DECODER_FILE, dec)):
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
        storage.write_bytes_atomic(storage.join(out, name), buf.getvalue())
    storage.write_bytes_atomic(storage.join(out, VQ_CONFIG_FILE), json.dumps({"config": vq_dict, **info}, indent=2).encode())
    return out, vq_dict


def _load_stage(first_stage_uri: str, name: str, vq_dict: dict, device: str | torch.device = "cpu") -> nn.Module:
    from synray.models.ldm_checkpoint import load_vq_decoder, load_vq_encoder

    vq_cfg = VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vq_dict.items()})
    loader = load_vq_encoder if name == ENCODER_FILE else load_vq_decoder
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(storage.join(first_stage_uri, name)))
        return loader(path, vq_cfg, device=device)


# --------------------------------------------------------------------------------------------
# encoding (contexts + latents, once per image)


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
    return config_hash(cfg, exclude={"name", "unet", "training", "scaling", "encode", "checkpoint", "output",
                                      "tracking", "ray", "kind"})


def encode_unit(unit: int, indices: list[int], items: ImageItems, first_stage: str, vq_dict: dict,
                image_size: tuple[int, int], embedder: str | None, contexts: np.ndarray | None,
                out_uri: str, device: str = "cpu", batch_size: int = 64) -> dict[str, Any]:
    """Encode one unit of images into ``<out_uri>/part-<unit>.parquet`` (skipped if it exists)."""
    from synray.io.shards import shard_name

    uri = storage.join(out_uri, shard_name(unit))
    if storage.exists(uri):
        return {"unit": unit, "skipped": True}
    enc = _load_stage(first_stage, ENCODER_FILE, vq_dict, device)
    model = None
    if embedder is not None:
        from synray.models.export import load_any_backbone

        model = load_any_backbone(embedder).eval().to(device)
    lat, lat_f, ctx = [], [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        images = load_images(items, idx, image_size)
        with torch.no_grad():
            x = _to_unit(images).to(device)
            lat.append(enc.encode(x).cpu())
            lat_f.append(enc.encode(x.flip(3)).cpu())
        if model is not None:
            from synray.evaluation.evaluate import embed_faces

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


def prepare_latents(cfg: LDMConfig, run_uri: str | None = None, use_ray: bool | None = None) -> LatentsInfo:
    """First stage + encoding of every unit not yet on disk; returns what training needs.

    With Ray running (or ``use_ray``) units are Ray tasks (``encode.num_cpus``/``num_gpus``), else a loop.
    """
    from synray.io.shards import shard_name

    run_uri = run_uri or storage.join(cfg.output.uri, cfg.name)
    out = storage.join(run_uri, "latents")
    meta_uri = storage.join(out, "latents.json")
    fp = _fingerprint(cfg)
    if storage.exists(meta_uri):
        info = LatentsInfo.from_dict(json.loads(storage.read_bytes(meta_uri)))
        if info.fingerprint != fp:
            raise LDMDataError(f"{out} was encoded from another data/contexts/vq config (fingerprint {info.fingerprint}, "
                               f"now {fp}); choose another name or output.uri")
        return info
    items = list_images(cfg)
    contexts = load_context_file(cfg.contexts.path, items) if cfg.contexts.source == "file" else None
    first_stage, vq_dict = prepare_first_stage(cfg, run_uri, items)
    size = tuple(cfg.data.image_size)
    factor = 2 ** (len(vq_dict["ch_mult"]) - 1)
    if size[0] % factor or size[1] % factor:
        raise LDMDataError(f"data.image_size {list(size)} must be divisible by the first stage's downsampling {factor}")
    embedder = cfg.contexts.embedder if cfg.contexts.source == "embedder" else None
    n, u = len(items), cfg.data.unit_size
    units = {k: list(range(k * u, min(n, (k + 1) * u))) for k in range((n + u - 1) // u)}
    args = dict(items=items, first_stage=first_stage, vq_dict=vq_dict, image_size=size, embedder=embedder,
                out_uri=out, batch_size=cfg.contexts.batch_size)

    import ray

    if use_ray is None:
        use_ray = ray.is_initialized()
    results = []
    if use_ray:
        e = cfg.encode
        task = ray.remote(encode_unit).options(num_cpus=e.num_cpus, num_gpus=e.num_gpus, max_retries=2)
        device = "cuda" if e.num_gpus > 0 else "cpu"
        items_ref = ray.put(items)
        pending, todo = [], sorted(units)
        while todo or pending:
            while todo and len(pending) < e.max_in_flight:
                k = todo.pop(0)
                ctx = contexts[units[k]] if contexts is not None else None
                pending.append(task.remote(k, units[k], **{**args, "items": items_ref}, contexts=ctx, device=device))
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
    else:
        for k, idx in units.items():
            results.append(encode_unit(k, idx, contexts=contexts[idx] if contexts is not None else None, **args))
    first = pq.read_schema(storage.resolve(storage.join(out, shard_name(0))).fs.open_input_file(
        storage.resolve(storage.join(out, shard_name(0))).path)).metadata
    info = LatentsInfo(
        uri=out, rows=n, latent_shape=tuple(json.loads(first[b"synray.latent_shape"])),
        context_dim=int(first[b"synray.context_dim"]), files=[storage.join(out, shard_name(k)) for k in sorted(units)],
        first_stage=first_stage, vq_config=vq_dict, fingerprint=fp,
    )
    storage.write_bytes_atomic(meta_uri, json.dumps(info.to_dict(), indent=2).encode())
    return info


def decode_batch(batch: dict[str, Any], info: LatentsInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parquet/Ray Data rows -> (latent, latent_flip, context) float32 arrays."""
    def stack(col: Any, dtype, shape) -> np.ndarray:
        return np.stack([np.frombuffer(b, dtype) for b in col]).reshape(len(col), *shape).astype(np.float32)

    return (stack(batch["latent"], np.float16, info.latent_shape), stack(batch["latent_flip"], np.float16, info.latent_shape),
            stack(batch["context"], np.float32, (info.context_dim,)))


class LocalLatents:
    """The latent files read once into this process (Tune trials, tests); sweeps at scale should subsample
    with ``data.max_images``, since every trial holds the table in memory."""

    def __init__(self, info: LatentsInfo) -> None:
        tables = []
        for uri in info.files:
            loc = storage.resolve(uri)
            with loc.fs.open_input_file(loc.path) as fh:
                tables.append(pq.read_table(fh, columns=["latent", "latent_flip", "context"]))
        self.table = pa.concat_tables(tables)

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """One shuffled pass: this rank's share of the rows in full batches."""
        order = np.random.default_rng(_seed(seed, 0xDA7A, epoch)).permutation(self.table.num_rows)[rank::world_size]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = self.table.take(pa.array(order[start:start + batch_size]))
            yield {c: rows.column(c).to_pylist() for c in ("latent", "latent_flip", "context")}


def local_batches(info: LatentsInfo, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[dict[str, Any]]:
    """One shuffled pass over the latent files in this process (reads them; see :class:`LocalLatents`)."""
    return LocalLatents(info).batches(batch_size, seed, epoch, rank, world_size)


# --------------------------------------------------------------------------------------------
# the learner (plain torch)


def unet_config(cfg: LDMConfig, context_dim: int) -> UNetConfig:
    """The UNetConfig of a run: flavour defaults, architecture overrides, CPD, context width."""
    u = cfg.unet
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in u.architecture.items()}
    arch.setdefault("context_input_channels", context_dim)
    if arch["context_input_channels"] != context_dim:
        raise LDMDataError(f"unet.architecture.context_input_channels is {arch['context_input_channels']} but the "
                           f"contexts are {context_dim}-d")
    flags = dict(FLAVOURS[u.flavour])
    flags["context_dropout"] = u.context_dropout
    if u.unconditioned_probability is not None:
        flags["unconditioned_probability"] = u.unconditioned_probability
    try:
        return UNetConfig(**{**arch, **flags})
    except (TypeError, ValueError) as exc:
        raise LDMDataError(f"unet: {exc}") from None


class LDMLearner:
    """UNet (+ DDP wrapper), Adam + warm restarts, EMA, and one training step on a latent batch."""

    def __init__(self, cfg: LDMConfig, info: LatentsInfo, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        from synray.diffusion.schedule import linear_schedule
        from synray.diffusion.training import EMA, reference_optimizer

        self.cfg, self.info, self.rank, self.world_size = cfg, info, rank, world_size
        self.device = torch.device(device)
        self.unet_config = unet_config(cfg, info.context_dim)
        torch.manual_seed(cfg.seed)
        self.module = ConditionalUNet(self.unet_config).to(self.device)
        self.model = wrap(self.module) if wrap is not None else self.module
        t = cfg.training
        self.optimizer, self.scheduler = reference_optimizer(self.module, t.lr, t.restart_period, t.restart_mult)
        e = t.ema
        self.ema = EMA(self.module, inv_gamma=e.inv_gamma, power=e.power, max_decay=e.max_decay,
                       reference_compat=e.reference_compat)
        self.schedule = linear_schedule().to(self.device)
        self.step_count = 0

    def step(self, batch: dict[str, Any]) -> float:
        from synray.diffusion.training import training_step

        lat, lat_f, ctx = decode_batch(batch, self.info)
        gen = torch.Generator().manual_seed(_seed(self.cfg.seed, self.step_count, self.rank))
        # CPD / uncond masks come from torch's global RNG inside the UNet: one stream per (step, rank),
        # so ranks drop different context elements and a resumed run repeats the same masks
        torch.manual_seed(_seed(self.cfg.seed, self.step_count, self.rank, 1))
        x0 = torch.from_numpy(lat)
        if self.cfg.training.flip:
            flip = torch.rand(x0.shape[0], generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], torch.from_numpy(lat_f), x0)
        loss = training_step(self.model, self.optimizer, x0.to(self.device), torch.from_numpy(ctx).to(self.device),
                             schedule=self.schedule, lr_scheduler=self.scheduler, generator=gen)
        self.ema.update(self.module, self.step_count)
        self.step_count += 1
        return loss

    def save(self, directory: str, meta: dict[str, Any]) -> None:
        """The published layout (``model.ckpt``, ``ema_averaged_model.ckpt``) + optimiser state + first stage."""
        from synray.diffusion.schedule import linear_schedule
        from synray.models.ldm_checkpoint import save_unet_checkpoint

        save_unet_checkpoint(self.module, os.path.join(directory, MODEL_FILE), linear_schedule())
        save_unet_checkpoint(self.ema.averaged_model, os.path.join(directory, EMA_FILE), linear_schedule())
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                    "ema_step": self.ema.optimization_step, "global_step": self.step_count},
                   os.path.join(directory, OPT_FILE))
        for name in (ENCODER_FILE, DECODER_FILE, VQ_CONFIG_FILE):
            with open(os.path.join(directory, name), "wb") as fh:
                fh.write(storage.read_bytes(storage.join(self.info.first_stage, name)))
        unet = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.unet_config).items()}
        with open(os.path.join(directory, META_FILE), "w") as fh:
            json.dump({**meta, "step": self.step_count, "unet_config": unet, "latent_shape": list(self.info.latent_shape),
                       "context_dim": self.info.context_dim}, fh, indent=2)

    def restore(self, directory: str) -> dict[str, Any]:
        from synray.models.checkpoint import load_strict, read_checkpoint
        from synray.models.ldm_checkpoint import normalize_unet_state

        for name, module in ((MODEL_FILE, self.module), (EMA_FILE, self.ema.averaged_model)):
            path = os.path.join(directory, name)
            load_strict(module, normalize_unet_state(read_checkpoint(path)), what=f"checkpoint {path}")
        opt = torch.load(os.path.join(directory, OPT_FILE), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["lr_scheduler"])
        self.ema.optimization_step = int(opt["ema_step"])
        self.step_count = int(opt["global_step"])
        with open(os.path.join(directory, META_FILE)) as fh:
            return json.load(fh)


# --------------------------------------------------------------------------------------------
# the loop, shared by Ray Train workers and Tune trials


@dataclass
class LDMHooks(RunnerHooks):
    batches: Callable[[int], Iterator[dict[str, Any]]] | None = None  # pass index -> this rank's batches
    on_checkpoint: Callable[[LDMLearner], dict[str, float]] | None = None  # extra metrics (e.g. a sweep objective)
    stop_after_step: int | None = None  # tests: stop (as if killed) after the checkpoint at this step


def _synced(batch: Any, world_size: int, device: torch.device) -> bool:
    """True on every rank while all ranks still have a batch (keeps DDP collectives aligned)."""
    if world_size == 1:
        return batch is not None
    import torch.distributed as dist

    flag = torch.tensor([0 if batch is None else 1], device=device)
    dist.all_reduce(flag, dist.ReduceOp.MIN)
    return bool(flag.item())


def ldm_loop(cfg: LDMConfig, info: LatentsInfo, hooks: LDMHooks) -> dict[str, Any]:
    """Train (or resume) to ``training.steps``; reports every ``log_every`` and checkpoints every ``checkpoint_every``."""
    if hooks.batches is None:
        raise ValueError("ldm_loop needs a batch source (hooks.batches)")
    learner = LDMLearner(cfg, info, hooks.rank, hooks.world_size, hooks.device, hooks.wrap)
    t = cfg.training
    resumed_from = -1
    if hooks.restore_dir is not None:
        learner.restore(hooks.restore_dir)
        resumed_from = learner.step_count
        if hooks.rank == 0:
            print(f"[synray train-ldm] resumed from step {resumed_from}", flush=True)
    passes = learner.step_count * (t.batch_size // hooks.world_size) // max(info.rows // hooks.world_size, 1)
    loss_sum, n, t0 = 0.0, 0, time.time()
    metrics: dict[str, Any] = {}
    it, got = iter(hooks.batches(passes)), False
    while learner.step_count < t.steps:
        try:
            batch = next(it)
        except StopIteration:
            batch = None
        if not _synced(batch, hooks.world_size, learner.device):
            if not got:
                raise LDMDataError(f"{info.uri}: a pass over {info.rows} rows gives no batch of "
                                   f"{t.batch_size // hooks.world_size} per worker; lower training.batch_size")
            passes += 1
            it, got = iter(hooks.batches(passes)), False
            continue
        got = True
        loss = learner.step(batch)
        if not math.isfinite(loss):
            raise FloatingPointError(f"LDM loss is {loss} at step {learner.step_count}; lower training.lr")
        loss_sum, n = loss_sum + loss, n + 1
        s = learner.step_count
        ckpt = s % t.checkpoint_every == 0 or s == t.steps
        if s % t.log_every == 0 or ckpt:
            total, count = loss_sum, n
            if hooks.world_size > 1:
                import torch.distributed as dist

                v = torch.tensor([loss_sum, n], dtype=torch.float64, device=learner.device)
                dist.all_reduce(v)
                total, count = v.tolist()
            metrics = {"step": s, "loss": total / max(count, 1), "lr": learner.scheduler.get_last_lr()[0],
                       "ema_decay": learner.ema.decay_at(s - 1), "passes": passes, "world_size": hooks.world_size,
                       "resumed_from_step": resumed_from,
                       "latents_per_second": count * (t.batch_size // hooks.world_size) / max(time.time() - t0, 1e-9)}
            loss_sum, n, t0 = 0.0, 0, time.time()
            if ckpt and hooks.rank == 0 and hooks.on_checkpoint is not None:
                metrics.update(hooks.on_checkpoint(learner))
            with tempfile.TemporaryDirectory() as tmp:
                if ckpt and hooks.rank == 0:
                    learner.save(tmp, {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
                if hooks.report is not None:
                    hooks.report(metrics, tmp if ckpt and hooks.rank == 0 else None)
            if ckpt and hooks.stop_after_step is not None and s >= hooks.stop_after_step and s < t.steps:
                raise RuntimeError(f"stopped after step {s} (stop_after_step)")
    return metrics


def ldm_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker function: batches come from this worker's Ray Data shard."""
    import ray.train
    import ray.train.torch

    cfg = LDMConfig.model_validate(loop_config["cfg"])
    info = LatentsInfo.from_dict(loop_config["latents"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.training.batch_size // world

    def batches(epoch: int) -> Iterator[dict[str, Any]]:
        return shard.iter_batches(batch_size=per_worker, drop_last=True, batch_format="numpy",
                                  local_shuffle_buffer_size=4 * per_worker, local_shuffle_seed=_seed(cfg.seed, epoch, rank))

    def report(metrics: dict, directory: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{metrics['step']:09d}")

    unused = cfg.unet.flavour == "uiface"  # a learnable empty context may see no gradient in a step
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False,
                                                     parallel_strategy_kwargs={"find_unused_parameters": unused})) \
        if world > 1 else None
    ckpt = ray.train.get_checkpoint()
    hooks = LDMHooks(rank, world, device, wrap, report, batches=batches)
    if ckpt is None:
        ldm_loop(cfg, info, hooks)
        return
    with ckpt.as_directory() as directory:
        hooks.restore_dir = directory
        ldm_loop(cfg, info, hooks)


# --------------------------------------------------------------------------------------------
# driver


@dataclass
class LDMOutcome:
    metrics: dict[str, Any]
    checkpoint_uri: str | None  # <run>/checkpoints: the published layout + first stage
    output_uri: str
    generator: dict[str, Any] | None  # the synthesis ``generator:`` settings that sample this model


def synthesis_generator(checkpoints_uri: str, meta: dict[str, Any], vq_config: dict[str, Any]) -> dict[str, Any]:
    """``generator:`` settings of a synth config (``type: ldm``) for a finished run."""
    return {"type": "ldm", "unet": storage.join(checkpoints_uri, EMA_FILE),
            "vq_decoder": storage.join(checkpoints_uri, DECODER_FILE), "vq_config": vq_config,
            "latent_shape": list(meta["latent_shape"])}


def run_train_ldm(cfg: LDMConfig, workdir: str | None = None) -> LDMOutcome:
    """Encode (resumable), then train on Ray Train; re-running with the same output and name resumes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from synray.runtime import init_ray, is_quiet
    from synray.tracking import job_run, resolve_tracking_uri
    from synray.tuning.tracking import TrainMetricsToMLflow

    init_ray(cfg.ray)
    run_uri = storage.join(cfg.output.uri, cfg.name)
    with job_run(cfg, "train_ldm", workdir=workdir) as tracker:
        info = prepare_latents(cfg, run_uri)
        unet_config(cfg, info.context_dim)  # a bad architecture fails before the workers start
        tracker.log_params({"latents.rows": info.rows, "latents.shape": str(list(info.latent_shape)),
                            "latents.context_dim": info.context_dim})
        stage = json.loads(storage.read_bytes(storage.join(info.first_stage, VQ_CONFIG_FILE)))
        tracker.log_metrics({f"first_stage/{k}": v for k, v in stage.items() if isinstance(v, float)})
        import ray.data

        loc = storage.resolve(info.uri)
        ds = ray.data.read_parquet([storage.resolve(f).path for f in info.files], filesystem=loc.fs,
                                   columns=["latent", "latent_flip", "context"])
        callbacks = []
        if tracker.run_id is not None:
            callbacks.append(TrainMetricsToMLflow(resolve_tracking_uri(cfg.tracking, workdir), tracker.run_id, "train-ldm"))
        s = cfg.scaling
        out = storage.resolve(cfg.output.uri)
        trainer = TorchTrainer(
            ldm_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "latents": info.to_dict()},
            scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                                   resources_per_worker={"CPU": s.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=f"{cfg.name}-train", storage_path=out.path, storage_filesystem=out.fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                callbacks=callbacks,
            ),
            datasets={"train": ds},
        )
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        ckpt_uri, generator = None, None
        if result.checkpoint is not None:
            from synray.training.checkpointing import CheckpointReader

            reader = CheckpointReader.from_checkpoint(result.checkpoint)
            ckpt_uri = storage.join(run_uri, "checkpoints")
            for name in reader.names():
                storage.write_bytes_atomic(storage.join(ckpt_uri, name), reader.read_bytes(name))
            meta = json.loads(reader.read_bytes(META_FILE))
            generator = synthesis_generator(ckpt_uri, meta, info.vq_config)
            tracker.log_text(json.dumps(generator, indent=2), "synthesis_generator.json")
        summary = {"metrics": metrics, "checkpoints": ckpt_uri, "generator": generator, "latents": info.to_dict()}
        storage.write_bytes_atomic(storage.join(run_uri, "summary.json"), json.dumps(summary, indent=2, default=str).encode())
        if not is_quiet(cfg.ray) and generator:
            print(f"[synray train-ldm] checkpoints in {ckpt_uri}; sample with generator: {json.dumps(generator)}")
    return LDMOutcome(metrics, ckpt_uri, run_uri, generator)
