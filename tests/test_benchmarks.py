"""The benchmark scripts' CPU-side checks, run as users run them (a subprocess), so that they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_benchmark_quick_runs_every_measurement_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = run_script("benchmarks/gpu.py", "--quick", "--quiet", "--out", str(out), "--workdir", str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    record = json.loads(out.read_text())
    res = record["results"]
    # the ceilings come from the published models' counted FLOPs, which agree with the anchors
    for key, anchor in (("unet_step", 13.79), ("vq_decode", 161.2), ("ir50_forward", 12.62)):
        assert abs(res["gflop"][key] / anchor - 1) <= 0.02, (key, res["gflop"][key])
    rows = res["rows"]
    measured = {(row["section"], row["measured"], row["setting"]) for row in rows if row.get("value")}
    for name in ("DDIM-50", "DPM-Solver++ 15", "UniPC 5", "UIFace 2-stage DDIM-50"):
        for setting in ("fp32", "bf16"):
            assert ("generation", name, setting) in measured, (name, setting, rows)
    assert ("generation", "UniPC 5", "bf16 + channels_last") in measured
    assert {row["section"] for row in rows if row.get("value")} >= {"generation", "IR-50 + ArcFace training", "LDM training"}
    assert not [row for row in rows if str(row.get("note", "")).startswith(("failed", "skipped"))]
    assert res["generation"]["cells"]["UniPC 5 / bf16"]["precision"] == "torch.bfloat16"
    assert "| section | measured |" in r.stdout and "H100 ceiling" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without CUDA gets")
def test_gpu_benchmark_refuses_without_cuda(tmp_path):
    r = run_script("benchmarks/gpu.py", "--out", str(tmp_path / "gpu.json"), timeout=120)
    assert r.returncode == 2 and "there is none here" in r.stderr and "--quick" in r.stderr
    assert not (tmp_path / "gpu.json").exists()
