"""Ray Tune sweeps over distillation (``resampling_coef``...) and LDM training (the CPD ratio...), tracked in MLflow.

* The target job's YAML (``base`` + ``overrides``) is validated with every grid value and both ends of
  every range before Ray starts.
* Each trial is a Tune function trainable that runs the job's loop in its own process
  (:func:`synray.distill.loop.distill_loop`, :func:`synray.training.ldm.ldm_loop`), reporting after
  every epoch / checkpoint with a Tune checkpoint, so a trial resumes where it stopped. For LDM sweeps
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
from dataclasses import dataclass, field
from typing import Any

import yaml

from synray.config.base import ConfigError, _set_dotted, apply_overrides, config_hash, read_yaml, validate
from synray.config.sweep import SweepConfig
from synray.io import storage
from synray.redact import redact, redact_text

__all__ = ["SweepOutcome", "load_target", "trial_config", "param_space", "run_sweep", "distill_trainable",
           "ldm_trainable", "best_config_yaml", "PARENT_FILE", "OWNER_FILE", "sweep_identity", "write_owner_marker", "check_owner_marker"]

PARENT_FILE = "synray_parent_run.json"
OWNER_FILE = "synray_sweep.json"


def _schema(target: str):
    if target == "distill":
        from synray.config.distill import DistillConfig

        return DistillConfig
    from synray.config.ldm import LDMConfig

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
                _set_dotted(trial, key, value)
            except ConfigError as exc:
                raise ConfigError(f"space.{key}: {exc}") from None
            validate(schema, trial, f"{cfg.base} with {key}={value!r}")
    return base


def trial_config(base: dict[str, Any], params: dict[str, Any], target: str):
    """The validated job config of one trial."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        _set_dotted(data, key, value)
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


def _fault(fault: dict[str, Any] | None) -> int | None:
    """Reports after which this trial fails (tests), claiming the marker so only one trial fails."""
    if not fault or fault.get("after_reports") is None:
        return None
    marker = fault["marker"]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    os.close(fd)
    return int(fault["after_reports"])


def _reporter():
    from ray import tune

    def report(metrics: dict, directory: str | None) -> None:
        tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    return report


def _run_with_checkpoint(run) -> None:
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        run(None)
        return
    with ckpt.as_directory() as directory:
        run(directory)


def distill_trainable(config: dict, *, base: dict, cwd: str, threads: int = 1, fault: dict | None = None) -> None:
    """One distillation trial: the whole loop in this process (one worker), one report per epoch."""
    import torch

    from synray.distill.loop import LoopHooks, distill_loop

    os.chdir(cwd)  # Tune starts trials in their own folder; the job's relative paths are the user's
    torch.set_num_threads(threads)
    cfg = trial_config(base, config, "distill")
    stop = _fault(fault)

    def run(directory: str | None) -> None:
        distill_loop(cfg, LoopHooks(report=_reporter(), restore_dir=directory, stop_after_epoch=stop))

    _run_with_checkpoint(run)


def ldm_trainable(config: dict, *, base: dict, cwd: str, latents: dict, objective: dict, threads: int = 1,
                  fault: dict | None = None) -> None:
    """One LDM trial: training on the pre-encoded latents in this process, the objective at every checkpoint."""
    import torch

    from synray.config.sweep import ObjectiveConfig
    from synray.models.export import load_any_backbone
    from synray.training.ldm import DECODER_FILE, LatentsInfo, LDMHooks, LocalLatents, _load_stage, ldm_loop
    from synray.tuning.objectives import ldm_objective, training_contexts

    os.chdir(cwd)
    torch.set_num_threads(threads)
    cfg = trial_config(base, config, "train_ldm")
    cfg.training.log_every = cfg.training.checkpoint_every  # Tune needs the metric in every report
    info = LatentsInfo.from_dict(latents)
    obj = ObjectiveConfig.model_validate(objective)
    embedder = load_any_backbone(obj.embedder or cfg.contexts.embedder).eval()
    decoder = _load_stage(info.first_stage, DECODER_FILE, info.vq_config)
    contexts = training_contexts(info, obj.identities)
    stop = _fault(fault)
    stop_step = stop * cfg.training.checkpoint_every if stop else None

    def score(learner) -> dict[str, float]:
        return ldm_objective(learner.ema.averaged_model, decoder, embedder, contexts, info.latent_shape, obj, cfg.seed)

    data = LocalLatents(info)

    def run(directory: str | None) -> None:
        hooks = LDMHooks(report=_reporter(), restore_dir=directory, on_checkpoint=score, stop_after_step=stop_step,
                         batches=lambda e: data.batches(cfg.training.batch_size, cfg.seed, e))
        ldm_loop(cfg, info, hooks)

    _run_with_checkpoint(run)


