"""The training images and their contexts: listing (canonical order), reading, context files.

Kept apart from the model code because it is plain I/O over local folders, shard datasets and S3,
shared by the first stage, the encoding pre-stage and the CLI's check that the data exist.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from synray.config.ldm import LDMConfig
from synray.errors import UserError
from synray.io import storage
from synray.io.images import decode_image
from synray.io.shards import ShardError, open_dataset, read_shard
from synray.models.inputs import fit_image

__all__ = ["LDMDataError", "ImageItems", "list_images", "load_images", "load_context_file"]


class LDMDataError(UserError, ValueError):
    """Training images, contexts or latents are missing or inconsistent with the config."""


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
        try:
            dataset = open_dataset(d.path, allow_incomplete=d.allow_incomplete)
        except (ShardError, OSError) as exc:
            raise LDMDataError(f"data.path: {exc}") from None
        root, shards = dataset.uri, dataset.shards
        names, ids_list = [], []
        for unit, uri in shards.items():
            t = read_shard(uri).select(["identity"])
            ident = t.column("identity").to_numpy()
            rel = uri[len(root.rstrip("/")):].lstrip("/")  # data/part-N.parquet (or part-N.parquet: old layout)
            names += [f"{rel}#{r}" for r in range(len(ident))]
            ids_list.append(ident)
        identities = np.concatenate(ids_list).astype(np.int64)
    if d.max_images is not None:
        names, identities = names[:d.max_images], identities[:d.max_images]
    return ImageItems(d.source, d.path if d.source == "folders" else root, names, identities)


def load_images(items: ImageItems, indices: np.ndarray | list[int], size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [n, H, W, 3] of the given items, resized to ``size`` (the references' ``Resize``)."""
    out = np.empty((len(indices), size[0], size[1], 3), np.uint8)
    tables: dict[str, pa.Table] = {}
    for k, i in enumerate(indices):
        name = items.names[int(i)]
        if items.source == "folders":
            uri = storage.join(items.root, *name.split("/"))
            img = decode_image(storage.read_bytes(uri), uri)
        else:
            shard, row = name.split("#")
            if shard not in tables:
                tables = {shard: read_shard(storage.join(items.root, shard)).select(["image"])}
            img = decode_image(tables[shard].column("image")[int(row)].as_py(), name)
        out[k] = fit_image(img, size)
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
