"""Synthesis on Ray Data: units -> (context faces) -> generation -> alignment -> finish -> shards.

The Ray code here only wires the stages of :mod:`synray.synthesis.stages`. One row is one work unit,
so a unit's images stay together and each unit becomes exactly one shard, written atomically. A job
holds a lease on its output (:mod:`synray.io.lease`) for as long as it runs; re-running the same
config skips the units whose shard exists and checks out (footer, config hash, row count), rewrites
unreadable ones, and refuses shards of another config. The manifest, the dataset card and
``_SUCCESS`` are written last.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Iterator
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
               "generator": {"batch_size", "num_gpus", "num_cpus", "min_actors", "max_actors", "precision",
                             "channels_last", "compile"},
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
    if c.path and c.source in ("embeddings_file", "face_embeddings"):
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


def unit_range(cfg: SynthConfig) -> range:
    """The fixed work units' numbers: unit u holds identities ``u*size .. (u+1)*size - 1`` within the run's range."""
    size, start, count = cfg.identities.unit_size, cfg.identities.start, cfg.identities.count
    return range(start // size, start // size + (count + size - 1) // size)


def unit_identities(cfg: SynthConfig, unit: int) -> np.ndarray:
    """The identities of work unit ``unit`` (the last unit may be short)."""
    size, end = cfg.identities.unit_size, cfg.identities.start + cfg.identities.count
    return np.arange(unit * size, min((unit + 1) * size, end), dtype=np.int64)


def units_of(cfg: SynthConfig) -> dict[int, np.ndarray]:
    """Every unit's identities (a dict over the whole run: for small runs and tests; jobs use :func:`unit_range`)."""
    return {u: unit_identities(cfg, u) for u in unit_range(cfg)}


def check_config(cfg: SynthConfig) -> None:
    """Cross-section checks a schema cannot express; raises ValueError naming the keys."""
    src = cfg.contexts.source
    if cfg.identities.start % cfg.identities.unit_size:
        raise ValueError("identities.start must be a multiple of identities.unit_size (units are fixed)")
    if cfg.contexts.separation.max_cosine is not None and src not in ("gaussian", "mixup"):
        raise ValueError("contexts.separation applies to gaussian/mixup contexts only")
    if src == "face_embeddings" and not cfg.contexts.embedder:
        raise ValueError("contexts.embedder is required for source 'face_embeddings'")
    if cfg.augment.context_repeats and src != "face_embeddings":
        raise ValueError("augment.context_repeats needs context faces: set contexts.source to 'face_embeddings'")
    if cfg.quality.threshold is not None and not cfg.quality.embedder:
        raise ValueError("quality.threshold needs quality.embedder")
    if cfg.generator.type == "world" and src == "mixup":
        raise ValueError("the world generator renders identities directly; identity mixup needs generator.type ldm or dcgan")
    for key, (_, path) in input_files(cfg).items():
        if not storage.exists(path):
            raise ValueError(f"{key}: {path} does not exist")


def all_identities(cfg: SynthConfig) -> np.ndarray:
    return np.arange(cfg.identities.start, cfg.identities.start + cfg.identities.count, dtype=np.int64)


def needs_base(cfg: SynthConfig) -> bool:
    """Whether a unit's contexts depend on other identities' (a file's table, separation, mixup partners)."""
    c = cfg.contexts
    return c.source in ("embeddings_file", "mixup") or (c.source == "gaussian" and c.separation.max_cosine is not None)


def base_contexts(cfg: SynthConfig) -> np.ndarray:
    """The unmixed contexts of every identity of the run, for the sources of :func:`needs_base`."""
    c, all_ids = cfg.contexts, all_identities(cfg)
    if c.source == "embeddings_file":
        return C.from_table(C.load_embeddings(c.path), all_ids, c.dim, c.path)
    if c.separation.max_cosine is not None:
        return C.separated_gaussian(cfg.seed, all_ids, c.dim, c.separation.max_cosine, c.separation.max_tries)
    return C.gaussian(cfg.seed, all_ids, c.dim)


@functools.lru_cache(maxsize=4)
def _face_files(folder: str) -> list[str]:
    """The image files of a context-face folder, sorted (listed once per process: rows are made unit by unit)."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))


def context_faces(cfg: SynthConfig, ids: np.ndarray) -> np.ndarray:
    """Context face images: the i-th image of ``contexts.path`` (sorted) or the world's render of i."""
    size = tuple(cfg.alignment.size)
    if cfg.contexts.path:
        from synray.io.images import decode_image

        names = _face_files(cfg.contexts.path)
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


