"""Synthesis on Ray Data: units -> (context faces) -> generation -> alignment -> finish -> shards.

The Ray code here only wires the stages of :mod:`synray.synthesis.stages`. One row is one work unit,
so a unit's images stay together and each unit becomes exactly one shard, written atomically. A job
holds a lease on its output (:mod:`synray.io.lease`) for as long as it runs; re-running the same
config skips the units whose shard exists and checks out (footer, config hash, row count), rewrites
unreadable ones, and refuses shards of another config. The manifest, the dataset card and
``_SUCCESS`` are written last.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from synray.config import ConfigError, to_yaml
from synray.config.synth import SynthConfig
from synray.errors import UserError
from synray.io import shards, storage
from synray.io.lease import OutputLease, acquire_lease
from synray.jobs import JobContext, Need, Outcome
from synray.progress import JobProgress
from synray.synthesis import contexts as C
from synray.synthesis.card import dataset_card
from synray.io.sources import open_source
from synray.plots import dataset_grid, encode_png
from synray.synthesis.stages import AlignStage, ContextFaceStage, FinishStage, GenerateStage, WriteStage

log = logging.getLogger(__name__)

#: fields that change how fast a dataset is made, never what it contains
NON_CONTENT = {"name": True, "output": True, "tracking": True, "ray": True, "local": True,
               "generator": {"batch_size", "num_gpus", "num_cpus", "min_actors", "max_actors"},
               "alignment": {"num_cpus"}}
CONTEXT_FACE_SAMPLE = 10**6  # world sample index reserved for an identity's context face
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_DIGESTS: dict[tuple[str, int, int | None], str] = {}


def _embedder_file(spec: str) -> tuple[str, str]:
    """``(kept prefix, file)`` of an embedder spec ``"<registry name>:<checkpoint>"`` or ``"<checkpoint>"``."""
    from synray.models.registry import list_backbones

    name, sep, path = spec.partition(":")
    if sep and name in list_backbones():
        return f"{name}:", path
    return "", spec


def input_files(cfg: SynthConfig) -> dict[str, tuple[str, str]]:
    """``{dotted key: (kept prefix, file or folder)}`` of every input whose bytes shape the dataset."""
    g, c = cfg.generator, cfg.contexts
    files: dict[str, tuple[str, str]] = {}
    if g.type == "ldm":
        files["generator.unet"] = ("", g.unet)
        files["generator.vq_decoder"] = ("", g.vq_decoder)
    if g.type == "dcgan" and importlib.util.find_spec("gan_face_generate") is not None:
        import importlib.resources as ir

        files["generator.weights"] = ("", str(ir.files("gan_face_generate") / "weights.tar"))
    if c.path and c.source in ("embeddings_file", "face_embeddings", "mixup"):
        files["contexts.path"] = ("", c.path)
    if c.embedder and c.source == "face_embeddings":
        files["contexts.embedder"] = _embedder_file(c.embedder)
    if cfg.quality.embedder:
        files["quality.embedder"] = _embedder_file(cfg.quality.embedder)
    return files


def file_digest(uri: str, key: str = "input") -> str:
    """``sha256:<hex>`` of a file's bytes (streamed), or of a folder's image files and their names.

    Cached per (file, size, modification time), so a repeated check in one process reads nothing.
    """
    loc = storage.resolve(uri)
    try:
        info = loc.fs.get_file_info(loc.path)
    except Exception as exc:
        raise storage.StorageError(f"{key}: cannot reach {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{key}: {uri} does not exist")
    if info.type == pafs.FileType.Directory:
        h = hashlib.sha256()
        entries = loc.fs.get_file_info(pafs.FileSelector(loc.path))
        for e in sorted((e for e in entries if e.type == pafs.FileType.File and e.path.lower().endswith(IMAGE_EXTENSIONS)),
                        key=lambda e: e.path):
            name = e.path.rsplit("/", 1)[-1]
            h.update(f"{name}\0{file_digest(storage.join(uri, name), key)}\n".encode())
        return f"sha256:{h.hexdigest()}"
    cache_key = (loc.uri, info.size, info.mtime_ns)
    if cache_key not in _DIGESTS:
        h = hashlib.sha256()
        with loc.fs.open_input_stream(loc.path) as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _DIGESTS[cache_key] = f"sha256:{h.hexdigest()}"
    return _DIGESTS[cache_key]


def content_hash(cfg: SynthConfig) -> str:
    """Hash of what determines the dataset: the content settings, and the bytes (not paths) of every input file."""
    data = cfg.model_dump(mode="json", exclude=NON_CONTENT)
    for key, (prefix, uri) in input_files(cfg).items():
        section, name = key.split(".")
        data[section][name] = prefix + file_digest(uri, key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def units_of(cfg: SynthConfig) -> dict[int, np.ndarray]:
    """Fixed work units: unit u holds identities ``start + u*size .. start + (u+1)*size - 1``."""
    ids = np.arange(cfg.identities.start, cfg.identities.start + cfg.identities.count, dtype=np.int64)
    size = cfg.identities.unit_size
    first = cfg.identities.start // size
    return {first + k: ids[k * size:(k + 1) * size] for k in range((len(ids) + size - 1) // size)}


def check_config(cfg: SynthConfig) -> None:
    """Cross-section checks a schema cannot express; raises ValueError naming the keys."""
    src = cfg.contexts.source
    if cfg.identities.start % cfg.identities.unit_size:
        raise ValueError("identities.start must be a multiple of identities.unit_size (units are fixed)")
    if cfg.contexts.separation.max_cosine is not None and (src not in ("gaussian", "mixup") or cfg.contexts.path):
        raise ValueError("contexts.separation applies to Gaussian contexts only (source gaussian, or mixup without contexts.path)")
    if src == "face_embeddings" and not cfg.contexts.embedder:
        raise ValueError("contexts.embedder is required for source 'face_embeddings'")
    if cfg.augment.context_repeats and src != "face_embeddings":
        raise ValueError("augment.context_repeats needs context faces: set contexts.source to 'face_embeddings'")
    if cfg.quality.threshold is not None and not cfg.quality.embedder:
        raise ValueError("quality.threshold needs quality.embedder")
    if src == "empty" and cfg.generator.type != "ldm":
        raise ValueError("contexts.source 'empty' samples an LDM with its empty context: set generator.type ldm")
    if cfg.generator.type == "world" and src == "mixup":
        raise ValueError("the world generator renders identities directly; identity mixup needs generator.type ldm or dcgan")
    for key, (_, path) in input_files(cfg).items():
        if not storage.exists(path):
            raise ValueError(f"{key}: {path} does not exist")


def _base_contexts(cfg: SynthConfig, all_ids: np.ndarray) -> np.ndarray:
    c = cfg.contexts
    if c.source == "embeddings_file" or (c.source == "mixup" and c.path):  # mixup blends the file's rows
        return C.from_table(C.load_embeddings(c.path), all_ids, c.dim, c.path)
    if c.separation.max_cosine is not None:
        return C.separated_gaussian(cfg.seed, all_ids, c.dim, c.separation.max_cosine, c.separation.max_tries)
    return C.gaussian(cfg.seed, all_ids, c.dim)


def context_faces(cfg: SynthConfig, ids: np.ndarray) -> np.ndarray:
    """Context face images: the i-th image of ``contexts.path`` (sorted) or the world's render of i."""
    size = tuple(cfg.alignment.size)
    if cfg.contexts.path:
        from synray.io.images import decode_image

        names = sorted(f for f in os.listdir(cfg.contexts.path) if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if len(ids) and int(ids.max()) >= len(names):
            raise C.ContextError(f"contexts.path {cfg.contexts.path} has {len(names)} images; identity {int(ids.max())} requested")
        faces = []
        for i in ids:
            p = os.path.join(cfg.contexts.path, names[int(i)])
            with open(p, "rb") as fh:
                faces.append(decode_image(fh.read(), p))
        from synray.align import resize

        return np.stack([resize(f, size) for f in faces])
    from synray.world.world import World

    world = World(seed=cfg.seed, num_identities=int(ids.max()) + 1 if len(ids) else 1,
                  difficulty=cfg.generator.world_difficulty)
    return np.stack([world.render(int(i), CONTEXT_FACE_SAMPLE) for i in ids])


def unit_rows(cfg: SynthConfig, units: dict[int, np.ndarray], only: list[int]) -> list[dict[str, Any]]:
    """The input rows for the pending units: identities, contexts, soft labels (and context faces)."""
    all_ids = np.concatenate(list(units.values()))
    src = cfg.contexts.source
    if src in ("face_embeddings", "empty"):  # filled by ContextFaceStage / none: the model's empty context
        base = np.zeros((len(all_ids), cfg.contexts.dim), np.float32)
    else:
        base = _base_contexts(cfg, all_ids)
    index = {int(i): n for n, i in enumerate(all_ids)}
    rows = []
    for u in only:
        ids = units[u]
        if src == "mixup":
            mixed = C.mixup(cfg.seed, ids, all_ids, base, cfg.generator.images_per_identity, cfg.contexts.mixup.weights)
            ctx, partner, weight = mixed.vectors, mixed.partner, mixed.weight
        else:
            ctx = base[[index[int(i)] for i in ids]]
            partner, weight = np.full(len(ids), -1, np.int64), np.ones(len(ids), np.float32)
        if src not in ("face_embeddings", "empty"):  # those are checked where the embedder computes them
            C.check_rows(ctx, ids, f"contexts ({src})")
        row = {"unit": np.int64(u), "ids": ids, "contexts": ctx.astype(np.float32), "partner": partner, "weight": weight}
        if src == "face_embeddings":
            row["context_faces"] = context_faces(cfg, ids)
        rows.append(row)
    return rows


@dataclass
class Prepared:
    """What :func:`prepare` found in the output folder."""

    uri: str
    pending: list[int]
    units: dict[int, np.ndarray]
    meta: dict[str, Any]
    rewritten: list[str]
    removed_temp: list[str]


def prepare(cfg: SynthConfig) -> Prepared:
    """Check the output and the shards earlier runs left, under this job's lease on it.

    Every existing shard's footer is read: one of another config (or not a synray shard) is an error
    naming it; an unreadable or self-contradicting one sits in one of this job's unit slots and is
    deleted to be rewritten; temp files of killed writers are removed. ``_SUCCESS`` is cleared while
    units are pending.
    """
    check_config(cfg)
    uri = cfg.output.uri
    if shards.is_legacy_layout(uri):
        raise shards.ShardError(
            f"{uri} holds a dataset in synray's previous layout (shards and manifest.json at the root); it stays"
            f" readable for training, but new shards go to {shards.DATA_DIR}/: write to a new output.uri"
        )
    units = units_of(cfg)
    chash = content_hash(cfg)
    removed = shards.remove_temp_files(uri)
    for t in removed:
        log.warning("removed %s, the temp file of a killed writer", t)
    done = shards.list_shards(uri)
    stray = sorted(set(done) - set(units))
    if stray:
        raise shards.ShardError(f"{uri} holds shards for units {stray[:5]} outside identities.start/count")
    _, errors = shards.read_footers(done, chash, on_error="collect")
    foreign = [e for e in errors.values() if isinstance(e, shards.ForeignShardError)]
    if foreign:
        more = f" ({len(foreign)} such files)" if len(foreign) > 1 else ""
        raise shards.ForeignShardError(f"{foreign[0]}{more}; use a new output.uri or the config that made it")
    failed = [e for e in errors.values() if not isinstance(e, shards.CorruptShardError)]
    if failed:
        raise failed[0]
    rewritten = []
    for unit, exc in sorted(errors.items()):
        log.warning("unit %d is written again: %s", unit, exc)
        storage.delete(done.pop(unit))
        rewritten.append(shards.shard_name(unit))
    pending = [u for u in units if u not in done]
    if pending:
        shards.mark_incomplete(uri)
    meta = {"generator": cfg.generator.type, "config_hash": chash, "run_seed": cfg.seed,
            "sampler": cfg.generator.sampler.model_dump() if cfg.generator.type == "ldm" else None}
    storage.write_bytes_atomic(storage.join(uri, shards.CONFIG), to_yaml(cfg).encode())
    return Prepared(uri, pending, units, meta, rewritten, removed)


def prepare_output(cfg: SynthConfig) -> tuple[str, list[int], dict[int, np.ndarray], dict[str, Any]]:
    """:func:`prepare` as ``(uri, pending units, all units, shard metadata)``; hold the lease (:func:`open_output`)."""
    p = prepare(cfg)
    return p.uri, p.pending, p.units, p.meta


def open_output(cfg: SynthConfig) -> OutputLease:
    """Check the output is writable and take this job's lease on it (a second job on it fails here)."""
    storage.check_writable(cfg.output.uri)
    return acquire_lease(cfg.output.uri)


def _cfg_dict(cfg: SynthConfig) -> dict:
    return cfg.model_dump(mode="json")


def _finish(cfg: SynthConfig, prep: Prepared, lease: OutputLease, results: list[dict], seconds: float, backend: str,
            tracker) -> dict:
    """Summary, then the files that describe the dataset, ``_manifest.json`` and ``_SUCCESS`` last."""
    uri = prep.uri
    images = int(sum(r["rows"] for r in results))
    qn = int(sum(r["quality_n"] for r in results))
    summary = {
        "backend": backend, "units_written": len(results), "units_skipped": len(prep.units) - len(prep.pending),
        "images_written": images, "filtered": int(sum(r["filtered"] for r in results)),
        "seconds": seconds, "images_per_second": images / seconds if seconds > 0 else 0.0,
        "generator_seconds": float(sum(r["gen_seconds"] for r in results)),
        "quality_mean_written": (sum(r["quality_sum"] for r in results) / qn) if qn else None,
        "shards_rewritten": prep.rewritten, "temp_files_removed": len(prep.removed_temp),
    }
    lease.check()
    manifest = shards.build_manifest(uri, {"generator": cfg.generator.type, "name": cfg.name, "last_run": dict(summary)},
                                     expected_units=sorted(prep.units), config_hash=prep.meta["config_hash"])
    summary["manifest"] = {k: manifest[k] for k in ("shards", "rows", "identities", "kinds", "quality")}
    previews = [r["preview"] for r in results][:64]
    if previews:  # identities (rows) x samples, spread over the whole dataset
        grid = dataset_grid(open_source(uri, allow_incomplete=True), identities=8, samples=8)
        storage.write_bytes_atomic(storage.join(uri, shards.SAMPLES), encode_png(grid))
    has_samples = storage.exists(storage.join(uri, shards.SAMPLES))
    inputs = {key: file_digest(path, key) for key, (_, path) in input_files(cfg).items()}
    card = dataset_card(cfg, manifest, inputs, samples=has_samples)
    storage.write_bytes_atomic(storage.join(uri, shards.CARD), card.encode())
    lease.check()
    shards.write_manifest(uri, manifest=manifest)
    shards.mark_complete(uri, manifest)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
        tracker.log_metrics({"dataset_rows": manifest["rows"], "dataset_identities": manifest["identities"]})
        if manifest["quality"]:
            tracker.log_metrics({f"consistency_{k}": v for k, v in manifest["quality"].items()})
        if previews:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "samples.png")
                with open(path, "wb") as fh:
                    fh.write(storage.read_bytes(storage.join(uri, shards.SAMPLES)))
                tracker.log_artifact(path)
    return summary


