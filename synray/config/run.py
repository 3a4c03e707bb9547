"""How a training job runs on Ray Train: workers, checkpoints and verification, the same for every job kind."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from synray.config.base import StrictModel
from synray.config.paths import URI

#: numeric precision of a model's forward (and backward) pass: ``auto`` is bf16 on a CUDA device that has it,
#: fp16 on other CUDA devices and fp32 on CPU (see :mod:`synray.models.precision`)
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ScalingConfig(StrictModel):
    """Ray Train workers: a fixed count or ``[min, max]`` (elastic); GPUs use NCCL, CPUs gloo."""

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    #: extra custom resources per worker, e.g. ``{gpu_node: 1}`` to place one worker per node of a type
    resources: dict[str, float] = {}
    #: autocast dtype of the training step: auto = bf16 on CUDA with bf16 (fp16 + loss scaling on older GPUs), fp32 on CPU
    precision: Precision = "auto"
    #: the older switch: false = fp32, true = mixed precision (auto on CUDA, bf16 on CPU); set one or the other
    amp: bool | None = None
    #: NHWC activations and weights (None: on for CUDA, where convolutions with BatchNorm gain; off on CPU)
    channels_last: bool | None = None
    #: ``torch.compile`` the model of the step (first steps slower while it compiles)
    compile: bool = False
    torch_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_precision_switch(self) -> ScalingConfig:
        if self.amp is not None and self.precision != "auto":
            raise ValueError("scaling.amp and scaling.precision both set: keep scaling.precision only "
                             "(amp: false is precision: fp32)")
        return self

    @property
    def precision_setting(self) -> str:
        """``precision`` with the older ``amp`` switch folded in: ``mixed`` = auto on CUDA, bf16 on CPU."""
        if self.amp is None:
            return self.precision
        return "mixed" if self.amp else "fp32"

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
