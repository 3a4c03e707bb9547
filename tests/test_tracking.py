"""Every job opens an MLflow run: SQLite under the working dir by default, a real server when asked."""

import mlflow
import pytest

from synray.config import load_config
from synray.config.synth import SynthConfig
from synray.tracking import default_tracking_uri, job_run, resolve_tracking_uri


def _run_job(cfg, workdir):
    with job_run(cfg, "synth", workdir=workdir) as tr:
        tr.log_metrics({"images": 10, "throughput": 2.5}, step=1)
        return tr.run_id


def test_default_sqlite_store_under_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, SynthConfig, ["tracking.experiment=t-local", "tracking.uri=null",
                                          "output.uri=s3://b/x"])
    assert resolve_tracking_uri(cfg.tracking, tmp_path) == default_tracking_uri(tmp_path)
    run_id = _run_job(cfg, tmp_path)
    assert (tmp_path / "mlruns" / "mlflow.db").exists()
    client = mlflow.MlflowClient(default_tracking_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["identities.count"] == "256"
    assert run.data.metrics["images"] == 10
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]


def test_env_overrides_and_secrets_not_logged(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = load_config(None, SynthConfig, ["tracking.experiment=t-server", "contexts.path=http://u:hunter2@h/x.npy"])
    run_id = _run_job(cfg, tmp_path)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.metrics["throughput"] == 2.5 and run.data.tags["synray.job"] == "synth"
    assert all("hunter2" not in str(v) for v in run.data.params.values())
    assert not (tmp_path / "mlruns").exists()


def test_disabled_tracking_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, SynthConfig, ["tracking.enabled=false"])
    assert _run_job(cfg, tmp_path) is None
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1"])
def test_explicit_uri_wins(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    cfg = load_config(None, SynthConfig, [f"tracking.uri={uri}"])
    assert resolve_tracking_uri(cfg.tracking) == uri
