"""``synray study --rebuild-assets``: the study's extra world assets, made beside the quickstart's.

If the asset folder lacks the quickstart's teacher and LDM, the quickstart's own build runs first (a nested
``quickstart`` job with ``--assets-only``, on the study's world split). Then, on the real split of the assets'
world: the CPD 0 and UIFace LDMs (``synray train-ldm`` with the quickstart's LDM recipe plus one override
each; the second trains on the first's latents, `data.latents`), the nuisance regressor, the CFSM synthesis
model and the teacher's identity centroids of that split.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from synray.config.study import StudyConfig
from synray.jobs import load_job, run_job
from synray.quickstart import has_assets, load_assets, make_real_split, train_ldm
from synray.study.assets import EXTRA_LDMS, copy_ldm, write_study_meta

__all__ = ["quickstart_config", "build_study_assets"]


def quickstart_config(cfg: StudyConfig, folder: str, tracking: list[str], world: dict[str, Any] | None = None):
    """The quickstart job that builds the base assets (its own world split), or, with ``world`` (the split the
    assets were trained on), whose recipe and real split the extra assets are made with."""
    pinned = [] if world is None else [
        f"world.{k}={'null' if world.get(k) is None else world[k]}"
        for k in ("seed", "difficulty", "train_identities", "images_per_identity", "verification_pairs")]
    if world is not None and cfg.build.ldm_steps is not None:
        pinned.append(f"ldm_steps={cfg.build.ldm_steps}")
    return load_job(cfg.quickstart.config, [
        *cfg.quickstart.overrides, *pinned, f"output={os.path.join(cfg.output, 'assets-build')}", f"assets={folder}",
        "assets_only=true", "rebuild_assets=true", *tracking], kind="quickstart")


def build_study_assets(cfg: StudyConfig, folder: str, tracking: list[str], log=print) -> dict[str, Any]:
    """Build what :func:`synray.study.assets.load_study_assets` reads into ``folder``; returns ``study.json``."""
    from synray.study.cfsm_world import WORLD_GENERATOR, fit_cfsm, save_cfsm
    from synray.study.measure import read_images
    from synray.study.nuisance import FACTORS, fit_regressor, r2_scores, render_set
    from synray.synthesis.embedders import Embedder

    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    built: dict[str, str] = {}  # where the quickstart build run here left its teacher and encoding
    if not has_assets(folder):
        log(f"[synray study] no quickstart assets in {folder}: building them first (synray quickstart --assets-only)")
        built = run_job(quickstart_config(cfg, folder, tracking)).extra["meta"]["work"]
    base = load_assets(folder)
    world = base["meta"]["world"]
    qs = quickstart_config(cfg, folder, tracking, world)  # the extras learn the split the teacher and LDM did
    real_uri, _, _ = make_real_split(qs, tracking)
    teacher = base["teacher"]
    b = cfg.build
    meta: dict[str, Any] = {"made_by": "synray study --rebuild-assets", "world": world, "ldms": {},
                            "built_quickstart_assets": bool(built)}
    work = os.path.join(cfg.output, "assets-build")
    phases = meta["phase_seconds"] = {}
    # one encoding serves every LDM (same images, contexts and first stage): the quickstart build's when it ran in
    # this job (its teacher path is the contexts' embedder the encoding was checked against), else the first's
    latents = [f"data.latents={built['ldm_latents']}"] if built else []
    embedder = built.get("teacher", teacher)
    for name, extra in EXTRA_LDMS.items():
        log(f"[synray study] LDM {name}: synray train-ldm with {extra}")
        t = time.perf_counter()
        out = train_ldm(qs, real_uri, embedder, work, tracking, name=f"ldm_{name}", extra=[*extra, *latents])
        latents = latents or [f"data.latents={out.extra['latents']['uri']}"]
        gen = copy_ldm(out.extra["generator"], folder, name)
        meta["ldms"][name] = {**gen, "overrides": extra, "metrics": out.metrics}
        phases[f"ldm_{name}"] = time.perf_counter() - t

    log("[synray study] nuisance regressor on world renders")
    t = time.perf_counter()
    seed = int(world["seed"])
    lo, hi = b.nuisance_difficulty
    train_ids = range(b.nuisance_identities)
    held = range(10_000, 10_000 + max(8, b.nuisance_identities // 4))  # identities the fit never sees
    x, y = render_set(seed, train_ids, b.nuisance_images, (lo, hi))
    xh, yh = render_set(seed, held, b.nuisance_images, (lo, hi))
    reg = fit_regressor(x, y, steps=b.nuisance_steps, seed=seed)
    r2 = r2_scores(reg.predict(xh), yh)
    reg.meta.update(heldout_r2=dict(zip(FACTORS, map(float, r2))), difficulty=[lo, hi], world_seed=seed)
    reg.save(os.path.join(folder, "nuisance.pt"))
    meta["nuisance"] = reg.meta
    phases["nuisance"] = time.perf_counter() - t

    log("[synray study] CFSM synthesis model: source = the real split, target = world-hard renders")
    t = time.perf_counter()
    images, ids, samples = read_images(real_uri, kinds=("real",))
    embedder = Embedder(teacher, flip=False)
    target, _ = render_set(seed, range(int(ids.max()) + 1), b.cfsm_target_images, (1.6, 1.6), sample_offset=500_000)
    small = np.stack([_resize(im, 32) for im in images])
    G, losses = fit_cfsm(small, target, _TeacherOnUnit(embedder.model), steps=b.cfsm_steps, seed=seed,
                         log_every=max(1, b.cfsm_steps // 10), log=log)
    save_cfsm(G, os.path.join(folder, "cfsm.pt"), {"steps": b.cfsm_steps, "losses": losses})
    meta["cfsm"] = {"generator": WORLD_GENERATOR, "steps": b.cfsm_steps, "losses": losses,
                    "source": "real split (difficulty x1)", "target": "world-hard renders (difficulty x1.6)"}
    phases["cfsm"] = time.perf_counter() - t

    log("[synray study] identity centroids of the LDMs' training split")
    from synray.evaluation.identity_stats import centres

    _, cent = centres(embedder.embed(images), ids)
    np.save(os.path.join(folder, "training_centroids.npy"), cent.astype(np.float32))
    meta["seconds"] = time.perf_counter() - t0
    write_study_meta(folder, meta)
    return meta


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return img if img.shape[0] == size else cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


class _TeacherOnUnit:
    """The teacher on [-1, 1] image batches (CFSM's normalisation), differentiable in the input."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    def eval(self):
        return self

    def requires_grad_(self, flag: bool = True):
        return self

    def __call__(self, x):
        from synray.distill.teachers import model_input, raw_embedding

        return raw_embedding(self.model(model_input(self.model, (x + 1) / 2)))