def unit_row(cfg: SynthConfig, unit: int, base: np.ndarray | None = None) -> dict[str, Any]:
    """One unit's input row: identities, contexts, soft labels (and context faces).

    A pure function of the config and the unit (``base``: :func:`base_contexts`, for the sources that need it),
    so the rows are made where they are consumed, a unit at a time, and the driver never holds them.
    """
    ids = unit_identities(cfg, unit)
    src = cfg.contexts.source
    if needs_base(cfg) and base is None:
        raise ValueError(f"contexts.source {src!r} needs the run's base contexts (base_contexts)")
    if src == "mixup":
        mixed = C.mixup(cfg.seed, ids, all_identities(cfg), base, cfg.contexts.mixup.phi)
        ctx, partner, weight = mixed.vectors, mixed.partner, mixed.weight
    else:
        if src == "face_embeddings":
            ctx = np.zeros((len(ids), cfg.contexts.dim), np.float32)  # filled by ContextFaceStage
        elif base is not None:
            ctx = base[ids - cfg.identities.start]
        else:
            ctx = C.gaussian(cfg.seed, ids, cfg.contexts.dim)  # per identity: the same rows as over the whole run
        partner, weight = np.full(len(ids), -1, np.int64), np.ones(len(ids), np.float32)
    if src != "face_embeddings":  # those are checked where the embedder computes them
        C.check_rows(ctx, ids, f"contexts ({src})")
    row = {"unit": np.int64(unit), "ids": ids, "contexts": ctx.astype(np.float32), "partner": partner, "weight": weight}
    if src == "face_embeddings":
        row["context_faces"] = context_faces(cfg, ids)
    return row


def unit_rows(cfg: SynthConfig, only: list[int]) -> Iterator[dict[str, Any]]:
    """The input rows of the units ``only``, one at a time (the base contexts computed once, when needed)."""
    base = base_contexts(cfg) if needs_base(cfg) else None
    for u in only:
        yield unit_row(cfg, u, base)


def _rows_batch(batch: dict[str, np.ndarray], cfg: dict, pending: list[int], base: Any = None) -> dict[str, np.ndarray]:
    """Ray Data: row ``k`` of ``range(len(pending))`` -> the input row of unit ``pending[k]``."""
    import ray

    (k,) = batch["id"]
    base_arr = ray.get(base) if base is not None else None
    row = unit_row(SynthConfig.model_validate(cfg), pending[int(k)], base_arr)
    return {name: np.asarray(v)[None] for name, v in row.items()}


@dataclass
class Prepared:
    """What :func:`prepare` found in the output folder."""

    uri: str
    pending: list[int]
    units: range  # every unit of the run (:func:`unit_range`)
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
    units = unit_range(cfg)
    chash = content_hash(cfg)
    removed = shards.remove_temp_files(uri)
    for t in removed:
        log.warning("removed %s, the temp file of a killed writer", t)
    done = shards.list_shards(uri)
    stray = sorted(u for u in done if u not in units)
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


def prepare_output(cfg: SynthConfig) -> tuple[str, list[int], range, dict[str, Any]]:
    """:func:`prepare` as ``(uri, pending units, all units, shard metadata)``; hold the lease (:func:`open_output`)."""
    p = prepare(cfg)
    return p.uri, p.pending, p.units, p.meta


def open_output(cfg: SynthConfig) -> OutputLease:
    """Check the output is writable and take this job's lease on it (a second job on it fails here)."""
    storage.check_writable(cfg.output.uri)
    return acquire_lease(cfg.output.uri)


def _cfg_dict(cfg: SynthConfig) -> dict:
    return cfg.model_dump(mode="json")


@dataclass
class Totals:
    """Running sums over the units written: the driver keeps these, not a row per unit, so its memory does
    not grow with the dataset."""

    units: int = 0
    rows: int = 0
    filtered: int = 0
    gen_seconds: float = 0.0
    quality_sum: float = 0.0
    quality_n: int = 0
    gen_first_start: float = math.inf  # wall-clock start of the first generate call, end of the last
    gen_last_end: float = -math.inf

    def add(self, row: dict[str, Any]) -> None:
        r = _row_dict(row)
        self.units += 1
        self.rows += int(r["rows"])
        self.filtered += int(r["filtered"])
        self.gen_seconds += float(r["gen_seconds"])
        self.quality_sum += float(r["quality_sum"])
        self.quality_n += int(r["quality_n"])
        self.gen_first_start = min(self.gen_first_start, float(r["gen_started"]))
        self.gen_last_end = max(self.gen_last_end, float(r["gen_started"]) + float(r["gen_seconds"]))