def _row_dict(row: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else (v[0] if isinstance(v, np.ndarray) and v.shape == (1,) else v))
            for k, v in row.items()}


def run_local(cfg: SynthConfig, tracker=None) -> dict:
    """The same stages in a plain loop in this process (baseline for benchmarks, and small runs)."""
    with open_output(cfg) as lease:
        prep = prepare(cfg)
        d = _cfg_dict(cfg)
        t0 = time.perf_counter()
        results = []
        if prep.pending:
            stages = ([ContextFaceStage(d)] if cfg.contexts.source == "face_embeddings" else []) + [
                GenerateStage(d), AlignStage(d), FinishStage(d), WriteStage(d, prep.uri, prep.meta)]
            for row in unit_rows(cfg, prep.units, prep.pending):
                lease.check()
                batch = {k: np.asarray(v)[None] for k, v in row.items()}
                for stage in stages:
                    batch = stage(batch)
                results.append(_row_dict({k: v[0] if len(v) == 1 else v for k, v in batch.items()}))
        return _finish(cfg, prep, lease, results, time.perf_counter() - t0, "local", tracker)


def build_dataset(cfg: SynthConfig, rows: list[dict], uri: str, meta: dict):
    """Wire the stages into a Ray Dataset (lazy); each stage is a pool sized by the config."""
    import ray.data
    from ray.data import ActorPoolStrategy

    d = _cfg_dict(cfg)
    g = cfg.generator
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    if cfg.contexts.source == "face_embeddings":
        ds = ds.map_batches(ContextFaceStage, fn_constructor_kwargs={"cfg": d}, batch_size=1, num_cpus=0.5,
                            compute=ActorPoolStrategy(min_size=1, max_size=g.max_actors))
    ds = ds.map_batches(GenerateStage, fn_constructor_kwargs={"cfg": d}, batch_size=1,
                        num_gpus=g.num_gpus, num_cpus=g.num_cpus,
                        compute=ActorPoolStrategy(min_size=g.min_actors, max_size=g.max_actors))
    if cfg.alignment.mode == "landmarks":
        ds = ds.map_batches(AlignStage, fn_constructor_kwargs={"cfg": d}, batch_size=1, num_cpus=cfg.alignment.num_cpus,
                            compute=ActorPoolStrategy(min_size=1, max_size=2))
    elif cfg.alignment.mode == "resize":
        ds = ds.map_batches(AlignStage(d), batch_size=1, num_cpus=cfg.alignment.num_cpus)
    if cfg.quality.embedder:
        ds = ds.map_batches(FinishStage, fn_constructor_kwargs={"cfg": d}, batch_size=1, num_cpus=0.5,
                            compute=ActorPoolStrategy(min_size=1, max_size=2))
    else:
        ds = ds.map_batches(FinishStage(d), batch_size=1, num_cpus=0.25)
    return ds.map_batches(WriteStage(d, uri, meta), batch_size=1, num_cpus=0.25)


