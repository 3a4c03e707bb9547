"""Synthesis pipeline efficiency: end-to-end images/s through Ray Data / images/s of the bottleneck stage alone.

For each generator setup, in one Ray session:

1. **plain loop**: the pipeline's own stage objects (``GenerateStage``, ``AlignStage``,
   ``FinishStage``, ``WriteStage``) run unit by unit in this process with one torch thread, each stage
   timed separately; the slowest stage is the bottleneck and its images/s the ceiling;
2. **Ray Data** at N and 2N units (:func:`synray.synthesis.pipeline.run_synthesis`, generator pool of
   one actor, i.e. the "one GPU" the ceiling was measured on; the other stages run in their own tasks);
3. **plain loop** again after each Ray run (the machine is shared).

efficiency = Ray end-to-end images/s (from dataset start to last shard) / (bottleneck images/s x
generator actors), the ceiling taken from the plain runs just before and after that Ray run (order:
plain, Ray N, plain, Ray 2N, plain). Goal: >= 0.9. Also reported, from inside each Ray run (so immune
to load drift between runs): the generator actors' busy fraction (their own generate time / wall time,
the "GPU busy" of a GPU node) and their speed in the pipeline relative to the plain loop.

Setups: ``world`` (conf/synth/world.yaml, the cheap parametric renderer) and ``ldm`` (conf/synth/admis.yaml's
sampler, DDIM 10 steps, on a randomly initialised ~1M-parameter ConditionalUNet and the small VQ
decoder, 16x16 latents -> 32 px -> resized to 112; gaussian contexts instead of context faces).

    python benchmarks/synthesis_pipeline.py [--quick] [--quiet] [--setups world,ldm]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    finish,
    gpu_info,
    log,
    machine,
    no_gpu_note,
    parser,
    setup,
    start_ray,
    stop_ray,
    table,
    workdir,
    write_ldm_assets,
)

GOAL = 0.9


def setup_config(name: str, assets: dict[str, str], uri: Path, units: int, quick: bool):
    from synray.config import load_config
    from synray.config.synth import SynthConfig

    gpus = (gpu_info() or {}).get("count", 0)
    common = [f"output.uri={uri}", "tracking.enabled=false", "ray.quiet=true", "generator.min_actors=1"]
    if name == "world":
        size = 8 if quick else 64
        over = [*common, f"identities.unit_size={size}", f"identities.count={units * size}", "generator.max_actors=1"]
        return load_config(ROOT / "conf" / "synth" / "world.yaml", SynthConfig, over)
    if name == "ldm":
        size = 4 if quick else 16
        n_gpu = max(gpus, 1)
        over = [*common, *(f"{k}={v}" for k, v in assets.items()), "contexts.source=gaussian", "contexts.path=null",
                "contexts.embedder=null", "quality.embedder=null", "augment.context_repeats=0",
                "generator.sampler.steps=10", "generator.images_per_identity=4", "generator.batch_size=32",
                f"generator.num_gpus={1 if gpus else 0}", f"generator.max_actors={n_gpu}", f"generator.min_actors={n_gpu}",
                f"identities.unit_size={size}", f"identities.count={units * size}", "alignment.mode=resize"]
        return load_config(ROOT / "conf" / "synth" / "admis.yaml", SynthConfig, over)
    raise ValueError(f"unknown setup {name!r}; valid: world, ldm")


def plain_loop(cfg) -> dict:
    """The pipeline's stages in this process, one unit at a time, each stage timed on its own."""
    import torch

    from synray.synthesis.pipeline import _cfg_dict, prepare_output, unit_rows
    from synray.synthesis.stages import (
        AlignStage,
        FinishStage,
        GenerateStage,
        WriteStage,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uri, pending, units, meta = prepare_output(cfg)
        d = _cfg_dict(cfg)
        stages = {"generate": GenerateStage(d), "align": AlignStage(d), "finish": FinishStage(d),
                  "write": WriteStage(d, uri, meta)}
        seconds = dict.fromkeys(stages, 0.0)
        images = 0
        t_rows = time.perf_counter()
        rows = list(unit_rows(cfg, pending))
        seconds["unit_rows"] = time.perf_counter() - t_rows
        for row in rows:
            batch = {k: np.asarray(v)[None] for k, v in row.items()}
            for name, stage in stages.items():
                t0 = time.perf_counter()
                batch = stage(batch)
                seconds[name] += time.perf_counter() - t0
            images += int(batch["rows"][0])
    finally:
        torch.set_num_threads(threads)
    per_stage = {k: images / v for k, v in seconds.items() if k != "unit_rows" and v > 0}
    bottleneck = min(per_stage, key=per_stage.get)
    return {"images": images, "seconds": seconds, "stage_images_per_second": per_stage, "bottleneck": bottleneck,
            "bottleneck_images_per_second": per_stage[bottleneck]}


def ray_run(cfg) -> dict:
    from synray.synthesis.pipeline import run_synthesis

    s = run_synthesis(cfg, progress=False)
    return {"images": s["images_written"], "units": s["units_written"], "seconds": s["seconds"],
            "images_per_second": s["images_per_second"], "generator_seconds": s["generator_seconds"],
            "generator_span_seconds": s["generator_span_seconds"], "start_seconds": s["generator_start_seconds"],
            "drain_seconds": s["drain_seconds"]}


def fresh(uri: Path) -> Path:
    if uri.exists():
        shutil.rmtree(uri)
    return uri


def measure(name: str, root: Path, assets: dict[str, str], args) -> dict:
    """plain, Ray N, plain, Ray 2N, plain: each Ray run is compared with the plain runs on either side of it."""
    units_plain = 1 if args.quick else 2
    n = 2 if args.quick else {"world": args.world_units, "ldm": args.ldm_units}[name]
    plains, runs = [], {}

    def plain(k: int) -> None:
        log(f"[{name}] plain loop {k + 1}/3, {units_plain} units")
        r = plain_loop(setup_config(name, assets, fresh(root / f"{name}_plain"), units_plain, args.quick))
        log(f"[{name}]   bottleneck {r['bottleneck']} at {r['bottleneck_images_per_second']:.1f} img/s; "
            f"stages {({k_: round(v, 1) for k_, v in r['stage_images_per_second'].items()})}")
        plains.append(r)

    plain(0)
    for k, units in (("N", n), ("2N", 2 * n)):
        log(f"[{name}] Ray Data, {units} units")
        cfg = setup_config(name, assets, fresh(root / f"{name}_ray"), units, args.quick)
        r = ray_run(cfg)
        actors = cfg.generator.max_actors
        r["generator_actors"] = actors
        # the generator's own time inside the pipeline: busy fraction of its actors over the run
        r["generator_busy"] = r["generator_seconds"] / actors / r["seconds"]
        r["generator_images_per_second_in_pipeline"] = r["images"] / (r["generator_seconds"] / actors)
        # between the first generate call's start and the last one's end: busy once started, before the drain
        r["generator_busy_after_start"] = r["generator_seconds"] / actors / max(r["generator_span_seconds"], 1e-9)
        log(f"[{name}]   {r['images']} images in {r['seconds']:.1f} s = {r['images_per_second']:.1f} img/s; "
            f"generator busy {r['generator_busy']:.0%} ({r['generator_busy_after_start']:.0%} after its start); "
            f"start-up {r['start_seconds']:.1f} s, drain {r['drain_seconds']:.1f} s")
        runs[k] = r
        plain(len(plains))
    for p_ in ("plain", "ray"):
        shutil.rmtree(root / f"{name}_{p_}", ignore_errors=True)
    bottleneck = plains[0]["bottleneck"]
    rates = [p_["stage_images_per_second"][bottleneck] for p_ in plains]
    out = {"setup": name, "plain": plains, "ray": runs, "bottleneck": bottleneck, "plain_bottleneck_images_per_second": rates}
    for i, k in enumerate(("N", "2N")):
        r = runs[k]
        ceiling = (rates[i] + rates[i + 1]) / 2 * r["generator_actors"]
        r["ceiling_images_per_second"] = ceiling
        r["efficiency"] = r["images_per_second"] / ceiling
        r["generator_slowdown"] = r["generator_images_per_second_in_pipeline"] / (ceiling / r["generator_actors"])
    out["efficiency"] = runs["2N"]["efficiency"]
    out["generator_busy"] = runs["2N"]["generator_busy"]
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--setups", default="world,ldm")
    p.add_argument("--world-units", type=int, default=4, help="world: units (1,280 images each) in the N run; 2N: twice")
    p.add_argument("--ldm-units", type=int, default=8, help="ldm: units (64 images each) in the N run; 2N: twice")
    args = p.parse_args()
    setup(args)
    root = workdir(args, "synthesis_pipeline")
    info = machine()
    assets = write_ldm_assets(root / "assets")
    results = {}
    start_ray()
    try:
        log("warm-up: one world unit through Ray Data (first execution in a session starts Ray Data's system actors)")
        t0 = time.perf_counter()
        ray_run(setup_config("world", assets, fresh(root / "warmup"), 1, True))
        results["warmup_seconds"] = time.perf_counter() - t0
        for name in args.setups.split(","):
            results[name] = measure(name.strip(), root, assets, args)
    finally:
        stop_ray()
        shutil.rmtree(root / "assets", ignore_errors=True)
        shutil.rmtree(root / "warmup", ignore_errors=True)
    rows = []
    for name in args.setups.split(","):
        r = results[name.strip()]
        for k in ("N", "2N"):
            x = r["ray"][k]
            rows.append({"setup": name, "run": f"{k}: {x['units']} units, {x['images']:,} img", "bottleneck": r["bottleneck"],
                         "plain-loop ceiling img/s": x["ceiling_images_per_second"], "Ray Data img/s": x["images_per_second"],
                         "efficiency": x["efficiency"], "generator busy": x["generator_busy"],
                         "busy after start": x["generator_busy_after_start"], "start-up s": x["start_seconds"],
                         "drain s": x["drain_seconds"],
                         "generator speed in pipeline / alone": x["generator_slowdown"], "goal": f">= {GOAL}",
                         "status": "met" if x["efficiency"] >= GOAL else "MISSED"})
    stages = []
    for name in args.setups.split(","):
        r = results[name.strip()]
        for k in r["plain"][0]["stage_images_per_second"]:
            stages.append({"setup": name, "stage": k, **{f"plain {i + 1} img/s": p_["stage_images_per_second"][k]
                                                           for i, p_ in enumerate(r["plain"])}})
    notes = [f"warm-up (first Ray Data execution in the session, 1 unit): {results['warmup_seconds']:.1f} s, not counted",
             "ceiling = bottleneck stage alone in a plain loop (1 torch thread) x generator actors, mean of the plain runs "
             "just before and after each Ray run (order: plain, Ray N, plain, Ray 2N, plain)",
             "generator busy = the generator actors' own time per unit summed / actors / wall time (measured inside the run, "
             "so immune to load drift between runs); 'after start' divides by the span from the first generate call's "
             "start to the last one's end instead; start-up = run start to the first generate call (actor start, first "
             "row), drain = last generate call's end to the run's end; speed in pipeline / alone < 1 when other stages "
             "share its cores",
             f"machine load (uptime) at the start: {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}"]
    if gpu_info() is None:
        notes.append(no_gpu_note() + "; generator actors run on 1 CPU each (the GPU stand-in)")
    finish("synthesis_pipeline", args, info, results, [table(rows), table(stages)], notes)


if __name__ == "__main__":
    main()
