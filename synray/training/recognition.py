"""Face-recognition training on Ray Train: shards -> Ray Data -> DDP backbone + sharded margin head.

The pieces, top to bottom:

* :func:`plan_training` (driver, no Ray): reads the shard footers, fixes the class space (synthetic
  identities, then the real-labelled ones of domain mixup) and the image size.
* :class:`Learner` (plain torch): backbone, class-centre shard (:class:`ShardedClassifier`),
  optimisers, LR schedule, AMP, and :meth:`Learner.step`, which applies SynFace mixups and CFSM
  before the optimiser step. It works without Ray (one process) and under DDP.
* :func:`train_loop` (one process, or every Ray Train rank through :mod:`synray.training.runner`):
  builds a :class:`Learner`, restores the last checkpoint, iterates this rank's Ray Data shard,
  evaluates on rank 0 and reports metrics plus a checkpoint every epoch (and every
  ``checkpoint.every_steps`` steps).
* :func:`run` (the ``train`` job): Ray Data pipelines into the shared runner (whose run name makes a
  re-run resume), the final backbone and verification table.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from synray.config.base import config_hash
from synray.config.train import TrainConfig
from synray.models.heads import build_head
from synray.models.registry import build_backbone, normalize_images
from synray.training import schedules
from synray.training.cfsm_aug import adversarial_styles, real_synth_indices
from synray.jobs import JobContext, Need, Outcome
from synray.training.checkpointing import CheckpointReader, TrainingMeta, write_rank_files
from synray.training.collective import all_have, all_reduce_sum
from synray.evaluation.roc import SCORES_FILE, save_scores
from synray.evaluation.roc_plots import publish_roc
from synray.training.data import DataError, DatasetInfo, dataset_info
from synray.training.mixup import SYNFACE_LAMBDAS, Target, mix_images, sample_lambda, synface_targets
from synray.training.partial_fc import ShardedClassifier, class_split
from synray.training.runner import Hooks, fit, guarded_settings
from synray.seeds import derive

__all__ = ["TrainPlan", "plan_training", "learning_rate", "Learner", "train_loop", "check", "needs", "run", "raw_embedding",
           "RESUMABLE"]

#: settings a re-run may change and still continue the run (length, evaluation, resources, bookkeeping)
RESUMABLE = ("kind", "name", "epochs", "eval", "scaling", "checkpoint", "output", "tracking", "ray",
             "data.allow_incomplete", "data.prefetch_batches", "data.decode_batch_size", "data.decode_num_cpus")


# --------------------------------------------------------------------------------------------
# planning (driver side, no Ray)


@dataclass
class TrainPlan:
    """Facts fixed before training starts, shipped to every worker."""

    train_rows: int
    num_syn_classes: int
    num_real_classes: int
    real_rows: int
    image_size: tuple[int, int]
    embedding_size: int
    config_hash: str

    @property
    def num_classes(self) -> int:
        return self.num_syn_classes + self.num_real_classes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_size": list(self.image_size), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainPlan:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{**{k: v for k, v in data.items() if k in names}, "image_size": tuple(data["image_size"])})

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Equal split (``streaming_split(equal=True)``) then whole per-worker batches."""
        return (self.train_rows // world_size) // (batch_size // world_size)


def _model_facts(cfg: TrainConfig) -> tuple[tuple[int, int], int]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
    size = tuple(getattr(model, "input_size", (112, 112)))
    return (int(size[0]), int(size[1])), int(getattr(model, "embedding_dim", 512))


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
# learning rate


def learning_rate(cfg: TrainConfig, epoch: int, step_in_epoch: int, global_step: int, steps_per_epoch: int) -> float:
    """LR in force for the optimiser step ``global_step`` (epoch ``epoch``, ``step_in_epoch``)."""
    s, base = cfg.schedule, cfg.optimizer.lr
    warmup = s.warmup_steps + int(round(s.warmup_epochs * steps_per_epoch))
    total = cfg.epochs * steps_per_epoch
    if s.name == "constant":
        return base if warmup == 0 or global_step > warmup else base * global_step / warmup
    if s.name == "step":
        lrs = s.lrs or [float(f"{base * s.gamma**k:.12g}") for k in range(len(s.milestones) + 1)]  # 0.1·0.1 -> 0.01
        return schedules.tface_lr(epoch, step_in_epoch, steps_per_epoch, lrs, s.milestones, warmup)
    if s.name == "elasticface":
        return base * schedules.elasticface_multiplier(epoch, s.milestones)
    if s.name == "poly":
        return schedules.poly_lr(min(global_step, total - 1), base, warmup, total, s.power or 2.0)
    lrs = _poly_warmup(base, warmup, total, s.power or 1.0)  # insightface's multiplicative recurrence
    return lrs[min(global_step, len(lrs) - 1)]


@functools.lru_cache(maxsize=4)
def _poly_warmup(base: float, warmup: int, total: int, power: float) -> tuple[float, ...]:
    return tuple(schedules.polynomial_lr_warmup(base, warmup, total, total, power))


# --------------------------------------------------------------------------------------------
# the learner (plain torch)


def raw_embedding(out: Any) -> Tensor:
    """A backbone's raw embedding; AdaFace-style ``(x/|x|, |x|)`` outputs are multiplied back."""
    if isinstance(out, (tuple, list)):
        return out[0] * out[1].reshape(-1, 1)
    return out


def _param_groups(model: nn.Module, weight_decay: float, no_decay_bn: bool) -> list[dict]:
    if not no_decay_bn:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    bn, rest = [], []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                (bn if isinstance(m, nn.modules.batchnorm._BatchNorm) else rest).append(p)
    return [{"params": rest, "weight_decay": weight_decay}, {"params": bn, "weight_decay": 0.0}]


def _optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr)


