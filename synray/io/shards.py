"""Idempotent Parquet shards: one file per work unit, deterministic name, atomic write.

A dataset folder (local or ``s3://``) is laid out so that standard readers open it as it is::

    <root>/data/part-NNNNNN.parquet   one shard per work unit (pyarrow, pandas, DuckDB, Ray Data: <root>/data)
    <root>/README.md                  dataset card (Hugging Face ``datasets``: ``load_dataset(<root>)``)
    <root>/_manifest.json             counts and statistics, written after the last shard
    <root>/_config.yaml, _samples.png
    <root>/_SUCCESS                   written last: the dataset is complete

A shard that exists is complete (atomic write), so a re-run skips it; anything else that looks like
data is reported, never silently read. The previous layout (shards, ``manifest.json`` and
``config.yaml`` side by side at the root) is still read. :func:`open_dataset` is the one entry for
readers: it refuses a dataset that is not complete unless told otherwise.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synray.errors import UserError
from synray.io import storage

SCHEMA_VERSION = 1
META_PREFIX = "synray."
SHARD_RE = re.compile(r"^part-(\d{6,})\.parquet$")
#: an atomic writer's temp file (``storage.write_bytes_atomic``), left behind only by a killed writer
TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")
KINDS = ("generated", "context", "augmented", "real")

DATA_DIR = "data"
MANIFEST = "_manifest.json"
CONFIG = "_config.yaml"
SAMPLES = "_samples.png"
SUCCESS = "_SUCCESS"
CARD = "README.md"
#: the previous layout's side files, at the root beside the shards
LEGACY_SIDE_FILES = {"manifest.json", "config.yaml", "samples.png"}
#: Files a dataset root may hold besides its shards (either layout).
SIDE_FILES = {MANIFEST, CONFIG, SAMPLES, SUCCESS, CARD} | LEGACY_SIDE_FILES
#: footer reads run in parallel (they are round trips on S3)
FOOTER_THREADS = 16

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
    """A shard or dataset folder is corrupt, foreign, incomplete, or of an unknown schema version."""


class CorruptShardError(ShardError):
    """A shard that cannot be read (truncated, garbled) or whose footer contradicts itself: safe to rewrite."""


class ForeignShardError(ShardError):
    """A readable file in a shard slot that this job did not make (another config, not synray, newer schema)."""


class IncompleteDatasetError(ShardError):
    """A dataset without its completion marker, or whose manifest does not match its shards."""


def shard_name(unit: int) -> str:
    return f"part-{unit:06d}.parquet"


def data_uri(dataset_uri: str) -> str:
    """The folder that holds the shards of a dataset written by this synray (``<root>/data``)."""
    return storage.join(dataset_uri, DATA_DIR)


def shard_uri(dataset_uri: str, unit: int) -> str:
    """Where unit ``unit`` of a dataset is written."""
    return storage.join(dataset_uri, DATA_DIR, shard_name(unit))


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
        meta[f"{META_PREFIX}{k}"] = json.dumps(v)  # strings too: a hash of digits must stay a string
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
    """Serialise in memory, then publish atomically as ``data/part-<unit>.parquet``; returns its URI."""
    table = build_table(columns, {**(metadata or {}), "unit": unit})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = shard_uri(dataset_uri, unit)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def _metadata(uri: str) -> dict[str, str]:
    loc = storage.resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            md = pq.read_metadata(fh)
    except FileNotFoundError as exc:
        raise ShardError(f"shard not found: {uri}") from exc
    except pa.ArrowInvalid as exc:  # not a Parquet file, or cut short: the footer is gone
        raise CorruptShardError(f"corrupt shard {uri}: {exc}") from exc
    except OSError as exc:  # the storage failed, not the file: never a reason to rewrite it
        raise ShardError(f"cannot read shard {uri}: {exc}") from exc
    try:
        meta = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    except UnicodeDecodeError as exc:
        raise CorruptShardError(f"corrupt shard {uri}: undecodable footer metadata") from exc
    version = meta.get(f"{META_PREFIX}schema_version")
    if version is None:
        raise ForeignShardError(f"{uri} is not a synray shard (no {META_PREFIX}schema_version in its metadata)")
    if not version.isdigit():
        raise CorruptShardError(f"corrupt shard {uri}: schema version {version!r}")
    if int(version) > SCHEMA_VERSION:
        raise ForeignShardError(f"{uri} has shard schema version {version}; this synray reads up to {SCHEMA_VERSION}")
    meta["_rows"] = str(md.num_rows)
    return meta


#: footer values that are always strings (shards of earlier versions stored them unquoted)
_STRING_KEYS = {"config_hash", "generator", "name", "label_kind"}


def shard_metadata(uri: str) -> dict[str, Any]:
    """Footer metadata of one shard (without the prefix, JSON values decoded; ``_rows``: rows in the file)."""
    out: dict[str, Any] = {}
    for k, v in _metadata(uri).items():
        key = k[len(META_PREFIX):] if k.startswith(META_PREFIX) else k
        if key in _STRING_KEYS and not v.startswith('"'):
            out[key] = v  # written unquoted by earlier versions: "1234e5" is a hash, not a number
            continue
        try:
            out[key] = json.loads(v)
        except ValueError:
            out[key] = v
    return out


def verify_shard(uri: str, unit: int | None = None, config_hash: str | None = None) -> dict[str, Any]:
    """The footer of a shard, checked against its slot: unit, config hash, and its own row statistics.

    Raises :class:`CorruptShardError` (unreadable, or the footer contradicts itself or its file name)
    or :class:`ForeignShardError` (another config, not a synray shard); both name the file.
    """
    meta = shard_metadata(uri)
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise ForeignShardError(
            f"{uri} was written by a different config (hash {meta.get('config_hash')}, this one {config_hash})"
        )
    if unit is not None and meta.get("unit") != unit:
        raise CorruptShardError(f"{uri} holds unit {meta.get('unit')}, its name says unit {unit}")
    stats = meta.get("stats")
    if not isinstance(stats, dict) or "rows" not in stats:
        raise CorruptShardError(f"corrupt shard {uri}: no row statistics in its footer")
    if stats["rows"] != meta["_rows"] or sum((stats.get("kinds") or {}).values()) != meta["_rows"]:
        raise CorruptShardError(
            f"corrupt shard {uri}: {meta['_rows']} rows in the file, its statistics say {stats['rows']}"
        )
    return meta


def read_footers(shards: Mapping[int, str], config_hash: str | None = None,
                 on_error: str = "raise") -> tuple[dict[int, dict[str, Any]], dict[int, ShardError]]:
    """Verified footers of many shards, read in parallel: ``({unit: metadata}, {unit: error})``.

    ``on_error="raise"`` raises the first error (by unit), naming its file; ``"collect"`` returns them.
    """
    def one(item: tuple[int, str]):
        unit, uri = item
        try:
            return unit, verify_shard(uri, unit, config_hash), None
        except ShardError as exc:
            return unit, None, exc

    items = sorted(shards.items())
    if len(items) > 1:
        with ThreadPoolExecutor(min(FOOTER_THREADS, len(items))) as pool:
            results = list(pool.map(one, items))
    else:
        results = [one(i) for i in items]
    metas = {u: m for u, m, e in results if e is None}
    errors = {u: e for u, _, e in results if e is not None}
    if errors and on_error == "raise":
        raise next(iter(errors.values()))
    return metas, errors


def read_shard(uri: str) -> pa.Table:
    """Read a whole shard, checking its schema version; errors name the file."""
    _metadata(uri)
    loc = storage.resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            return pq.read_table(fh)
    except pa.ArrowInvalid as exc:
        raise CorruptShardError(f"corrupt shard {uri}: {exc}") from exc
    except OSError as exc:
        raise ShardError(f"cannot read shard {uri}: {exc}") from exc


def _scan(folder: str, allowed: set[str]) -> tuple[dict[int, str], list[str]]:
    """``({unit: uri}, foreign names)`` of one folder; hidden files (temp files, the lease) are skipped."""
    units, foreign = {}, []
    for name in storage.listdir(folder):
        m = SHARD_RE.match(name)
        if m:
            units[int(m.group(1))] = storage.join(folder, name)
        elif not (name.startswith(".") or name in allowed):
            foreign.append(name)
    return units, foreign


def list_shards(dataset_uri: str) -> dict[int, str]:
    """``{unit: uri}`` of the finished shards, under ``data/`` or (previous layout) at the root.

    Files that are not synray shards or side files are an error naming them, and so is a folder with
    shards in both places.
    """
    legacy, foreign = _scan(dataset_uri, SIDE_FILES)
    units, foreign_data = _scan(data_uri(dataset_uri), set())
    foreign += [f"{DATA_DIR}/{n}" for n in foreign_data]
    if foreign:
        raise ShardError(
            f"dataset folder {dataset_uri} holds files that are not synray shards: {foreign[:10]}"
            " (move them away or choose another output folder)"
        )
    if legacy and units:
        raise ShardError(
            f"dataset folder {dataset_uri} holds shards both at its root ({shard_name(min(legacy))}, ...) and under"
            f" {DATA_DIR}/ ({shard_name(min(units))}, ...); keep one dataset per folder"
        )
    return dict(sorted((units or legacy).items()))


def is_legacy_layout(dataset_uri: str) -> bool:
    """True for a folder in the previous layout (shards and ``manifest.json`` at the root)."""
    names = storage.listdir(dataset_uri)
    return any(SHARD_RE.match(n) for n in names) or "manifest.json" in names


def remove_temp_files(dataset_uri: str) -> list[str]:
    """Delete the temp files killed writers left (root and ``data/``); call only while holding the lease."""
    removed = []
    for folder in (dataset_uri, data_uri(dataset_uri)):
        for name in storage.listdir(folder):
            if TEMP_RE.match(name):
                uri = storage.join(folder, name)
                storage.delete(uri)
                removed.append(uri)
    return removed


def validate_dataset(dataset_uri: str) -> dict[int, dict[str, Any]]:
    """Open every shard footer; returns ``{unit: metadata}``. Raises on the first bad file, naming it.

    This checks the shards only; readers use :func:`open_dataset`, which also checks completeness.
    """
    shards = list_shards(dataset_uri)
    if not shards:
        raise ShardError(f"no shards in {dataset_uri}")
    return read_footers(shards)[0]


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


def build_manifest(dataset_uri: str, extra: Mapping[str, Any] | None = None, *, expected_units: Sequence[int] | None = None,
                   config_hash: str | None = None) -> dict[str, Any]:
    """The manifest from the shard footers: counts, statistics, rows per unit.

    With ``expected_units`` a missing unit is an error; with ``config_hash`` a shard of another config is.
    """
    shards = list_shards(dataset_uri)
    if not shards:
        raise ShardError(f"no shards in {dataset_uri}")
    metas = read_footers(shards, config_hash)[0]
    if expected_units is not None:
        missing = sorted(set(expected_units) - set(metas))
        if missing:
            raise IncompleteDatasetError(f"{dataset_uri} lacks units {missing[:10]}: cannot write a complete manifest")
    manifest = {"schema_version": SCHEMA_VERSION, "layout": DATA_DIR, **summarize(metas.values()), "units": sorted(metas),
                "shard_rows": {str(u): int(m["_rows"]) for u, m in sorted(metas.items())}}
    if expected_units is not None:
        manifest["expected_units"] = sorted(int(u) for u in expected_units)
    if config_hash is not None:
        manifest["config_hash"] = config_hash
    manifest.update(extra or {})
    return manifest


def write_manifest(dataset_uri: str, extra: Mapping[str, Any] | None = None, *, expected_units: Sequence[int] | None = None,
                   config_hash: str | None = None, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``_manifest.json`` (``manifest`` as given, else :func:`build_manifest`); returns it."""
    if manifest is None:
        manifest = build_manifest(dataset_uri, extra, expected_units=expected_units, config_hash=config_hash)
    storage.write_bytes_atomic(storage.join(dataset_uri, MANIFEST), json.dumps(manifest, indent=2).encode())
    return dict(manifest)


