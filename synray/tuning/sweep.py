"""Ray Tune sweeps over distillation (``resampling_coef``...) and LDM training (the CPD ratio...), tracked in MLflow.

* The target job's YAML (``base`` + ``overrides``) is validated with every grid value and both ends of
  every range before Ray starts.
* Each trial is a Tune function trainable that runs the job's loop in its own process
  (:func:`synray.distill.loop.distill_loop`, :func:`synray.ldm.learner.ldm_loop`) with the runner's
  Tune hooks (:func:`synray.training.runner.tune_hooks`), reporting after every epoch / checkpoint
  with a Tune checkpoint, so a trial resumes where it stopped. For LDM sweeps
  the encoding pre-stage runs once before the trials and the objective
  (:mod:`synray.tuning.objectives`) is scored at every checkpoint.
* MLflow: the sweep is a parent run (params = the resolved sweep config); Ray's ``MLflowLoggerCallback``
  makes one child run per trial (params = the trial's sampled values, metrics = every report), tagged
  ``mlflow.parentRunId``. The best trial's values (tags ``best.<key>``), metric (``best/<metric>``) and
  full job config (``best_config.yaml``) are logged to the parent and printed.
* Re-running a sweep with the same ``output.uri`` and ``name`` calls ``Tuner.restore``: finished trials
  are kept, unfinished and errored ones resume from their last checkpoint, under the same parent run.
  Restoring unpickles Tune's state from that folder, so it happens only when the folder holds the marker
  (``synray_sweep.json``: sweep name, config hash, random id) that this sweep wrote when it created the
  experiment, and the marker matches the sweep's name and config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from synray.config.base import (
    ConfigError,
    apply_overrides,
    config_hash,
    read_yaml,
    set_dotted,
    validate,
)
from synray.config.distill import DistillConfig
from synray.config.ldm import LDMConfig
from synray.config.sweep import ObjectiveConfig, SweepConfig
from synray.distill.loop import check as check_distill
from synray.distill.loop import distill_loop
from synray.io import storage
from synray.io.s3 import run_storage
from synray.jobs import JobContext, Need, Outcome
from synray.ldm.encode import LatentsInfo, prepare_latents
from synray.ldm.first_stage import DECODER_FILE, load_stage
from synray.ldm.learner import ldm_loop
from synray.models.export import load_any_backbone
from synray.redact import redact, redact_text
from synray.tracking import (
    PARENT_TAG,
    Tracker,
    close_orphans,
    ensure_experiment,
    job_run,
    numeric_metrics,
    resolve_tracking_uri,
)
from synray.training.runner import Callback, tune_hooks
from synray.tuning.objectives import ldm_objective, training_contexts

__all__ = ["SweepOutcome", "load_target", "trial_config", "param_space", "check", "needs", "run", "distill_trainable",
           "ldm_trainable", "best_config_yaml", "PARENT_FILE", "OWNER_FILE", "sweep_identity", "write_owner_marker",
           "check_owner_marker"]

PARENT_FILE = "synray_parent_run.json"
OWNER_FILE = "synray_sweep.json"


def _schema(target: str):
    if target == "distill":
        return DistillConfig

    return LDMConfig


def load_target(cfg: SweepConfig) -> dict[str, Any]:
    """The target job's config as a plain dict (``base`` + ``overrides``), with every searched value checked."""
    schema = _schema(cfg.target)
    data = read_yaml(cfg.base)
    kind = "distill" if cfg.target == "distill" else "train_ldm"
    if data.get("kind", kind) != kind:
        raise ConfigError(f"base: {cfg.base} is a {data.get('kind')!r} config; target {cfg.target!r} needs kind {kind!r}")
    data["kind"] = kind
    apply_overrides(data, cfg.overrides)
    base = validate(schema, data, cfg.base).model_dump(mode="json")
    for key, dim in cfg.space.items():
        for value in dim.probe_values():
            trial = copy.deepcopy(base)
            try:
                set_dotted(trial, key, value)
            except ConfigError as exc:
                raise ConfigError(f"space.{key}: {exc}") from None
            validate(schema, trial, f"{cfg.base} with {key}={value!r}")
    return base


