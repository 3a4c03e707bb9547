"""Start and stop a real ``ray start`` head for cluster-marked tests, ending only its own processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


@contextmanager
def ray_tmpdir(monkeypatch, prefix: str) -> Iterator[str]:
    """A short private temp dir that also holds Ray's session files (Unix socket paths have a length limit)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RayHead:
    """A head node with the dashboard (Jobs API), in its own temp dir; processes are found by that dir."""

    def __init__(self, num_cpus: int = 4, env: dict | None = None):
        from conftest import free_port

        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: raylet socket paths have a length limit
        self.port, self.dashboard_port = free_port(), free_port()
        # the agents' default ports (52365, ...) may still be held by an earlier cluster of this session:
        # a head whose agent cannot bind never accepts jobs ("No available agent"), so every port is fresh
        self.agent_ports = {"dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
                            "runtime-env-agent-port": free_port(), "metrics-export-port": free_port()}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.num_cpus = num_cpus

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RayHead:
        out = subprocess.run(
            ["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
             "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats", *(f"--{k}={v}" for k, v in self.agent_ports.items())],
            env=self.env, capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"`ray start --head` failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return self

    def processes(self) -> list[psutil.Process]:
        mine = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in (p.info["cmdline"] or [])):
                    mine.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return mine

    def stop(self) -> None:
        """Terminate every process of this head (by pid), then the stragglers hard."""
        for _ in range(3):
            procs = self.processes()
            if not procs:
                break
            for p in procs:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=10)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
