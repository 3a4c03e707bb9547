"""Every labelled image dataset synray reads, behind one interface: its own shards, insightface RecordIO, folders.

A source URI is

* a synray dataset folder, local or ``s3://`` (opened with :func:`synray.io.shards.open_dataset`);
* ``rec://<path>``: an insightface ``train.rec`` (or the folder holding it) with ``train.idx`` and ``property``
  beside it; ``rec+s3://bucket/key`` on S3;
* ``folder://<path>``: an ``<identity>/<image>`` tree; ``folder+s3://bucket/prefix`` on S3.

:func:`open_source` reads only what tells rows and identities (footers, the ``.idx`` and header records, a
listing), so a job knows its class count before Ray starts. Images are read in chunks: by plain functions on
the driver (:meth:`ImageSource.read_rows`), or streamed through Ray Data (:meth:`ImageSource.ray_dataset`),
one read task per chunk, without converting anything first. Every row has ``image`` (encoded bytes),
``identity`` (int64) and ``path`` (where it came from, for error messages).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synray.errors import UserError
from synray.io import recordio, shards, storage
from synray.io.folders import FolderIndex, list_folder

__all__ = ["SHARDS", "REC", "FOLDER", "SourceError", "parse_uri", "is_foreign", "ImageSource", "open_source",
           "read_chunk", "CHUNK_ROWS"]

SHARDS, REC, FOLDER = "shards", "rec", "folder"
#: rows per read task of RecordIO and folder sources (a shard is always one chunk)
CHUNK_ROWS = 1024
_THREADS = 16


class SourceError(UserError, ValueError):
    """A dataset URI names no readable dataset, or its files disagree with each other."""


def parse_uri(uri: str) -> tuple[str, str]:
    """``(kind, location)``: ``rec://x`` -> ``("rec", "x")``, ``folder+s3://b/p`` -> ``("folder", "s3://b/p")``."""
    for kind in (REC, FOLDER):
        for prefix, scheme in ((f"{kind}+s3://", "s3://"), (f"{kind}://", "")):
            if uri.startswith(prefix):
                rest = uri[len(prefix):]
                if not rest.strip("/"):
                    raise SourceError(f"{uri}: no path after {prefix}")
                return kind, scheme + rest
    return SHARDS, uri


def is_foreign(uri: str | None) -> bool:
    """True for RecordIO and folder URIs (``rec://``, ``folder://``), False for synray datasets."""
    return bool(uri) and parse_uri(uri)[0] != SHARDS