def mark_complete(dataset_uri: str, manifest: Mapping[str, Any]) -> None:
    """Write ``_SUCCESS`` (last, after the manifest): readers take the dataset as finished from now on."""
    marker = {k: manifest.get(k) for k in ("config_hash", "shards", "rows", "identities")}
    storage.write_bytes_atomic(storage.join(dataset_uri, SUCCESS), json.dumps(marker).encode())


def finish_dataset(dataset_uri: str, extra: Mapping[str, Any] | None = None, *, expected_units: Sequence[int] | None = None,
                   config_hash: str | None = None) -> dict[str, Any]:
    """Manifest, then ``_SUCCESS``: what a writer other than the synthesis job (tests, tools) calls when done."""
    manifest = write_manifest(dataset_uri, extra, expected_units=expected_units, config_hash=config_hash)
    mark_complete(dataset_uri, manifest)
    return manifest


def mark_incomplete(dataset_uri: str) -> None:
    """Remove ``_SUCCESS`` before a job changes the dataset, so that no reader takes it as finished meanwhile."""
    storage.delete(storage.join(dataset_uri, SUCCESS))


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    """``_manifest.json`` (or the previous layout's ``manifest.json``)."""
    for name in (MANIFEST, "manifest.json"):
        uri = storage.join(dataset_uri, name)
        if storage.exists(uri):
            return json.loads(storage.read_bytes(uri))
    raise ShardError(f"no {MANIFEST} in {dataset_uri}")


