"""Resume overhead: how long a re-run of a finished 100,000-image synthesis job takes to skip its units.

The job is ``conf/synth/world.yaml`` at 5,000 identities x 20 images (79 units of 64 identities, one
shard each). Unless ``--real`` is given, the finished job is laid down directly with the library's own
writer (:func:`synray.io.shards.write_shard` with the job's metadata and config hash, plus the
manifest), re-using the PNG bytes of one unit's real renders for every unit: the re-run only lists the
folder and reads shard footers, so what matters is the number, size and layout of the shards, which
are those of the real job. ``--real`` makes the job through Ray Data first (about 7 minutes on 2 idle
cores); ``--dataset URI`` times a job that already exists (e.g. the million-image run of
``benchmarks/scaling.py --million --keep``).

Measured, each twice (first and second re-run):

* ``run_synthesis`` re-run on a running Ray (what ``synray synth`` does after ``init_ray``);
* ``run_local`` re-run (the same skip logic without Ray);
* the skip itself (:func:`synray.synthesis.pipeline.prepare_output`) and the manifest rewrite
  (:func:`synray.io.shards.write_manifest`, which opens every footer) on their own;
* a resume after losing 2% of the shards: the re-run writes exactly those units; its time over the
  time those units take in a plain loop is the resume overhead of a crashed job.

    python benchmarks/resume.py [--quick] [--quiet] [--real | --dataset URI]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from common import (
    ROOT,
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

IMAGES_PER_IDENTITY = 20


def job_config(uri: str, identities: int):
    from synray.config import load_config
    from synray.config.synth import SynthConfig

    over = [f"identities.count={identities}", f"output.uri={uri}", "tracking.enabled=false", "ray.quiet=true",
            f"generator.images_per_identity={IMAGES_PER_IDENTITY}"]
    return load_config(ROOT / "conf" / "synth" / "world.yaml", SynthConfig, over)


def lay_down(cfg) -> dict:
    """Write every unit's shard with the job's metadata, as the pipeline's WriteStage would."""
    from synray.io import shards
    from synray.io.images import encode_image
    from synray.seeds import sample_seed
    from synray.synthesis.pipeline import (
        _cfg_dict,
        prepare_output,
        unit_identities,
        unit_rows,
    )
    from synray.synthesis.stages import GenerateStage

    uri, pending, _, meta = prepare_output(cfg)
    first = pending[0]
    row = next(unit_rows(cfg, [first]))
    unit = GenerateStage(_cfg_dict(cfg))({k: np.asarray(v)[None] for k, v in row.items()})
    pngs = [encode_image(im, ".png") for im in unit["images"][0]]
    n = IMAGES_PER_IDENTITY
    t0 = time.perf_counter()
    for u in pending:
        ids = unit_identities(cfg, u)
        identity = np.repeat(ids, n)
        sample = np.tile(np.arange(n, dtype=np.int32), len(ids))
        m = len(identity)
        shards.write_shard(uri, int(u), {
            "image": [pngs[k % len(pngs)] for k in range(m)], "identity": identity, "sample": sample,
            "kind": ["generated"] * m, "seed": np.array([sample_seed(cfg.seed, i, s) for i, s in zip(identity, sample)], np.int64),
            "height": np.full(m, 112, np.int32), "width": np.full(m, 112, np.int32),
            "quality": np.full(m, np.nan, np.float32), "identity_b": np.full(m, -1, np.int64),
            "mix_weight": np.ones(m, np.float32)}, meta)
    manifest = shards.write_manifest(uri, {"name": cfg.name})
    return {"seconds": time.perf_counter() - t0, "units": len(pending), "rows": manifest["rows"]}


def timed(fn, *a, **kw) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


def folder_bytes(uri: str) -> int:
    return sum(p.stat().st_size for p in Path(uri).glob("*.parquet"))