@dataclass
class ImageSource:
    """An opened dataset: rows, identities (sorted unique ids; class k is ``identities[k]``), and its files."""

    uri: str
    kind: str
    location: str
    rows: int
    identities: np.ndarray
    detail: Any = field(repr=False)  # ShardSet | RecIndex | FolderIndex
    _row_identity: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.identities.size)

    def row_identity(self) -> np.ndarray:
        """The identity of every row in the canonical order (shards: their identity columns are read)."""
        if self._row_identity is None:
            if self.kind == SHARDS:
                def column(uri: str) -> np.ndarray:
                    return _shard_columns(uri, ["identity"]).column("identity").to_numpy().astype(np.int64)

                with ThreadPoolExecutor(min(_THREADS, max(1, len(self.detail.files)))) as pool:
                    parts = list(pool.map(column, self.detail.files))
                self._row_identity = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            elif self.kind == REC:
                idx: recordio.RecIndex = self.detail
                self._row_identity = idx.labels if idx.labels is not None else recordio.read_labels(
                    self.location, idx.image_keys, idx.offsets)
            else:
                self._row_identity = self.detail.identity
        return self._row_identity

    def chunks(self, rows_per_chunk: int = CHUNK_ROWS) -> list[dict[str, Any]]:
        """Self-contained read units in canonical order (``start``: the first row's global index)."""
        out: list[dict[str, Any]] = []
        if self.kind == SHARDS:
            start = 0
            for unit, uri in self.detail.shards.items():
                n = int(self.detail.metas[unit]["_rows"])
                out.append({"kind": SHARDS, "location": uri, "start": start, "rows": n})
                start += n
            return out
        if self.kind == REC:  # where each record ends: the next record's offset (or the end of the file)
            bounds = np.r_[np.sort(np.fromiter(self.detail.offsets.values(), np.int64)), self.detail.file_size or 0]
        for start in range(0, self.rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.rows)
            chunk: dict[str, Any] = {"kind": self.kind, "location": self.location, "start": start, "rows": stop - start}
            if self.kind == REC:
                idx: recordio.RecIndex = self.detail
                keys = idx.image_keys[start:stop]
                chunk["keys"] = keys.tolist()
                chunk["offsets"] = [int(idx.offsets[int(k)]) for k in keys]
                chunk["labels"] = idx.labels[start:stop].tolist() if idx.labels is not None else None
                if idx.file_size:  # one read of the chunk's byte range (one request on S3), not one per record
                    lo, hi = min(chunk["offsets"]), max(chunk["offsets"])
                    chunk["span"] = [lo, int(bounds[np.searchsorted(bounds, hi, side="right")])]
            else:
                folder: FolderIndex = self.detail
                chunk["files"] = list(folder.files[start:stop])
                chunk["labels"] = folder.identity[start:stop].tolist()
            out.append(chunk)
        return out

    def read_rows(self, rows: Sequence[int], rows_per_chunk: int = CHUNK_ROWS) -> dict[str, np.ndarray]:
        """The given global rows (any order; returned in that order), read on this process."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise SourceError(f"{self.uri}: rows outside 0..{self.rows - 1} requested")
        chunks = self.chunks(rows_per_chunk)
        starts = np.array([c["start"] for c in chunks], np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        images = np.empty(rows.size, object)
        identity = np.empty(rows.size, np.int64)
        paths = np.empty(rows.size, object)
        for c in np.unique(which):
            sel = np.flatnonzero(which == c)
            part = read_chunk(chunks[int(c)], local_rows=(rows[sel] - chunks[int(c)]["start"]).tolist())
            images[sel], identity[sel], paths[sel] = part["image"], part["identity"], part["path"]
        return {"image": images, "identity": identity, "path": paths}

    def identity_rows(self, identities: Sequence[int], per_identity: int) -> dict[int, list[int]]:
        """Up to ``per_identity`` global rows of each given identity (its first ones in canonical order).

        Shards are located from their footers and only the shards holding those identities are read.
        """
        want = {int(i) for i in identities}
        out: dict[int, list[int]] = {i: [] for i in want}
        if self.kind == SHARDS:
            start = 0
            for unit, uri in self.detail.shards.items():
                meta = self.detail.metas[unit]
                n = int(meta["_rows"])
                if want & set(meta["stats"]["identities"]):
                    ident = _shard_columns(uri, ["identity"]).column("identity").to_numpy()
                    for r in range(n):
                        lst = out.get(int(ident[r]))
                        if lst is not None and len(lst) < per_identity:
                            lst.append(start + r)
                start += n
            return out
        ident = self.row_identity()
        for i in want:
            out[i] = np.flatnonzero(ident == i)[:per_identity].tolist()
        return out

    def ray_dataset(self, rows_per_chunk: int = CHUNK_ROWS, num_cpus: float = 1.0):
        """A Ray Dataset of the rows (``image``, ``identity``, ``path``) in canonical order, one read task per chunk.

        Shards are read with ``ray.data.read_parquet`` (:func:`synray.io.shards.read_dataset`), which also adds the
        shards' other columns.
        """
        import ray.data

        if self.kind == SHARDS:
            return shards.read_dataset(self.detail, include_paths=True)
        chunks = self.chunks(rows_per_chunk)
        ds = ray.data.from_items([{"chunk": i} for i in range(len(chunks))], override_num_blocks=len(chunks))
        return ds.map_batches(_read_batch, fn_kwargs={"chunks": chunks}, batch_size=1, batch_format="numpy",
                              num_cpus=num_cpus)


def _shard_columns(uri: str, columns: list[str]) -> pa.Table:
    """Some columns of a shard whose footer was checked when its dataset was opened; errors name the file."""
    loc = storage.resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            return pq.read_table(fh, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise shards.ShardError(f"cannot read shard {uri}: {exc}") from exc


def _read_batch(batch: dict[str, np.ndarray], chunks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    parts = [read_chunk(chunks[int(i)]) for i in batch["chunk"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "identity", "path")}


def read_chunk(chunk: dict[str, Any], local_rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The rows of one chunk (all, or ``local_rows`` of it): ``image`` bytes, ``identity``, ``path``."""
    kind, location = chunk["kind"], chunk["location"]
    rows = list(range(chunk["rows"])) if local_rows is None else [int(r) for r in local_rows]
    images = np.empty(len(rows), object)
    identity = np.empty(len(rows), np.int64)
    paths = np.empty(len(rows), object)
    if kind == SHARDS:
        table = _shard_columns(location, ["image", "identity"])
        col_img, col_id = table.column("image"), table.column("identity").to_numpy()
        for n, r in enumerate(rows):
            images[n], identity[n] = col_img[r].as_py(), col_id[r]
        paths[:] = location
    elif kind == REC:
        loc = storage.resolve(location)
        with loc.fs.open_input_file(loc.path) as fh:
            base = 0
            if chunk.get("span") and local_rows is None:
                base, end = chunk["span"]
                fh.seek(base)
                fh = io.BytesIO(fh.read(end - base))
            for n, r in enumerate(rows):
                key = chunk["keys"][r]
                what = f"{location} record {key}"
                header, image = recordio.unpack(recordio.read_at(fh, chunk["offsets"][r] - base, what), what)
                label = header.label[0] if header.flag > 0 else header.label
                if chunk["labels"] is not None and int(label) != int(chunk["labels"][r]):
                    raise SourceError(f"{what}: label {label} in its header, its identity record says {chunk['labels'][r]}")
                images[n], identity[n], paths[n] = image, int(label), what
    elif kind == FOLDER:
        for n, r in enumerate(rows):
            uri = storage.join(location, *chunk["files"][r].split("/"))
            images[n], identity[n], paths[n] = storage.read_bytes(uri), chunk["labels"][r], uri
    else:
        raise SourceError(f"unknown source kind {kind!r}")
    return {"image": images, "identity": identity, "path": paths}


