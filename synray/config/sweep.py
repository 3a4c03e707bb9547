"""Sweep config (``kind: sweep``): Ray Tune over dotted keys of a distillation or LDM-training config.

Every trial is the target job with the sampled values set (``resampling_coef``, ``unet.context_dropout``,
``optimizer.lr``...), run in its own Tune trial process, reported after every epoch (distillation) or
checkpoint (LDM), checkpointed, and logged as an MLflow child run of the sweep's parent run.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator

from synray.config.base import JobConfig, OutputConfig, StrictModel, TrackingConfig
from synray.config.paths import URI, ConfigRef, ModelRef
from synray.config.sampler import DDIMSampler, SamplerConfig


class SearchDim(StrictModel):
    """One searched key: exactly one of ``grid`` / ``choice`` (lists), ``uniform`` / ``loguniform`` / ``randint`` ([low, high])."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> SearchDim:
        set_ = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {set_ or 'none'})")
        kind = set_[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {list(value)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that must validate in the target config (all of a list, both ends of a range)."""
        v = getattr(self, self.kind)
        return list(v) if self.kind in ("grid", "choice") else [v[0], v[1] - 1 if self.kind == "randint" else v[1]]


class SearchConfig(StrictModel):
    """``grid``: every combination of the grid keys once; ``random``: ``num_samples`` draws (grid keys crossed)."""

    algorithm: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)


class SchedulerConfig(StrictModel):
    """``fifo`` runs every trial to the end; ``asha`` stops poor trials early (reports = ``training_iteration``)."""

    name: Literal["fifo", "asha"] = "fifo"
    max_t: int | None = Field(None, ge=1)  # default: the number of reports of a full trial
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class StudentObjectiveConfig(StrictModel):
    name: str = "iresnet18"
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"layers": [1, 1, 1, 1], "widths": [16, 32, 64, 128],
                                                            "embedding_dim": 64, "input_size": [56, 56]})
    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(0.1, gt=0.0)


class ObjectiveConfig(StrictModel):
    """LDM sweeps: score the samples of the EMA model at every checkpoint (see ``synray.tuning.objectives``)."""

    name: Literal["consistency", "separability", "verification_accuracy", "student_accuracy"] = "separability"
    embedder: ModelRef | None = None  # FR model measuring the samples; default: the LDM config's context embedder
    identities: int = Field(8, ge=2)
    images_per_identity: int = Field(4, ge=2)
    sampler: SamplerConfig = DDIMSampler(steps=10)  # how the objective samples the trial's LDM
    student: StudentObjectiveConfig = StudentObjectiveConfig()
    bins: list[URI] = Field(default_factory=list)  # student_accuracy: verification sets

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.name == "student_accuracy" and not self.bins:
            raise ValueError("objective.bins (verification .bin sets) is required for student_accuracy")
        return self


class TrialResources(StrictModel):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


class SweepConfig(JobConfig):
    kind: Literal["sweep"] = "sweep"
    name: str = Field("sweep", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # Tune experiment name: re-runs resume it
    target: Literal["distill", "train_ldm"] = "distill"
    base: ConfigRef | None = None  # the target job's YAML (relative paths: to the working directory, else conf/)
    overrides: list[str] = Field(default_factory=list)  # dotted overrides applied to ``base``
    space: dict[str, SearchDim] = Field(default_factory=dict)
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    metric: str | None = None  # default: val/cos (distill), objective/<objective.name> (train_ldm)
    mode: Literal["max", "min"] = "max"
    objective: ObjectiveConfig = ObjectiveConfig()
    max_concurrent_trials: int = Field(1, ge=1)
    trial_resources: TrialResources = TrialResources()
    trial_max_failures: int = Field(1, ge=0)  # automatic retries of a failed trial (from its last checkpoint)
    num_to_keep: int | None = Field(1, ge=1)  # checkpoints kept per trial
    resume: bool = True  # restore an existing experiment of the same name (Tuner.restore)
    output: OutputConfig = Field(default_factory=partial(OutputConfig, uri="outputs/sweeps"))
    tracking: TrackingConfig = Field(default_factory=partial(TrackingConfig, experiment="synray-sweeps"))

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not self.base:
            raise ValueError("base (the YAML config of the job to sweep) is required")
        if not self.space:
            raise ValueError("space: give at least one key to search, e.g. {resampling_coef: {grid: [0.5, 1.0]}}")
        if self.search.algorithm == "grid":
            bad = [k for k, d in self.space.items() if d.kind != "grid"]
            if bad:
                raise ValueError(f"search.algorithm 'grid' needs grid values for every key; {bad} are not grids "
                                 "(use search.algorithm: random)")
            if self.search.num_samples != 1:
                raise ValueError("search.num_samples must be 1 for a grid search (every combination runs once)")
        return self

    @property
    def resolved_metric(self) -> str:
        if self.metric:
            return self.metric
        return "val/cos" if self.target == "distill" else f"objective/{self.objective.name}"
