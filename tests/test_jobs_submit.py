"""``ray job submit`` as the README tells a cluster user to type it: from outside the repository, against a local
head that keeps Ray's token authentication on, the client reading the token as documented (``RAY_AUTH_MODE=token``)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from synray.io import shards

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def submit(head, cwd: Path, entrypoint: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``RAY_AUTH_MODE=token ray job submit --address ... --working-dir <repo> -- <entrypoint>`` run in ``cwd``."""
    deadline = time.time() + 120  # the head's job agent needs a moment after `ray start`
    while True:
        out = subprocess.run(
            ["ray", "job", "submit", f"--address={head.dashboard}", f"--working-dir={ROOT}", "--", *entrypoint],
            cwd=cwd, env={**head.env, "RAY_AUTH_MODE": "token", "SYNRAY_QUIET": "1"}, capture_output=True, text=True,
            timeout=timeout)
        if "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
            return out
        time.sleep(2)


def succeeded(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0 and "succeeded" in out.stdout.lower(), out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def failed(out: subprocess.CompletedProcess) -> str:
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "succeeded" not in out.stdout.lower(), text[-3000:]
    return text


def test_token_auth_is_on_and_a_client_without_the_token_is_refused(tmp_path):
    from raycluster import RayHead

    with RayHead(num_cpus=2) as head:
        out = subprocess.run(["ray", "job", "list", f"--address={head.dashboard}"], cwd=tmp_path,
                             env={**head.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "auth" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    assert not head.processes()


def test_submit_synthesis_then_resubmit_resumes(tmp_path):
    from raycluster import RayHead

    out = tmp_path / "ds"
    args = ["python", "jobs/synthesize.py", "--config", "conf/synth/world.yaml", "--set", f"output.uri={out}",
            "--set", "identities.count=12", "--set", "identities.unit_size=4", "--set",
            "generator.images_per_identity=2", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    with RayHead() as head:
        logs = succeeded(submit(head, tmp_path, args))
        assert '"units_written": 3' in logs
        assert shards.read_manifest(str(out))["rows"] == 24
        logs = succeeded(submit(head, tmp_path, args))
        assert '"units_written": 0' in logs and '"units_skipped": 3' in logs
        # a bad config fails the job with a message naming the key, and writes nothing
        assert "identities.cont: unknown key" in failed(submit(head, tmp_path, [*args, "--set", "identities.cont=3"]))
        # a relative output would land in Ray's temporary copy of the working dir: refused before any work
        t0 = time.time()
        text = failed(submit(head, tmp_path, [*args, "--set", "output.uri=relout"]))
        assert "output.uri:" in text and "temporary working dir" in text and "s3://" in text
        assert time.time() - t0 < 120
    assert not head.processes()


def test_submit_recognition_training(tmp_path):
    """jobs/train_recognition.py on a 2-CPU head: the recipe's 2 workers + data loading can never fit and fail at
    once naming the keys; with 1 worker the job runs, and the checkpoint and table land where the user said."""
    from raycluster import RayHead

    from synray.config.base import load_config
    from synray.config.synth import SynthConfig
    from synray.synthesis.pipeline import run_local
    from synray.world.world import World

    data = tmp_path / "real"
    run_local(load_config(ROOT / "conf/synth/world.yaml", SynthConfig, [
        f"output.uri={data}", "identities.count=16", "identities.unit_size=8", "generator.images_per_identity=4",
        "label_kind=real", "tracking.enabled=false"]))
    World(seed=0, num_identities=16).write_verification_bins(tmp_path / "bins", num_pairs=40)
    entry = ["python", "jobs/train_recognition.py", "--config", "conf/train/world_tiny.yaml", "--set", f"data.train={data}",
             "--set", f"eval.bins=[{tmp_path / 'bins'}]", "--set", f"output.uri={tmp_path / 'train'}", "--set", "epochs=1",
             "--set", "batch_size=16", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--quiet"]
    with RayHead(num_cpus=2) as head:
        t0 = time.time()
        text = failed(submit(head, tmp_path, entry))
        assert "cannot schedule this job" in text and "scaling.num_workers" in text, text[-3000:]
        assert time.time() - t0 < 120  # fails fast instead of hanging on "resources are not enough"
        logs = succeeded(submit(head, tmp_path, [*entry, "--set", "scaling.num_workers=1"], timeout=480))
    assert (tmp_path / "train" / "world_tiny" / "final" / "model.pt").exists()
    assert "world-frontal" in logs
    assert not head.processes()