@dataclass
class StepResult:
    loss: float
    correct: int
    rows: int
    lr: float
    lam: float = 1.0


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    steps: int = 0
    correct: int = 0
    rows: int = 0
    images: int = 0
    seconds: float = 0.0
    lr: float = float("nan")

    def add(self, r: StepResult, images: int) -> None:
        self.lr = r.lr
        self.loss_sum += r.loss
        self.steps += 1
        self.correct += r.correct
        self.rows += r.rows
        self.images += images


class Learner:
    """Backbone + class-centre shard + optimisers for one worker (``rank`` of ``world_size``).

    ``wrap`` turns the backbone into its data-parallel form (``ray.train.torch.prepare_model``);
    without it the learner trains in one process, which is what the unit tests use.
    """

    def __init__(self, cfg: TrainConfig, plan: TrainPlan, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", wrap=None) -> None:
        self.cfg, self.plan, self.rank, self.world_size = cfg, plan, rank, world_size
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)  # the same backbone on every rank
        backbone = build_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
        self.start, count = class_split(plan.num_classes, world_size, rank)
        torch.manual_seed(derive(cfg.seed, 1, self.start))  # centres depend on their classes, not the rank
        head = build_head(cfg.head.name, plan.embedding_size, count, **cfg.head.kwargs)
        self.classifier = ShardedClassifier(head, plan.num_classes, self.start, cfg.partial_fc.sample_rate,
                                            grad_scale=float(world_size), seed=cfg.seed).to(self.device)
        backbone.to(self.device)
        self.backbone_module = backbone
        self.backbone = wrap(backbone) if wrap is not None else backbone
        o = cfg.optimizer
        self.opt_backbone = _optimizer(cfg, _param_groups(backbone, o.weight_decay, o.no_decay_bn))
        self.opt_head = _optimizer(cfg, [{"params": list(head.parameters()), "weight_decay": o.weight_decay}])
        self.amp = bool(cfg.scaling.amp if cfg.scaling.amp is not None else self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")
        self.generator = self._load_generator() if cfg.cfsm.enabled else None
        self.lambdas = tuple(cfg.mixup.domain.lambdas or SYNFACE_LAMBDAS)

    @property
    def head(self) -> nn.Module:
        return self.classifier.head

    def _load_generator(self) -> nn.Module:
        from synray.io import storage
        from synray.models.cfsm import load_generator

        uri = self.cfg.cfsm.checkpoint
        if not storage.is_s3(uri):
            return load_generator(uri, freeze=True, **self.cfg.cfsm.generator).to(self.device)
        with tempfile.TemporaryDirectory() as d:  # stage a remote checkpoint through a local file
            path = os.path.join(d, os.path.basename(uri))
            with open(path, "wb") as fh:
                fh.write(storage.read_bytes(uri))
            return load_generator(path, freeze=True, **self.cfg.cfsm.generator).to(self.device)

    # -- one optimiser step -------------------------------------------------------------------
    def _embed(self, module: nn.Module, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, enabled=self.amp):
            out = module(x)
        return raw_embedding(out).float()

    def targets_for(self, batch: Mapping[str, Tensor], real_label: Tensor | None = None, lam: float = 1.0) -> list[Target]:
        label = batch["label"].to(self.device)
        if self.cfg.mixup.identity:
            return synface_targets(label, batch["weight_a"].to(self.device), batch["label_b"].to(self.device), real_label, lam)
        return synface_targets(label, real_label=real_label, lam=lam)

    def step(self, batch: Mapping[str, Tensor], global_step: int, lr: float, real: Mapping[str, Tensor] | None = None) -> StepResult:
        """One optimiser step on a worker's batch (uint8 NCHW ``image``, ``label``, soft-label columns)."""
        cfg = self.cfg
        self.backbone.train()
        x = normalize_images(self.backbone_module, batch["image"].to(self.device, non_blocking=True))
        rng = np.random.default_rng(derive(cfg.seed, 2, global_step, self.rank))
        lam = 1.0
        real_label = None
        if real is not None:
            lam = sample_lambda(rng, self.lambdas)
            xr = normalize_images(self.backbone_module, real["image"].to(self.device, non_blocking=True))
            x = mix_images(x, xr, lam)
            real_label = real["label"].to(self.device)
        targets = self.targets_for(batch, real_label, lam)

        if self.generator is not None:
            gen = torch.Generator().manual_seed(derive(cfg.seed, 3, global_step, self.rank))

            def adv_loss(img: Tensor) -> Tensor:
                return self.classifier(self._embed(self.backbone_module, img), targets)[0]

            _, synth = adversarial_styles(self.generator, x, adv_loss, cfg.cfsm.epsilon, cfg.cfsm.alpha,
                                          cfg.cfsm.steps, rng=gen)
            idx_real, idx_syn = (i.to(self.device) for i in real_synth_indices(x.shape[0], cfg.cfsm.real_ratio, gen))
            x = torch.cat([x[idx_real], synth[idx_syn]])
            targets = [Target(torch.cat([t.labels[idx_real], t.labels[idx_syn]]),
                              torch.cat([t.weights[idx_real], t.weights[idx_syn]])) for t in targets]

        for opt in (self.opt_backbone, self.opt_head):
            for g in opt.param_groups:
                g["lr"] = lr
        emb = self._embed(self.backbone, x)
        self.classifier.reseed(derive(cfg.seed, 4, global_step, self.start))  # PartialFC sampling: no state to save
        loss, pred = self.classifier(emb, targets)
        self.opt_backbone.zero_grad(set_to_none=True)
        self.opt_head.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optimizer.grad_clip:
            self.scaler.unscale_(self.opt_backbone)
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), cfg.optimizer.grad_clip)
        self.scaler.step(self.opt_backbone)
        self.scaler.step(self.opt_head)
        self.scaler.update()
        primary = targets[0].labels
        correct = int((pred == primary).sum())
        return StepResult(float(loss.detach()), correct, int(primary.numel()), lr, lam)

    def lr_at(self, epoch: int, step_in_epoch: int, global_step: int, steps_per_epoch: int) -> float:
        return learning_rate(self.cfg, epoch, step_in_epoch, global_step, steps_per_epoch)

    # -- checkpoints ----------------------------------------------------------------------------
    def kernel_state(self) -> dict[str, Any]:
        state = self.opt_head.state.get(self.head.kernel, {})
        return dict(state)

    def write_checkpoint(self, directory: str, meta: TrainingMeta) -> None:
        buffers = {k: v for k, v in self.head.state_dict().items() if k != "kernel"}
        trainer_state = {
            "optimizer": self.opt_backbone.state_dict(),
            "scaler": self.scaler.state_dict(),
            "head_buffers": buffers,
        }
        write_rank_files(directory, rank=self.rank, start=self.start, kernel=self.head.kernel,
                         kernel_state=self.kernel_state(), meta=meta if self.rank == 0 else None,
                         backbone=self.backbone_module.state_dict() if self.rank == 0 else None,
                         trainer_state=trainer_state if self.rank == 0 else None)

    def restore(self, reader: CheckpointReader) -> TrainingMeta:
        """Load a checkpoint written by any number of workers; returns its progress counters."""
        meta = reader.meta()
        if meta.num_classes != self.plan.num_classes or meta.embedding_size != self.plan.embedding_size:
            raise ValueError(
                f"checkpoint {reader.path} is for {meta.num_classes} classes x {meta.embedding_size}-d embeddings; "
                f"this run has {self.plan.num_classes} x {self.plan.embedding_size} (different data or backbone?)"
            )
        from synray.models.checkpoint import load_strict

        load_strict(self.backbone_module, reader.load("backbone.pt"), what=f"checkpoint {reader.path}")
        ts = reader.load("trainer_state.pt")
        self.opt_backbone.load_state_dict(ts["optimizer"])
        if ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        kernel, state = reader.centres(self.start, self.start + self.classifier.count)
        with torch.no_grad():
            self.head.kernel.copy_(kernel.to(self.head.kernel.device))
            for k, v in ts.get("head_buffers", {}).items():
                self.head.get_buffer(k).copy_(v)
        if state:
            self.opt_head.state[self.head.kernel] = {
                k: (v.to(self.head.kernel.device) if isinstance(v, Tensor) else v) for k, v in state.items()
            }
        return meta


