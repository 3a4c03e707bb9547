"""Learning-rate schedules of the reference recipes, as pure functions and torch schedulers.

* insightface arcface_torch ``PolynomialLRWarmup`` (per iteration): linear warmup base·k/w, then a
  *multiplicative* update reproducing base·(1 − (k−w)/(T−w))^power. The very first iteration runs at
  the full base LR because the scheduler only changes the LR on its first ``step()``; we keep that.
* CFSM ``PolyScheduler`` (per iteration, power 2): warmup from 0 (base·k/w) then base·(1 − (k−w)/(T−w))².
* TFace / ADMIS step schedule (per epoch): ``LRS[bisect_right(STAGES, epoch)]``, optionally with a
  linear warmup over the first global steps.
* ElasticFace ``lr_func`` (per epoch multiplier for ``LambdaLR``): 0.1^|{m : m − 1 <= epoch}|.

Values are reproduced to the last bit (the recurrences are evaluated in the reference's order).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = [
    "polynomial_lr_warmup", "PolynomialLRWarmup", "poly_lr", "PolyScheduler", "step_lr", "tface_lr",
    "elasticface_multiplier", "elasticface_scheduler", "ELASTICFACE_MILESTONES",
]

#: ElasticFace epoch milestones per training set (``config/config.py``).
ELASTICFACE_MILESTONES = {"webface": (22, 30, 40), "ms1mv2": (8, 14, 20, 25)}


def _check(warmup: int, total: int) -> None:
    if warmup < 0 or total <= 0 or warmup >= total:
        raise ValueError(f"need 0 <= warmup < total, got warmup={warmup}, total={total}")


def _poly_warmup_next(lr: float, base_lr: float, k: int, warmup: int, total: int, power: float) -> float:
    """LR after the scheduler's k-th ``step()`` given the current LR (insightface's ``get_lr``)."""
    if k == 0 or k > total:
        return lr
    if k <= warmup:
        return base_lr * k / warmup
    decay = ((1.0 - (k - warmup) / (total - warmup)) / (1.0 - (k - 1 - warmup) / (total - warmup))) ** power
    return lr * decay


def polynomial_lr_warmup(base_lr: float, warmup_iters: int, total_iters: int, num_steps: int, power: float = 1.0) -> list[float]:
    """LR in force at each of the first ``num_steps`` optimiser steps (insightface)."""
    _check(warmup_iters, total_iters)
    lrs, lr = [], base_lr
    for k in range(num_steps):
        lr = _poly_warmup_next(lr, base_lr, k, warmup_iters, total_iters, power)
        lrs.append(lr)
    return lrs


class PolynomialLRWarmup(LRScheduler):
    """insightface arcface_torch's scheduler; call ``step()`` once per iteration."""

    def __init__(self, optimizer: Optimizer, warmup_iters: int, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1) -> None:
        _check(warmup_iters, total_iters)
        self.warmup_iters, self.total_iters, self.power = int(warmup_iters), int(total_iters), float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            _poly_warmup_next(group["lr"], base, self.last_epoch, self.warmup_iters, self.total_iters, self.power)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs)
        ]


def poly_lr(step: int, base_lr: float, warmup_steps: int, max_steps: int, power: float = 2.0) -> float:
    """CFSM ``PolyScheduler`` LR at ``step`` (0 during the first step)."""
    _check(warmup_steps, max_steps)
    if step < warmup_steps:
        return base_lr * (float(step) / float(warmup_steps))
    return base_lr * pow(1 - float(step - warmup_steps) / float(max_steps - warmup_steps), power)


class PolyScheduler(LRScheduler):
    """CFSM's per-iteration polynomial schedule with warmup from 0."""

    def __init__(self, optimizer: Optimizer, base_lr: float, max_steps: int, warmup_steps: int, power: float = 2.0, last_epoch: int = -1) -> None:
        _check(warmup_steps, max_steps)
        self.base_lr, self.max_steps, self.warmup_steps, self.power = float(base_lr), int(max_steps), int(warmup_steps), float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr = poly_lr(self.last_epoch, self.base_lr, self.warmup_steps, self.max_steps, self.power)
        return [lr for _ in self.optimizer.param_groups]


def step_lr(epoch: int, lrs: Sequence[float], stages: Sequence[int]) -> float:
    """TFace / ADMIS: ``lrs[bisect_right(stages, epoch)]`` for a 0-based epoch."""
    if len(lrs) != len(stages) + 1:
        raise ValueError(f"need one more learning rate than stages, got {len(lrs)} LRs and {len(stages)} stages")
    return float(lrs[bisect_right(list(stages), epoch)])


def tface_lr(epoch: int, step: int, steps_per_epoch: int, lrs: Sequence[float], stages: Sequence[int], warmup_step: int = 0) -> float:
    """TFace LR for iteration ``step`` of ``epoch``: the step schedule, overridden by linear warmup
    (``global_step · lrs[0] / warmup_step``) while ``global_step <= warmup_step``."""
    global_step = epoch * steps_per_epoch + step
    if warmup_step > 0 and global_step <= warmup_step:
        return global_step * lrs[0] / warmup_step
    return step_lr(epoch, lrs, stages)


def elasticface_multiplier(epoch: int, milestones: Sequence[int], warmup_epoch: int = -1) -> float:
    """ElasticFace ``lr_step_func``: LR multiplier for a 0-based epoch (warmup disabled by default)."""
    if epoch < warmup_epoch:
        return ((epoch + 1) / (4 + 1)) ** 2
    return 0.1 ** len([m for m in milestones if m - 1 <= epoch])


def elasticface_scheduler(optimizer: Optimizer, dataset: str = "webface") -> LambdaLR:
    """``LambdaLR`` stepped once per epoch with ElasticFace's milestones for ``dataset``."""
    try:
        milestones = ELASTICFACE_MILESTONES[dataset]
    except KeyError:
        raise ValueError(f"unknown ElasticFace config {dataset!r}; choose one of {sorted(ELASTICFACE_MILESTONES)}") from None
    return LambdaLR(optimizer, lr_lambda=lambda epoch: elasticface_multiplier(epoch, milestones))
