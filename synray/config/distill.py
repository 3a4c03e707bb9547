"""SynthDistill job config (``kind: distill``): generator in the loop -> frozen teacher -> student on Ray Train.

Defaults reproduce SynthDistill (IJCB 2023): StyleGAN2-FFHQ-256 ``G_ema`` (truncation 1), the fixed FFHQ
eye crop to 112x112, teacher iresnet100, TinyFaR-A student, global batch 128, 7812 iterations of two
optimiser steps per epoch, 21 epochs, Adam 1e-3 with StepLR(10 epochs, 0.5), ``resampling_coef`` 1, seed
2021. ``conf/distill/`` holds that recipe and small ones (DigiFace DCGAN + dlib teacher, the mini world).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator

from synray.config.base import JobConfig, OutputConfig, StrictModel, TrackingConfig
from synray.config.paths import URI, ModelRef
from synray.config.run import CheckpointConfig, EvalConfig, ScalingConfig
from synray.config.sampler import DDIMSampler, SamplerConfig
from synray.config.train import BackboneConfig


class WorldLatentConfig(StrictModel):
    """The built-in world as a latent -> face generator (see :mod:`synray.distill.generators`)."""

    seed: int = Field(0, ge=0)
    size: int = Field(64, ge=16)  # render size; the crop then resizes to ``crop_size``
    difficulty: float = Field(0.5, ge=0.0)  # scale of the latent-driven pose / expression / light


class DistillGeneratorConfig(StrictModel):
    """Which latent -> image generator runs in the loop (frozen)."""

    type: Literal["stylegan2", "dcgan", "ldm", "world"] = "stylegan2"
    path: URI | None = None  # StyleGAN2 pickle, or the LDM's UNet checkpoint (published layout)
    truncation_psi: float = Field(1.0, gt=0.0)
    vq_decoder: URI | None = None  # LDM only
    vq_config: dict[str, Any] | None = None  # LDM only: non-published VQ sizes
    latent_shape: tuple[int, int, int] = (3, 32, 32)  # LDM only
    sampler: SamplerConfig = DDIMSampler(steps=20)  # LDM only: how each image is sampled
    world: WorldLatentConfig = WorldLatentConfig()
    #: how generator output becomes the 112 face crop: SynthDistill's fixed FFHQ eye crop, a plain resize
    #: (generators whose output is already a face crop), or the generator's own default (``auto``)
    crop: Literal["auto", "ffhq", "resize"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> DistillGeneratorConfig:
        if self.type in ("stylegan2", "ldm") and not self.path:
            raise ValueError(f"generator.path is required for generator type {self.type!r}")
        if self.type == "ldm" and not self.vq_decoder:
            raise ValueError("generator.vq_decoder is required for generator type 'ldm'")
        return self


class StudentConfig(BackboneConfig):
    """A registry backbone (``tinyfar_a|b|c``, ``iresnet*``...) and its constructor arguments."""

    name: str = "tinyfar_a"


class DistillOptimizerConfig(StrictModel):
    """Adam with StepLR stepped once per epoch (SynthDistill ``train.py``)."""

    lr: float = Field(1e-3, gt=0.0)
    step_epochs: int = Field(10, ge=1)
    gamma: float = Field(0.5, gt=0.0, le=1.0)


class ValidationConfig(StrictModel):
    """Mean MSE and cosine to the teacher on fixed synthetic batches (drawn from ``seed``), every epoch."""

    batches: int = Field(78, ge=1)
    batch_size: int | None = Field(None, ge=1)  # default: the training batch size


class DistillConfig(JobConfig):
    kind: Literal["distill"] = "distill"
    name: str = Field("distill", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # Ray Train run name: re-runs resume
    seed: int = Field(2021, ge=0)
    generator: DistillGeneratorConfig = Field(default_factory=partial(DistillGeneratorConfig, path="stylegan2-ffhq-256x256.pkl"))
    #: ``dlib`` (dlib ResNet, 128-d), ``<registry name>:<published checkpoint>`` or a synray checkpoint path
    teacher: ModelRef = "synthdistill_teacher_iresnet100:iresnet100-73e07ba7.pth"
    student: StudentConfig = StudentConfig()
    crop_size: int = Field(112, ge=16)
    resampling: bool = True  # the second (resampled) step of every iteration
    resampling_coef: float = Field(1.0, ge=0.0)
    batch_size: int = Field(128, ge=1)  # global, split evenly over the workers
    iterations_per_epoch: int = Field(7812, ge=1)
    epochs: int = Field(21, ge=1)
    optimizer: DistillOptimizerConfig = DistillOptimizerConfig()
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()  # the student, on .bin sets
    scaling: ScalingConfig = ScalingConfig()  # each worker generates its slice of the global batch
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = Field(default_factory=partial(OutputConfig, uri="outputs/distill"))
    tracking: TrackingConfig = Field(default_factory=partial(TrackingConfig, experiment="synray-distill"))

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        bad = [n for n in self.scaling.worker_counts if self.batch_size % n]
        if bad:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by scaling.num_workers "
                             f"(every worker count it allows: {bad} do not divide it)")
        sc = self.scaling
        if sc.precision not in ("auto", "fp32") or sc.amp or sc.channels_last or sc.compile:
            raise ValueError("scaling.precision, amp, channels_last and compile apply to train and train-ldm; "
                             "distillation runs in float32")
        if self.teacher != "dlib" and not self.teacher.strip():
            raise ValueError("teacher must be 'dlib', '<registry name>:<checkpoint>' or a synray checkpoint path")
        return self
