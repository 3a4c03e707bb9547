"""MLflow plumbing for Ray Train jobs and Tune sweeps.

* :func:`TrainMetricsToMLflow`: a Ray Train controller callback that logs rank 0's reported metrics to
  the job's MLflow run (so workers never need the tracking store).
* Sweeps are one parent run (the ``synray sweep`` job) with one child run per trial, written by Ray's
  ``MLflowLoggerCallback`` with the ``mlflow.parentRunId`` tag; :func:`child_runs` finds them and
  :func:`close_orphans` marks runs of trials a killed driver left RUNNING before a resume.
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["TrainMetricsToMLflow", "numeric_metrics", "child_runs", "close_orphans", "PARENT_TAG"]

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
