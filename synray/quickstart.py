"""The papers' protocol on the built-in world, end to end on local Ray.

world "real" split -> (teacher FR, identity-conditioned LDM: shipped, or rebuilt with ``--rebuild-assets``)
-> contexts = teacher embeddings of novel identities' faces -> LDM synthesis through the Ray Data
pipeline -> student trained with Ray Train on the synthetic set, and the same student on the real split
as the baseline -> verification on held-out world identities.

Every stage is a normal synray job (``conf/`` file + overrides) run through :func:`synray.jobs.run_job`,
exactly as ``synray synth`` / ``synray train`` / ``synray train-ldm`` run it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from synray.config.quickstart import QuickstartConfig
from synray.evaluation.roc import load_scores
from synray.evaluation.roc_plots import log_artifacts, roc_artifacts
from synray.io import storage
from synray.jobs import JobContext, Need, Outcome, load_job, run_job
from synray.redact import redact_text
from synray.synthesis.embedders import embedding_dim
from synray.tracking import mlflow_ui_hint
from synray.world.world import DEFAULT_DIFFICULTY, World

ASSET_FILES = ("teacher.pt", "generator.json", "unet.ckpt", "vq_decoder.pt")
#: ``--tiny``: CI size (about 3.5 minutes on 2 cores with the shipped assets; a tiny ``--rebuild-assets`` adds 5)
TINY = ["world.train_identities=48", "world.images_per_identity=16", "world.verification_pairs=300",
        "synth_identities=48", "synth_images_per_identity=16", "teacher_epochs=16", "student_epochs=6",
        "ldm_steps=100", "vq_fit_steps=60", "distill.iterations_per_epoch=4", "distill.epochs=2", "distill.batch_size=16"]


def packaged_assets() -> str:
    return str(resources.files("synray") / "assets" / "world")


def _stage(stage, *overrides: str):
    return load_job(stage.config, [*stage.overrides, *overrides])


def _difficulty(value: float | None) -> float:
    return DEFAULT_DIFFICULTY if value is None else value


def world_difficulty(cfg: QuickstartConfig) -> float:
    return _difficulty(cfg.world.difficulty)


def write_world_bins(world: dict[str, Any], out: str) -> dict[str, Any]:
    """The held-out verification ``.bin`` sets of a ``world:`` block (as recorded in ``generator.json`` too)."""
    w = World(seed=world["seed"], num_identities=world["train_identities"], difficulty=_difficulty(world.get("difficulty")))
    return w.write_verification_bins(out, num_pairs=world["verification_pairs"], seed=world["seed"])


def make_real_split(cfg: QuickstartConfig, tracking: list[str]) -> tuple[str, str, dict]:
    """World "real" data: training shards (kind=real) and held-out verification ``.bin`` sets."""
    w = cfg.world
    bins = os.path.join(cfg.output, "bins")
    if not os.path.exists(os.path.join(bins, ".done")):
        write_world_bins(w.model_dump(), bins)
        open(os.path.join(bins, ".done"), "w").close()
    real_uri = os.path.join(cfg.output, "real")
    real = _stage(cfg.real, f"output.uri={real_uri}", f"seed={w.seed}", "generator.type=world",
                  f"generator.world_difficulty={world_difficulty(cfg)}", f"identities.count={w.train_identities}",
                  f"identities.unit_size={min(64, w.train_identities)}", f"generator.images_per_identity={w.images_per_identity}",
                  "alignment.mode=none", "label_kind=real", "contexts.source=gaussian", "augment.context_repeats=0",
                  "quality.embedder=null", *tracking)
    return real_uri, bins, run_job(real).metrics


def train_student(cfg: QuickstartConfig, name: str, data: str, bins: str, tracking: list[str],
                  extra: Sequence[str] = ()) -> Outcome:
    """``synray train`` of the student recipe on ``data`` (``extra``: further overrides, e.g. a mixup); also the study's."""
    job = _stage(cfg.student, f"name={name}", f"epochs={cfg.student_epochs}", f"data.train={data}", f"eval.bins=[{bins}]",
                 f"output.uri={os.path.join(cfg.output, 'students')}", *extra, *tracking)
    return run_job(job)


