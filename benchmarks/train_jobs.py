"""Short ``synray train`` jobs: what Ray Train's controller poll interval costs them.

Ray Train's controller collects each worker's report when it polls the workers (every 2 s by default), and a
worker's next report waits until its last one was collected (a queue of one). A job whose epochs are shorter
than the interval therefore waits for the poll at every epoch, and once more at the end: the study's students
(8 epochs of a few hundred world faces on 2 workers, one report and checkpoint per epoch) are such jobs.
synray polls every 0.5 s (``synray.training.runner.POLL_INTERVAL_S``) unless
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set.

The same ``world_tiny`` job (2 workers, as the quickstart and the study train) runs with Ray's 2 s and synray's
0.5 s in turn, in one Ray session; each setting's median wall time per job, and their ratio.

    python benchmarks/train_jobs.py [--quick] [--quiet] [--pairs N] [--epochs E] [--rows R]
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
from common import (
    finish,
    log,
    machine,
    parser,
    setup,
    start_ray,
    stop_ray,
    table,
    workdir,
)

POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
SETTINGS = {"Ray's default (2 s)": "2.0", "synray (0.5 s)": "0.5"}


def one_job(data, out, epochs: int, poll: str, k: int) -> dict:
    from training_input import train_config

    from synray.jobs import run_job

    os.environ[POLL] = poll  # the driver's value is the one Ray Train hands its controller
    cfg = train_config("world_tiny", data, out, "cpu", [f"epochs={epochs}", "scaling.num_workers=2", "batch_size=64",
                                                        "schedule.milestones=[100]", f"name=poll-{poll}-{k}"])
    t0 = time.perf_counter()
    outcome = run_job(cfg)
    return {"seconds": time.perf_counter() - t0, "steps": outcome.metrics.get("step"), "epochs": outcome.metrics.get("epoch")}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--pairs", type=int, default=3, help="jobs per setting, the settings taking turns")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rows", type=int, default=768, help="training rows (the tiny study's students: 24 x 6 to 48 x 16)")
    args = p.parse_args()
    setup(args)
    from training_input import write_shards

    root = workdir(args, "train_jobs")
    info = machine()
    pairs, epochs = (1, 3) if args.quick else (args.pairs, args.epochs)
    data = root / "shards"
    write_shards(data, args.rows, per_shard=args.rows // 2 or 1, identities=48)
    user = os.environ.get(POLL)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    start_ray()
    try:
        one_job(data, root / "jobs", 1, "0.5", -1)  # warm-up: the session's first Train and Data actors
        for k in range(pairs):
            for name, poll in (SETTINGS.items() if k % 2 == 0 else reversed(SETTINGS.items())):
                r = one_job(data, root / "jobs", epochs, poll, k)
                runs[name].append(r)
                log(f"{name}: {r['seconds']:.1f} s ({r['steps']} steps, {r['epochs']} epochs)")
    finally:
        stop_ray()
        if user is None:
            os.environ.pop(POLL, None)
        else:
            os.environ[POLL] = user
        shutil.rmtree(root / "jobs", ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    med = {name: float(np.median([r["seconds"] for r in rs])) for name, rs in runs.items()}
    default, ours = med["Ray's default (2 s)"], med["synray (0.5 s)"]
    rows = [{"poll interval": name, "jobs": len(runs[name]), "median s / job": med[name],
             "all (s)": " ".join(f"{r['seconds']:.1f}" for r in runs[name])} for name in SETTINGS]
    results = {"runs": runs, "median_seconds": med, "ratio": default / ours, "saved_seconds_per_job": default - ours,
               "epochs": epochs, "rows": args.rows}
    notes = [f"ratio (Ray's default / synray's, median wall time per job): {default / ours:.2f}; "
             f"{default - ours:.1f} s saved per job of {epochs} epochs",
             "each job: world_tiny (conf/train/world_tiny.yaml), 2 workers x 1 CPU, one report and checkpoint per "
             "epoch, no verification sets; the settings take turns, so load swings hit both",
             f"machine load (uptime) at the start: {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}"]
    finish("train_jobs", args, info, results, [table(rows)], notes)


if __name__ == "__main__":
    main()