@dataclass(frozen=True)
class ShardSet:
    """An opened dataset: its shards with their verified footers, its manifest, and whether it is complete."""

    uri: str
    shards: dict[int, str]
    metas: dict[int, dict[str, Any]]
    manifest: dict[str, Any] | None
    problems: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def files(self) -> list[str]:
        return list(self.shards.values())

    @property
    def rows(self) -> int:
        return sum(int(m["_rows"]) for m in self.metas.values())


def _dataset_root(uri: str) -> str:
    """A reader given ``<root>/data`` (the path pyarrow and pandas take) means ``<root>``."""
    stripped = uri.rstrip("/")
    parent, _, name = stripped.rpartition("/")
    if name == DATA_DIR and parent and not any(storage.exists(storage.join(stripped, f)) for f in (MANIFEST, SUCCESS)):
        if storage.exists(storage.join(parent, MANIFEST)) or storage.exists(storage.join(parent, SUCCESS)):
            return parent
    return uri


def _problems(uri: str, shards: dict[int, str], metas: dict[int, dict[str, Any]], manifest: dict | None,
              legacy: bool) -> list[str]:
    problems = []
    if not legacy and not storage.exists(storage.join(uri, SUCCESS)):
        problems.append(f"no {SUCCESS} marker (its synthesis job has not finished, or was interrupted)")
    if manifest is None:
        problems.append(f"no {'manifest.json' if legacy else MANIFEST}")
    hashes: dict[Any, list[str]] = {}
    for unit, meta in metas.items():
        hashes.setdefault(meta.get("config_hash"), []).append(shard_name(unit))
    if len(hashes) > 1:
        parts = [f"{h}: {names[:3]}{' ...' if len(names) > 3 else ''}" for h, names in hashes.items()]
        problems.append(f"shards of {len(hashes)} different configs ({'; '.join(parts)})")
    if manifest is not None:
        listed = set(manifest.get("expected_units") or manifest.get("units") or [])
        missing, extra = sorted(listed - set(shards)), sorted(set(shards) - listed)
        if missing:
            problems.append(f"{len(missing)} unit(s) of the manifest have no shard: {[shard_name(u) for u in missing[:5]]}")
        if extra:
            problems.append(f"{len(extra)} shard(s) not in the manifest: {[shard_name(u) for u in extra[:5]]}")
        per_unit = manifest.get("shard_rows") or {}
        wrong = [f"{shard_name(u)} has {metas[u]['_rows']} rows, the manifest says {per_unit[str(u)]}"
                 for u in sorted(metas) if str(u) in per_unit and per_unit[str(u)] != metas[u]["_rows"]]
        problems += wrong[:5]
        rows = sum(int(m["_rows"]) for m in metas.values())
        if not wrong and not missing and not extra and manifest.get("rows") != rows:
            problems.append(f"the shards hold {rows} rows, the manifest says {manifest.get('rows')}")
        mh = manifest.get("config_hash")
        if mh is not None and len(hashes) == 1 and mh not in hashes:
            problems.append(f"the shards were written by config {next(iter(hashes))}, the manifest by {mh}")
    return problems


