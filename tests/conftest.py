"""Shared fixtures: golden reference data and helpers that read settings and models from it, and (added
below) the session Ray, S3 and MLflow servers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Golden data lives beside the repository (``../shared/reference``) unless SYNRAY_REFERENCE says otherwise."""
    env = os.environ.get("SYNRAY_REFERENCE")
    path = Path(env) if env else ROOT.parent / "shared" / "reference"
    if not path.is_dir():
        pytest.fail(f"golden reference data not found at {path}; set SYNRAY_REFERENCE")
    return path


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


# A number (``64``, ``0.35``, ``1e-3``) or a bracketed list (``[22,28,32]``) inside a golden key's name.
_KEY_VALUE = r"\[[^\]]*\]|\d+(?:\.\d+)?(?:e-?\d+)?"


def golden_keys(golden: dict, template: str) -> list[tuple[str, dict]]:
    """Keys of ``golden`` of the form ``template`` and the settings their names carry, sorted by key.

    Golden files name a run after its settings (``admis_ddim5``, ``tface_arcface_s64_m0.5``,
    ``..._STAGES[22,28,32]_40ep``); ``{name}`` in ``template`` stands for such a number or list.
    """
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_KEY_VALUE})" for i, p in enumerate(parts))
    found = [(k, {n: json.loads(v) for n, v in m.groupdict().items()})
             for k in golden if isinstance(k, str) and (m := re.fullmatch(regex, k))]
    assert found, f"no golden key of the form {template!r}"
    return sorted(found, key=lambda kv: kv[0])


def golden_key(golden: dict, template: str) -> tuple[str, dict]:
    """The one key of ``golden`` of the form ``template`` and its settings (see :func:`golden_keys`)."""
    found = golden_keys(golden, template)
    assert len(found) == 1, f"expected one golden key of the form {template!r}, found {[k for k, _ in found]}"
    return found[0]


def golden_unet_config(golden: dict, flavour: str = "idiff_face"):
    """The UNet config of a forward golden (``unet_small_golden.pt``), read from its ``config_small_unet``.

    The file stores the reference constructor keys; the training flags it does not store (UIFace's
    learnable empty context and uncond probability) are those of the published ``flavour``.
    """
    from synray.models.unet import FLAVOURS, UNetConfig

    cfg = dict(golden["config_small_unet"])
    for key, value in FLAVOURS[flavour].items():
        if key != "context_dropout":  # stored as context_dropout_probability
            cfg.setdefault(key, value)
    return UNetConfig.from_reference(cfg)


def golden_unet(golden: dict, flavour: str = "idiff_face", dtype=None):
    """The golden's UNet in eval mode with its weights loaded strictly.

    IDiff-Face/ADMIS keep a zero empty context, so their variant drops ``empty_context_embedding``.
    """
    from synray.models.unet import ConditionalUNet

    cfg = golden_unet_config(golden, flavour)
    state = dict(golden["state_dict"])
    if not cfg.learn_empty_context:
        state.pop("empty_context_embedding")
    model = ConditionalUNet(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- servers and Ray -------------------------------------------------------------------------

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

# Ray's token authentication on, as users run it: explicitly, so that clients naming an address (test clusters,
# `ray job submit`) use it too (Ray reads the mode once, when it is first imported)
os.environ.setdefault("RAY_AUTH_MODE", "token")


def _private_auth_token() -> None:
    """A token for this test process's Ray clusters, in a file of its own (``RAY_AUTH_TOKEN_PATH``, which Ray's
    processes and clients read before ``~/.ray/auth_token``). Only a local ``ray.init`` makes a missing token:
    ``ray start --head`` and ``ray.cluster_utils`` refuse to start without one (``ray get-auth-token --generate``
    for users), so on a fresh machine the cluster tests failed unless another test had run ``ray.init`` first."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    import atexit
    import secrets
    import tempfile

    folder = tempfile.mkdtemp(prefix="synray-token-")
    path = os.path.join(folder, "auth_token")
    with open(path, "w") as fh:
        fh.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    atexit.register(shutil.rmtree, folder, True)
    os.environ["RAY_AUTH_TOKEN_PATH"] = path


_private_auth_token()
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("SYNRAY_QUIET", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
# Ray Train's controller polls its workers every 2 s: a test run's start, end and injected failures are seen
# up to 2 s late, dozens of times in the suite (read by each controller from its environment)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

S3_CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not come up in {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's server); the AWS environment points at it."""
    port = free_port()
    exe = shutil.which("moto_server") or sys.executable
    cmd = [exe, "-H", "127.0.0.1", "-p", str(port)] if exe != sys.executable else [exe, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_CREDS, "AWS_ENDPOINT_URL")}
    try:
        _wait_http(endpoint, proc, 30)
        os.environ.update(S3_CREDS, AWS_ENDPOINT_URL=endpoint)
        import boto3

        boto3.client("s3").create_bucket(Bucket="synray-test")
        yield {"endpoint": endpoint, "bucket": "synray-test", "env": {**S3_CREDS, "AWS_ENDPOINT_URL": endpoint}}
    finally:
        _stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on loopback with its own SQLite store."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # no background job runner (a pool of huey workers): tests only need the tracking API
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, 90)
        yield uri
    finally:
        _stop(proc)


# Fault-injecting callbacks travel to Ray Train workers and Tune trials by value (tests/ is not on their path).
import faults  # noqa: E402
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(faults)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (4 logical CPUs on 2 cores: avoids Data/Train deadlocks).

    Workers get the S3 test server's environment so any stage can read and write ``s3://``.
    """
    import ray

    env_vars = dict(s3_server["env"])
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, object_store_memory=384 * 2**20,
        log_to_driver=False, runtime_env={"env_vars": env_vars},
    )
    from synray.runtime import configure_data_context

    configure_data_context(quiet=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def world_teacher(tmp_path_factory):
    """A small FR model trained on 48 world identities, 32-d at 32x32 (distillation, LDM and sweep tests)."""
    import torch

    from synray.world.teacher import fit_world_teacher

    torch.set_num_threads(1)  # two busy-waiting threads on 2 shared cores are many times slower
    path = tmp_path_factory.getbasetemp() / "world_teacher_32.pt"
    if not path.exists():
        kwargs = {"layers": (1, 1, 1, 1), "widths": (8, 16, 32, 64), "embedding_dim": 32, "input_size": (32, 32)}
        stats = fit_world_teacher(path, num_identities=48, images_per_identity=6, steps=80, batch_size=32, kwargs=kwargs)
        assert stats["train_accuracy"] > 0.3  # far above chance (1/48) after 80 steps
    return path
