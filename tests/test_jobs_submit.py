"""``ray job submit`` against a real local head (dashboard + Jobs API) started by the test."""

import subprocess
import time
import sys
from pathlib import Path

import pytest

from synray.io import shards

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def submit(head, entrypoint: list[str], timeout: float = 300) -> str:
    """Submit through the CLI (as a user would) and return the logs; fails on a non-SUCCEEDED job."""
    out = subprocess.run(
        ["ray", "job", "submit", f"--address={head.dashboard}", f"--working-dir={ROOT}", "--", *entrypoint],
        env={**head.env, "SYNRAY_QUIET": "1"}, capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0 and "succeeded" in out.stdout.lower(), out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_submit_synthesis_then_resubmit_resumes(tmp_path):
    from raycluster import RayHead

    out = tmp_path / "ds"
    args = ["python", "jobs/synthesize.py", "--config", "conf/synth/world.yaml", "--set", f"output.uri={out}",
            "--set", "identities.count=12", "--set", "identities.unit_size=4", "--set",
            "generator.images_per_identity=2", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    with RayHead(env={"RAY_AUTH_MODE": "disabled"}) as head:
        logs = submit(head, args)
        assert '"units_written": 3' in logs
        assert shards.read_manifest(str(out))["rows"] == 24
        logs = submit(head, args)
        assert '"units_written": 0' in logs and '"units_skipped": 3' in logs
        # a bad config fails the job with a message naming the key, and writes nothing
        bad = subprocess.run(
            ["ray", "job", "submit", f"--address={head.dashboard}", f"--working-dir={ROOT}", "--",
             *args, "--set", "identities.cont=3"], env=head.env, capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and "identities.cont: unknown key" in bad.stdout + bad.stderr
    assert not head.processes()


def test_submit_recognition_training(tmp_path):
    """jobs/train_recognition.py through the Jobs API on world shards; the checkpoint and table come back."""
    from raycluster import RayHead
    from ray.job_submission import JobStatus, JobSubmissionClient

    from synray.config import load_config
    from synray.config.synth import SynthConfig
    from synray.synthesis.pipeline import run_local
    from synray.world.world import World

    data = tmp_path / "real"
    run_local(load_config(ROOT / "conf/synth/world.yaml", SynthConfig, [
        f"output.uri={data}", "identities.count=16", "identities.unit_size=8", "generator.images_per_identity=4",
        "label_kind=real", "tracking.enabled=false"]))
    World(seed=0, num_identities=16).write_verification_bins(tmp_path / "bins", num_pairs=40)
    entry = (f"python jobs/train_recognition.py --config conf/train/world_tiny.yaml --set data.train={data} "
             f"--set eval.bins=[{tmp_path / 'bins'}] --set output.uri={tmp_path / 'train'} --set epochs=1 "
             f"--set batch_size=16 --set tracking.uri=sqlite:///{tmp_path}/mlflow.db --quiet")
    with RayHead(env={"RAY_AUTH_MODE": "disabled"}) as head:
        client = JobSubmissionClient(head.dashboard)
        ready = time.time() + 120  # the head's job agent needs a moment after `ray start`
        while True:
            try:
                job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(ROOT)})
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.time() > ready:
                    raise
                time.sleep(2)
        deadline = time.time() + 480
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.time() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert (tmp_path / "train" / "world_tiny" / "final" / "model.pt").exists()
    assert "world-frontal" in logs
