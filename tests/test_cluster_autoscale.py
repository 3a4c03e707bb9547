"""Ray's autoscaler really scales the fake multi-node cluster of ``cluster/local-fake.yaml``.

Work that needs GPUs, submitted to a head with no GPU, must make the autoscaler add fake GPU worker
nodes: first ``jobs/synthesize.py`` (generation actors with ``num_gpus=1``) attached to the cluster
the way ``ray job submit`` runs it, then plain GPU tasks that need two GPU nodes at once. The work
must finish on them, and the idle nodes must be removed again. The cluster is started with
``ray start --head --block`` in its own session (process group) with its own temp dir and ports, so
the cleanup kills exactly the processes this test started and nothing else on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from synray.io import shards

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
FAKE_YAML = ROOT / "cluster" / "local-fake.yaml"
START_TIMEOUT = 60.0
SCALE_DOWN_TIMEOUT = 90.0
JOB_UNITS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(proc: subprocess.Popen, grace: float = 8.0) -> None:
    """SIGTERM then SIGKILL the process group that ``ray start`` leads (our cluster only)."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and _group_alive(pgid):
            if proc.poll() is None:
                try:
                    proc.wait(0.5)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def _kill_leftovers(marker: str) -> None:
    """SIGKILL any process whose command line names our private temp dir (it cannot be anyone else's)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def _gpus(ray) -> float:
    return sum(n["Resources"].get("GPU", 0.0) for n in _alive_nodes(ray))


def test_fake_cluster_scales_up_for_gpu_work_and_down_when_idle(monkeypatch):
    import ray

    t0 = time.time()
    # Short root: Unix socket paths under the session dir must stay below ~107 characters.
    tmp = tempfile.mkdtemp(prefix="srfake-", dir="/tmp")
    port = _free_port()
    ip = "127.0.0.1"  # the test cluster listens on loopback only

    cfg = yaml.safe_load(FAKE_YAML.read_text())
    # Worker raylets must find this head's GCS (the provider assumes port 6379 otherwise).
    cfg["provider"]["gcs_address"] = f"{ip}:{port}"
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    cfg_path = Path(tmp) / "fake.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    # AUTOSCALER_UPDATE_INTERVAL_S=1 (Ray's own fake-cluster tests use it) runs the autoscaler loop
    # every second instead of every 5 s, so scale-up and scale-down show sooner.
    # token authentication stays on: `ray start` reads the token (conftest's RAY_AUTH_TOKEN_PATH here, a user's
    # ~/.ray/auth_token), and clients that name an address use it only with RAY_AUTH_MODE=token, as the README says
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_FAKE_CLUSTER": "1", "RAY_TMPDIR": tmp,
           "RAY_USAGE_STATS_ENABLED": "0", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    monkeypatch.setenv("RAY_TMPDIR", tmp)  # the driver's address file and logs stay in tmp too
    ray_exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_exe, "start", "--head", "--block", f"--port={port}", f"--node-ip-address={ip}",
        f"--num-cpus={int(head['CPU'])}", f"--num-gpus={int(head.get('GPU', 0))}",
        "--include-dashboard=false", f"--autoscaling-config={cfg_path}", f"--temp-dir={tmp}",
        "--disable-usage-stats", "--object-store-memory=134217728",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]
    log = open(Path(tmp) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timings: dict[str, float] = {}
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"ray start exited: {(Path(tmp) / 'ray-start.log').read_text()[-3000:]}"
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex((ip, port)) == 0:
                    break
            assert time.time() < deadline, "the fake cluster's GCS did not come up"
            time.sleep(0.5)
        ray.init(address=f"{ip}:{port}", log_to_driver=False, logging_level="ERROR")
        timings["up"] = time.time() - t0
        assert _gpus(ray) == 0 and len(_alive_nodes(ray)) == 1, "the head alone must have no GPU"

        # 1. The synthesis job entry point, attached to this cluster as `ray job submit` would run it
        #    (a driver with RAY_ADDRESS set), with generation on GPUs: GPU nodes must be added for it.
        t_job = time.time()
        dataset = Path(tmp) / "dataset"
        job_log = Path(tmp) / "job.log"
        job_fh = job_log.open("w")
        job = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "synthesize.py"), "--config", str(ROOT / "conf" / "synth" / "world.yaml"),
             "--set", f"output.uri={dataset}", "--set", "output.shared=true",  # every fake node is this machine
             "--set", f"identities.count={JOB_UNITS * 4}",
             "--set", "identities.unit_size=4", "--set", "generator.images_per_identity=3",
             "--set", "generator.num_gpus=1", "--set", "generator.num_cpus=0.5",
             "--set", "tracking.enabled=false", "--quiet"],
            env={**env, "RAY_ADDRESS": f"{ip}:{port}", "SYNRAY_QUIET": "1"}, cwd=tmp,
            stdout=job_fh, stderr=subprocess.STDOUT)
        job_gpus = 0.0
        try:
            deadline = time.time() + 150
            while job.poll() is None:
                assert proc.poll() is None, "the head died during the synthesis job"
                assert time.time() < deadline, "the synthesis job did not finish"
                job_gpus = max(job_gpus, _gpus(ray))
                time.sleep(1)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(10)
            job_fh.close()
            job_out = job_log.read_text(errors="replace")
        timings["job"] = time.time() - t_job
        assert job.returncode == 0, job_out[-3000:]
        assert f'"units_written": {JOB_UNITS}' in job_out, job_out[-3000:]
        assert job_gpus >= 1, "no GPU node was added for the generation actors"
        found = shards.list_shards(str(dataset))
        assert sorted(found) == list(range(JOB_UNITS))
        ids = [i for uri in found.values() for i in shards.read_shard(uri)["identity"].to_pylist()]
        assert sorted(ids) == sorted(list(range(JOB_UNITS * 4)) * 3), "each identity exactly 3 times, in one shard"

        # 2. Plain GPU tasks that need two GPU nodes at once.
        @ray.remote(num_gpus=1, num_cpus=1)
        def gpu_work(i: int) -> tuple[int, str, str | None]:
            time.sleep(3)
            return i, ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES")

        t_submit = time.time()
        max_nodes = len(_alive_nodes(ray))
        pending = [gpu_work.remote(i) for i in range(4)]
        results, max_gpus = [], 0.0
        deadline = time.time() + 150
        while pending:
            assert proc.poll() is None, "the head died while GPU work was pending"
            assert time.time() < deadline, f"GPU work not done; GPUs seen {max_gpus}, nodes {max_nodes}"
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            results += ray.get(done)
            max_gpus = max(max_gpus, _gpus(ray))
            max_nodes = max(max_nodes, len(_alive_nodes(ray)))
        timings["work"] = time.time() - t_submit

        assert sorted(r[0] for r in results) == [0, 1, 2, 3]
        # Each fake GPU node fits one task at a time: two distinct nodes prove two were added.
        worker_nodes = {r[1] for r in results}
        assert len(worker_nodes) == 2, f"expected the work spread over 2 added GPU nodes, got {worker_nodes}"
        assert max_gpus >= 2 and max_nodes == 3, (max_gpus, max_nodes)
        assert all(r[2] == "0" for r in results), "each task should see its node's one GPU"

        # 3. Everything idle: the GPU nodes go away, the head stays.
        t_idle = time.time()
        while _gpus(ray) > 0 or len(_alive_nodes(ray)) > 1:
            assert time.time() - t_idle < SCALE_DOWN_TIMEOUT, (
                f"idle GPU nodes were not removed: {len(_alive_nodes(ray))} nodes, {_gpus(ray)} GPUs")
            time.sleep(2)
        timings["down"] = time.time() - t_idle
        assert proc.poll() is None, "the head must survive scale-down"
    finally:
        try:
            ray.shutdown()
        finally:
            _stop_group(proc)
            _kill_leftovers(tmp)
            log.close()
            shutil.rmtree(tmp, ignore_errors=True)
    timings["total"] = time.time() - t0
    print("fake autoscaler timings (s):", {k: round(v, 1) for k, v in timings.items()})