def main() -> None:
    p = parser(__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--real", action="store_true", help="make the finished job through Ray Data first")
    g.add_argument("--dataset", default=None, help="time the re-run of this finished job (its _config.yaml is used)")
    p.add_argument("--keep", action="store_true", help="keep the job written here")
    args = p.parse_args()
    setup(args)
    info = machine()
    root = workdir(args, "resume")
    from synray.config import load_config
    from synray.config.synth import SynthConfig
    from synray.io import shards
    from synray.synthesis.pipeline import prepare_output, run_local, run_synthesis

    made: dict = {}
    if args.dataset:
        uri = args.dataset
        cfg = load_config(str(Path(uri) / "_config.yaml"), SynthConfig, ["tracking.enabled=false", "ray.quiet=true"])
    else:
        ids = 500 if args.quick else 5000
        uri = str(root / f"job{ids * IMAGES_PER_IDENTITY}")
        if Path(uri).exists():
            shutil.rmtree(uri)
        cfg = job_config(uri, ids)
    results: dict = {"uri": uri, "how_made": "existing" if args.dataset else ("ray" if args.real else "laid down")}
    start_ray()
    try:
        if not args.dataset:
            if args.real:
                log(f"making the job through Ray Data: {cfg.identities.count * IMAGES_PER_IDENTITY:,} images")
                secs, s = timed(run_synthesis, cfg, progress=False)
                made = {"seconds": secs, "units": s["units_written"], "rows": s["images_written"]}
            else:
                log(f"laying down {cfg.identities.count * IMAGES_PER_IDENTITY:,} images of shards")
                made = lay_down(cfg)
            log(f"  {made['units']} units, {made['rows']:,} rows in {made['seconds']:.1f} s")
        results["made"] = made
        manifest = shards.read_manifest(uri)
        results["job"] = {"rows": manifest["rows"], "shards": manifest["shards"], "bytes": folder_bytes(uri)}
        rows = []
        for k in (1, 2):
            log(f"re-run {k}: run_synthesis (Ray), run_local, skip check, manifest")
            t_ray, s_ray = timed(run_synthesis, cfg, progress=False)
            t_local, s_local = timed(run_local, cfg)
            t_skip, (_, pending, units, _) = timed(prepare_output, cfg)
            t_manifest, _ = timed(shards.write_manifest, uri, {"name": cfg.name})
            assert s_ray["images_written"] == 0 and s_local["images_written"] == 0 and not pending, "a finished job wrote"
            rec = {"re-run": k, "run_synthesis s": t_ray, "run_local s": t_local, "skip check s": t_skip,
                   "manifest s": t_manifest, "units skipped": s_ray["units_skipped"],
                   "ms per unit (run_synthesis)": 1000 * t_ray / max(s_ray["units_skipped"], 1)}
            rows.append(rec)
        results["reruns"] = rows
        # resume after losing 2% of the shards
        done = shards.list_shards(uri)
        lost = sorted(done)[:: max(1, len(done) // max(1, round(0.02 * len(done))))][: max(1, round(0.02 * len(done)))]
        backup = root / "lost"
        backup.mkdir(exist_ok=True)
        for u in lost:
            shutil.move(done[u].replace("file://", ""), backup / Path(done[u]).name)
        log(f"resume after losing {len(lost)} of {len(done)} shards")
        t_resume, s_resume = timed(run_synthesis, cfg, progress=False)
        assert s_resume["units_written"] == len(lost), (s_resume["units_written"], len(lost))
        # the same units in a plain loop: what the lost work costs without the resume machinery
        from synray.synthesis.pipeline import _cfg_dict, unit_rows
        from synray.synthesis.stages import AlignStage, FinishStage, GenerateStage
        d = _cfg_dict(cfg)
        stages = [GenerateStage(d), AlignStage(d), FinishStage(d)]
        t0 = time.perf_counter()
        for row in unit_rows(cfg, lost):
            b = {k: np.asarray(v)[None] for k, v in row.items()}
            for st in stages:
                b = st(b)
        t_work = time.perf_counter() - t0
        shutil.rmtree(backup, ignore_errors=True)
        results["partial"] = {"lost_units": len(lost), "resume_seconds": t_resume, "plain_loop_work_seconds": t_work,
                              "images_written": s_resume["images_written"], "overhead_seconds": t_resume - t_work}
    finally:
        stop_ray()
    if not args.dataset and not args.keep:
        shutil.rmtree(uri, ignore_errors=True)
    job = results["job"]
    pr = results["partial"]
    ptable = [{"lost units": pr["lost_units"], "images re-made": pr["images_written"], "resume run s": pr["resume_seconds"],
               "same units, plain loop (no encode/write) s": pr["plain_loop_work_seconds"], "overhead s": pr["overhead_seconds"]}]
    notes = [f"job: {job['rows']:,} images in {job['shards']} shards ({job['bytes'] / 2**30:.2f} GiB), made by: {results['how_made']}",
             "run_synthesis time excludes ray.init (Ray already running, as under `ray job submit`)"]
    finish("resume" if not args.dataset else "resume_existing", args, info, results, [table(rows), table(ptable)], notes)


if __name__ == "__main__":
    main()
