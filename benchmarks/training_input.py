"""Training input pipeline: can the shard loader feed the training step, and what does Ray Train cost?

On shards in the synthesis format (112x112 PNG world faces, the same bytes the pipeline writes), for
two backbones -- ``world_tiny`` (conf/train/world_tiny.yaml: tiny iresnet at 32x32, where a step is
cheap and any overhead shows) and IR-50 (conf/train/ir50_arcface.yaml: ``tface_ir50`` at 112x112):

1. **loader / step**: samples/s that synray's Ray Data loader (:func:`synray.training.data.build_dataset`:
   read, global shuffle, PNG decode, resize, flip + ADMIS crop) delivers to ``iter_torch_batches`` on
   this machine -- marginal rate from passes over R and 2R rows (and the fixed start-up per pass) --
   divided by the samples/s one training step
   (:meth:`synray.training.recognition.Learner.step`, 1 torch thread = one Ray Train worker with
   ``cpus_per_worker: 1``) consumes on batches already in memory. Goal >= 2: the loader never starves
   the trainer.
2. **Ray Train / plain**: steps/s of the same ``Learner.step`` on the same in-memory batches inside a
   1-worker ``TorchTrainer`` vs a plain loop in this process. The machine is shared and its load
   swings within seconds, so the two sides take turns block by block (file handshakes) and each
   side's rate comes from its median step. Goal >= 0.95.
3. **end to end** (world_tiny only): ``synray train`` (run_job) with 1 worker (Ray Data ingest + Ray Train), its
   reported images/s / the plain loop's.

With a GPU the steps run on it (IR-50 img/s per GPU and utilisation vs the 20.9k img/s H100
ceiling); without one the script says so.

    python benchmarks/training_input.py [--quick] [--quiet] [--models world_tiny,ir50]
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np

from common import (IR50_H100_CEILING, ROOT, finish, gpu_info, log, machine, no_gpu_note, parser, setup, start_ray,
                    stop_ray, table, workdir)

GOAL_LOADER, GOAL_TRAIN = 2.0, 0.95
MODELS = {
    "world_tiny": {"conf": "world_tiny.yaml", "batch": 64, "steps": 10, "quick_steps": 5, "blocks": 6},
    "ir50": {"conf": "ir50_arcface.yaml", "batch": 8, "steps": 1, "quick_steps": 1, "blocks": 3},
}


def write_shards(uri: Path, rows: int, unique: int = 256, per_shard: int = 1000, identities: int = 100) -> None:
    """``rows`` world faces at 112 px in shards of ``per_shard``; ``unique`` renders are re-used (the
    loader's work per row does not depend on which face it decodes)."""
    from synray.io.images import encode_image
    from synray.io.shards import finish_dataset, write_shard
    from synray.world.world import World

    if uri.exists():
        shutil.rmtree(uri)
    world = World(seed=0, num_identities=identities)
    pngs = [encode_image(world.render(k % identities, k // identities)) for k in range(unique)]
    for unit, start in enumerate(range(0, rows, per_shard)):
        idx = np.arange(start, min(start + per_shard, rows))
        write_shard(str(uri), unit, {
            "image": [pngs[k % unique] for k in idx], "identity": (idx % identities).tolist(),
            "sample": (idx // identities).tolist(), "kind": ["generated"] * len(idx), "seed": [0] * len(idx),
            "height": [112] * len(idx), "width": [112] * len(idx)}, {"generator": "world"})
    finish_dataset(str(uri))


def train_config(name: str, data: Path, out: Path, device: str, extra=()):
    from synray.config.base import load_config
    from synray.config.train import TrainConfig

    m = MODELS[name]
    over = [f"data.train={data}", f"output.uri={out}", "tracking.enabled=false", "eval.bins=[]", "ray.quiet=true",
            f"batch_size={m['batch']}", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "scaling.torch_threads=1",
            f"scaling.use_gpu={'true' if device == 'cuda' else 'false'}", "data.decode_num_cpus=1",
            "checkpoint.num_to_keep=1", *extra]
    return load_config(ROOT / "conf" / "train" / m["conf"], TrainConfig, over)


def in_memory_batches(cfg, plan, info, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` decoded + augmented batches, made by the loader's own function (no Ray)."""
    from synray.io.shards import list_shards, read_shard
    from synray.training.data import decode_augment

    table = read_shard(next(iter(list_shards(cfg.data.train).values()))).to_pydict()
    b = cfg.batch_size
    aug = {"flip": cfg.augment.flip, "rrc_prob": cfg.augment.rrc_prob, "rrc_scale": tuple(cfg.augment.rrc_scale),
           "rrc_ratio": tuple(cfg.augment.rrc_ratio)}
    out = []
    for k in range(count):
        sl = slice((k * b) % (len(table["image"]) - b), (k * b) % (len(table["image"]) - b) + b)
        batch = {c: np.asarray(table[c][sl], dtype=object if c == "image" else None) for c in ("image", "identity", "identity_b", "mix_weight")}
        out.append(decode_augment(batch, image_size=plan.image_size, ids=info.identities, augment=aug, seed=seed + k))
    return out


def _to_torch(batch: dict[str, np.ndarray], device: str) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def _wait(path: Path, stop: threading.Event | None = None, timeout: float = 1800.0) -> None:
    t0 = time.time()
    while not path.exists():
        if stop is not None and stop.is_set():
            raise RuntimeError(f"the other side stopped before {path.name}")
        if time.time() - t0 > timeout:
            raise TimeoutError(f"no {path.name} after {timeout:.0f} s")
        time.sleep(0.005)


def _learner_and_data(cfg, plan, batches, device):
    import torch

    from synray.training.recognition import Learner

    learner = Learner(cfg, plan, device=device)
    data = [{k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in b.items()} for b in batches]
    learner.step(data[0], 0, 0.01)  # warm-up
    return learner, data


def _timed_steps(learner, data, steps: int, start: int, device) -> list[float]:
    import torch

    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        learner.step(data[(start + k + 1) % len(data)], start + k + 1, 0.01)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _ray_train_loop(config: dict) -> None:
    """Ray Train worker: the same Learner and steps as the plain side, block by block in turn with it."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch

    from synray.config.train import TrainConfig
    from synray.training.recognition import TrainPlan

    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate(config["cfg"])
    plan = TrainPlan(**{**config["plan"], "image_size": tuple(config["plan"]["image_size"])})
    device = ray.train.torch.get_device()
    learner, data = _learner_and_data(cfg, plan, config["batches"], device)
    sync = Path(config["sync"])
    (sync / "ray.ready").touch()
    times = []
    for b in range(config["blocks"]):
        _wait(sync / f"ray{b}.go")
        times += _timed_steps(learner, data, config["steps"], b * config["steps"], device)
        (sync / f"ray{b}.done").touch()
    with tempfile.TemporaryDirectory() as d:  # Train V2 keeps only metrics that come with a checkpoint
        open(f"{d}/done", "w").close()
        ray.train.report({"step_seconds": times, "threads": torch.get_num_threads()},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def interleaved(cfg, plan, batches, steps: int, blocks: int, device: str, storage: Path) -> dict:
    """1-worker Ray Train and a plain loop take turns, ``steps`` steps a block, ``blocks`` blocks each.

    The plain loop runs in a thread of this process while the main thread waits in ``fit()`` -- the
    same shape as a Train worker, whose train function runs in a thread beside the actor's own.
    """
    import tempfile
    from dataclasses import asdict

    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    sync = Path(tempfile.mkdtemp(prefix="sync-", dir=storage.parent))
    plain_times: list[float] = []
    errors: list[BaseException] = []
    fit_done = threading.Event()

    def plain_side() -> None:
        try:
            torch.set_num_threads(1)
            learner, data = _learner_and_data(cfg, plan, batches, device)
            _wait(sync / "ray.ready", fit_done)
            for b in range(blocks):
                (sync / f"ray{b}.go").touch()
                _wait(sync / f"ray{b}.done", fit_done)
                plain_times.extend(_timed_steps(learner, data, steps, b * steps, device))
        except BaseException as exc:  # noqa: BLE001 - reported after fit()
            errors.append(exc)
            for b in range(blocks):  # never leave the worker waiting
                (sync / f"ray{b}.go").touch()

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": {**asdict(plan), "image_size": list(plan.image_size)},
                           "batches": batches, "steps": steps, "blocks": blocks, "sync": str(sync)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=device == "cuda", resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-{int(time.time())}", storage_path=str(storage)),
    )
    thread = threading.Thread(target=plain_side, daemon=True)
    thread.start()
    try:
        result = trainer.fit()
    finally:
        fit_done.set()
        thread.join(timeout=60)
        shutil.rmtree(sync, ignore_errors=True)
    if errors:
        raise errors[0]
    return {"plain_step_seconds": plain_times, "ray_step_seconds": result.metrics["step_seconds"],
            "worker_threads": result.metrics.get("threads"), "fit_seconds": time.perf_counter() - t0}


def rate(times: list[float], batch: int) -> dict:
    """Step times -> samples/s from the median step (robust to other users' bursts) and from the mean."""
    return {"median_samples_per_second": batch / float(np.median(times)), "mean_samples_per_second": batch * len(times) / sum(times),
            "steps": len(times)}


def loader_pass(cfg, plan, info) -> dict:
    """One pass of the Ray Data loader to the consumer (driver), timed from execution start."""
    from synray.training.recognition import build_datasets

    ds = build_datasets(cfg, plan, info, None)["train"]
    t0 = time.perf_counter()
    first = None
    rows = 0
    for b in ds.iter_torch_batches(batch_size=cfg.batch_size, drop_last=False, prefetch_batches=cfg.data.prefetch_batches):
        if first is None:
            first = time.perf_counter() - t0
        rows += int(b["image"].shape[0])
    total = time.perf_counter() - t0
    steady = (rows - cfg.batch_size) / max(total - first, 1e-9)
    return {"rows": rows, "seconds": total, "first_batch_seconds": first, "samples_per_second": rows / total,
            "steady_samples_per_second": steady}


def run_model(name: str, args, data: Path, data2: Path, root: Path, device: str) -> dict:
    from synray.training.data import dataset_info
    from synray.training.recognition import plan_training

    m = MODELS[name]
    steps = m["quick_steps"] if args.quick else m["steps"]
    cfg = train_config(name, data, root / f"train_{name}", device)
    plan, info, _ = plan_training(cfg)
    batches = in_memory_batches(cfg, plan, info, 8)
    blocks = 2 if args.quick else m["blocks"]
    log(f"[{name}] Ray Data loader, one pass over {info.rows} rows, then one over twice that")
    loader_pass(cfg, plan, info)  # warm-up: the session's first Ray Data executions start its system actors
    small = loader_pass(cfg, plan, info)
    large = loader_pass(cfg, plan, dataset_info(str(data2)))
    loader = {"small": small, "large": large, "samples_per_second": large["samples_per_second"]}
    if large["seconds"] > small["seconds"]:
        loader["marginal_samples_per_second"] = (large["rows"] - small["rows"]) / (large["seconds"] - small["seconds"])
        loader["fixed_seconds"] = max(small["seconds"] - small["rows"] / loader["marginal_samples_per_second"], 0.0)
    else:  # noise larger than the work: fall back to the pass rate
        loader["marginal_samples_per_second"], loader["fixed_seconds"] = large["samples_per_second"], float("nan")
    log(f"[{name}]   {small['samples_per_second']:.1f} / {large['samples_per_second']:.1f} samples/s per pass; marginal "
        f"{loader['marginal_samples_per_second']:.1f} samples/s, fixed {loader['fixed_seconds']:.1f} s per pass")
    log(f"[{name}] Ray Train (1 worker) and plain loop in turn: {blocks} blocks of {steps} steps of {cfg.batch_size} each")
    inter = interleaved(cfg, plan, batches, steps, blocks, device, root / "ray_train")
    plain_r, ray_r = rate(inter["plain_step_seconds"], cfg.batch_size), rate(inter["ray_step_seconds"], cfg.batch_size)
    plain = plain_r["median_samples_per_second"]
    log(f"[{name}]   plain {plain:.1f} samples/s, Ray Train {ray_r['median_samples_per_second']:.1f} (median steps)")
    out = {"model": name, "batch": cfg.batch_size, "steps_per_block": steps, "blocks": blocks, "rows": info.rows,
           "interleaved": inter, "plain": plain_r, "ray_train": ray_r, "plain_samples_per_second": plain, "loader": loader,
           "loader_ratio": loader["marginal_samples_per_second"] / plain, "loader_pass_ratio": loader["samples_per_second"] / plain,
           "ray_train_ratio": ray_r["median_samples_per_second"] / plain,
           # per block pair (adjacent in time): how far apart the sides are within one load regime
           "block_ratios": (np.median(np.reshape(inter["plain_step_seconds"], (blocks, -1)), 1)
                            / np.median(np.reshape(inter["ray_step_seconds"], (blocks, -1)), 1)).tolist(),
           "ray_train_ratio_mean": ray_r["mean_samples_per_second"] / plain_r["mean_samples_per_second"]}
    if name == "world_tiny":
        from synray.jobs import run_job

        epochs = 1 if args.quick else 2
        log(f"[{name}] synray train end to end, 1 worker, {epochs} epochs")
        e2e_cfg = train_config(name, data, root / "e2e", device, [f"epochs={epochs}", "schedule.milestones=[100]",
                                                                      f"name=e2e-{int(time.time())}"])
        t0 = time.perf_counter()
        outcome = run_job(e2e_cfg)
        out["end_to_end"] = {"images_per_second": outcome.metrics.get("images_per_second"),
                             "seconds": time.perf_counter() - t0, "steps": outcome.metrics.get("step")}
        out["end_to_end_ratio"] = (outcome.metrics.get("images_per_second") or 0.0) / plain
        log(f"[{name}]   {out['end_to_end']['images_per_second']:.1f} img/s in the last epoch")
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", default="world_tiny,ir50")
    p.add_argument("--rows", type=int, default=4000, help="rows in the smaller shard dataset (the other has twice)")
    args = p.parse_args()
    setup(args)
    root = workdir(args, "training_input")
    info = machine()
    device = "cuda" if gpu_info() else "cpu"
    rows = 1000 if args.quick else args.rows
    log(f"writing {rows} and {2 * rows} rows of 112x112 world faces")
    data, data2 = root / "shards", root / "shards2"
    write_shards(data, rows)
    write_shards(data2, 2 * rows)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    results: dict = {"rows": rows, "device": device}
    start_ray()
    try:
        for name in names:
            results[name] = run_model(name, args, data, data2, root, device)
    finally:
        stop_ray()
        for d in ("ray_train", "shards", "shards2", "e2e") + tuple(f"train_{n}" for n in names):
            shutil.rmtree(root / d, ignore_errors=True)
    rows_out = []
    for name in names:
        r = results[name]
        rows_out.append({"model": name, "batch": r["batch"], "plain step samples/s": r["plain_samples_per_second"],
                         "loader samples/s (marginal)": r["loader"]["marginal_samples_per_second"],
                         "loader fixed s/pass": r["loader"]["fixed_seconds"], "loader / step": r["loader_ratio"],
                         "one pass incl. start-up / step": r["loader_pass_ratio"],
                         "goal": f">= {GOAL_LOADER}", "status": "met" if r["loader_ratio"] >= GOAL_LOADER else "MISSED"})
    train_rows = []
    for name in names:
        r = results[name]
        train_rows.append({"model": name, "plain samples/s": r["plain_samples_per_second"],
                           "Ray Train 1 worker samples/s": r["ray_train"]["median_samples_per_second"],
                           "Ray Train / plain": r["ray_train_ratio"], "same, mean steps": r["ray_train_ratio_mean"],
                           "goal": f">= {GOAL_TRAIN}",
                           "status": "met" if r["ray_train_ratio"] >= GOAL_TRAIN else "MISSED"})
        if "end_to_end" in r:
            train_rows.append({"model": f"{name} (synray train, Ray Data ingest)", "plain samples/s": r["plain_samples_per_second"],
                               "Ray Train 1 worker samples/s": r["end_to_end"]["images_per_second"],
                               "Ray Train / plain": r["end_to_end_ratio"], "goal": "-", "status": "-"})
    notes = ["loader: passes over R and 2R rows on this machine's 2 cores (read, global shuffle, decode tasks at 1 CPU "
             "each); marginal = R / (t(2R) - t(R)), the rate once the fixed per-pass start-up is paid; step: 1 torch "
             "thread on in-memory batches; both sides measured in this run",
             "Ray Train / plain: 1-worker Ray Train and a plain loop (a thread of the driver) take turns block by block on "
             "the same in-memory batches; samples/s from each side's median step (other users' bursts hit single steps; "
             "the mean is shown beside)",
             "synray train row: the whole path (Ray Data ingest + Ray Train, 1 worker) on 2 shared cores, where decode "
             "and the step compete for the same cores; images/s of its last epoch",
             "loader samples/s per core ~ loader samples/s / 2; a GPU node needs (2 x step rate) / that per GPU"]
    if device == "cuda" and "ir50" in results:
        ir = results["ir50"]
        notes.append(f"IR-50 on {gpu_info()['name']}: {ir['plain_samples_per_second']:.0f} img/s per GPU = "
                     f"{ir['plain_samples_per_second'] / IR50_H100_CEILING:.1%} of the H100 ceiling ({IR50_H100_CEILING:,.0f} img/s)")
    else:
        notes.append(no_gpu_note())
    finish("training_input", args, info, results, [table(rows_out), table(train_rows)], notes)


if __name__ == "__main__":
    main()
