"""How a training job runs on Ray Train: workers, checkpoints and verification, the same for every job kind."""

from __future__ import annotations

from pydantic import Field, field_validator

from synray.config.base import StrictModel
from synray.config.paths import URI


class ScalingConfig(StrictModel):
    """Ray Train workers: a fixed count or ``[min, max]`` (elastic); GPUs use NCCL, CPUs gloo."""

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    #: extra custom resources per worker, e.g. ``{gpu_node: 1}`` to place one worker per node of a type
    resources: dict[str, float] = {}
    amp: bool | None = None  # mixed precision; default on with GPUs
    torch_threads: int | None = Field(None, ge=1)

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, tuple):
            if v[0] < 1 or v[1] < v[0]:
                raise ValueError(f"num_workers [min, max] needs 1 <= min <= max, got {list(v)}")
        elif v < 1:
            raise ValueError(f"num_workers must be >= 1, got {v}")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU") or amount <= 0:
                raise ValueError(f"resources: {name}={amount} must be a custom resource > 0 "
                                 "(CPUs and GPUs come from cpus_per_worker and use_gpu)")
        return v

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every world size the job may run with (one for a fixed count)."""
        return range(self.min_workers, self.max_workers + 1)

    def bundle(self) -> dict[str, float]:
        """The resources of one worker."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {}), **self.resources}


class CheckpointConfig(StrictModel):
    """Checkpoints kept (every report carries one; ``every_steps`` adds mid-epoch ones where a job has epochs)
    and how many worker-group failures are retried from the last one."""

    num_to_keep: int | None = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)
    every_steps: int = Field(0, ge=0)


class EvalConfig(StrictModel):
    """Verification on insightface ``.bin`` sets (local files or folders) after every ``every_epochs`` epochs."""

    bins: list[URI] = Field(default_factory=list)
    batch_size: int = Field(256, ge=1)
    flip: bool = True
    every_epochs: int = Field(1, ge=1)

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether verification runs after ``epoch`` (counted from 1) of ``epochs``: every ``every_epochs``, and the last."""
        return bool(self.bins) and (epoch % self.every_epochs == 0 or epoch == epochs)
