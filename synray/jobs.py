"""Every job synray runs, and the one path each takes: load and validate, check, start or join Ray, run.

:data:`JOBS` maps a config ``kind`` to its schema and the module that runs it. A job module has

* ``run(cfg, ctx) -> Outcome``: the job itself (Ray is up, the config valid, the MLflow run open);
* ``check(cfg)`` (optional): checks that need files or data but no Ray (datasets exist, teachers load);
* ``needs(cfg)`` (optional): the resources it will ask Ray for, checked against the cluster before any
  Ray work, so a job that can never be scheduled fails at once instead of hanging; ``None`` means the
  job runs without Ray;
* ``tracking_run(cfg)`` (optional): a context manager yielding the job's MLflow Tracker, for jobs whose
  run outlives one invocation (a sweep reopens its parent run on resume); else :func:`synray.tracking.job_run`.

The command line, ``jobs/*.py`` for ``ray job submit``, the quickstart and the study all go through
:func:`load_job` and :func:`run_job`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from synray import runtime
from synray.config.base import ConfigError, apply_overrides, read_yaml, redact, validate
from synray.tracking import job_run

__all__ = ["Job", "JOBS", "JobContext", "Need", "Outcome", "job_for", "load_job", "run_job"]


@dataclass(frozen=True)
class Job:
    kind: str  # the config's ``kind``
    command: str  # ``synray <command>`` and ``jobs/<entry>.py``
    schema: str  # "module:Class"
    module: str  # module with run(cfg, ctx) [, check(cfg), needs(cfg)]
    help: str

    def schema_class(self) -> type[BaseModel]:
        mod, cls = self.schema.split(":")
        return getattr(importlib.import_module(mod), cls)

    def impl(self) -> ModuleType:
        return importlib.import_module(self.module)


JOBS: dict[str, Job] = {j.kind: j for j in (
    Job("synth", "synth", "synray.config.synth:SynthConfig", "synray.synthesis.pipeline",
        "synthesise a sharded face dataset on Ray (re-run to resume)"),
    Job("train", "train", "synray.config.train:TrainConfig", "synray.training.recognition",
        "train a face-recognition model on shards with Ray Train (re-run to resume)"),
    Job("distill", "distill", "synray.config.distill:DistillConfig", "synray.distill.loop",
        "distil a face-recognition student from a teacher on generated faces (Ray Train)"),
    Job("train_ldm", "train-ldm", "synray.config.ldm:LDMConfig", "synray.ldm.job",
        "train an identity-conditioned LDM (CPD, EMA) on Ray Train (re-run to resume)"),
    Job("sweep", "sweep", "synray.config.sweep:SweepConfig", "synray.tuning.sweep",
        "Ray Tune sweep (resampling_coef, CPD ratio, ...) tracked in MLflow (re-run to resume)"),
    Job("quickstart", "quickstart", "synray.config.quickstart:QuickstartConfig", "synray.quickstart",
        "the whole synthetic-data protocol on the built-in world, on local Ray"),
    Job("export", "export", "synray.config.export:ExportConfig", "synray.export",
        "export a dataset to insightface RecordIO (train.rec) or an <identity>/<n>.jpg tree on Ray Data (re-run to resume)"),
    Job("report", "report", "synray.config.report:ReportConfig", "synray.report",
        "dataset report: counts, identity consistency and separability under an FR model, leakage, sample grid"),
    Job("study", "study", "synray.config.study:StudyConfig", "synray.study.job",
        "every seed method's recipe on the built-in world: the papers' claims as a table (local Ray)"),
)}


def job_for(kind: Any, source: str = "config") -> Job:
    if kind not in JOBS:
        raise ConfigError(f"{source}: kind: unknown job kind {kind!r}; expected one of {sorted(JOBS)}")
    return JOBS[kind]


def load_job(path: str | os.PathLike | None, overrides: Sequence[str] | None = None, kind: str | None = None) -> BaseModel:
    """Read a job config (or start from the defaults of ``kind`` when ``path`` is None), apply overrides, validate.

    Local paths become absolute here, against the working directory. ``kind`` (the calling command's)
    must agree with the file's ``kind``.
    """
    source = os.fspath(path) if path is not None else "<overrides>"
    data = apply_overrides(read_yaml(path) if path is not None else {}, list(overrides or []))
    file_kind = data.get("kind", kind)
    if kind is not None and file_kind != kind:
        raise ConfigError(f"{source}: kind: this command takes kind {kind!r}, the file says {file_kind!r}")
    data["kind"] = file_kind
    return validate(job_for(file_kind, source).schema_class(), data, source)


@dataclass
class Need:
    """Resources a job asks of Ray at the same time: ``count`` bundles of ``bundle``, set by the config ``keys``."""

    what: str
    keys: str
    bundle: dict[str, float]
    count: int = 1
    phase: str = "main"  # needs of different phases (encoding, then training) never run at the same time

    @classmethod
    def workers(cls, scaling: Any, prefix: str = "scaling") -> Need:
        n = scaling.min_workers
        keys = f"{prefix}.num_workers, {prefix}.cpus_per_worker" + (f", {prefix}.use_gpu" if scaling.use_gpu else "") \
            + (f", {prefix}.resources" if scaling.resources else "")
        return cls(f"{n} Ray Train worker{'s' if n > 1 else ''}", keys, scaling.bundle(), n)

    @classmethod
    def data(cls, cpus: float, key: str) -> Need:
        return cls("data loading (Ray Data read/decode tasks)", key, {"CPU": cpus})


@dataclass
class JobContext:
    """What a running job gets besides its config."""

    tracker: Any  # synray.tracking.Tracker (a no-op one when tracking is off)
    callbacks: tuple = ()  # synray.training.runner.Callback instances, passed to training loops
    quiet: bool = False


@dataclass
class Outcome:
    """What a finished job left behind; ``summary()`` is what the command prints and saves."""

    job: str
    output_uri: str
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_uri: str | None = None  # the last Ray Train checkpoint (or the job's published checkpoint folder)
    model_uri: str | None = None  # the model to use next: final backbone, distilled student, LDM weights
    verification: dict[str, dict[str, float]] | None = None
    table: str | None = None  # human-readable result (verification table, quickstart table)
    extra: dict[str, Any] = field(default_factory=dict)
    ok: bool = True

    def set_verification(self, results: dict[str, dict[str, float]], tracker: Any = None) -> None:
        from synray.evaluation.evaluate import (
            format_table,  # torch: not at import time of the command line
        )
        from synray.evaluation.verification import accuracy_metrics

        self.verification = results
        self.table = format_table(results)
        if tracker is not None:
            tracker.log_text(self.table, "verification.txt")
            tracker.log_metrics(accuracy_metrics(results, "final/"))

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("table", "ok") and v not in (None, {})}
        return redact(out)

    def write_summary(self, uri: str) -> None:
        from synray.io import storage  # pyarrow: not at import time of the command line

        storage.write_bytes_atomic(uri, json.dumps(self.summary(), indent=2, default=str).encode())

    def console(self) -> str:
        """What the command prints: the table and where things are, or the summary as JSON when there is no table."""
        if not self.table:
            return json.dumps(self.summary(), indent=2, default=str)
        where = [f"{k}: {v}" for k, v in (("output", self.output_uri), ("model", self.model_uri)) if v]
        return "\n".join([self.table, "", *redact(where)])


def run_job(cfg: BaseModel, *, callbacks: Sequence[Any] = (), quiet: bool | None = None) -> Outcome:
    """Check, start or join Ray once, open the MLflow run, run the job; Ray is shut down only if started here."""
    job = job_for(cfg.kind)
    impl = job.impl()
    quiet = runtime.is_quiet(cfg.ray) if quiet is None else quiet
    runtime.check_writes(cfg)
    if hasattr(impl, "check"):
        impl.check(cfg)
    needs = impl.needs(cfg) if hasattr(impl, "needs") else []
    started = runtime.init_ray(cfg.ray, quiet=quiet) if needs is not None else False
    try:
        if needs is not None:
            runtime.check_cluster_writes(cfg)
            runtime.preflight(needs)
        runtime.check_storage(cfg)
        tracking = impl.tracking_run(cfg) if hasattr(impl, "tracking_run") else job_run(cfg, job.command)
        with tracking as tracker:
            return impl.run(cfg, JobContext(tracker, tuple(callbacks), quiet))
    finally:
        if started:
            import ray

            ray.shutdown()
