"""Face-recognition training config (``kind: train``): shards -> Ray Train DDP -> checkpoints + verification.

Defaults reproduce the TFace / ADMIS IR-50 ArcFace recipe (global batch 512, 40 epochs, SGD 0.1 with
x0.1 drops at epochs 22/28/32, momentum 0.9, weight decay 5e-4, flip + RandomResizedCrop p=0.2 when
enabled); ``conf/train/`` holds that recipe at full scale and a tiny world one for CPU runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from synray.config.base import JobConfig, OutputConfig, StrictModel
from synray.config.paths import URI, ModelRef
from synray.config.run import CheckpointConfig, EvalConfig, ScalingConfig


def _registered(name: str, registry: Iterable[str], what: str) -> str:
    """``name`` if the registry has it, else an error listing the valid names."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid names: {', '.join(sorted(registry))}")
    return name


class BackboneConfig(StrictModel):
    """A registry backbone (``synray.models.registry``) and its constructor arguments."""

    name: str = "tface_ir50"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from synray.models.registry import BACKBONES  # torch: configs load without it

        return _registered(v, BACKBONES, "backbone")


class HeadConfig(StrictModel):
    """A margin head (``synray.models.heads.HEADS``) and its arguments (s, m, mode, ...)."""

    name: str = "arcface"
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"s": 64.0, "m": 0.5})

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from synray.models.heads import HEADS  # torch: configs load without it

        return _registered(v, HEADS, "head")


class DataConfig(StrictModel):
    """Training shards (a synray dataset folder, local or ``s3://``) and how Ray Data feeds them."""

    train: URI | None = None
    image_size: tuple[int, int] | None = None  # default: the backbone's input_size
    shuffle: Literal["global", "blocks", "none"] = "global"
    shuffle_buffer: int = Field(0, ge=0)  # rows of local shuffle on each worker (with shuffle: blocks)
    decode_batch_size: int = Field(256, ge=1)
    decode_num_cpus: float = Field(1.0, gt=0.0)
    prefetch_batches: int = Field(2, ge=0)
    #: decode the images once, at the training size, and keep them (Ray's object store); every epoch then only
    #: shuffles and augments. None: when the decoded set is at most 1 GiB (``synray.training.data.CACHE_LIMIT_BYTES``)
    cache_decoded: bool | None = None
    #: train on a dataset without its completion marker or whose manifest disagrees with its shards
    allow_incomplete: bool = False


class AugmentConfig(StrictModel):
    """Horizontal flip, then ADMIS's extra RandomResizedCrop (resize back) with probability ``rrc_prob``."""

    flip: bool = True
    rrc_prob: float = Field(0.0, ge=0.0, le=1.0)
    rrc_scale: tuple[float, float] = (0.2, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.rrc_scale must satisfy 0 < low <= high <= 1, got {self.rrc_scale}")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"augment.rrc_ratio must satisfy 0 < low <= high, got {self.rrc_ratio}")
        return self


class OptimizerConfig(StrictModel):
    """SGD (every recipe) or AdamW; the head gets its own optimiser with the same settings (TFace)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False
    no_decay_bn: bool = False  # AdaFace excludes BatchNorm parameters from weight decay; TFace does not
    grad_clip: float | None = Field(None, gt=0.0)  # insightface/ElasticFace clip the backbone grad norm at 5


class ScheduleConfig(StrictModel):
    """Learning rate per step (``synray.training.schedules``).

    * ``step``: TFace/ADMIS ``lrs[bisect_right(milestones, epoch)]`` with ``lrs = lr·gamma^k`` (or
      explicit ``lrs``), optional linear warmup over ``warmup_steps``;
    * ``poly_warmup``: insightface ``PolynomialLRWarmup`` (``power`` 1) per iteration;
    * ``poly``: CFSM ``PolyScheduler`` (``power`` 2, warmup from 0) per iteration;
    * ``elasticface``: lr · 0.1^|{m : m-1 <= epoch}|; ``constant``.
    """

    name: Literal["step", "poly_warmup", "poly", "elasticface", "constant"] = "step"
    milestones: list[int] = Field(default_factory=lambda: [22, 28, 32])
    gamma: float = Field(0.1, gt=0.0)
    lrs: list[float] | None = None
    warmup_steps: int = Field(0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0.0)  # converted to steps; added to warmup_steps
    power: float | None = None  # default 1 (poly_warmup) / 2 (poly)

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"schedule.milestones must be increasing, got {self.milestones}")
        if self.lrs is not None and len(self.lrs) != len(self.milestones) + 1:
            raise ValueError(f"schedule.lrs needs one more value than milestones ({len(self.milestones) + 1}), got {len(self.lrs)}")
        return self


class DomainMixupConfig(StrictModel):
    """SynFace domain mixup: blend each synthetic batch with a batch of real-labelled images."""

    enabled: bool = False
    real: URI | None = None  # shards of the real-labelled images (classes follow the synthetic ones)
    lambdas: list[float] | None = None  # default: SynFace's grid 0, 0.05, ..., 1

    @model_validator(mode="after")
    def _check(self) -> DomainMixupConfig:
        if self.enabled and not self.real:
            raise ValueError("mixup.domain.real (a shard dataset URI) is required when domain mixup is enabled")
        if self.lambdas is not None and (not self.lambdas or any(not 0 <= v <= 1 for v in self.lambdas)):
            raise ValueError(f"mixup.domain.lambdas must be a non-empty list of values in [0, 1], got {self.lambdas}")
        return self


class MixupConfig(StrictModel):
    """``identity``: train on the shards' soft labels (identity_b / mix_weight); ``domain``: see above."""

    identity: bool = False
    domain: DomainMixupConfig = DomainMixupConfig()


class CFSMConfig(StrictModel):
    """CFSM adversarial augmentation with a frozen synthesis model (``G_state_dict`` checkpoint)."""

    enabled: bool = False
    checkpoint: ModelRef | None = None
    generator: dict[str, Any] = Field(default_factory=dict)  # CFSMGenerator kwargs (defaults: the released model)
    epsilon: float = Field(0.314, ge=0.0)
    alpha: float = Field(0.314, ge=0.0)
    steps: int = Field(1, ge=1)
    real_ratio: float = Field(0.75, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> CFSMConfig:
        if self.enabled and not self.checkpoint:
            raise ValueError("cfsm.checkpoint (the synthesis model) is required when CFSM is enabled")
        return self


class PartialFCConfig(StrictModel):
    """Class centres are always sharded over the workers; ``sample_rate < 1`` samples them (PartialFC)."""

    sample_rate: float = Field(1.0, gt=0.0, le=1.0)


class TrainConfig(JobConfig):
    kind: Literal["train"] = "train"
    name: str = Field("train", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # Ray Train run name: re-runs resume it
    seed: int = Field(0, ge=0)
    backbone: BackboneConfig = BackboneConfig()
    head: HeadConfig = HeadConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    batch_size: int = Field(512, ge=1)  # global: split evenly over the workers
    epochs: int = Field(40, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    mixup: MixupConfig = MixupConfig()
    cfsm: CFSMConfig = CFSMConfig()
    partial_fc: PartialFCConfig = PartialFCConfig()
    eval: EvalConfig = EvalConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = Field(default_factory=partial(OutputConfig, uri="outputs/train"))

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.data.train:
            raise ValueError("data.train (a shard dataset URI) is required")
        if self.batch_size < self.scaling.max_workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than the number of workers {self.scaling.max_workers}")
        if self.cfsm.enabled and self.mixup.domain.enabled:
            raise ValueError("cfsm and mixup.domain cannot both be enabled (both rebuild the batch)")
        return self