def _rec_file(location: str) -> str:
    """A ``.rec`` given by itself or by its folder (``train.rec`` inside)."""
    if location.endswith(".rec") or not storage.exists(storage.join(location, "train.rec")):
        return location
    return storage.join(location, "train.rec")


def open_source(uri: str, allow_incomplete: bool = False) -> ImageSource:
    """Open any dataset synray reads (see the module docstring); errors name the file that is wrong."""
    kind, location = parse_uri(uri)
    if kind == SHARDS:
        opened = shards.open_dataset(location, allow_incomplete=allow_incomplete)
        rows, ids = 0, set()
        for meta in opened.metas.values():
            stats = meta.get("stats") or {}
            rows += int(stats.get("rows", 0))
            ids.update(int(i) for i in stats.get("identities", []))
        return ImageSource(uri, kind, opened.uri, rows, np.array(sorted(ids), np.int64), opened)
    if kind == REC:
        location = _rec_file(location)
        idx = recordio.open_rec(location)
        if idx.labels is not None:
            identities = np.arange(idx.num_classes, dtype=np.int64)
            return ImageSource(uri, kind, location, idx.rows, identities, idx, idx.labels)
        if idx.num_classes is not None:
            return ImageSource(uri, kind, location, idx.rows, np.arange(idx.num_classes, dtype=np.int64), idx)
        labels = recordio.read_labels(location, idx.image_keys, idx.offsets)
        return ImageSource(uri, kind, location, idx.rows, np.unique(labels), idx, labels)
    folder = list_folder(location)
    return ImageSource(uri, kind, location, folder.rows, np.unique(folder.identity), folder, folder.identity)
