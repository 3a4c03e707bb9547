"""Summing per-rank statistics across Ray Train workers (a no-op on one worker)."""

from __future__ import annotations

import torch


def all_reduce_sum(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """Element-wise sum of ``values`` over every rank, in float64 so counts and sums stay exact."""
    if world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
