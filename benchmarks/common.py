"""Shared pieces of the benchmark scripts: argument parsing, a local Ray, timing, memory sampling,
GPU detection, Markdown tables and the JSON record written under ``outputs/bench/``.

The machine the project runs on is small and shared, so every script measures both sides of a ratio
in one run (interleaved where it can) and records the load average before and after, which says how
noisy the numbers were.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "outputs" / "bench"

# Physical ceilings used for "utilisation vs the H100 ceiling" (see the anchors: dense BF16 figure used there).
H100_FLOPS = 790e12
IR50_TRAIN_GFLOP = 37.9  # 3 x 12.62 GFLOP forward at 112x112
IR50_H100_CEILING = H100_FLOPS / (IR50_TRAIN_GFLOP * 1e9)  # ~20.9k img/s

_QUIET = False


def log(msg: str) -> None:
    """Progress line on stderr (silenced by ``--quiet``); results always go to stdout."""
    if not _QUIET:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (well under a minute of work)")
    p.add_argument("--quiet", action="store_true", help="no progress lines; only the result table")
    p.add_argument("--out", default=None, help="JSON path (default outputs/bench/<script>.json)")
    p.add_argument("--workdir", default=None, help="scratch folder for datasets (default outputs/bench/work/<script>)")
    return p


def setup(args: argparse.Namespace) -> None:
    """Quiet flags and the environment a private local Ray needs; call before importing ray."""
    global _QUIET
    _QUIET = bool(args.quiet)
    os.environ.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray runs its workers at niceness 15 by default. On a shared machine that starves them next to
    # other users' processes while the plain-loop baseline in the driver runs at 0: equal terms instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("SYNRAY_QUIET", "1")  # synray's own progress output off; ours is log()
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def workdir(args: argparse.Namespace, name: str) -> Path:
    d = Path(args.workdir) if args.workdir else OUT_DIR / "work" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def start_ray(num_cpus: int | None = None, object_store_mb: int = 768) -> None:
    """A private local Ray (never an existing cluster) with synray's Data context settings."""
    import logging

    import ray

    from synray.runtime import configure_data_context

    ncpu = num_cpus or max(4, os.cpu_count() or 1)  # more logical CPUs than cores: see synray.runtime
    ray.init(address="local", num_cpus=ncpu, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
             log_to_driver=False, logging_level=logging.ERROR)
    configure_data_context(quiet=True)
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING if not _QUIET else logging.ERROR)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def machine() -> dict[str, Any]:
    """What ran the benchmark (date, CPU, cores, memory, versions, load)."""
    import numpy
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover
        ray_version = None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version, "numpy": numpy.__version__,
        "gpu": gpu_info(), "loadavg_start": list(os.getloadavg()),
    }


