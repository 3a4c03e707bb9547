"""How a training loop talks to whatever runs it: a Ray Train worker (every rank) or a Tune trial (one process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RunnerHooks:
    rank: int = 0
    world_size: int = 1
    device: str | torch.device = "cpu"
    wrap: Callable[[nn.Module], nn.Module] | None = None  # e.g. DDP
    report: Callable[[dict[str, Any], str | None], None] | None = None  # (metrics, checkpoint dir or None)
    restore_dir: str | None = None  # a local copy of the checkpoint to resume from