def _finish(cfg: SynthConfig, prep: Prepared, lease: OutputLease, totals: Totals, seconds: float, backend: str,
            tracker) -> dict:
    """Summary, then the files that describe the dataset, ``_manifest.json`` and ``_SUCCESS`` last."""
    uri = prep.uri
    images, qn = totals.rows, totals.quality_n
    summary = {
        "backend": backend, "units_written": totals.units, "units_skipped": len(prep.units) - len(prep.pending),
        "images_written": images, "filtered": totals.filtered,
        "seconds": seconds, "images_per_second": images / seconds if seconds > 0 else 0.0,
        "generator_seconds": totals.gen_seconds,
        # from the first generate call's start to the last one's end: the generator's span, without start-up
        "generator_span_seconds": max(totals.gen_last_end - totals.gen_first_start, 0.0) if totals.units else 0.0,
        "quality_mean_written": (totals.quality_sum / qn) if qn else None,
        "shards_rewritten": prep.rewritten, "temp_files_removed": len(prep.removed_temp),
    }
    lease.check()
    manifest = shards.build_manifest(uri, {"generator": cfg.generator.type, "name": cfg.name, "last_run": dict(summary)},
                                     expected_units=list(prep.units), config_hash=prep.meta["config_hash"])
    summary["manifest"] = {k: manifest[k] for k in ("shards", "rows", "identities", "kinds", "quality")}
    if totals.units:  # identities (rows) x samples, spread over the whole dataset
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
        if totals.units and has_samples:
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
        totals = Totals()
        if prep.pending:
            stages = ([ContextFaceStage(d)] if cfg.contexts.source == "face_embeddings" else []) + [
                GenerateStage(d), AlignStage(d), FinishStage(d), WriteStage(d, prep.uri, prep.meta)]
            for row in unit_rows(cfg, prep.pending):
                lease.check()
                batch = {k: np.asarray(v)[None] for k, v in row.items()}
                for stage in stages:
                    batch = stage(batch)
                totals.add(batch)
        return _finish(cfg, prep, lease, totals, time.perf_counter() - t0, "local", tracker)


def build_dataset(cfg: SynthConfig, pending: list[int], uri: str, meta: dict, base: Any = None):
    """Wire the stages into a Ray Dataset (lazy); each stage is a pool sized by the config.

    The dataset starts from ``range(len(pending))``: each unit's row (identities, contexts, context faces) is
    made by a task just ahead of the generator, so the driver holds neither the rows nor the contexts, and
    the generator actors start while the first rows are made. ``base``: an object ref to
    :func:`base_contexts` for the sources that need them.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    d = _cfg_dict(cfg)
    g = cfg.generator
    ds = ray.data.range(len(pending), override_num_blocks=max(1, len(pending)))
    ds = ds.map_batches(_rows_batch, fn_kwargs={"cfg": d, "pending": list(pending), "base": base}, batch_size=1,
                        num_cpus=0.25)
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


def _put_base(cfg: SynthConfig):
    """An object ref to :func:`base_contexts`, computed by a Ray task (the table never enters the driver)."""
    import ray

    return ray.remote(num_cpus=0.25)(_base_task).remote(_cfg_dict(cfg)) if needs_base(cfg) else None


def _base_task(cfg: dict) -> np.ndarray:
    return base_contexts(SynthConfig.model_validate(cfg))


def run_synthesis(cfg: SynthConfig, tracker=None, progress: bool | None = None) -> dict:
    """Run the pipeline on the current Ray (call :func:`synray.runtime.init_ray` first)."""
    from synray.runtime import is_quiet

    with open_output(cfg) as lease:
        prep = prepare(cfg)
        quiet = is_quiet(cfg.ray) if progress is None else not progress
        t0 = time.perf_counter()
        totals = Totals()
        if prep.pending:
            ds = build_dataset(cfg, prep.pending, prep.uri, prep.meta, _put_base(cfg))
            skipped = len(prep.units) - len(prep.pending)
            bar = JobProgress("synth", len(prep.pending), "units", quiet)
            try:
                bar.update(0, skipped=skipped)
                for row in ds.iter_rows():
                    lease.check()
                    totals.add(row)
                    bar.update(totals.units, images=totals.rows,
                               **{"img/s": totals.rows / max(time.perf_counter() - t0, 1e-9)})
            finally:
                bar.close()
        return _finish(cfg, prep, lease, totals, time.perf_counter() - t0, "ray", tracker)


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
