"""MLflow, in one place: every job's run, Ray Train metrics, and the runs of a sweep.

The store is ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else SQLite under the
job's working directory (``./mlruns/mlflow.db``), so a laptop run leaves a browsable store with no
server. Params are the flattened resolved config. Everything a Tracker sends (params, tags, text and
text-file artifacts) goes through :mod:`synray.redact`.

* :func:`job_run` opens a job's run (a child run when another job's run is open: quickstart, study);
  :func:`child_run` opens a named child of a job's run (the study's rows);
* :func:`TrainMetricsToMLflow` is a Ray Train controller callback that logs rank 0's reports to the
  job's run (so workers never need the tracking store);
* sweeps are one parent run with one child run per trial, written by Ray's ``MLflowLoggerCallback``
  with the ``mlflow.parentRunId`` tag; :func:`child_runs` finds them and :func:`close_orphans` marks
  runs of trials a killed driver left RUNNING before a resume.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel

from synray.config import TrackingConfig, to_yaml
from synray.config.base import flatten
from synray.redact import redact, redact_text

#: artifacts logged from files with these suffixes are text: they are redacted on the way out
TEXT_SUFFIXES = (".txt", ".json", ".yaml", ".yml", ".log", ".md", ".csv")


def default_tracking_uri(workdir: str | os.PathLike | None = None) -> str:
    root = os.path.abspath(os.fspath(workdir or os.getcwd()))
    return f"sqlite:///{os.path.join(root, 'mlruns', 'mlflow.db')}"


def resolve_tracking_uri(cfg: TrackingConfig | None = None, workdir: str | os.PathLike | None = None) -> str:
    if cfg is not None and cfg.uri:
        return cfg.uri
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def _ensure_local_store(uri: str) -> str | None:
    """Create the folder of a SQLite store; returns an artifact root beside it (None for servers)."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "artifacts")
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """Set the tracking URI and return the experiment id, creating it (with a local artifact root) if needed."""
    import mlflow

    artifacts = _ensure_local_store(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    return exp.experiment_id


class Tracker:
    """Thin wrapper so jobs log unconditionally; does nothing when tracking is disabled."""

    def __init__(self, run: Any | None, uri: str | None = None):
        self.run = run
        self.uri = uri
        self.run_id = run.info.run_id if run is not None else None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_params({k: ("" if v is None else v) for k, v in redact(dict(params)).items()})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.run is not None:
            import mlflow

            if not path.lower().endswith(TEXT_SUFFIXES):
                mlflow.log_artifact(path, artifact_path)
                return

            with open(path, encoding="utf-8", errors="replace") as fh:
                text = redact_text(fh.read())
            with tempfile.TemporaryDirectory() as tmp:
                copy = os.path.join(tmp, os.path.basename(path))
                with open(copy, "w", encoding="utf-8") as fh:
                    fh.write(text)
                mlflow.log_artifact(copy, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_text(redact_text(text), name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run is not None:
            import mlflow

            mlflow.set_tags({k: redact(v, k) if isinstance(v, str) else v for k, v in tags.items()})


@contextmanager
def job_run(
    cfg: BaseModel,
    job: str,
    tracking: TrackingConfig | None = None,
    workdir: str | os.PathLike | None = None,
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
) -> Iterator[Tracker]:
    """Open an MLflow run for a job, log its resolved config (params + ``config.yaml``), yield a Tracker."""
    tracking = tracking or getattr(cfg, "tracking", None) or TrackingConfig()
    if not tracking.enabled:
        yield Tracker(None)
        return
    import mlflow

    uri = resolve_tracking_uri(tracking, workdir)
    exp_id = ensure_experiment(uri, tracking.experiment)
    # A job started inside another job's run (quickstart, sweeps) becomes its child run.
    nested = nested or mlflow.active_run() is not None
    run_name = redact_text(tracking.run_name or job)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested) as run:
        tracker = Tracker(run, uri)
        tracker.set_tags({"synray.job": job, **(tags or {})})
        params = flatten(redact(cfg.model_dump(mode="json")))
        tracker.log_params({k: (str(v)[:500] if isinstance(v, (list, dict)) else v) for k, v in params.items()})
        tracker.log_text(to_yaml(cfg), "config.yaml")
        yield tracker


@contextmanager
def child_run(parent: Tracker, name: str, tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
    """A child run of ``parent``'s run (one per study row): jobs started inside it become its children."""
    if parent.run is None:
        yield Tracker(None)
        return
    import mlflow

    with mlflow.start_run(run_name=redact_text(name), nested=True,
                          experiment_id=parent.run.info.experiment_id) as run:
        tracker = Tracker(run, parent.uri)
        tracker.set_tags({"synray.row": name, **(tags or {})})
        yield tracker


def mlflow_ui_hint(uri: str) -> str:
    """One line telling a user how to browse the runs (credentials in the URI masked)."""
    uri = redact_text(uri)
    if uri.startswith(("http://", "https://")):
        return f"MLflow runs: open {uri}"
    return f"MLflow runs: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"


PARENT_TAG = "mlflow.parentRunId"


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a result dict (bools and strings dropped)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def TrainMetricsToMLflow(uri: str, run_id: str, job: str):  # noqa: N802 - a class factory (Ray imported lazily)
    """A ``ray.train.UserCallback`` logging each report of rank 0 (step = its ``step`` metric)."""
    from ray.train import UserCallback

    class _Callback(UserCallback):
        def __init__(self) -> None:
            self.uri, self.run_id, self.job = uri, run_id, job

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not metrics:
                return
            try:
                from mlflow.entities import Metric
                from mlflow.tracking import MlflowClient

                m = metrics[0]
                step, now = int(m.get("step", 0)), int(time.time() * 1000)
                items = [Metric(k, v, now, step) for k, v in numeric_metrics(m).items()]
                MlflowClient(self.uri).log_batch(self.run_id, metrics=items)
            except Exception as exc:  # tracking must never stop training
                print(f"[synray {self.job}] MLflow logging failed: {exc}", flush=True)

    return _Callback()


def child_runs(uri: str, experiment: str, parent_run_id: str):
    """The trial runs of a sweep (a pandas DataFrame from ``mlflow.search_runs``)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def close_orphans(uri: str, experiment: str, parent_run_id: str) -> int:
    """Mark trial runs still RUNNING under ``parent_run_id`` as KILLED (their driver died); returns how many."""
    from mlflow.tracking import MlflowClient

    runs = child_runs(uri, experiment, parent_run_id)
    client = MlflowClient(uri)
    n = 0
    for run_id, status in zip(runs.get("run_id", []), runs.get("status", [])):
        if status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            n += 1
    return n
