"""The recognition learner in plain torch: what a worker holds and how it makes one optimiser step.

:class:`Learner` holds the backbone, its class-centre shard (:class:`ShardedClassifier`), the optimisers,
mixed precision (``scaling.precision``) and the LR schedule (:func:`learning_rate`); :meth:`Learner.step` applies SynFace's mixups and CFSM
before the optimiser step. It works without Ray (one process, the unit tests) and under DDP, where
:func:`synray.training.recognition.train_loop` builds one per rank from the driver's :class:`TrainPlan`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from synray.config.train import TrainConfig
from synray.io import storage
from synray.models.cfsm import load_generator
from synray.models.checkpoint import load_strict
from synray.models.heads import build_head
from synray.models.inputs import normalize_images, raw_embedding
from synray.models.precision import (
    autocast,
    maybe_compile,
    needs_loss_scaling,
    resolve_precision,
    to_channels_last,
    use_channels_last,
)
from synray.models.registry import build_backbone
from synray.seeds import derive
from synray.training import schedules
from synray.training.cfsm_aug import adversarial_styles, real_synth_indices
from synray.training.checkpointing import (
    CheckpointReader,
    TrainingMeta,
    write_rank_files,
)
from synray.training.mixup import (
    SYNFACE_LAMBDAS,
    Target,
    mix_images,
    sample_lambda,
    synface_targets,
)
from synray.training.partial_fc import ShardedClassifier, class_split

__all__ = ["TrainPlan", "learning_rate", "StepResult", "EpochStats", "Learner"]


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
        sc = cfg.scaling
        self.precision = resolve_precision(sc.precision_setting, self.device)
        self.amp = self.precision is not None
        self.channels_last = use_channels_last(sc.channels_last, self.device, default_on_cuda=True)
        backbone.to(self.device)
        to_channels_last(backbone, self.channels_last)
        self.backbone_module = backbone
        self.backbone = maybe_compile(wrap(backbone) if wrap is not None else backbone, sc.compile)
        o = cfg.optimizer
        self.opt_backbone = _optimizer(cfg, _param_groups(backbone, o.weight_decay, o.no_decay_bn))
        self.opt_head = _optimizer(cfg, [{"params": list(head.parameters()), "weight_decay": o.weight_decay}])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_loss_scaling(self.precision))
        self.generator = self._load_generator() if cfg.cfsm.enabled else None
        self.lambdas = tuple(cfg.mixup.domain.lambdas or SYNFACE_LAMBDAS)

    @property
    def head(self) -> nn.Module:
        return self.classifier.head

    def _load_generator(self) -> nn.Module:
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
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
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