# --------------------------------------------------------------------------------------------
# the loop (one process, or every Ray Train rank)


def _synced_next(it: Iterator, world_size: int, device: torch.device):
    """Next batch, or None on every rank as soon as any rank has run out."""
    batch = next(it, None)
    return batch if all_have(batch is not None, device, world_size) else None


def _cycle(shard, batch_size: int, prefetch: int) -> Iterator:
    """Endless batches from a (small) dataset shard: SynFace replicates its real list the same way."""
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=prefetch):
            n += 1
            yield b
        if n == 0:
            raise DataError("the real-labelled dataset shard yields no full batch")


def _evaluate(learner: Learner, cfg: TrainConfig, scores: dict | None = None) -> dict[str, dict[str, float]]:
    from synray.evaluation.evaluate import evaluate_bins

    return evaluate_bins(learner.backbone_module, cfg.eval.bins, batch_size=cfg.eval.batch_size, flip=cfg.eval.flip,
                         image_size=learner.plan.image_size, scores=scores)


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

    def report(stats: EpochStats, epoch_done: int, in_epoch: int, eval_results: dict | None, scores: dict | None = None) -> None:
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
        for name, r in (eval_results or {}).items():
            metrics[f"val/{name}/accuracy"] = r["accuracy"]
        val = "".join(f", {k[4:-9]} {v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
        hooks.log(f"[synray train] epoch {epoch_done}/{cfg.epochs} step {global_step}: loss {metrics['loss']:.4f}, "
                  f"train acc {metrics['train_accuracy']:.4f}, lr {metrics['lr']:.4g}, "
                  f"{metrics['images_per_second']:.1f} img/s over {stats.seconds:.1f} s{val}")
        meta = TrainingMeta(epoch_done, global_step, in_epoch, plan_.num_classes, plan_.embedding_size, world,
                            plan_.config_hash)
        with tempfile.TemporaryDirectory() as d:
            learner.write_checkpoint(d, meta)
            if rank == 0 and eval_results:
                with open(os.path.join(d, "eval.json"), "w") as fh:
                    json.dump(eval_results, fh)
            if rank == 0 and scores:  # pair distances of the last evaluation: the final ROC curves
                with open(os.path.join(d, SCORES_FILE), "wb") as fh:
                    fh.write(save_scores(scores))
            hooks.report(metrics, d)

    while epoch < cfg.epochs:
        stats = EpochStats()
        t0 = time.time()
        it = iter(train_shard.iter_torch_batches(
            batch_size=b_w, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=derive(cfg.seed, 5, epoch, rank) if cfg.data.shuffle_buffer else None,
        ))
        while step_in_epoch < spe:
            batch = _synced_next(it, world, device)
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
        if rank == 0 and cfg.eval.bins and (epoch % cfg.eval.every_epochs == 0 or epoch == cfg.epochs):
            results = _evaluate(learner, cfg, scores)
        report(stats, epoch, 0, results, scores)
    return metrics


# --------------------------------------------------------------------------------------------
# the job (driver)


def build_datasets(cfg: TrainConfig, plan: TrainPlan, train: DatasetInfo, real: DatasetInfo | None) -> dict:
    from synray.training.data import build_dataset

    aug = cfg.augment
    augment = {"flip": aug.flip, "rrc_prob": aug.rrc_prob, "rrc_scale": tuple(aug.rrc_scale), "rrc_ratio": tuple(aug.rrc_ratio)}
    common = dict(image_size=plan.image_size, augment=augment, shuffle=cfg.data.shuffle,
                  batch_size=cfg.data.decode_batch_size, num_cpus=cfg.data.decode_num_cpus)
    datasets = {"train": build_dataset(train, soft_labels=cfg.mixup.identity, **common)}
    if real is not None:
        repeat = -(-train.rows // real.rows)  # SynFace: the real list replicated to the synthetic length
        datasets["real"] = build_dataset(real, offset=plan.num_syn_classes, repeat=repeat, **common)
    return datasets


def export_final(cfg: TrainConfig, backbone_bytes: bytes) -> bytes:
    """The trained backbone as a self-describing synray checkpoint (usable as an embedder or teacher)."""
    import io

    from synray.models.checkpoint import load_strict
    from synray.models.export import save_backbone

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
    from synray.io import storage

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
    if reader is not None:
        final = storage.join(run_uri, "final")
        if "eval.json" in reader.names():
            outcome.set_verification(json.loads(reader.read_bytes("eval.json")), ctx.tracker)
        if SCORES_FILE in reader.names():
            outcome.extra.update(publish_roc(reader.read_bytes(SCORES_FILE), final, ctx.tracker, cfg.name))
        backbone = reader.read_bytes("backbone.pt")
        storage.write_bytes_atomic(storage.join(final, "backbone.pt"), backbone)
        outcome.model_uri = storage.join(final, "model.pt")
        storage.write_bytes_atomic(outcome.model_uri, export_final(cfg, backbone))
    outcome.write_summary(storage.join(run_uri, "final", "summary.json"))
    return outcome