# --------------------------------------------------------------------------------------------
# restore ownership: Tuner.restore unpickles what it finds, so it only restores what this sweep created

#: sweep settings that may change between a run and its resume without changing the experiment
_RUN_SETTINGS = {"resume", "fault_injection", "ray", "tracking", "output", "trial_resources", "max_concurrent_trials",
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
class SweepOutcome:
    best_params: dict[str, Any] | None
    best_metric: float | None
    best_config: str | None  # the full job config of the best trial (YAML)
    metric: str
    parent_run_id: str | None
    restored: bool
    trials: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    path: str = ""


def _max_reports(cfg: SweepConfig, base: dict[str, Any]) -> int:
    if cfg.target == "distill":
        return int(base["epochs"])
    t = base["training"]
    return -(-int(t["steps"]) // int(t["checkpoint_every"]))


def _parent_run(cfg: SweepConfig, exp_uri: str, workdir: str | None):
    """A context manager yielding the sweep's parent Tracker: reopened on resume, new otherwise."""
    from contextlib import contextmanager

    from synray.tracking import Tracker, ensure_experiment, job_run, resolve_tracking_uri

    marker = storage.join(exp_uri, PARENT_FILE)

    @contextmanager
    def ctx():
        if not cfg.tracking.enabled:
            yield Tracker(None)
            return
        uri = resolve_tracking_uri(cfg.tracking, workdir)
        if storage.exists(marker):
            import mlflow

            run_id = json.loads(storage.read_bytes(marker))["run_id"]
            exp_id = ensure_experiment(uri, cfg.tracking.experiment)
            with mlflow.start_run(run_id=run_id, experiment_id=exp_id) as run:
                yield Tracker(run)
            return
        with job_run(cfg, "sweep", workdir=workdir, tags={"synray.sweep": cfg.name}) as tracker:
            storage.write_bytes_atomic(marker, json.dumps({"run_id": tracker.run_id,
                                                           "tracking_uri": redact_text(uri)}).encode())
            yield tracker

    return ctx()


def run_sweep(cfg: SweepConfig, workdir: str | None = None) -> SweepOutcome:
    """Run (or resume) the sweep; prints and logs the best configuration."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from synray.runtime import init_ray, is_quiet
    from synray.tracking import resolve_tracking_uri
    from synray.tuning.tracking import PARENT_TAG, close_orphans, numeric_metrics

    base = load_target(cfg)
    metric, mode = cfg.resolved_metric, cfg.mode
    cwd = os.path.abspath(workdir or os.getcwd())
    threads = max(1, int(cfg.trial_resources.cpu))
    fault = cfg.fault_injection.model_dump() if cfg.fault_injection.after_reports else None
    target_cfg = trial_config(base, {}, cfg.target)
    exp_uri = storage.join(cfg.output.uri, cfg.name)
    loc, exp_loc = storage.resolve(cfg.output.uri), storage.resolve(exp_uri)
    restored = bool(cfg.resume) and tune.Tuner.can_restore(exp_loc.path, storage_filesystem=exp_loc.fs)
    identity = sweep_identity(cfg, base)  # before Ray starts: refuse a foreign experiment first
    if restored:
        check_owner_marker(exp_uri, identity)
    else:
        write_owner_marker(exp_uri, identity)
    init_ray(cfg.ray)
    if cfg.target == "distill":
        from synray.distill.loop import check_distill_config

        check_distill_config(target_cfg)
        trainable = tune.with_parameters(distill_trainable, base=base, cwd=cwd, threads=threads, fault=fault)
    else:
        from synray.training.ldm import prepare_latents

        info = prepare_latents(target_cfg)  # once, before the trials (CPD does not change the latents)
        objective = cfg.objective.model_dump(mode="json")
        if not (cfg.objective.embedder or target_cfg.contexts.embedder):
            raise ConfigError("objective.embedder is required when the LDM contexts come from a file")
        trainable = tune.with_parameters(ldm_trainable, base=base, cwd=cwd, latents=info.to_dict(),
                                         objective=objective, threads=threads, fault=fault)
    trainable = tune.with_resources(trainable, {"cpu": cfg.trial_resources.cpu, "gpu": cfg.trial_resources.gpu})

    with _parent_run(cfg, exp_uri, workdir) as tracker:
        uri = resolve_tracking_uri(cfg.tracking, workdir)
        if restored and tracker.run_id:
            close_orphans(uri, cfg.tracking.experiment, tracker.run_id)
        if restored:
            tuner = tune.Tuner.restore(exp_loc.path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=exp_loc.fs)
        else:
            callbacks = []
            if tracker.run_id:
                callbacks.append(MLflowLoggerCallback(
                    tracking_uri=uri, experiment_name=cfg.tracking.experiment, save_artifact=False,
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
                    name=cfg.name, storage_path=loc.path, storage_filesystem=loc.fs, callbacks=callbacks, verbose=0,
                    failure_config=tune.FailureConfig(max_failures=cfg.trial_max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.num_to_keep)),
            )
        results = tuner.fit()

        trials, errors = [], []
        for r in results:
            params = {k: r.config.get(k) for k in cfg.space}
            error = None if r.error is None else redact_text(str(r.error).splitlines()[0][:300])
            trials.append({"params": params, "metrics": numeric_metrics(r.metrics or {}), "error": error, "path": r.path})
            if r.error is not None:
                errors.append(f"{params}: {error}")
        best_params = best_metric = best_yaml = None
        try:
            best = results.get_best_result(metric=metric, mode=mode, scope="last")
        except RuntimeError:
            best = None
        if best is not None and best.metrics and metric in best.metrics:
            best_params = {k: best.config.get(k) for k in cfg.space}
            best_metric = float(best.metrics[metric])
            best_yaml = best_config_yaml(base, best_params, cfg.target)
            # tags, not params: a resumed sweep may find another best, and MLflow params are write-once
            tracker.set_tags({**{f"best.{k}": json.dumps(v) for k, v in best_params.items()},
                              "synray.best_trial": os.path.basename(best.path or "")})
            tracker.log_metrics({f"best/{metric}": best_metric})
            tracker.log_text(best_yaml, "best_config.yaml")
            storage.write_bytes_atomic(storage.join(exp_uri, "best_config.yaml"), best_yaml.encode())
        tracker.log_metrics({"trials": len(trials), "trials_errored": len(errors)})
        outcome = SweepOutcome(best_params, best_metric, best_yaml, metric, tracker.run_id, restored, trials, errors, exp_uri)
        storage.write_bytes_atomic(storage.join(exp_uri, "sweep_summary.json"),
                                   redact_text(json.dumps(outcome.__dict__, indent=2, default=str)).encode())
    lines = [f"[synray sweep] {cfg.name}: {len(trials)} trials ({len(errors)} errored){' (restored)' if restored else ''}"]
    if best_params is not None:
        lines.append(f"[synray sweep] best {metric} = {best_metric:.6g} with {json.dumps(best_params)}")
    for e in errors:
        lines.append(f"[synray sweep] errored trial {e} (re-run the sweep to resume it)")
    print(redact_text("\n".join(lines)), flush=True)
    if not is_quiet(cfg.ray) and best_yaml:
        print(best_yaml)
    return outcome
