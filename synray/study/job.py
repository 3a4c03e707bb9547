"""The ``synray study`` job: every seed method's recipe on the built-in world, the table, the claims.

world real split (the quickstart's stage) -> the study's world assets (shipped, or ``--rebuild-assets``) ->
one row per recipe (:mod:`synray.study.rows`: ``synth`` -> ``train``, ``distill``, each through
:func:`synray.jobs.run_job`), each an MLflow child run with its dataset figures and sample grid -> the table
and the claims (:mod:`synray.study.claims`) printed, in ``results.json`` and on the parent run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from synray.config.study import StudyConfig
from synray.jobs import JobContext, Need, Outcome
from synray.redact import redact_text

__all__ = ["TINY", "needs", "run"]

#: ``--tiny``: CI size (shipped assets, 2 idle cores, an empty directory: 534-554 s on 2026-12-02; the aim is 6
#: minutes)
TINY = ["world.train_identities=24", "world.images_per_identity=6", "world.verification_pairs=300",
        "student_epochs=8", "tiny=true",
        "quickstart={config: conf/quickstart.yaml, overrides: [world.train_identities=48, world.images_per_identity=16,"
        " world.verification_pairs=300, teacher_epochs=16, ldm_steps=100, vq_fit_steps=60]}",
        "build.ldm_steps=40", "build.nuisance_identities=40", "build.nuisance_images=6", "build.nuisance_steps=200",
        "build.cfsm_steps=60"]


def needs(cfg: StudyConfig) -> list[Need]:
    return []  # every row's jobs check their own needs when they start


def _log(ctx: JobContext):
    return (lambda message: None) if ctx.quiet else (lambda message: print(message, flush=True))


def run(cfg: StudyConfig, ctx: JobContext) -> Outcome:
    from synray.quickstart import make_real_split, packaged_assets, untrained_student
    from synray.study.assets import has_study_assets, load_study_assets
    from synray.study.build import build_study_assets
    from synray.study.claims import evaluate_all
    from synray.study.rows import RowResult, StudyRun, expand_rows
    from synray.study.table import format_claims, format_table
    from synray.tracking import child_run, mlflow_ui_hint

    t0 = time.perf_counter()
    log = _log(ctx)
    tracker = ctx.tracker
    os.makedirs(cfg.output, exist_ok=True)
    tracking = [f"tracking.enabled={str(cfg.tracking.enabled).lower()}", f"tracking.experiment={cfg.tracking.experiment}",
                *([f"tracking.uri={tracker.uri}"] if tracker.uri else []), f"ray.quiet={str(ctx.quiet).lower()}"]
    folder = cfg.assets or packaged_assets()
    hint = mlflow_ui_hint(tracker.uri or "(tracking disabled)")
    if cfg.rebuild_assets or cfg.assets_only or not has_study_assets(folder):
        if not (cfg.rebuild_assets or cfg.assets_only) and not cfg.assets:
            folder = os.path.join(cfg.output, "assets")  # an install without them: build once, reuse
        if cfg.rebuild_assets or cfg.assets_only or not has_study_assets(folder):
            meta = build_study_assets(cfg, folder, tracking, log)
            tracker.log_text(json.dumps(meta, indent=2, default=str), "study_assets.json")
            if cfg.assets_only:
                text = _assets_summary(folder, meta)
                return Outcome("study", folder, {"seconds": time.perf_counter() - t0},
                               table=f"{text}\n\ntook {time.perf_counter() - t0:.0f} s\n{hint}", extra={"meta": meta})
    assets = load_study_assets(folder)
    real_uri, bins, _ = make_real_split(cfg, tracking)
    study = StudyRun(cfg, assets, real_uri, bins, tracking)
    rows = expand_rows(cfg)
    for name, row in rows.items():
        log(f"[synray study] row {name}: {row.label}")
        with child_run(tracker, name, {"synray.row.kind": row.kind}) as rt:
            res = study.make(name, row)
            rt.log_params({"label": row.label, "kind": row.kind, "ldm": row.ldm or "", "config": row.config or ""})
            rt.log_metrics({f"figures/{k}": v for k, v in res.figures.items()})
            rt.log_metrics({f"{k}/accuracy": v["accuracy"] for k, v in (res.verification or {}).items()})
            rt.log_metrics({"seconds": res.seconds, **({"images_per_second": res.images_per_second}
                                                       if res.images_per_second else {})})
            if res.grid is not None:
                _log_grid(rt, res.grid, f"{name}_samples.png")
    made = study.data
    claims = evaluate_all(cfg.claims, made)
    # the floor every student row must clear: the student's architecture at its random initialisation
    untrained = untrained_student(cfg.student, bins)
    floor = RowResult("untrained", "untrained (random init)", "untrained", verification=untrained)
    table = format_table({"untrained": floor, **made})
    claim_text = format_claims(claims)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "rows": {k: r.to_dict() for k, r in made.items()}, "claims": {k: c.to_dict() for k, c in claims.items()},
        "untrained": untrained,
        "world": cfg.world.model_dump(), "identities": cfg.synth_identities, "images_per_identity": cfg.synth_images,
        "student_epochs": cfg.student_epochs, "tiny": cfg.tiny, "assets": folder, "seconds": seconds,
        "table": table, "claims_text": claim_text, "mlflow": redact_text(tracker.uri or ""),
    }
    tracker.log_text(f"{table}\n\n{claim_text}\n", "results.txt")
    tracker.log_metrics({f"untrained/{k}/accuracy": v["accuracy"] for k, v in untrained.items()})
    tracker.log_metrics({"seconds": seconds, **{f"claims/{k}": float(c.holds) for k, c in claims.items()
                                                 if c.holds is not None}})
    path = os.path.join(cfg.output, "results.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)
    tracker.log_artifact(path)
    text = f"{table}\n\n{claim_text}\n\ntook {seconds:.0f} s; results in {path}\n{hint}"
    return Outcome("study", cfg.output, {"seconds": seconds}, table=text, extra={"results": path})


def _log_grid(tracker: Any, grid, name: str) -> None:
    if tracker.run is None:
        return
    from synray.io.images import encode_image

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, name)
        with open(p, "wb") as fh:
            fh.write(encode_image(grid, ".png"))
        tracker.log_artifact(p)


def _assets_summary(folder: str, meta: dict[str, Any]) -> str:
    from synray.quickstart import assets_summary, load_assets

    lines = []
    if meta.get("built_quickstart_assets"):  # an empty folder: the quickstart's build ran first, in this job
        lines += [assets_summary(folder, load_assets(folder)["meta"]), ""]
    lines.append(f"study assets in {folder}:")
    for name, m in meta.get("ldms", {}).items():
        lines.append(f"  LDM {name:<8} loss {m['metrics'].get('loss', float('nan')):.4f} at step {m['metrics'].get('step')}")
    r2 = meta.get("nuisance", {}).get("heldout_r2", {})
    if r2:
        lines.append("  nuisance regressor held-out R^2: " + ", ".join(f"{k} {v:.2f}" for k, v in r2.items()))
    if "cfsm" in meta:
        losses = meta["cfsm"]["losses"]
        shown = [f"{k} {v:.4f}" + (f" (from {losses['first/' + k]:.4f})" if "first/" + k in losses else "")
                 for k, v in sorted(losses.items()) if not k.startswith("first/")]
        lines.append("  CFSM fit, mean of the last quarter of steps (of the first): " + ", ".join(shown))
    if meta.get("phase_seconds"):
        lines.append("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["phase_seconds"].items()))
    return "\n".join(lines)
