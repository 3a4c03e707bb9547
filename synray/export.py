"""``synray export``: any dataset synray reads -> insightface RecordIO or an ``<identity>/<n>.<ext>`` tree, on Ray Data.

* **Plan** (driver, no Ray): open the source (:mod:`synray.io.sources`), the class of every row, and what each
  task writes: one task per source chunk (a shard, or ``rows_per_task`` records/files), its rows sorted by class
  so that every identity's images are contiguous, as insightface's identity records need.
* **Tasks** (Ray Data, streaming): read a chunk, re-encode if asked, write one part: RecordIO bytes with their
  record index (``_parts/part-N.rec`` + ``.json``), or the chunk's image files and then ``_parts/part-N.json``. A
  part whose ``.json`` exists is complete, so a re-run (same config and output) does only what is missing.
* **Finish** (driver): RecordIO: ``train.rec`` = header record 0, the parts in order, one identity record per
  class; ``train.idx``; ``property``. Both formats: ``_export.json`` last (counts, class -> identity), then the
  parts are removed.

Labels in a ``.rec`` are class indices 0..C-1 (sorted source identities, the order training uses), as float
header labels; ``_export.json`` maps them back to the source identities.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import cv2
import numpy as np
import pyarrow.fs as pafs

from synray.config.base import ConfigError
from synray.config.export import ExportConfig
from synray.errors import UserError
from synray.io import recordio, storage
from synray.io.folders import identity_folder, image_extension
from synray.io.images import decode_image, encode_image
from synray.io.lease import acquire_lease
from synray.io.sources import ImageSource, open_source, read_chunk
from synray.jobs import JobContext, Need, Outcome
from synray.progress import JobProgress

__all__ = ["ExportError", "plan_export", "write_part", "finish_rec", "check", "needs", "run", "SUMMARY", "PARTS"]

PARTS = "_parts"
SUMMARY = "_export.json"
PLAN = "plan.json"
REC_FILES = ("train.rec", "train.idx", "property")


class ExportError(UserError, ValueError):
    """The source cannot be exported as asked, or the output holds something else."""


# --------------------------------------------------------------------------------------------
# plan (driver)


def _within_identity_index(seq: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same identity (0, 1, 2, ... per identity)."""
    order = np.argsort(seq, kind="stable")
    ranked = seq[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]
    sizes = np.diff(np.r_[starts, ranked.size])
    out = np.empty(seq.size, np.int64)
    out[order] = np.arange(seq.size) - np.repeat(starts, sizes)
    return out


def plan_export(cfg: ExportConfig, src: ImageSource) -> dict[str, Any]:
    """Tasks (source chunks + what to write), classes and the plan's hash; rows of one identity must not interleave
    with others' across chunks for RecordIO (true of every dataset synray writes and of class-grouped sources)."""
    identity = src.row_identity()
    if identity.size != src.rows:
        raise ExportError(f"{src.uri}: {identity.size} identity labels for {src.rows} rows")
    if identity.size and identity.min() < 0:
        raise ExportError(f"{src.uri}: negative identity {int(identity.min())}")
    classes = np.searchsorted(src.identities, identity)
    outside = classes >= src.identities.size
    if not outside.any():
        outside = src.identities[classes] != identity
    if outside.any():
        raise ExportError(f"{src.uri}: rows {np.flatnonzero(outside)[:5].tolist()} have identities outside the "
                          "dataset's identity list (labels >= the class count in its property file?)")
    chunks = src.chunks(cfg.rows_per_task)
    width = max(7, len(str(int(src.identities.max())))) if src.identities.size else 7
    out_ident, tasks, prev_max, key = [], [], -1, 1
    for part, chunk in enumerate(chunks):
        local = classes[chunk["start"]:chunk["start"] + chunk["rows"]]
        order = np.argsort(local, kind="stable")
        ordered = local[order]
        if cfg.format == "rec" and ordered.size:
            if ordered[0] < prev_max:
                ident = int(src.identities[ordered[0]])
                raise ExportError(
                    f"{src.uri}: the images of identity {ident} are spread over {chunk['location']} and earlier parts;"
                    " RecordIO needs each identity's images together (export to a folder, or regroup the dataset)")
            prev_max = int(ordered[-1])
        task = {**chunk, "part": part, "order": order.tolist(), "first_key": key, "classes": ordered.tolist()}
        tasks.append(task)
        out_ident.append(identity[chunk["start"]:chunk["start"] + chunk["rows"]][order])
        key += chunk["rows"]
    if cfg.format == "folder":
        seq = np.concatenate(out_ident) if out_ident else np.zeros(0, np.int64)
        n = _within_identity_index(seq)
        digits = max(3, len(str(int(n.max())))) if n.size else 3  # zero-padded: name order is image order
        pos = 0
        for task, ids in zip(tasks, out_ident):
            task["names"] = [f"{identity_folder(int(i), width)}/{int(k):0{digits}d}"
                             for i, k in zip(ids, n[pos:pos + ids.size])]
            pos += ids.size
    digest = hashlib.sha256(json.dumps({
        "source": src.uri, "rows": src.rows, "format": cfg.format, "image_format": cfg.image_format,
        "jpeg_quality": cfg.jpeg_quality, "image_size": cfg.image_size, "rows_per_task": cfg.rows_per_task,
    }, sort_keys=True, default=list).encode())
    digest.update(identity.astype("<i8").tobytes())
    return {"tasks": tasks, "identities": src.identities, "rows": src.rows, "hash": digest.hexdigest()[:16]}