def run_synthesis(cfg: SynthConfig, tracker=None, progress: bool | None = None) -> dict:
    """Run the pipeline on the current Ray (call :func:`synray.runtime.init_ray` first)."""
    from synray.runtime import is_quiet

    with open_output(cfg) as lease:
        prep = prepare(cfg)
        quiet = is_quiet(cfg.ray) if progress is None else not progress
        t0 = time.perf_counter()
        results: list[dict] = []
        if prep.pending:
            rows = unit_rows(cfg, prep.units, prep.pending)
            ds = build_dataset(cfg, rows, prep.uri, prep.meta)
            skipped = len(prep.units) - len(prep.pending)
            bar = JobProgress("synth", len(prep.pending), "units", quiet)
            try:
                bar.update(0, skipped=skipped)
                for row in ds.iter_rows():
                    lease.check()
                    results.append(_row_dict(row))
                    images = int(sum(r["rows"] for r in results))
                    bar.update(len(results), images=images,
                               **{"img/s": images / max(time.perf_counter() - t0, 1e-9)})
            finally:
                bar.close()
        return _finish(cfg, prep, lease, results, time.perf_counter() - t0, "ray", tracker)


# --------------------------------------------------------------------------------------------
# the job


def check(cfg: SynthConfig) -> None:
    try:
        check_config(cfg)
    except ValueError as exc:
        if isinstance(exc, UserError):
            raise
        raise ConfigError(str(exc)) from None


def needs(cfg: SynthConfig) -> list[Need] | None:
    """The actor pools' minimum sizes plus one slot for the task stages (None: ``local`` runs without Ray)."""
    if cfg.local:
        return None
    g = cfg.generator
    gen = {"CPU": g.num_cpus, **({"GPU": g.num_gpus} if g.num_gpus else {})}
    out = [Need(f"{g.min_actors} generator actor(s)", "generator.min_actors, generator.num_cpus, generator.num_gpus",
                gen, g.min_actors),
           Need("the write stage", "(fixed)", {"CPU": 0.25})]
    if cfg.contexts.source == "face_embeddings":
        out.append(Need("the context-face embedder", "contexts.source", {"CPU": 0.5}))
    if cfg.alignment.mode == "landmarks":
        out.append(Need("the landmark aligner", "alignment.num_cpus", {"CPU": cfg.alignment.num_cpus}))
    return out


def run(cfg: SynthConfig, ctx: JobContext) -> Outcome:
    summary = run_local(cfg, ctx.tracker) if cfg.local else run_synthesis(cfg, ctx.tracker, progress=not ctx.quiet)
    return Outcome("synth", cfg.output.uri, summary)