def gpu_info() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return {"count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}


def no_gpu_note() -> str:
    return "no GPU on this machine: GPU figures (img/s per GPU, utilisation vs the H100 ceiling) not measured"


@contextmanager
def stopwatch() -> Iterable[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]``."""
    rec: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield rec
    finally:
        rec["seconds"] = time.perf_counter() - t0


class MemorySampler:
    """Samples RSS of this process (the driver) and of all its descendants (Ray's raylet, GCS, workers).

    RSS counts shared pages once per process, so the workers' sum overstates real use; every
    ``pss_every``-th sample also records PSS (shared pages divided among their users), which is
    exact but costs ~10 ms per process to read.
    """

    def __init__(self, interval: float = 1.0, pss_every: int = 10):
        self.interval, self.pss_every = interval, pss_every
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._me = psutil.Process()
        self.t0 = time.perf_counter()

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            self.samples.append(self.sample(pss=self.pss_every > 0 and k % self.pss_every == 0))
            k += 1
            self._stop.wait(self.interval)

    def sample(self, pss: bool = False) -> dict[str, float]:
        driver = self._me.memory_info().rss
        rss = pss_sum = 0
        n = 0
        try:
            children = self._me.children(recursive=True)
        except psutil.Error:
            children = []
        for p in children:
            try:
                rss += p.memory_info().rss
                if pss:
                    pss_sum += p.memory_full_info().pss
                n += 1
            except psutil.Error:
                continue
        s = {"t": time.perf_counter() - self.t0, "driver_mb": driver / 2**20, "workers_mb": rss / 2**20, "processes": n}
        if pss:
            s["workers_pss_mb"] = pss_sum / 2**20
            s["driver_pss_mb"] = self._me.memory_full_info().pss / 2**20
        return s

    def __enter__(self) -> MemorySampler:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, key: str, since: float = 0.0, until: float = float("inf")) -> float:
        vals = [s[key] for s in self.samples if key in s and since <= s["t"] <= until]
        return max(vals) if vals else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "peak_driver_mb": self.peak("driver_mb"), "peak_workers_mb": self.peak("workers_mb"),
            "peak_workers_pss_mb": self.peak("workers_pss_mb"),
            "peak_total_mb": max((s["driver_mb"] + s["workers_mb"] for s in self.samples), default=float("nan")),
            "samples": len(self.samples),
        }

    def series(self, points: int = 120) -> list[dict[str, float]]:
        """At most ``points`` samples spread over the run (for the JSON record)."""
        if len(self.samples) <= points:
            return [dict(s) for s in self.samples]
        step = len(self.samples) / points
        return [dict(self.samples[int(k * step)]) for k in range(points)]


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts) over ``columns`` (default: keys of the first row)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def goal(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None or value != value:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def finish(name: str, args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any], tables: Sequence[str],
           notes: Sequence[str] = ()) -> Path:
    """Print the tables and notes, then write the JSON record; returns its path."""
    info = dict(info)
    info["loadavg_end"] = list(os.getloadavg())
    out = Path(args.out) if args.out else OUT_DIR / f"{name}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "quick": bool(args.quick), "machine": info, "results": results, "notes": list(notes)}
    out.write_text(json.dumps(record, indent=2, default=_json_default))
    print(f"\n## {name}  ({info['date']}, {info['cores']} cores {info['cpu']}, load {info['loadavg_start'][0]:.1f}"
          f" -> {info['loadavg_end'][0]:.1f})\n")
    for t in tables:
        print(t)
        print()
    for n in notes:
        print(f"- {n}")
    print(f"\nJSON: {out}")
    return out


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def best_of(fn: Callable[[], float], repeats: int) -> float:
    """Best (largest) of ``repeats`` throughput measurements: the least disturbed by other load."""
    return max(fn() for _ in range(repeats))


# --- models for the generation benchmarks ---------------------------------------------------------

#: a CPU-sized identity-conditioned UNet (same class as the published 216M model, ~1M parameters)
TINY_UNET = dict(initial_channels=32, channel_multipliers=(1, 2), is_attention=(False, True), n_blocks_per_resolution=1,
                 context_channels=32)
#: the small VQ decoder of the goldens (latent 16x16 -> 32x32 RGB); the published f4 is 161 GFLOP/image
SMALL_VQ = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 32}


def random_unet(config: Any = None, learn_empty_context: bool = False, seed: int = 0):
    """A randomly initialised ConditionalUNet whose zero-initialised output conv gets ordinary weights.

    Untrained, the published architecture predicts eps = 0 exactly (its last conv starts at zero), which
    would make every sampler return a scaled x_T; default conv weights make the samplers do real work.
    """
    import torch

    from synray.models.unet import ConditionalUNet, UNetConfig

    torch.manual_seed(seed)
    cfg = config or UNetConfig(**TINY_UNET, learn_empty_context=learn_empty_context)
    unet = ConditionalUNet(cfg)
    unet.final.reset_parameters()
    return unet.eval()


def write_ldm_assets(folder: Path, learn_empty_context: bool = False) -> dict[str, str]:
    """Tiny UNet checkpoint (published layout) + small VQ decoder in ``folder``; returns config overrides."""
    import torch

    from synray.diffusion.schedule import linear_schedule
    from synray.models.ldm_checkpoint import save_unet_checkpoint
    from synray.models.vq import VQConfig, VQDecoder

    folder.mkdir(parents=True, exist_ok=True)
    unet_path, vq_path = folder / "unet.ckpt", folder / "vq_decoder.pt"
    save_unet_checkpoint(random_unet(learn_empty_context=learn_empty_context), unet_path, linear_schedule())
    torch.manual_seed(1)
    torch.save(VQDecoder(VQConfig.from_dict(SMALL_VQ)).state_dict(), vq_path)
    return {"generator.unet": str(unet_path), "generator.vq_decoder": str(vq_path),
            "generator.vq_config": "{ch: 32, ch_mult: [1, 2], num_res_blocks: 1, resolution: 32}",
            "generator.latent_shape": "[3,16,16]"}
