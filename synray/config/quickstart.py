"""Quickstart config (``kind: quickstart``): the papers' protocol on the built-in world.

Each stage is an ordinary synray job config from ``conf/`` plus overrides, so what the quickstart runs
is exactly what a user would run by hand.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field

from synray.config.base import JobConfig, OutputConfig, StrictModel, TrackingConfig
from synray.config.paths import URI, ConfigRef


class WorldSplitConfig(StrictModel):
    seed: int = Field(0, ge=0)
    difficulty: float | None = Field(None, ge=0.0)  # None: the world's calibrated default
    train_identities: int = Field(200, ge=2)
    images_per_identity: int = Field(16, ge=2)
    verification_pairs: int = Field(1000, ge=20)


class StageConfig(StrictModel):
    """A job config file and the overrides the quickstart applies to it."""

    config: ConfigRef
    overrides: list[str] = Field(default_factory=list)


class DistillStageConfig(StrictModel):
    """``--distill``: SynthDistill with the real offline pair (DigiFace DCGAN in the loop, dlib teacher)."""

    enabled: bool = False
    config: ConfigRef = "conf/distill/dcgan_dlib.yaml"
    iterations_per_epoch: int = Field(20, ge=1)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=2)


class QuickstartConfig(JobConfig):
    kind: Literal["quickstart"] = "quickstart"
    output: URI = "outputs/quickstart"  # every stage writes under it
    world: WorldSplitConfig = WorldSplitConfig()
    #: folder with the shipped world teacher + LDM (``synray quickstart --rebuild-assets`` writes it)
    assets: URI | None = None
    #: ``--rebuild-assets``: retrain the world teacher and LDM first; ``--assets-only``: stop after that
    rebuild_assets: bool = False
    assets_only: bool = False
    synth_identities: int = Field(200, ge=2)
    synth_images_per_identity: int = Field(16, ge=2)
    #: training lengths (applied on top of the stage configs)
    teacher_epochs: int = Field(8, ge=1)
    student_epochs: int = Field(6, ge=1)
    ldm_steps: int = Field(2000, ge=1)
    vq_fit_steps: int = Field(300, ge=1)
    real: StageConfig = Field(default_factory=partial(StageConfig, config="conf/synth/world.yaml"))
    synth: StageConfig = Field(default_factory=partial(StageConfig, config="conf/synth/admis.yaml"))
    student: StageConfig = Field(default_factory=partial(StageConfig, config="conf/train/world_tiny.yaml"))
    teacher: StageConfig = Field(default_factory=partial(StageConfig, config="conf/train/world_tiny.yaml"))
    ldm: StageConfig = Field(default_factory=partial(StageConfig, config="conf/ldm/world_tiny.yaml"))
    distill: DistillStageConfig = Field(default_factory=DistillStageConfig)
    tracking: TrackingConfig = Field(default_factory=partial(TrackingConfig, experiment="synray-quickstart"))

    def writes(self) -> dict[str, OutputConfig]:
        return {"output": OutputConfig(uri=self.output)}