def untrained_student(student: Any, bins: str) -> dict[str, dict[str, float]]:
    """The student recipe's backbone at its random initialisation (the recipe's seed) on ``bins``: the floor a
    trained student must clear. On the world, random convolutional features already match a frontal face to its
    identity by its pixels (about 84% on world-frontal), far above chance (50%). ``student``: a stage config."""
    import torch

    from synray.evaluation.evaluate import evaluate_bins
    from synray.models.registry import build_backbone

    job = _stage(student, "data.train=unused")
    torch.manual_seed(job.seed)
    model = build_backbone(job.backbone.name, **job.backbone.kwargs).eval()
    return evaluate_bins(model, bins)  # at the backbone's input size


def train_ldm(cfg: QuickstartConfig, real_uri: str, teacher: str, work: str, tracking: list[str], name: str = "ldm",
              extra: Sequence[str] = ()) -> Outcome:
    """``synray train-ldm`` of the world LDM recipe on the real split, contexts = ``teacher``'s embeddings
    (``extra``: further overrides; the study trains its CPD 0 and UIFace LDMs this way)."""
    return run_job(_stage(cfg.ldm, f"name={name}", f"training.steps={cfg.ldm_steps}",
                          f"training.checkpoint_every={max(1, cfg.ldm_steps // 2)}",
                          f"vq.fit.steps={cfg.vq_fit_steps}", "data.source=shards", f"data.path={real_uri}",
                          "contexts.source=embedder", f"contexts.embedder={teacher}", f"output.uri={work}",
                          *extra, *tracking))


def teacher_schedule(cfg: QuickstartConfig) -> list[str]:
    """The teacher's learning rate drops once, after half its epochs, as the shipped build's does (8 epochs, drop
    after 4) at any ``teacher_epochs``: with the recipe's fixed drop after epoch 4, the tiny build's 16 epochs spent
    three quarters at the low rate and its teacher cleared pixel matching by +1.2 to +8.8 points on the average
    (9 builds), against +7.5 to +9.8 with the drop at half (5 builds). The teacher stage's own overrides come
    after, so a recipe that sets ``schedule.milestones`` keeps them."""
    return [f"schedule.milestones=[{max(1, cfg.teacher_epochs // 2)}]"]


def build_assets(cfg: QuickstartConfig, real_uri: str, bins: str, dest: str, tracking: list[str]) -> dict[str, Any]:
    """Train the world teacher (``synray train``) and the LDM (``synray train-ldm``) and copy them to ``dest``."""
    work = os.path.join(cfg.output, "assets-build")
    teacher = run_job(load_job(cfg.teacher.config, [*teacher_schedule(cfg), *cfg.teacher.overrides, "name=teacher",
                                                    f"epochs={cfg.teacher_epochs}", f"data.train={real_uri}",
                                                    f"eval.bins=[{bins}]", f"output.uri={work}", *tracking]))
    teacher_path = teacher.model_uri
    ldm = train_ldm(cfg, real_uri, teacher_path, work, tracking)
    os.makedirs(dest, exist_ok=True)
    gen = dict(ldm.extra["generator"])
    shutil.copyfile(teacher_path, os.path.join(dest, "teacher.pt"))
    for key, name in (("unet", "unet.ckpt"), ("vq_decoder", "vq_decoder.pt")):
        with open(os.path.join(dest, name), "wb") as fh:
            fh.write(storage.read_bytes(gen[key]))
        gen[key] = name

    meta = {"generator": gen, "teacher": "teacher.pt", "context_dim": embedding_dim(teacher_path),
            "teacher_verification": teacher.verification, "ldm_metrics": ldm.metrics,
            "made_by": "synray quickstart --rebuild-assets", "world": cfg.world.model_dump()}
    with open(os.path.join(dest, "generator.json"), "w") as fh:
        json.dump(meta, fh, indent=2, default=str)
    # where the build's own teacher and LDM encoding lie (not recorded: the study's extra LDMs reuse the encoding)
    return {**meta, "work": {"teacher": teacher_path, "ldm_latents": ldm.extra["latents"]["uri"]}}


def has_assets(folder: str) -> bool:
    return all(os.path.exists(os.path.join(folder, f)) for f in ASSET_FILES)