def trial_config(base: dict[str, Any], params: dict[str, Any], target: str):
    """The validated job config of one trial."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(data, key, value)
    return _schema(target).model_validate(data)


def best_config_yaml(base: dict[str, Any], params: dict[str, Any], target: str) -> str:
    """A trial's full job config as YAML, redacted: it goes to MLflow, to storage and to stdout."""
    return yaml.safe_dump(redact(trial_config(base, params, target).model_dump(mode="json")), sort_keys=False)


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[d.kind](list(getattr(d, d.kind))) for key, d in cfg.space.items()}


# --------------------------------------------------------------------------------------------
# trainables (run inside Tune trial processes)


def distill_trainable(config: dict, *, base: dict, threads: int = 1, callbacks: tuple[Callback, ...] = ()) -> None:
    """One distillation trial: the whole loop in this process (one worker), one report per epoch."""
    torch.set_num_threads(threads)
    distill_loop(trial_config(base, config, "distill"), tune_hooks(callbacks))


def ldm_trainable(config: dict, *, base: dict, latents: dict, objective: dict, threads: int = 1,
                  callbacks: tuple[Callback, ...] = ()) -> None:
    """One LDM trial: training on the pre-encoded latents in this process, the objective at every checkpoint."""
    torch.set_num_threads(threads)
    cfg = trial_config(base, config, "train_ldm")
    cfg.training.log_every = cfg.training.checkpoint_every  # Tune needs the metric in every report
    info = LatentsInfo.from_dict(latents)
    obj = ObjectiveConfig.model_validate(objective)
    embedder = load_any_backbone(obj.embedder or cfg.contexts.embedder).eval()
    decoder = load_stage(info.first_stage, DECODER_FILE, info.vq_config)
    contexts = training_contexts(info, obj.identities)

    def score(learner) -> dict[str, float]:
        return ldm_objective(learner.ema.averaged_model, decoder, embedder, contexts, info.latent_shape, obj, cfg.seed)

    ldm_loop(cfg, tune_hooks(callbacks), latents=latents, score=score)


_RUN_SETTINGS = {"resume", "ray", "tracking", "output", "trial_resources", "max_concurrent_trials",
                 "trial_max_failures", "num_to_keep", "base", "overrides"}


def sweep_identity(cfg: SweepConfig, base: dict[str, Any]) -> dict[str, str]:
    """Name and content hash of the experiment: the searched space, scheduler, metric and the resolved target config."""
    content = json.dumps([config_hash(cfg, exclude=_RUN_SETTINGS), base], sort_keys=True, default=str)
    return {"sweep": cfg.name, "config_hash": hashlib.sha256(content.encode()).hexdigest()[:16]}


