"""Synthesis on Ray Data: units -> (context faces) -> generation -> alignment -> finish -> shards.

The Ray code here only wires the stages of :mod:`synray.synthesis.stages`. One row is one work unit,
so a unit's images stay together and each unit becomes exactly one shard, written atomically. A job
holds a lease on its output (:mod:`synray.io.lease`) for as long as it runs; re-running the same
config skips the units whose shard exists and checks out (footer, config hash, row count), rewrites
unreadable ones, and refuses shards of another config. The manifest, the dataset card and
``_SUCCESS`` are written last.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synray.config import ConfigError, to_yaml
from synray.config.synth import SynthConfig
from synray.errors import UserError
from synray.io import shards, storage
from synray.io.lease import OutputLease, acquire_lease
from synray.io.sources import open_source
from synray.jobs import JobContext, Need, Outcome
from synray.plots import dataset_grid, encode_png
from synray.progress import JobProgress
from synray.runtime import is_quiet
from synray.synthesis.card import dataset_card
from synray.synthesis.fingerprint import content_hash, file_digest, input_files
from synray.synthesis.stages import (
    AlignStage,
    ContextFaceStage,
    FinishStage,
    GenerateStage,
    WriteStage,
)
from synray.synthesis.units import (  # noqa: F401 - the unit helpers, named here too
    CONTEXT_FACE_SAMPLE,
    base_task,
    context_faces,
    needs_base,
    rows_batch,
    unit_identities,
    unit_range,
    unit_row,
    unit_rows,
    units_of,
)

log = logging.getLogger(__name__)

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
    gen_actors: set[str] = field(default_factory=set)  # the generators that made units (at most max_actors)

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
        if r.get("gen_actor"):
            self.gen_actors.add(str(r["gen_actor"]))


def _finish(cfg: SynthConfig, prep: Prepared, lease: OutputLease, totals: Totals, started: float, backend: str,
            tracker) -> dict:
    """Summary, then the files that describe the dataset, ``_manifest.json`` and ``_SUCCESS`` last.

    ``started``: wall-clock time the units' processing began (after :func:`prepare`).
    """
    uri = prep.uri
    seconds = time.time() - started
    images, qn = totals.rows, totals.quality_n
    span = totals.units > 0
    summary = {
        "backend": backend, "units_written": totals.units, "units_skipped": len(prep.units) - len(prep.pending),
        "images_written": images, "filtered": totals.filtered,
        "seconds": seconds, "images_per_second": images / seconds if seconds > 0 else 0.0,
        "generator_seconds": totals.gen_seconds, "generator_actors": len(totals.gen_actors),
        # the generator's span (first generate call's start to the last one's end), the time before it (start-up:
        # actors, first rows) and after it (drain: the last unit's alignment and write)
        "generator_span_seconds": totals.gen_last_end - totals.gen_first_start if span else 0.0,
        "generator_start_seconds": totals.gen_first_start - started if span else 0.0,
        "drain_seconds": started + seconds - totals.gen_last_end if span else 0.0,
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
        if totals.units:
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
        started = time.time()
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
        return _finish(cfg, prep, lease, totals, started, "local", tracker)


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
    ds = ds.map_batches(rows_batch, fn_kwargs={"cfg": d, "pending": list(pending), "base": base}, batch_size=1,
                        num_cpus=0.25)
    if cfg.contexts.source == "face_embeddings":
        ds = ds.map_batches(ContextFaceStage, fn_constructor_kwargs={"cfg": d}, batch_size=1, num_cpus=0.5,
                            compute=ActorPoolStrategy(min_size=1, max_size=g.max_actors))
    # As many generator actors as there are units (up to max_actors) from the start, one unit each at a time:
    # Ray Data's autoscaler otherwise queues a few units on the first actor and never starts the second,
    # and a short job (the study's 2 units) runs on one actor while the others' CPUs idle.
    actors = min(g.max_actors, max(g.min_actors, len(pending)))
    ds = ds.map_batches(GenerateStage, fn_constructor_kwargs={"cfg": d}, batch_size=1,
                        num_gpus=g.num_gpus, num_cpus=g.num_cpus,
                        compute=ActorPoolStrategy(min_size=g.min_actors, max_size=g.max_actors, initial_size=actors,
                                                  max_tasks_in_flight_per_actor=1))
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

    return ray.remote(num_cpus=0.25)(base_task).remote(_cfg_dict(cfg)) if needs_base(cfg) else None


def run_synthesis(cfg: SynthConfig, tracker=None, progress: bool | None = None) -> dict:
    """Run the pipeline on the current Ray (call :func:`synray.runtime.init_ray` first)."""
    with open_output(cfg) as lease:
        prep = prepare(cfg)
        quiet = is_quiet(cfg.ray) if progress is None else not progress
        started = time.time()
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
                               **{"img/s": totals.rows / max(time.time() - started, 1e-9)})
            finally:
                bar.close()
        return _finish(cfg, prep, lease, totals, started, "ray", tracker)


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
