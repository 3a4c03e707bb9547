"""The few collectives the training loops need (no-ops on one worker)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def all_reduce_sum(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """Element-wise sum of ``values`` over every rank, in float64 so counts and sums stay exact."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def synced_next(it: Iterator, device: torch.device, world_size: int) -> Any:
    """The next item of ``it``, or None on every rank as soon as any rank has run out (:func:`all_have`)."""
    item = next(it, None)
    return item if all_have(item is not None, device, world_size) else None


def all_have(present: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank while every rank still has a batch: the first rank to run out stops them all,
    which keeps DDP's collectives aligned."""
    if world_size == 1:
        return present
    flag = torch.tensor([1 if present else 0], device=device)
    dist.all_reduce(flag, dist.ReduceOp.MIN)
    return bool(flag.item())
