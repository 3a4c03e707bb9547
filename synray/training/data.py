"""Shards -> training batches: labels, decoding and augmentation as plain functions, wired into Ray Data.

Decoding and augmentation run in Ray Data tasks (off the training loop); workers receive uint8 NCHW
images and normalise them on their device, which keeps the object store traffic 4x smaller than
float batches. Augmentation follows the TFace/ADMIS recipe: horizontal flip (p=0.5), then with
probability ``rrc_prob`` (ADMIS: 0.2) torchvision's ``RandomResizedCrop(scale=(0.2, 1), ratio=(3/4,
4/3))`` cropped and resized back to the input size.

Labels: the identities of a dataset (from the shard footers) are mapped to contiguous classes
0..C-1 in sorted order; the real-labelled set of SynFace's domain mixup follows after them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from synray.errors import UserError
from synray.io import storage
from synray.io.images import ImageDecodeError, decode_image
from synray.io.shards import (
    IncompleteDatasetError,
    open_dataset,
    read_dataset,
    read_shard,
)
from synray.io.sources import ImageSource, SourceError, is_foreign, open_source
from synray.models.inputs import fit_image

__all__ = [
    "DatasetInfo", "dataset_info", "labels_for", "rrc_params", "random_resized_crop", "augment_image",
    "decode_augment", "augment_decoded", "decoded_bytes", "repeat_rows", "build_dataset", "SHARD_COLUMNS", "DataError",
    "CACHE_LIMIT_BYTES", "LOCAL_DECODE_BYTES",
]

#: decoded size up to which ``data.cache_decoded: None`` (auto) keeps a dataset decoded
CACHE_LIMIT_BYTES = 1 << 30
#: decoded size up to which a cached dataset is decoded by the driver itself, not by a Ray Data job: a few thousand
#: small images decode in well under a second, while reading, decoding and materialising them through Ray Data
#: costs about 4 s of task scheduling on 2 cores (every study and quickstart student paid it)
LOCAL_DECODE_BYTES = 64 << 20
#: shard columns training reads (``sample`` and the file path name a row whose image is corrupt)
SHARD_COLUMNS = ["image", "identity", "sample", "identity_b", "mix_weight"]


class DataError(UserError, ValueError):
    """Training data is missing, too small or inconsistent with the config."""


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know about a dataset before reading it: rows and identities."""

    uri: str
    rows: int
    identities: np.ndarray  # sorted unique identity ids: class k is identities[k]
    files: tuple[str, ...] = ()  # the shards, checked when the dataset was opened
    source: ImageSource | None = None  # a RecordIO or image-folder dataset (rec://, folder://) instead of shards

    @property
    def num_classes(self) -> int:
        return int(self.identities.size)


def dataset_info(uri: str, allow_incomplete: bool = False) -> DatasetInfo:
    """Rows and identity ids from the shard footers (no image is read) of a complete dataset.

    A dataset whose synthesis has not finished (no ``_SUCCESS``, or a manifest that does not match
    its shards) is refused naming what is missing, unless ``allow_incomplete`` (``data.allow_incomplete``).
    ``rec://`` and ``folder://`` datasets are read as they are (:mod:`synray.io.sources`).
    """
    if is_foreign(uri):
        try:
            src = open_source(uri)
        except (SourceError, UserError) as exc:
            raise DataError(f"{exc}") from None
        if src.rows == 0 or not src.num_classes:
            raise DataError(f"dataset {uri} has no rows")
        return DatasetInfo(uri, src.rows, src.identities, (), src)
    try:
        opened = open_dataset(uri, allow_incomplete=allow_incomplete)
    except IncompleteDatasetError as exc:
        raise DataError(f"{exc}") from None
    rows, ids = 0, set()
    for meta in opened.metas.values():
        stats = meta.get("stats") or {}
        rows += int(stats.get("rows", 0))
        ids.update(int(i) for i in stats.get("identities", []))
    if rows == 0 or not ids:
        raise DataError(f"dataset {uri} has no rows")
    return DatasetInfo(opened.uri, rows, np.array(sorted(ids), dtype=np.int64), tuple(opened.files))


def labels_for(identities: np.ndarray, ids: np.ndarray, offset: int = 0, what: str = "identity") -> np.ndarray:
    """Class ids (``offset`` + position in sorted ``ids``) of ``identities``; -1 stays -1."""
    identities = np.asarray(identities, dtype=np.int64)
    pos = np.searchsorted(ids, identities)
    pos_c = np.clip(pos, 0, len(ids) - 1)
    valid = identities >= 0
    bad = valid & (ids[pos_c] != identities)
    if bad.any():
        raise DataError(f"{what} {identities[bad][:5].tolist()} not among the dataset's identities")
    return np.where(valid, pos_c + offset, -1).astype(np.int64)