def load_assets(folder: str) -> dict[str, Any]:
    missing = [f for f in ASSET_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"quickstart assets missing in {folder}: {missing}; run `synray quickstart --rebuild-assets`")
    with open(os.path.join(folder, "generator.json")) as fh:
        meta = json.load(fh)
    gen = dict(meta["generator"])
    for key in ("unet", "vq_decoder"):
        gen[key] = os.path.join(folder, gen[key])
    teacher = os.path.join(folder, meta["teacher"])
    if "context_dim" not in meta:
        meta["context_dim"] = embedding_dim(teacher)
    return {"generator": gen, "teacher": teacher, "meta": meta}


def synthesize(cfg: QuickstartConfig, assets: dict[str, Any], tracking: list[str]) -> tuple[str, dict]:
    """ADMIS-style context-enhanced synthesis with the world LDM for identities no model has seen."""
    gen = assets["generator"]
    start = ((cfg.world.train_identities + 63) // 64) * 64  # novel identities, unit-aligned
    uri = os.path.join(cfg.output, "synthetic")
    job = _stage(cfg.synth, f"output.uri={uri}", f"seed={cfg.world.seed}", f"identities.start={start}",
                 f"identities.count={cfg.synth_identities}", "identities.unit_size=64",
                 f"generator.images_per_identity={cfg.synth_images_per_identity}", "generator.type=ldm",
                 f"generator.unet={gen['unet']}", f"generator.vq_decoder={gen['vq_decoder']}",
                 f"generator.vq_config={json.dumps(gen['vq_config'])}", f"generator.latent_shape={json.dumps(gen['latent_shape'])}",
                 "generator.num_gpus=0", "generator.batch_size=64", f"generator.world_difficulty={world_difficulty(cfg)}",
                 "contexts.source=face_embeddings", "contexts.path=null", f"contexts.embedder={assets['teacher']}",
                 f"contexts.dim={assets['meta']['context_dim']}",
                 f"quality.embedder={assets['teacher']}", "augment.context_repeats=0",
                 "alignment.mode=none",  # the world LDM decodes aligned faces; the student resizes
                 *tracking)
    return uri, run_job(job).metrics


def results_table(rows: list[tuple[str, dict | None]], synth_summary: dict) -> str:
    """``rows``: (label, verification dict) per student; one column per verification set."""
    sets = [k for k in (rows[0][1] or {}) if k != "average"]
    head = f"{'training data':<26}" + "".join(f"{s:>16}" for s in sets) + f"{'average':>10}"
    lines = [head, "-" * len(head)]
    for label, v in rows:
        v = v or {}
        lines.append(f"{label:<26}" + "".join(f"{100 * v[s]['accuracy']:>15.2f}%" if v.get(s) else f"{'n/a':>16}" for s in sets)
                     + (f"{100 * v['average']['accuracy']:>9.2f}%" if "average" in v else f"{'n/a':>10}"))
    lines.append("")
    lines.append(f"synthetic images generated: {synth_summary['images_written']}  "
                 f"({synth_summary['images_per_second']:.1f} images/s end to end)")
    return "\n".join(lines)


def distill_real_assets(cfg: QuickstartConfig, bins: str, tracking: list[str]) -> Outcome:
    """SynthDistill with real offline assets: the DigiFace DCGAN in the loop, dlib's ResNet as the teacher."""
    d = cfg.distill
    job = load_job(d.config, [
        f"output.uri={os.path.join(cfg.output, 'distill')}", f"eval.bins=[{bins}]",
        f"iterations_per_epoch={d.iterations_per_epoch}", f"epochs={d.epochs}", f"batch_size={d.batch_size}", *tracking])
    return run_job(job)


def assets_summary(folder: str, meta: dict[str, Any]) -> str:
    """What a build of the world assets reached, for the console."""
    lines = [f"world assets in {folder}:"]
    for name, v in (meta.get("teacher_verification") or {}).items():
        lines.append(f"  teacher {name:<16} {100 * v['accuracy']:6.2f}%")
    if "loss" in (meta.get("ldm_metrics") or {}):
        lines.append(f"  LDM {'loss':<20} {meta['ldm_metrics']['loss']:.4f}")
    return "\n".join(lines)


def needs(cfg: QuickstartConfig) -> list[Need]:
    return []  # every stage checks its own needs when it starts


def run(cfg: QuickstartConfig, ctx: JobContext) -> Outcome:
    """The whole protocol; ``assets_only`` stops after (re)building the teacher and LDM."""
    t0 = time.perf_counter()
    tracker = ctx.tracker
    os.makedirs(cfg.output, exist_ok=True)
    uri = tracker.uri or "(tracking disabled)"
    tracking = [f"tracking.enabled={str(cfg.tracking.enabled).lower()}", f"tracking.experiment={cfg.tracking.experiment}",
                *([f"tracking.uri={tracker.uri}"] if tracker.uri else []), f"ray.quiet={str(ctx.quiet).lower()}"]
    real_uri, bins, _ = make_real_split(cfg, tracking)
    folder = cfg.assets or packaged_assets()
    rebuild = cfg.rebuild_assets
    if not rebuild and not cfg.assets and not has_assets(folder):
        # no shipped checkpoints in this install: build them once into the output folder and reuse them
        folder = os.path.join(cfg.output, "assets")
        rebuild = not has_assets(folder)
    hint = mlflow_ui_hint(uri)
    if rebuild or cfg.assets_only:
        meta = build_assets(cfg, real_uri, bins, folder, tracking)
        if cfg.assets_only:
            table = assets_summary(folder, meta)
            tracker.log_text(table, "assets.txt")
            return Outcome("quickstart", folder, {"seconds": time.perf_counter() - t0},
                           table=f"{table}\n\ntook {time.perf_counter() - t0:.0f} s; assets in {folder}\n{hint}",
                           extra={"assets": folder, "meta": meta})
    assets = load_assets(folder)
    synth_uri, synth_summary = synthesize(cfg, assets, tracking)
    synthetic = train_student(cfg, "student_synthetic", synth_uri, bins, tracking)
    real = train_student(cfg, "student_real", real_uri, bins, tracking)
    untrained = untrained_student(cfg.student, bins)
    rows = [("untrained (random init)", untrained), ("real (baseline)", real.verification),
            ("synthetic (LDM)", synthetic.verification)]
    result: dict[str, Any] = {
        "untrained": untrained, "real": real.verification, "synthetic": synthetic.verification,
        "images_generated": synth_summary["images_written"], "images_per_second": synth_summary["images_per_second"],
        "mlflow": redact_text(uri),  # results.json leaves the process: no credentials
    }
    if cfg.distill.enabled:
        distilled = distill_real_assets(cfg, bins, tracking)
        rows.append(("distilled (DCGAN + dlib)", distilled.verification))
        result["distill"] = {"verification": distilled.verification, "metrics": distilled.metrics,
                             "student": distilled.model_uri}
    table = results_table(rows, synth_summary)
    result["table"] = table
    result["seconds"] = time.perf_counter() - t0
    tracker.log_text(table, "results.txt")
    for label, v in (("untrained", untrained), ("real", real.verification), ("synthetic", synthetic.verification),
                     ("distilled", (result.get("distill") or {}).get("verification"))):
        tracker.log_metrics({f"{label}/{k}": x["accuracy"] for k, x in (v or {}).items()})
    tracker.log_metrics({"images_generated": result["images_generated"], "images_per_second": result["images_per_second"],
                         "seconds": result["seconds"]})
    grid = os.path.join(synth_uri, "_samples.png")
    if os.path.exists(grid):
        tracker.log_artifact(grid)
    ran = [("real (baseline)", real), ("synthetic (LDM)", synthetic)]
    ran += [("distilled (DCGAN + dlib)", distilled)] if cfg.distill.enabled else []
    students = {label: load_scores(storage.read_bytes(o.extra["verification_scores"])) for label, o in ran
                if o.extra.get("verification_scores")}
    if students:  # both students on the same axes, per verification set
        log_artifacts(tracker, roc_artifacts(students), "roc")
    results_path = os.path.join(cfg.output, "results.json")
    with open(results_path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    text = f"{table}\n\ntook {result['seconds']:.0f} s; results in {results_path}\n{hint}"
    return Outcome("quickstart", cfg.output, {"seconds": result["seconds"]}, table=text, extra={"results": results_path})
