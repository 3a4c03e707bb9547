"""SynthDistill: the plain-torch :class:`Distiller`, its loop and the ``distill`` job on the shared runner.

Each iteration makes two optimiser steps (SynthDistill ``train.py``):

1. fresh ``z ~ N(0, I)`` -> ``w = map(z)`` -> images -> face crops; the frozen teacher embeds them, the
   student is trained with MSE on the raw embeddings;
2. resampling: ``w' = w + resampling_coef * (cos(e_s, e_t) + 1) / 2 * n`` with the student embeddings
   of step 1 taken *before* its update (:func:`synray.distill.resample.resample_latents`), then a
   second step on images of ``w'``.

Randomness of iteration ``i`` derives from ``(seed, epoch, i)`` for the *global* batch, and rank ``r``
takes rows ``[r B/W, (r+1) B/W)``: the data the student sees does not depend on the number of
workers. Validation uses fixed latents drawn from ``(seed, "validation")`` so the reported cosine is
comparable across epochs; ``val/cos_initial`` is the untrained student's value and ``val/cos_constant`` what a
constant embedding (the teacher's mean direction on those images) reaches: a student that learnt only the mean.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synray.config.base import ConfigError
from synray.config.distill import DistillConfig
from synray.distill.generators import (
    GeneratorError,
    LatentGenerator,
    build_latent_generator,
    face_crops,
)
from synray.distill.resample import kd_loss, resample_latents
from synray.distill.teachers import Teacher, load_teacher
from synray.evaluation.evaluate import evaluate_bins, find_bins
from synray.evaluation.verification import accuracy_metrics
from synray.io import storage
from synray.jobs import JobContext, Need, Outcome
from synray.models.checkpoint import load_strict
from synray.models.export import save_backbone
from synray.models.inputs import model_input, raw_embedding
from synray.models.registry import build_backbone
from synray.seeds import derive
from synray.training.checkpointing import CheckpointReader
from synray.training.collective import all_reduce_sum
from synray.training.runner import Hooks, fit, guarded_settings

__all__ = ["Distiller", "distill_loop", "check", "needs", "run", "VALIDATION_STREAM", "RESUMABLE"]

#: settings a re-run may change and still continue the run
RESUMABLE = ("kind", "name", "epochs", "eval", "validation", "scaling", "checkpoint", "output", "tracking", "ray")

VALIDATION_STREAM = 0x7A11D  # keeps validation latents apart from every training draw
STUDENT_FILE, STATE_FILE, META_FILE = "student.pt", "trainer_state.pt", "meta.json"


def _gen(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive(*parts))


class Distiller:
    """Generator + teacher (both frozen) + student, optimiser and LR schedule of one worker."""

    def __init__(self, cfg: DistillConfig, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 wrap: Callable[[nn.Module], nn.Module] | None = None, generator: LatentGenerator | None = None,
                 teacher: Teacher | None = None) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.generator = generator or build_latent_generator(cfg.generator, self.device)
        self.teacher = teacher or load_teacher(cfg.teacher, self.device)
        torch.manual_seed(cfg.seed)  # the same student on every rank
        self.student_module = build_backbone(cfg.student.name, **cfg.student.kwargs).to(self.device)
        dim = int(getattr(self.student_module, "embedding_dim", 0))
        if dim != self.teacher.embedding_dim:
            raise ValueError(
                f"student {cfg.student.name} gives {dim}-d embeddings but teacher {cfg.teacher!r} gives "
                f"{self.teacher.embedding_dim}-d; set student.kwargs.embedding_dim: {self.teacher.embedding_dim}")
        self.student = wrap(self.student_module) if wrap is not None else self.student_module
        o = cfg.optimizer
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=o.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=o.step_epochs, gamma=o.gamma)
        self.crop = cfg.generator.crop if cfg.generator.crop != "auto" else self.generator.crop
        if cfg.batch_size % world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world_size} workers")
        self.local_batch = cfg.batch_size // world_size

    # -- data ----------------------------------------------------------------------------------
    def _slice(self, x: Tensor) -> Tensor:
        lo = self.rank * (x.shape[0] // self.world_size)
        return x[lo:lo + x.shape[0] // self.world_size]

    def latents(self, *key: int, batch: int | None = None) -> Tensor:
        """This rank's rows of the global batch of ``z`` drawn from ``(seed, *key)``."""
        batch = batch or self.cfg.batch_size
        z = torch.randn(batch, self.generator.z_dim, generator=_gen(self.cfg.seed, *key))
        return self._slice(z).to(self.device)

    def crops(self, w: Tensor, *key: int) -> Tensor:
        images = self.generator.synthesize(w, generator=_gen(self.cfg.seed, *key, self.rank))
        return face_crops(images.to(self.device), self.crop, self.cfg.crop_size)

    # -- optimisation --------------------------------------------------------------------------
    def embed_student(self, crops: Tensor, module: nn.Module | None = None) -> Tensor:
        m = module if module is not None else self.student
        return raw_embedding(m(model_input(self.student_module, crops))).float()

    def step(self, crops: Tensor) -> tuple[float, Tensor, Tensor]:
        """One optimiser step on a batch of crops; returns (loss, student embeddings before the step, teacher)."""
        e_t = self.teacher(crops).to(self.device)
        self.student.train()
        e_s = self.embed_student(crops)
        loss = kd_loss(e_s, e_t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), e_s.detach(), e_t

    def iteration(self, epoch: int, it: int) -> dict[str, float]:
        """The two-step SynthDistill iteration ``it`` of ``epoch``."""
        w = self.generator.map(self.latents(epoch, it, 0))
        loss1, e_s, e_t = self.step(self.crops(w, epoch, it, 1))
        out = {"loss": loss1, "cos": float(F.cosine_similarity(e_s, e_t).mean())}
        if self.cfg.resampling:
            noise = self._slice(torch.randn(self.cfg.batch_size, w.shape[2], generator=_gen(self.cfg.seed, epoch, it, 2)))
            w2 = resample_latents(w, e_s, e_t, self.cfg.resampling_coef, noise=noise.to(w))
            out["loss_resampled"], _, _ = self.step(self.crops(w2, epoch, it, 3))
        return out

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Sum of MSE and cosine over this rank's rows of the fixed validation batches, the row count, and the
        teacher embeddings (unit, summed) a constant student would aim at (the constant-embedding baseline)."""
        v = self.cfg.validation
        batch = v.batch_size or self.cfg.batch_size
        self.student.eval()
        mse = cos = 0.0
        rows = 0
        teacher = []
        for b in range(v.batches):
            w = self.generator.map(self.latents(VALIDATION_STREAM, b, batch=batch))
            crops = self.crops(w, VALIDATION_STREAM, b, 1)
            e_t = self.teacher(crops).to(self.device)
            e_s = self.embed_student(crops, self.student_module)
            mse += float(F.mse_loss(e_s, e_t, reduction="none").mean(1).sum())
            cos += float(F.cosine_similarity(e_s, e_t).sum())
            rows += e_s.shape[0]
            teacher.append(F.normalize(e_t.float(), dim=1))
        return {"mse_sum": mse, "cos_sum": cos, "rows": rows, "teacher": torch.cat(teacher)}

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: str, meta: dict[str, Any]) -> None:
        """Student (a self-describing synray checkpoint), optimiser + scheduler, progress."""
        save_backbone(os.path.join(directory, STUDENT_FILE), self.cfg.student.name, self.student_module,
                      self.cfg.student.kwargs, extra={"distilled_from": str(self.cfg.teacher)})
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(directory, STATE_FILE))
        with open(os.path.join(directory, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)

    def restore(self, reader: CheckpointReader) -> dict[str, Any]:
        blob = reader.load(STUDENT_FILE)
        load_strict(self.student_module, blob["state_dict"], what=f"checkpoint {reader.path}")
        state = reader.load(STATE_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return json.loads(reader.read_bytes(META_FILE))


# --------------------------------------------------------------------------------------------
# the loop (one process, every Ray Train rank, or a Tune trial)


def distill_loop(cfg: DistillConfig, hooks: Hooks) -> dict[str, Any]:
    """Run (or resume) the distillation; reports metrics and a checkpoint after every epoch."""
    d = Distiller(cfg, hooks.rank, hooks.world_size, hooks.device, hooks.wrap)
    epoch, step, cos_initial = 0, 0, None
    if hooks.restore is not None:
        meta = d.restore(hooks.restore)
        epoch, step, cos_initial = meta["epoch"], meta["step"], meta.get("val_cos_initial")
        hooks.log(f"[synray distill] resumed from epoch {epoch} (step {step})")
    resumed_from = epoch if hooks.restore is not None else -1

    def val() -> tuple[float, float, float]:
        """Mean MSE and cosine to the teacher, and the cosine the best constant embedding (the teacher's mean
        direction) reaches on the same images: a student that only learnt the mean scores that."""
        v = d.validate()
        mse, cos, rows = all_reduce_sum([v["mse_sum"], v["cos_sum"], v["rows"]], d.device, hooks.world_size)
        mean = torch.tensor(all_reduce_sum(v["teacher"].sum(0).double().tolist(), d.device, hooks.world_size))
        unit = F.normalize(mean, dim=0).to(v["teacher"])
        constant = all_reduce_sum([float((v["teacher"] @ unit).sum())], d.device, hooks.world_size)[0]
        return mse / rows, cos / rows, constant / rows

    if cos_initial is None:
        cos_initial = val()[1]
    metrics: dict[str, Any] = {}
    while epoch < cfg.epochs:
        t0 = time.time()
        sums = np.zeros(3)
        for it in range(cfg.iterations_per_epoch):
            r = d.iteration(epoch, it)
            if not math.isfinite(r["loss"]):
                raise FloatingPointError(f"distillation loss is {r['loss']} at epoch {epoch} iteration {it}; lower optimizer.lr")
            sums += (r["loss"], r.get("loss_resampled", 0.0), r["cos"])
            step += 2 if cfg.resampling else 1
            hooks.step_done(step)
            hooks.progress(epoch * cfg.iterations_per_epoch + it + 1, cfg.epochs * cfg.iterations_per_epoch,
                           epoch=f"{epoch + 1}/{cfg.epochs}", loss=r["loss"], cos=r["cos"])
        seconds = time.time() - t0
        lr = d.optimizer.param_groups[0]["lr"]
        d.scheduler.step()
        epoch += 1
        loss, loss2, cos = (np.asarray(all_reduce_sum(list(sums), d.device, hooks.world_size)) /
                            (cfg.iterations_per_epoch * hooks.world_size))
        val_mse, val_cos, val_constant = val()
        metrics = {
            "epoch": epoch, "step": step, "loss": float(loss), "loss_resampled": float(loss2), "train/cos": float(cos),
            "val/mse": val_mse, "val/cos": val_cos, "val/cos_initial": cos_initial, "val/cos_constant": val_constant,
            "lr": lr,
            "images_per_second": cfg.batch_size * (2 if cfg.resampling else 1) * cfg.iterations_per_epoch / max(seconds, 1e-9),
            "world_size": hooks.world_size, "resumed_from_epoch": resumed_from,
        }
        results, scores = None, {}
        if hooks.rank == 0 and cfg.eval.due(epoch, cfg.epochs):
            results = evaluate_bins(d.student_module, cfg.eval.bins, batch_size=cfg.eval.batch_size, flip=cfg.eval.flip,
                                    scores=scores)
            metrics.update(accuracy_metrics(results, "val/"))
        meta = {"epoch": epoch, "step": step, "val_cos_initial": cos_initial, "metrics": metrics}
        hooks.report_checkpoint(metrics, lambda folder: d.save(folder, meta), results, scores=scores)
    return metrics


# --------------------------------------------------------------------------------------------
# the job (driver)


def check(cfg: DistillConfig) -> None:
    """Before any Ray work: teacher/student dims, generator files, evaluation sets."""
    if cfg.generator.type in ("stylegan2", "ldm") and not os.path.exists(cfg.generator.path):
        raise GeneratorError(f"generator.path: file not found: {cfg.generator.path}")
    if cfg.generator.type == "ldm" and not os.path.exists(cfg.generator.vq_decoder):
        raise GeneratorError(f"generator.vq_decoder: file not found: {cfg.generator.vq_decoder}")
    if cfg.eval.bins:
        try:
            find_bins(cfg.eval.bins)
        except FileNotFoundError as exc:
            raise ConfigError(f"eval.bins: {exc}") from None
    teacher = load_teacher(cfg.teacher)
    student = build_backbone(cfg.student.name, **cfg.student.kwargs)
    dim = int(getattr(student, "embedding_dim", 0))
    if dim != teacher.embedding_dim:
        raise ConfigError(
            f"student.kwargs.embedding_dim: student {cfg.student.name} gives {dim}-d embeddings, teacher "
            f"{cfg.teacher!r} gives {teacher.embedding_dim}-d; set student.kwargs.embedding_dim: {teacher.embedding_dim}")


def needs(cfg: DistillConfig) -> list[Need]:
    return [Need.workers(cfg.scaling)]


def run(cfg: DistillConfig, ctx: JobContext) -> Outcome:
    """Distil as configured on Ray Train; re-running with the same ``output.uri`` and ``name`` resumes."""
    run_uri = storage.join(cfg.output.uri, cfg.name)
    result = fit(distill_loop, cfg, name=cfg.name, output_uri=cfg.output.uri, scaling=cfg.scaling,
                 checkpoint=cfg.checkpoint, callbacks=ctx.callbacks, tracker=ctx.tracker, job="distill",
                 quiet=ctx.quiet, settings=guarded_settings(cfg, RESUMABLE))
    outcome = Outcome("distill", run_uri, result.metrics, checkpoint_uri=result.checkpoint_uri)
    result.publish_evaluation(outcome, storage.join(run_uri, "final"), ctx.tracker, cfg.name)
    reader = result.checkpoint
    if reader is not None:
        outcome.model_uri = storage.join(run_uri, "final", STUDENT_FILE)
        storage.write_bytes_atomic(outcome.model_uri, reader.read_bytes(STUDENT_FILE))
    outcome.write_summary(storage.join(run_uri, "final", "summary.json"))
    return outcome
