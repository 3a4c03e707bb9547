"""``ray job submit`` against a real local head (dashboard + Jobs API) started by the test."""

import subprocess
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