def write_owner_marker(exp_uri: str, identity: dict[str, str]) -> dict[str, str]:
    """Mark ``exp_uri`` as created by this sweep (written when the experiment is created, before any trial)."""
    marker = {**identity, "id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes_atomic(storage.join(exp_uri, OWNER_FILE), json.dumps(marker, indent=2).encode())
    return marker


def check_owner_marker(exp_uri: str, identity: dict[str, str]) -> dict[str, str]:
    """The marker of the experiment in ``exp_uri`` if it was created by this sweep; else a ConfigError saying why."""
    where = storage.join(exp_uri, OWNER_FILE)
    hint = ("Tune restores a sweep by unpickling the files in that folder, so synray restores only an experiment "
            "this sweep created there; give the sweep another name or output.uri, or set resume=false to start "
            "a new experiment in that folder")
    if not storage.exists(where):
        raise ConfigError(f"refusing to restore sweep {identity['sweep']!r} from {exp_uri}: it has a Tune experiment "
                          f"but no {OWNER_FILE} (not created by this sweep). {hint}")
    try:
        marker = json.loads(storage.read_bytes(where))
        if not isinstance(marker, dict) or not isinstance(marker.get("id"), str):
            raise ValueError("not a synray sweep marker")
    except ValueError as exc:
        raise ConfigError(f"refusing to restore sweep {identity['sweep']!r}: {where} is unreadable ({exc}). {hint}") from None
    for key, want in identity.items():
        if marker.get(key) != want:
            raise ConfigError(f"refusing to restore sweep {identity['sweep']!r} from {exp_uri}: the experiment there "
                              f"has {key} {marker.get(key)!r}, this sweep {want!r} (a different sweep or config). {hint}")
    return marker


# --------------------------------------------------------------------------------------------
# driver


@dataclass
class SweepOutcome(Outcome):
    """A sweep's :class:`Outcome` plus what Tune found (``ok`` is False when trials errored)."""

    best_params: dict[str, Any] | None = None
    best_metric: float | None = None
    best_config: str | None = None  # the full job config of the best trial (YAML)
    metric: str = ""
    parent_run_id: str | None = None
    restored: bool = False
    trials: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def console(self) -> str:
        lines = [f"[synray sweep] {len(self.trials)} trials ({len(self.errors)} errored)"
                 f"{' (restored)' if self.restored else ''}"]
        if self.best_params is not None:
            lines.append(f"[synray sweep] best {self.metric} = {self.best_metric:.6g} with {json.dumps(self.best_params)}")
        lines += [f"[synray sweep] errored trial {e} (re-run the sweep to resume it)" for e in self.errors]
        return redact_text("\n".join(lines + ([self.best_config] if self.best_config else [])))


def _max_reports(cfg: SweepConfig, base: dict[str, Any]) -> int:
    if cfg.target == "distill":
        return int(base["epochs"])
    t = base["training"]
    return -(-int(t["steps"]) // int(t["checkpoint_every"]))


@contextmanager
def tracking_run(cfg: SweepConfig) -> Iterator[Tracker]:
    """The sweep's parent MLflow run: reopened when the sweep resumes, new otherwise."""
    exp_uri = storage.join(cfg.output.uri, cfg.name)
    marker = storage.join(exp_uri, PARENT_FILE)
    if not cfg.tracking.enabled:
        yield Tracker(None)
        return
    uri = resolve_tracking_uri(cfg.tracking)
    if storage.exists(marker):
        import mlflow

        run_id = json.loads(storage.read_bytes(marker))["run_id"]
        exp_id = ensure_experiment(uri, cfg.tracking.experiment)
        with mlflow.start_run(run_id=run_id, experiment_id=exp_id) as run:
            yield Tracker(run, uri)
        return
    with job_run(cfg, "sweep", tags={"synray.sweep": cfg.name}) as tracker:
        storage.write_bytes_atomic(marker, json.dumps({"run_id": tracker.run_id,
                                                       "tracking_uri": redact_text(uri)}).encode())
        yield tracker


def _restorable(cfg: SweepConfig) -> bool:
    from ray import tune

    exp = storage.resolve(storage.join(cfg.output.uri, cfg.name))
    return bool(cfg.resume) and tune.Tuner.can_restore(exp.path, storage_filesystem=exp.fs)


def check(cfg: SweepConfig) -> None:
    """Before Ray starts: the target config with every searched value, the target job's own checks, and
    that an experiment to restore was created by this sweep."""
    base = load_target(cfg)
    if _restorable(cfg):
        check_owner_marker(storage.join(cfg.output.uri, cfg.name), sweep_identity(cfg, base))
    target = trial_config(base, {}, cfg.target)
    if cfg.target == "distill":
        check_distill(target)
    elif not (cfg.objective.embedder or target.contexts.embedder):
        raise ConfigError("objective.embedder is required when the LDM contexts come from a file")


def needs(cfg: SweepConfig) -> list[Need]:
    out = [Need(f"{cfg.max_concurrent_trials} trial(s)", "trial_resources, max_concurrent_trials",
                {"CPU": cfg.trial_resources.cpu, **({"GPU": cfg.trial_resources.gpu} if cfg.trial_resources.gpu else {})})]
    return out


def run(cfg: SweepConfig, ctx: JobContext) -> SweepOutcome:
    """Run (or resume) the sweep; logs the best configuration to the parent run and beside the trials."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    base = load_target(cfg)
    metric, mode = cfg.resolved_metric, cfg.mode
    threads = max(1, int(cfg.trial_resources.cpu))
    callbacks = tuple(ctx.callbacks)
    if cfg.target == "distill":
        trainable = tune.with_parameters(distill_trainable, base=base, threads=threads, callbacks=callbacks)
    else:
        info = prepare_latents(trial_config(base, {}, cfg.target))  # once: CPD does not change the latents
        trainable = tune.with_parameters(ldm_trainable, base=base, latents=info.to_dict(),
                                         objective=cfg.objective.model_dump(mode="json"), threads=threads,
                                         callbacks=callbacks)
    trainable = tune.with_resources(trainable, {"cpu": cfg.trial_resources.cpu, "gpu": cfg.trial_resources.gpu})

    tracker = ctx.tracker
    exp_uri = storage.join(cfg.output.uri, cfg.name)
    # Tune's checkpoints and state go through the same atomic uploads as Ray Train's
    (path, fs), (exp_path, exp_fs) = run_storage(cfg.output.uri), run_storage(exp_uri)
    restored = _restorable(cfg)
    identity = sweep_identity(cfg, base)
    if restored:
        check_owner_marker(exp_uri, identity)
    else:
        write_owner_marker(exp_uri, identity)
    if restored and tracker.run_id:
        close_orphans(tracker.uri, cfg.tracking.experiment, tracker.run_id)
    if restored:
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=exp_fs)
    else:
        loggers = []
        if tracker.run_id:
            loggers.append(MLflowLoggerCallback(
                tracking_uri=tracker.uri, experiment_name=cfg.tracking.experiment, save_artifact=False,
                tags={PARENT_TAG: tracker.run_id, "synray.sweep": cfg.name, "synray.job": cfg.target}))
        s = cfg.scheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=s.max_t or _max_reports(cfg, base),
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor) \
            if s.name == "asha" else FIFOScheduler()
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, scheduler=scheduler, num_samples=cfg.search.num_samples,
                reuse_actors=True,
                search_alg=BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials,
                                                 random_state=cfg.search.seed)),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=path, storage_filesystem=fs, callbacks=loggers, verbose=0,
                failure_config=tune.FailureConfig(max_failures=cfg.trial_max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.num_to_keep)),
        )
    results = tuner.fit()

    trials, errors = [], []
    for r in results:
        params = {k: r.config.get(k) for k in cfg.space}
        error = None if r.error is None else redact_text(str(r.error).splitlines()[0][:300])
        trials.append({"params": params, "metrics": numeric_metrics(r.metrics or {}), "error": error, "path": r.path})
        if error is not None:
            errors.append(f"{params}: {error}")
    outcome = SweepOutcome("sweep", exp_uri, {"trials": len(trials), "trials_errored": len(errors)}, metric=metric,
                           parent_run_id=tracker.run_id, restored=restored, trials=trials, errors=errors,
                           ok=not errors)
    try:
        best = results.get_best_result(metric=metric, mode=mode, scope="last")
    except RuntimeError:
        best = None
    if best is not None and best.metrics and metric in best.metrics:
        outcome.best_params = {k: best.config.get(k) for k in cfg.space}
        outcome.best_metric = float(best.metrics[metric])
        outcome.best_config = best_config_yaml(base, outcome.best_params, cfg.target)
        # tags, not params: a resumed sweep may find another best, and MLflow params are write-once
        tracker.set_tags({**{f"best.{k}": json.dumps(v) for k, v in outcome.best_params.items()},
                          "synray.best_trial": os.path.basename(best.path or "")})
        tracker.log_metrics({f"best/{metric}": outcome.best_metric})
        tracker.log_text(outcome.best_config, "best_config.yaml")
        storage.write_bytes_atomic(storage.join(exp_uri, "best_config.yaml"), outcome.best_config.encode())
    tracker.log_metrics(outcome.metrics)
    outcome.write_summary(storage.join(exp_uri, "sweep_summary.json"))
    return outcome
