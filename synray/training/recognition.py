"""Face-recognition training on Ray Train: shards -> Ray Data -> DDP backbone + sharded margin head.

The pieces, top to bottom:

* :func:`plan_training` (driver, no Ray): reads the shard footers, fixes the class space (synthetic
  identities, then the real-labelled ones of domain mixup) and the image size.
* :func:`train_loop` (one process, or every Ray Train rank through :mod:`synray.training.runner`):
  builds a :class:`~synray.training.learner.Learner`, restores the last checkpoint, iterates this
  rank's Ray Data shard, evaluates on rank 0 and reports metrics plus a checkpoint every epoch (and
  every ``checkpoint.every_steps`` steps).
* :func:`run` (the ``train`` job): Ray Data pipelines into the shared runner (whose run name makes a
  re-run resume), the final backbone and verification table.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from synray.config.base import config_hash
from synray.config.train import TrainConfig
from synray.evaluation.evaluate import evaluate_bins
from synray.evaluation.verification import accuracy_metrics
from synray.io import storage
from synray.jobs import JobContext, Need, Outcome
from synray.models.checkpoint import load_strict
from synray.models.export import save_backbone
from synray.models.inputs import input_size
from synray.models.registry import build_backbone
from synray.seeds import derive
from synray.training.checkpointing import TrainingMeta
from synray.training.collective import all_reduce_sum, synced_next
from synray.training.data import (
    CACHE_LIMIT_BYTES,
    DataError,
    DatasetInfo,
    build_dataset,
    dataset_info,
    decoded_bytes,
)
from synray.training.learner import EpochStats, Learner, TrainPlan
from synray.training.runner import Hooks, fit, guarded_settings

__all__ = ["plan_training", "train_loop", "build_datasets", "export_final", "check", "needs", "run", "RESUMABLE"]

#: settings a re-run may change and still continue the run (length, evaluation, resources, bookkeeping)
RESUMABLE = ("kind", "name", "epochs", "eval", "scaling", "checkpoint", "output", "tracking", "ray",
             "data.allow_incomplete", "data.prefetch_batches", "data.decode_batch_size", "data.decode_num_cpus",
             "data.cache_decoded")


# --------------------------------------------------------------------------------------------
# planning (driver side, no Ray)


def _model_facts(cfg: TrainConfig) -> tuple[tuple[int, int], int]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
    return input_size(model), int(getattr(model, "embedding_dim", 512))


def plan_training(cfg: TrainConfig) -> tuple[TrainPlan, DatasetInfo, DatasetInfo | None]:
    """Check the data against the config and fix the class space; errors name the problem."""
    train = dataset_info(cfg.data.train, allow_incomplete=cfg.data.allow_incomplete)
    real = dataset_info(cfg.mixup.domain.real, allow_incomplete=cfg.data.allow_incomplete) if cfg.mixup.domain.enabled else None
    size, emb = _model_facts(cfg)
    if cfg.data.image_size is not None and tuple(cfg.data.image_size) != size:
        raise DataError(f"data.image_size {tuple(cfg.data.image_size)} differs from the backbone's input_size {size}")
    plan = TrainPlan(
        train_rows=train.rows, num_syn_classes=train.num_classes, num_real_classes=real.num_classes if real else 0,
        real_rows=real.rows if real else 0, image_size=size, embedding_size=emb,
        config_hash=config_hash(cfg, exclude={"epochs", "scaling", "fault_injection", "tracking", "ray", "eval"}),
    )
    workers = cfg.scaling.max_workers
    per_worker = cfg.batch_size // workers
    if plan.num_classes < workers:
        raise DataError(f"{plan.num_classes} classes cannot be sharded over {workers} workers")
    if plan.steps_per_epoch(cfg.batch_size, workers) < 1:
        raise DataError(
            f"dataset {train.uri} has {train.rows} rows: not one batch of {per_worker} per worker for {workers} workers"
        )
    return plan, train, real

# --------------------------------------------------------------------------------------------
# the loop (one process, or every Ray Train rank)


def _cycle(shard, batch_size: int, prefetch: int) -> Iterator:
    """Endless batches from a (small) dataset shard: SynFace replicates its real list the same way."""
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=prefetch):
            n += 1
            yield b
        if n == 0:
            raise DataError("the real-labelled dataset shard yields no full batch")


def train_loop(cfg: TrainConfig, hooks: Hooks, plan: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) on ``hooks.datasets["train"]`` (and ``"real"`` for domain mixup); reports every epoch."""
    plan_ = TrainPlan.from_dict(plan)
    rank, world, device = hooks.rank, hooks.world_size, torch.device(hooks.device)
    learner = Learner(cfg, plan_, rank, world, device, wrap=hooks.wrap)

    epoch, global_step, step_in_epoch, resumed_from = 0, 0, 0, -1
    if hooks.restore is not None:
        meta = learner.restore(hooks.restore)
        epoch, global_step, step_in_epoch, resumed_from = meta.epoch, meta.step, meta.step_in_epoch, meta.step
        hooks.log(f"[synray train] resumed from epoch {meta.epoch} step {meta.step} "
                  f"(written by {meta.world_size} workers, now {world})")

    b_w = cfg.batch_size // world
    spe = plan_.steps_per_epoch(cfg.batch_size, world)
    train_shard = hooks.datasets["train"]
    real_it = _cycle(hooks.datasets["real"], b_w, cfg.data.prefetch_batches) if cfg.mixup.domain.enabled else None
    every = cfg.checkpoint.every_steps
    metrics: dict[str, Any] = {}

    def report(stats: EpochStats, epoch_done: int, in_epoch: int, eval_results: dict | None,
               scores: dict | None = None) -> None:
        nonlocal metrics
        loss_sum, steps, correct, rows, images = all_reduce_sum(
            [stats.loss_sum, stats.steps, stats.correct, stats.rows, stats.images], device, world)
        metrics = {
            "epoch": epoch_done, "step": global_step, "step_in_epoch": in_epoch, "world_size": world,
            "resumed_from_step": resumed_from, "steps_per_epoch": spe,
            "loss": loss_sum / max(steps, 1), "train_accuracy": correct / max(rows, 1),
            "lr": stats.lr,
            "images_per_second": images / max(stats.seconds, 1e-9),
        }
        metrics.update(accuracy_metrics(eval_results or {}, "val/"))
        val = "".join(f", {k[4:-9]} {v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
        hooks.log(f"[synray train] epoch {epoch_done}/{cfg.epochs} step {global_step}: loss {metrics['loss']:.4f}, "
                  f"train acc {metrics['train_accuracy']:.4f}, lr {metrics['lr']:.4g}, "
                  f"{metrics['images_per_second']:.1f} img/s over {stats.seconds:.1f} s{val}")
        meta = TrainingMeta(epoch_done, global_step, in_epoch, plan_.num_classes, plan_.embedding_size, world,
                            plan_.config_hash)
        hooks.report_checkpoint(metrics, lambda d: learner.write_checkpoint(d, meta), eval_results, every_rank=True,
                                scores=scores)

    while epoch < cfg.epochs:
        stats = EpochStats()
        t0 = time.time()
        it = iter(train_shard.iter_torch_batches(
            batch_size=b_w, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=derive(cfg.seed, 5, epoch, rank) if cfg.data.shuffle_buffer else None,
        ))
        while step_in_epoch < spe:
            batch = synced_next(it, device, world)
            if batch is None:
                break
            real = next(real_it) if real_it is not None else None
            lr = learner.lr_at(epoch, step_in_epoch, global_step, spe)
            result = learner.step(batch, global_step, lr, real)
            if not math.isfinite(result.loss):
                raise FloatingPointError(f"loss is {result.loss} at step {global_step} (epoch {epoch}); lower the learning rate")
            stats.add(result, int(batch["image"].shape[0]))
            global_step += 1
            step_in_epoch += 1
            hooks.step_done(global_step)
            hooks.progress(global_step, cfg.epochs * spe, epoch=f"{epoch + 1}/{cfg.epochs}", loss=result.loss,
                           **{"img/s": world * stats.images / max(time.time() - t0, 1e-9)})
            if every and global_step % every == 0 and step_in_epoch < spe:
                stats.seconds = time.time() - t0
                report(stats, epoch, step_in_epoch, None)
        del it
        if step_in_epoch < spe:
            hooks.log(f"[synray train] epoch {epoch} ran out of data after {step_in_epoch} of {spe} steps")
        stats.seconds = time.time() - t0
        epoch += 1
        step_in_epoch = 0
        results, scores = None, {}
        if rank == 0 and cfg.eval.due(epoch, cfg.epochs):
            results = evaluate_bins(learner.backbone_module, cfg.eval.bins, batch_size=cfg.eval.batch_size,
                                    flip=cfg.eval.flip, image_size=learner.plan.image_size, scores=scores)
        report(stats, epoch, 0, results, scores)
    return metrics


# --------------------------------------------------------------------------------------------
# the job (driver)


def build_datasets(cfg: TrainConfig, plan: TrainPlan, train: DatasetInfo, real: DatasetInfo | None) -> dict:
    aug = cfg.augment
    augment = {"flip": aug.flip, "rrc_prob": aug.rrc_prob, "rrc_scale": tuple(aug.rrc_scale), "rrc_ratio": tuple(aug.rrc_ratio)}
    common = dict(image_size=plan.image_size, augment=augment, shuffle=cfg.data.shuffle,
                  batch_size=cfg.data.decode_batch_size, num_cpus=cfg.data.decode_num_cpus)

    def cache(info: DatasetInfo) -> bool:
        if cfg.data.cache_decoded is not None:
            return cfg.data.cache_decoded
        return decoded_bytes(info, plan.image_size) <= CACHE_LIMIT_BYTES

    datasets = {"train": build_dataset(train, soft_labels=cfg.mixup.identity, cache=cache(train), **common)}
    if real is not None:
        repeat = -(-train.rows // real.rows)  # SynFace: the real list replicated to the synthetic length
        datasets["real"] = build_dataset(real, offset=plan.num_syn_classes, repeat=repeat, cache=cache(real), **common)
    return datasets


def export_final(cfg: TrainConfig, backbone_bytes: bytes) -> bytes:
    """The trained backbone as a self-describing synray checkpoint (usable as an embedder or teacher)."""
    state = torch.load(io.BytesIO(backbone_bytes), map_location="cpu", weights_only=True)
    model = build_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
    load_strict(model, state, what="final backbone")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.pt")
        save_backbone(path, cfg.backbone.name, model, cfg.backbone.kwargs, extra={"trained_by": f"synray train {cfg.name}"})
        with open(path, "rb") as fh:
            return fh.read()


def check(cfg: TrainConfig) -> None:
    """Before Ray starts: the data must fit the config."""
    plan_training(cfg)


def needs(cfg: TrainConfig) -> list[Need]:
    return [Need.workers(cfg.scaling), Need.data(cfg.data.decode_num_cpus, "data.decode_num_cpus")]


def run(cfg: TrainConfig, ctx: JobContext) -> Outcome:
    """Train as configured; re-running with the same ``output.uri`` and ``name`` resumes the run."""
    plan, train, real = plan_training(cfg)
    run_uri = storage.join(cfg.output.uri, cfg.name)
    ctx.tracker.log_params({"plan.num_classes": plan.num_classes, "plan.train_rows": plan.train_rows})
    result = fit(train_loop, cfg, name=cfg.name, output_uri=cfg.output.uri, scaling=cfg.scaling,
                 checkpoint=cfg.checkpoint, extra={"plan": plan.to_dict()},
                 datasets=build_datasets(cfg, plan, train, real), callbacks=ctx.callbacks, tracker=ctx.tracker,
                 job="train", quiet=ctx.quiet, settings=guarded_settings(cfg, RESUMABLE))
    outcome = Outcome("train", run_uri, result.metrics, checkpoint_uri=result.checkpoint_uri,
                      extra={"plan": plan.to_dict()})
    reader = result.checkpoint
    final = storage.join(run_uri, "final")
    result.publish_evaluation(outcome, final, ctx.tracker, cfg.name)
    if reader is not None:
        backbone = reader.read_bytes("backbone.pt")
        storage.write_bytes_atomic(storage.join(final, "backbone.pt"), backbone)
        outcome.model_uri = storage.join(final, "model.pt")
        storage.write_bytes_atomic(outcome.model_uri, export_final(cfg, backbone))
    outcome.write_summary(storage.join(run_uri, "final", "summary.json"))
    return outcome