def rrc_params(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)``; 10 tries, then a central crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: np.ndarray, rng: np.random.Generator, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> np.ndarray:
    """Crop a random region (torchvision's sampling) and resize it back to the image's own size."""
    h, w = img.shape[:2]
    top, left, ch, cw = rrc_params(h, w, scale, ratio, rng)
    crop = img[top:top + ch, left:left + cw]
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)


def augment_image(
    img: np.ndarray, rng: np.random.Generator, flip: bool = True, rrc_prob: float = 0.0,
    rrc_scale: Sequence[float] = (0.2, 1.0), rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """TFace/ADMIS order: random horizontal flip, then the extra crop with probability ``rrc_prob``."""
    if flip and rng.random() < 0.5:
        img = img[:, ::-1]
    if rrc_prob > 0 and rng.random() < rrc_prob:
        img = random_resized_crop(np.ascontiguousarray(img), rng, rrc_scale, rrc_ratio)
    return img


def decode_augment(
    batch: Mapping[str, np.ndarray],
    *,
    image_size: tuple[int, int],
    ids: np.ndarray,
    offset: int = 0,
    soft_labels: bool = False,
    augment: Mapping[str, Any] | None = None,
    seed: int | None = None,
    s3: bool = False,
) -> dict[str, np.ndarray]:
    """Shard rows -> ``image`` uint8 [n, 3, H, W] (decoded, resized, augmented), ``label``, ``label_b``, ``weight_a``.

    ``ids``/``offset`` map identities to classes; with ``soft_labels`` the identity-mixup columns
    become ``label_b``/``weight_a`` (else -1 / 1). ``augment`` holds :func:`augment_image` options
    (``None``: no augmentation, e.g. evaluation). ``seed`` fixes the augmentation draws (tests).
    A corrupt image is an error naming its shard and row (from the ``path`` column Ray Data adds;
    ``s3``: those paths are in S3).
    """
    rng = np.random.default_rng(seed)
    images = batch["image"]
    n = len(images)
    out = np.empty((n, 3, image_size[0], image_size[1]), np.uint8)
    for k in range(n):
        try:
            img = decode_image(bytes(images[k]), "a shard row")
        except ImageDecodeError:
            raise ImageDecodeError(f"corrupt or unsupported image data in {_where(batch, k, s3)}") from None
        img = fit_image(img, image_size)
        if augment:
            img = augment_image(img, rng, **augment)
        out[k] = np.ascontiguousarray(img).transpose(2, 0, 1)
    label = labels_for(batch["identity"], ids, offset)
    if soft_labels and "identity_b" in batch:
        label_b = labels_for(batch["identity_b"], ids, offset, what="identity_b")
        weight = np.where(label_b >= 0, np.asarray(batch["mix_weight"], np.float32), 1.0).astype(np.float32)
        if ((weight < 0) | (weight > 1)).any():
            raise DataError(f"mix_weight outside [0, 1]: {weight[(weight < 0) | (weight > 1)][:5].tolist()}")
    else:
        label_b = np.full(n, -1, np.int64)
        weight = np.ones(n, np.float32)
    return {"image": out, "label": label, "label_b": label_b, "weight_a": weight}


def _where(batch: Mapping[str, np.ndarray], k: int, s3: bool) -> str:
    """``shard <file> row <r> (identity i, sample s)`` of row ``k`` of a decode batch (read back on error only)."""
    identity = int(batch["identity"][k])
    sample = int(batch["sample"][k]) if "sample" in batch else None
    who = f"identity {identity}" + (f", sample {sample}" if sample is not None else "")
    if "path" not in batch:
        return f"a shard row ({who}; the shard file is unknown here)"
    path = str(batch["path"][k])
    if not path.endswith(".parquet"):  # a RecordIO record or an image file names itself
        return f"{path} ({who})"
    uri = f"s3://{path}" if s3 and not path.startswith("s3://") else path
    if sample is None:
        return f"shard {uri} ({who})"
    try:
        t = read_shard(uri).select(["identity", "sample"])
        rows = np.flatnonzero((t.column("identity").to_numpy() == identity) & (t.column("sample").to_numpy() == sample))
    except Exception:  # noqa: BLE001 - the file itself is unreadable: name it without the row
        rows = np.array([], np.int64)
    return f"shard {uri} row {int(rows[0])} ({who})" if len(rows) else f"shard {uri} ({who})"


def augment_decoded(batch: Mapping[str, np.ndarray], *, augment: Mapping[str, Any], seed: int | None = None) -> dict[str, np.ndarray]:
    """:func:`augment_image` on rows already decoded at the training size (uint8 [n, 3, H, W]); labels pass through."""
    rng = np.random.default_rng(seed)
    images = batch["image"]
    out = np.empty_like(images)
    for k in range(len(images)):
        img = augment_image(images[k].transpose(1, 2, 0), rng, **augment)
        out[k] = np.ascontiguousarray(img).transpose(2, 0, 1)
    return {**batch, "image": out}


def decoded_bytes(info: DatasetInfo, image_size: tuple[int, int]) -> int:
    """Bytes of a dataset decoded at ``image_size`` (uint8 RGB): what caching it decoded costs."""
    return int(info.rows) * 3 * int(image_size[0]) * int(image_size[1])


def repeat_rows(batch: Mapping[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
    """Every row ``times`` times (encoded, so each copy is augmented independently later)."""
    return {k: np.concatenate([np.asarray(v)] * times) for k, v in batch.items()}


def build_dataset(
    info: DatasetInfo,
    *,
    image_size: tuple[int, int],
    offset: int = 0,
    soft_labels: bool = False,
    augment: Mapping[str, Any] | None = None,
    shuffle: str = "global",
    batch_size: int = 256,
    num_cpus: float = 1.0,
    repeat: int = 1,
    cache: bool = False,
    local_decode_bytes: int = LOCAL_DECODE_BYTES,
):
    """The Ray Dataset of decoded, augmented training rows of one shard dataset.

    ``repeat`` > 1 lists the rows that many times per epoch: SynFace replicates its few real images
    to the length of the synthetic set, which also spares a pipeline restart every few batches.
    ``cache``: decode every image once, now, at the training size (uint8, in Ray's object store; see
    :func:`decoded_bytes`); each epoch then shuffles and augments those rows, the same draws as decoding
    each epoch, without decoding again: for small images a PNG decode costs more than a training step. A cached
    shard dataset of at most ``local_decode_bytes`` decoded is decoded here, in the driver (the same function).
    """
    decode = {"image_size": tuple(image_size), "ids": info.identities, "offset": offset, "soft_labels": soft_labels,
              "s3": storage.is_s3(info.uri)}
    here = cache and info.source is None and bool(info.files) and decoded_bytes(info, image_size) <= local_decode_bytes
    if here:
        ds = _decoded_here(info.files, decode, batch_size)
    elif info.source is not None:
        ds = info.source.ray_dataset(num_cpus=num_cpus)
    else:
        ds = read_dataset(list(info.files) if info.files else info.uri, columns=SHARD_COLUMNS, include_paths=True)
    if cache and not here:
        ds = ds.map_batches(decode_augment, fn_kwargs={**decode, "augment": None}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=num_cpus).materialize()
    if repeat > 1:
        ds = ds.map_batches(repeat_rows, fn_kwargs={"times": repeat}, batch_size=None, batch_format="numpy", num_cpus=num_cpus)
    if shuffle == "global":
        ds = ds.random_shuffle()
    elif shuffle == "blocks":
        ds = ds.randomize_block_order()
    elif shuffle != "none":
        raise ValueError(f"unknown shuffle {shuffle!r}; expected 'global', 'blocks' or 'none'")
    if cache:
        if not augment:
            return ds
        return ds.map_batches(augment_decoded, fn_kwargs={"augment": dict(augment)}, batch_size=batch_size,
                              batch_format="numpy", num_cpus=num_cpus)
    return ds.map_batches(decode_augment, fn_kwargs={**decode, "augment": dict(augment) if augment else None},
                          batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus)


def _decoded_here(files: Sequence[str], decode: Mapping[str, Any], block_rows: int):
    """The decoded rows of small shards as an in-memory Ray Dataset, in blocks of ``block_rows`` as the Ray Data
    path makes them (an epoch shuffles the block order)."""
    import ray.data
    from ray.data.block import BlockAccessor

    blocks = []
    for uri in files:
        table = read_shard(uri)
        columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in SHARD_COLUMNS if c in table.column_names}
        columns["path"] = np.full(table.num_rows, storage.resolve(uri).path, dtype=object)
        for start in range(0, table.num_rows, block_rows):
            batch = {c: v[start:start + block_rows] for c, v in columns.items()}
            blocks.append(BlockAccessor.batch_to_block(decode_augment(batch, **decode, augment=None)))
    return ray.data.from_blocks(blocks)
