"""Idempotent Parquet shards: one file per work unit, deterministic name, atomic write.

A dataset folder holds ``part-NNNNNN.parquet`` files (one per work unit of identities),
``manifest.json`` and ``config.yaml``. A shard that exists is complete, so a re-run skips it; anything
else in the folder that looks like data is reported, never silently read.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synray.errors import UserError
from synray.io import storage

SCHEMA_VERSION = 1
META_PREFIX = "synray."
SHARD_RE = re.compile(r"^part-(\d{6,})\.parquet$")
KINDS = ("generated", "context", "augmented", "real")
#: Files a dataset folder may hold besides its shards.
SIDE_FILES = {"manifest.json", "config.yaml", "samples.png", "_SUCCESS"}

SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("identity", pa.int64()),
        ("sample", pa.int32()),
        ("kind", pa.string()),
        ("seed", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("quality", pa.float32()),
        # Soft labels (SynFace identity mixup): identity_b with weight 1 - mix_weight; -1 when unmixed.
        ("identity_b", pa.int64()),
        ("mix_weight", pa.float32()),
    ]
)
REQUIRED = ("image", "identity", "sample", "kind", "seed", "height", "width")


class ShardError(UserError, ValueError):
    """A shard or dataset folder is corrupt, foreign, or of an unknown schema version."""


def shard_name(unit: int) -> str:
    return f"part-{unit:06d}.parquet"


def build_table(columns: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> pa.Table:
    """Columns -> a table in the shard schema; missing optional columns get their neutral values."""
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ShardError(f"shard rows lack required columns: {missing}")
    unknown = [c for c in columns if c not in SHARD_SCHEMA.names]
    if unknown:
        raise ShardError(f"unknown shard columns: {unknown}; schema has {SHARD_SCHEMA.names}")
    n = len(columns["identity"])
    defaults = {"quality": np.full(n, np.nan, np.float32), "identity_b": np.full(n, -1, np.int64),
                "mix_weight": np.ones(n, np.float32)}
    arrays = []
    for field in SHARD_SCHEMA:
        values = columns.get(field.name, defaults.get(field.name))
        if field.name == "kind":
            bad = set(map(str, values)) - set(KINDS)
            if bad:
                raise ShardError(f"unknown kind(s) {sorted(bad)}; expected one of {KINDS}")
            values = [str(v) for v in values]
        elif field.name == "image":
            values = [bytes(v) for v in values]
        arr = pa.array(values, type=field.type)
        if len(arr) != n:
            raise ShardError(f"column '{field.name}' has {len(arr)} rows, 'identity' has {n}")
        arrays.append(arr)
    meta = {f"{META_PREFIX}schema_version": str(SCHEMA_VERSION)}
    for k, v in (metadata or {}).items():
        meta[f"{META_PREFIX}{k}"] = v if isinstance(v, str) else json.dumps(v)
    meta[f"{META_PREFIX}stats"] = json.dumps(table_stats(columns))
    return pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA.with_metadata(meta))


def table_stats(columns: Mapping[str, Any]) -> dict[str, Any]:
    """Per-shard counts kept in the footer so a manifest never has to read images."""
    kinds, counts = np.unique(np.asarray(columns["kind"], dtype=str), return_counts=True)
    q = np.asarray(columns.get("quality", []), dtype=np.float64)
    q = q[np.isfinite(q)]
    return {
        "rows": int(len(columns["identity"])),
        "identities": sorted(int(i) for i in np.unique(np.asarray(columns["identity"]))),
        "kinds": {str(k): int(c) for k, c in zip(kinds, counts)},
        "quality_n": int(q.size),
        "quality_sum": float(q.sum()),
        "quality_sumsq": float((q**2).sum()),
        "quality_min": float(q.min()) if q.size else None,
        "quality_max": float(q.max()) if q.size else None,
    }


def write_shard(dataset_uri: str, unit: int, columns: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> str:
    """Serialise in memory, then publish atomically as ``part-<unit>.parquet``; returns its URI."""
    table = build_table(columns, {**(metadata or {}), "unit": unit})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = storage.join(dataset_uri, shard_name(unit))
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def _metadata(uri: str) -> dict[str, str]:
    loc = storage.resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            md = pq.read_metadata(fh)
    except FileNotFoundError as exc:
        raise ShardError(f"shard not found: {uri}") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"corrupt shard {uri}: {exc}") from exc
    meta = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    version = meta.get(f"{META_PREFIX}schema_version")
    if version is None:
        raise ShardError(f"{uri} is not a synray shard (no {META_PREFIX}schema_version in its metadata)")
    if int(version) > SCHEMA_VERSION:
        raise ShardError(f"{uri} has shard schema version {version}; this synray reads up to {SCHEMA_VERSION}")
    meta["_rows"] = str(md.num_rows)
    return meta


def shard_metadata(uri: str) -> dict[str, Any]:
    """Footer metadata of one shard (without the prefix, JSON values decoded)."""
    out: dict[str, Any] = {}
    for k, v in _metadata(uri).items():
        key = k[len(META_PREFIX):] if k.startswith(META_PREFIX) else k
        try:
            out[key] = json.loads(v)
        except ValueError:
            out[key] = v
    return out


def read_shard(uri: str) -> pa.Table:
    """Read a whole shard, checking its schema version; errors name the file."""
    _metadata(uri)
    loc = storage.resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            return pq.read_table(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"corrupt shard {uri}: {exc}") from exc


def list_shards(dataset_uri: str) -> dict[int, str]:
    """``{unit: uri}`` of the finished shards; foreign files in the folder are an error naming them."""
    units: dict[int, str] = {}
    foreign = []
    for name in storage.listdir(dataset_uri):
        m = SHARD_RE.match(name)
        if m:
            units[int(m.group(1))] = storage.join(dataset_uri, name)
        elif not (name.startswith(".") or name in SIDE_FILES):
            foreign.append(name)
    if foreign:
        raise ShardError(
            f"dataset folder {dataset_uri} holds files that are not synray shards: {foreign[:10]}"
            " (move them away or choose another output folder)"
        )
    return dict(sorted(units.items()))


def validate_dataset(dataset_uri: str) -> dict[int, dict[str, Any]]:
    """Open every shard footer; returns ``{unit: metadata}``. Raises on the first bad file, naming it."""
    shards = list_shards(dataset_uri)
    if not shards:
        raise ShardError(f"no shards in {dataset_uri}")
    return {unit: shard_metadata(uri) for unit, uri in shards.items()}


def read_dataset(dataset_uri: str, columns: list[str] | None = None, **kwargs: Any):
    """The shards as a Ray Dataset (after checking every footer), in unit order."""
    import ray.data

    validate_dataset(dataset_uri)
    uris = list(list_shards(dataset_uri).values())
    loc = storage.resolve(dataset_uri)
    paths = [storage.resolve(u).path for u in uris]
    return ray.data.read_parquet(paths, filesystem=loc.fs, columns=columns, **kwargs)


def summarize(metas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-shard footer stats into dataset counts and quality statistics."""
    rows, kinds, ids, qn, qs, qss = 0, {}, set(), 0, 0.0, 0.0
    qmin, qmax = math.inf, -math.inf
    shards = 0
    for meta in metas:
        st = meta["stats"]
        shards += 1
        rows += st["rows"]
        ids.update(st["identities"])
        for k, c in st["kinds"].items():
            kinds[k] = kinds.get(k, 0) + c
        qn, qs, qss = qn + st["quality_n"], qs + st["quality_sum"], qss + st["quality_sumsq"]
        if st["quality_min"] is not None:
            qmin, qmax = min(qmin, st["quality_min"]), max(qmax, st["quality_max"])
    quality = None
    if qn:
        mean = qs / qn
        quality = {"n": qn, "mean": mean, "std": math.sqrt(max(qss / qn - mean**2, 0.0)), "min": qmin, "max": qmax}
    return {"shards": shards, "rows": rows, "identities": len(ids), "kinds": kinds, "quality": quality}


def write_manifest(dataset_uri: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` from the shard footers (counts, statistics) plus ``extra`` fields."""
    metas = validate_dataset(dataset_uri)
    manifest = {"schema_version": SCHEMA_VERSION, **summarize(metas.values()), "units": sorted(metas), **(extra or {})}
    storage.write_bytes_atomic(storage.join(dataset_uri, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(dataset_uri, "manifest.json")))