# --------------------------------------------------------------------------------------------
# tasks (Ray Data)


def _part(out: str, part: int, suffix: str) -> str:
    return storage.join(out, PARTS, f"part-{part:06d}{suffix}")


def _convert(images: np.ndarray, settings: dict[str, Any]) -> list[bytes]:
    fmt, size = settings["image_format"], settings["image_size"]
    if fmt == "keep" and size is None:
        return [bytes(b) for b in images]
    ext = ".jpg" if fmt == "jpg" else ".png"
    out = []
    for k, data in enumerate(images):
        img = decode_image(bytes(data), f"image {k} of the chunk")
        if size is not None and img.shape[:2] != tuple(size):
            interp = cv2.INTER_AREA if img.shape[0] > size[0] else cv2.INTER_LINEAR
            img = cv2.resize(img, (size[1], size[0]), interpolation=interp)
        out.append(encode_image(np.ascontiguousarray(img), ext, settings["jpeg_quality"]))
    return out


def write_part(task: dict[str, Any], out: str, fmt: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Read one chunk and write its part (skipped when its marker exists); returns rows, bytes and image size."""
    marker = _part(out, task["part"], ".json")
    if storage.exists(marker):
        meta = json.loads(storage.read_bytes(marker))
        return {"part": task["part"], "rows": meta["rows"], "bytes": meta["bytes"], "skipped": True}
    data = read_chunk(task)
    order = np.asarray(task["order"], np.int64)
    images = _convert(data["image"][order], settings)
    height, width = (decode_image(images[0], str(data["path"][order[0]])).shape[:2] if images else (0, 0))
    meta: dict[str, Any] = {"rows": len(images), "height": int(height), "width": int(width)}
    if fmt == "rec":
        keys = task["first_key"] + np.arange(len(images))
        blob, offsets = recordio.encode_images(keys.tolist(), task["classes"], images)
        storage.write_bytes_atomic(_part(out, task["part"], ".rec"), blob)
        meta.update(bytes=len(blob), offsets=offsets, classes=task["classes"])
    else:
        total = 0
        for name, image in zip(task["names"], images):
            folder, n = name.split("/")
            storage.write_bytes_atomic(storage.join(out, folder, f"{n}{image_extension(image)}"), image)
            total += len(image)
        meta["bytes"] = total
    storage.write_bytes_atomic(marker, json.dumps(meta).encode())
    return {"part": task["part"], "rows": meta["rows"], "bytes": meta["bytes"], "skipped": False}


def _export_batch(batch: dict[str, np.ndarray], tasks: list[dict[str, Any]], out: str, fmt: str,
                  settings: dict[str, Any]) -> dict[str, np.ndarray]:
    rows = [write_part(tasks[int(i)], out, fmt, settings) for i in batch["task"]]
    return {k: np.array([r[k] for r in rows]) for k in ("part", "rows", "bytes", "skipped")}


# --------------------------------------------------------------------------------------------
# finish (driver)


@contextmanager
def _stream(uri: str) -> Iterator[BinaryIO]:
    """A large file written as a stream that appears only once complete (temp + rename; an S3 upload completes
    on close)."""
    loc = storage.resolve(uri)
    if storage.is_s3(uri):
        fh = loc.fs.open_output_stream(loc.path)
        try:
            yield fh
        except BaseException:
            fh.close()  # the upload completes on close: remove what a failed writer left
            storage.delete(uri)
            raise
        fh.close()
        return
    os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(loc.path), f".{os.path.basename(loc.path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, loc.path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finish_rec(out: str, tasks: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """``train.rec`` (header record, the parts, identity records), ``train.idx`` and ``property`` from finished parts."""
    metas = [json.loads(storage.read_bytes(_part(out, t["part"], ".json"))) for t in tasks]
    rows = sum(m["rows"] for m in metas)
    labels = np.concatenate([np.asarray(m["classes"], np.int64) for m in metas]) if metas else np.zeros(0, np.int64)
    first = rows + 1
    keys: list[int] = []
    offsets: list[int] = []
    with _stream(storage.join(out, "train.rec")) as fh:
        header = recordio.encode_record(recordio.pack(recordio.IRHeader(2, [first, first + num_classes], 0, 0), b""))
        fh.write(header)
        keys.append(0)
        offsets.append(0)
        pos = len(header)
        for task, meta in zip(tasks, metas):
            blob = storage.read_bytes(_part(out, task["part"], ".rec"))
            if len(blob) != meta["bytes"]:
                raise ExportError(f"{_part(out, task['part'], '.rec')} has {len(blob)} bytes, its index says {meta['bytes']}")
            fh.write(blob)
            keys += list(range(task["first_key"], task["first_key"] + meta["rows"]))
            offsets += [pos + o for o in meta["offsets"]]
            pos += len(blob)
        start = np.searchsorted(labels, np.arange(num_classes), side="left") + 1
        end = np.searchsorted(labels, np.arange(num_classes), side="right") + 1
        for c in range(num_classes):
            rec = recordio.encode_record(recordio.pack(
                recordio.IRHeader(2, [int(start[c]), int(end[c])], first + c, 0), b""))
            keys.append(first + c)
            offsets.append(pos)
            fh.write(rec)
            pos += len(rec)
    sizes = {(m["height"], m["width"]) for m in metas if m["rows"]}
    height, width = max(sizes, key=lambda s: sum(1 for m in metas if (m["height"], m["width"]) == s)) if sizes else (0, 0)
    storage.write_bytes_atomic(storage.join(out, "train.idx"), recordio.format_idx(keys, offsets))
    storage.write_bytes_atomic(storage.join(out, "property"), recordio.format_property(num_classes, height, width))
    return {"rows": rows, "bytes": pos, "image_size": [int(height), int(width)], "sizes_seen": sorted(map(list, sizes))}


def _entries(uri: str) -> list[str]:
    loc = storage.resolve(uri)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except Exception as exc:  # noqa: BLE001 - storage errors name the output
        raise storage.StorageError(f"cannot list {uri}: {exc}") from exc
    return sorted(os.path.basename(i.path.rstrip("/")) for i in infos)


def _remove_parts(out: str) -> None:
    loc = storage.resolve(storage.join(out, PARTS))
    try:
        loc.fs.delete_dir(loc.path)
    except (FileNotFoundError, OSError):
        pass


# --------------------------------------------------------------------------------------------
# the job


def check(cfg: ExportConfig) -> None:
    """The source opens (files present, complete) and the output is not another dataset or export."""
    from synray.io.sources import parse_uri

    if os.path.normpath(parse_uri(cfg.source)[1]).rstrip("/") == os.path.normpath(cfg.output.uri).rstrip("/"):
        raise ConfigError(f"output.uri: {cfg.output.uri} is the source itself; export to another folder")
    open_source(cfg.source, allow_incomplete=cfg.allow_incomplete)


def needs(cfg: ExportConfig) -> list[Need]:
    return [Need.data(cfg.num_cpus, "num_cpus")]


def run(cfg: ExportConfig, ctx: JobContext) -> Outcome:
    """Export as configured; a re-run with the same config and output writes only the missing parts."""
    import ray.data

    out = cfg.output.uri
    t0 = time.perf_counter()
    src = open_source(cfg.source, allow_incomplete=cfg.allow_incomplete)
    plan = plan_export(cfg, src)
    summary_uri = storage.join(out, SUMMARY)
    with acquire_lease(out) as lease:
        if storage.exists(summary_uri):
            done = json.loads(storage.read_bytes(summary_uri))
            if done.get("plan_hash") != plan["hash"]:
                raise ExportError(f"{out} holds another export (of {done.get('source')}, {done.get('format')}); "
                                  "choose a new output.uri")
            return Outcome("export", out, {k: v for k, v in done.items() if k != "identities"} | {"skipped": True},
                           table=f"{out} already holds this export ({done['rows']} images of {done['classes']} "
                                 f"identities as {done['format']}); nothing to do")
        plan_uri = storage.join(out, PARTS, PLAN)
        if storage.exists(plan_uri):
            if json.loads(storage.read_bytes(plan_uri)).get("hash") != plan["hash"]:
                raise ExportError(f"{out} holds parts of another export; choose a new output.uri (or delete {PARTS}/)")
        else:
            foreign = [e for e in _entries(out) if not e.startswith(".")]
            if foreign:
                raise ExportError(f"output.uri {out} is not empty ({foreign[:5]}); export into a new folder")
            storage.write_bytes_atomic(plan_uri, json.dumps({"hash": plan["hash"], "source": src.uri}).encode())
        tasks = plan["tasks"]
        done_parts = {n for n in storage.listdir(storage.join(out, PARTS)) if n.endswith(".json") and n != PLAN}
        pending = [i for i, t in enumerate(tasks) if f"part-{t['part']:06d}.json" not in done_parts]
        settings = {"image_format": cfg.image_format, "image_size": list(cfg.image_size) if cfg.image_size else None,
                    "jpeg_quality": cfg.jpeg_quality}
        written, nbytes = 0, 0
        if pending:
            ds = ray.data.from_items([{"task": i} for i in pending], override_num_blocks=len(pending))
            ds = ds.map_batches(_export_batch, fn_kwargs={"tasks": tasks, "out": out, "fmt": cfg.format,
                                                          "settings": settings},
                                batch_size=1, batch_format="numpy", num_cpus=cfg.num_cpus)
            bar = JobProgress("export", len(pending), "parts", ctx.quiet)
            try:
                bar.update(0, skipped=len(tasks) - len(pending))
                for n, row in enumerate(ds.iter_rows(), 1):
                    lease.check()
                    written += int(row["rows"])
                    nbytes += int(row["bytes"])
                    bar.update(n, images=written, **{"img/s": written / max(time.perf_counter() - t0, 1e-9)})
            finally:
                bar.close()
        lease.check()
        summary: dict[str, Any] = {"format": cfg.format, "source": src.uri, "source_kind": src.kind,
                                   "rows": int(plan["rows"]), "classes": int(plan["identities"].size),
                                   "parts": len(tasks), "parts_written": len(pending), "images_written": written,
                                   "plan_hash": plan["hash"]}
        if cfg.format == "rec":
            summary.update(finish_rec(out, tasks, int(plan["identities"].size)))
            summary["files"] = list(REC_FILES)
        summary["seconds"] = time.perf_counter() - t0
        summary["identities"] = plan["identities"].tolist()  # class k (rec label k, folder k in sorted order) -> identity
        storage.write_bytes_atomic(summary_uri, json.dumps(summary, indent=1).encode())
        _remove_parts(out)
    ctx.tracker.log_metrics({"rows": summary["rows"], "classes": summary["classes"], "seconds": summary["seconds"],
                             "images_written": written})
    metrics = {k: v for k, v in summary.items() if k != "identities"}
    files = ", ".join(REC_FILES) if cfg.format == "rec" else "<identity>/<n>.<ext>"
    table = (f"exported {summary['rows']} images of {summary['classes']} identities from {src.uri} as {cfg.format} "
             f"({files}); {len(pending)} of {len(tasks)} parts written now, {summary['seconds']:.1f} s")
    return Outcome("export", out, metrics, table=table)