def open_dataset(uri: str, allow_incomplete: bool = False) -> ShardSet:
    """The one way to open a shard dataset for reading: every footer checked, completeness enforced.

    Complete means ``_SUCCESS`` present (the previous layout, which never wrote it: ``manifest.json``
    present) and the manifest's units and row counts equal the shards', all of one config. Otherwise
    :class:`IncompleteDatasetError` names what is missing, unless ``allow_incomplete`` (then
    :attr:`ShardSet.problems` says it). A corrupt or foreign shard is an error either way.
    """
    root = _dataset_root(uri)
    shards = list_shards(root)
    if not shards:
        raise ShardError(f"no shards in {root} (expected {DATA_DIR}/part-NNNNNN.parquet)")
    metas = read_footers(shards)[0]
    legacy = not all(u.startswith(data_uri(root)) for u in shards.values())
    try:
        manifest = read_manifest(root)
    except ShardError:
        manifest = None
    problems = tuple(_problems(root, shards, metas, manifest, legacy))
    if problems and not allow_incomplete:
        raise IncompleteDatasetError(
            f"dataset {root} is incomplete: {'; '.join(problems)}. Re-run the synthesis job that writes it (same"
            " config and output.uri) to finish it, or read it anyway with allow_incomplete (training: data.allow_incomplete: true)"
        )
    return ShardSet(root, shards, metas, manifest, problems)


def read_dataset(source: str | ShardSet | Sequence[str], columns: list[str] | None = None, *,
                 allow_incomplete: bool = False, **kwargs: Any):
    """The shards as a Ray Dataset in unit order: of a dataset URI (opened with :func:`open_dataset`),
    a :class:`ShardSet`, or a list of shard URIs already checked. ``kwargs`` go to ``ray.data.read_parquet``."""
    import ray.data

    if isinstance(source, str):
        source = open_dataset(source, allow_incomplete)
    uris = source.files if isinstance(source, ShardSet) else list(source)
    if not uris:
        raise ShardError("no shards to read")
    fs = storage.resolve(uris[0]).fs
    paths = [storage.resolve(u).path for u in uris]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns, **kwargs)
