"""Study config (``kind: study``): every seed method's recipe on the built-in world, one row each, one student.

A row is made by the jobs a user runs (``synth`` -> ``train``, ``distill``), from a ``conf/`` file plus
overrides; the study adds what ties rows together: the world split, the identities and images per row, which
of the world LDMs samples it, and the student recipe. See ``conf/study/world.yaml``.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field, model_validator

from synray.config.base import JobConfig, OutputConfig, StrictModel, TrackingConfig
from synray.config.paths import URI, ConfigRef
from synray.config.quickstart import StageConfig, WorldSplitConfig
from synray.config.sampler import SamplerConfig

#: the world LDMs a row can sample from (files in the study's asset folder)
LDMS = ("cpd25", "cpd0", "uiface")


class RowConfig(StrictModel):
    """One row: a dataset made by a ``synth`` job (or a ``distill`` run) and the student trained on it.

    ``kind``: ``real`` (the world's real split), ``synth`` (``config`` is a synth recipe sampled by the world LDM
    ``ldm``), ``distill`` (``config`` is a distill recipe, the world LDM in the loop), ``same_data`` (the dataset of
    row ``data`` trained with other ``train`` overrides, e.g. CFSM). ``fast``: also make the row with this sampler
    (a ``<name>_fast`` row). ``student: false`` measures the dataset only.
    """

    label: str
    kind: Literal["real", "synth", "distill", "same_data"]
    config: ConfigRef | None = None
    overrides: list[str] = Field(default_factory=list)
    ldm: Literal["cpd25", "cpd0", "uiface"] | None = None
    data: str | None = None
    train: list[str] = Field(default_factory=list)
    fast: SamplerConfig | None = None
    student: bool = True
    #: identities of this row as a multiple of the study's (the "more identities" row)
    identity_scale: int = Field(1, ge=1)
    #: overrides of this row's synth/distill job and of its student at ``--tiny`` size only
    tiny: list[str] = Field(default_factory=list)
    tiny_train: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> RowConfig:
        if self.kind in ("synth", "distill") and not self.config:
            raise ValueError(f"config (a {self.kind} recipe) is required for a {self.kind} row")
        if self.kind == "synth" and not self.ldm:
            raise ValueError(f"ldm (one of {', '.join(LDMS)}) is required for a synth row")
        if self.kind == "same_data" and not self.data:
            raise ValueError("data (the row whose dataset is reused) is required for a same_data row")
        return self


class ClaimConfig(StrictModel):
    """A seed paper's headline claim as a comparison of two rows' figures: ``row`` beats ``baseline`` on ``figure``.

    ``figure`` is a dataset figure (``consistency``, ``spread/pose``, ...) or a verification figure
    (``world-hard``, ``average``, ...); ``gap_to_real``: compare the distance to the real row's ``figure``
    instead (smaller is better); ``at_least``: the row's figure must reach this value (no baseline).
    ``also``: further conditions that must hold with it (e.g. consistency not lower).
    """

    paper: str
    text: str
    row: str
    figure: str
    baseline: str | None = None
    at_least: float | None = None
    gap_to_real: bool = False
    also: list[ClaimConfig] = Field(default_factory=list)
    #: ``>=``: a tie counts (the "no less than" side of a claim)
    allow_equal: bool = False

    @model_validator(mode="after")
    def _check(self) -> ClaimConfig:
        if (self.baseline is None) == (self.at_least is None):
            raise ValueError("a claim compares with a baseline row or with at_least, exactly one of them")
        return self


class ContextFacesConfig(StrictModel):
    """ADMIS's context database: faces of an unconditional model (here the world LDM of UIFace's flavour sampled
    with its empty context), one per identity, embedded once by the teacher."""

    config: ConfigRef = "conf/synth/admis.yaml"
    ldm: Literal["cpd25", "cpd0", "uiface"] = "uiface"
    overrides: list[str] = Field(default_factory=lambda: ["contexts.source=empty", "augment.context_repeats=0"])


class DomainRealConfig(StrictModel):
    """SynFace's few real-labelled images for domain mixup (2,000 CASIA identities x 10 beside 10,000 synthetic):
    ``fraction`` of the synthetic identity count, ``images`` each, world identities the real split does not hold."""

    fraction: float = Field(0.2, gt=0.0, le=1.0)
    images: int = Field(5, ge=1)


class BuildConfig(StrictModel):
    """Sizes of ``--rebuild-assets``' own fits (the LDMs follow the quickstart recipe, ``quickstart``)."""

    #: training steps of the extra LDMs; None: the quickstart recipe's (``ldm_steps``), as shipped
    ldm_steps: int | None = Field(None, ge=1)
    nuisance_identities: int = Field(400, ge=4)
    nuisance_images: int = Field(10, ge=1)
    nuisance_steps: int = Field(1500, ge=1)
    #: difficulty range of the regressor's renders: frontal (x0.4) to hard (x1.6) and a margin
    nuisance_difficulty: tuple[float, float] = (0.3, 1.8)
    cfsm_steps: int = Field(2000, ge=1)
    cfsm_target_images: int = Field(4, ge=1)


class StudyConfig(JobConfig):
    kind: Literal["study"] = "study"
    output: URI = "outputs/study"  # every row writes under it
    world: WorldSplitConfig = WorldSplitConfig(train_identities=100, images_per_identity=10)
    #: synthetic identities and generated images per identity of every row (equal to the real split's by default)
    identities: int | None = Field(None, ge=2)
    images_per_identity: int | None = Field(None, ge=2)
    #: folder of the world assets (teacher, LDMs, first stage, nuisance regressor, CFSM generator); None: shipped
    assets: URI | None = None
    #: ``--rebuild-assets``: retrain the study's extra assets (CPD 0 and UIFace LDMs, regressor, CFSM) first
    rebuild_assets: bool = False
    assets_only: bool = False
    student_epochs: int = Field(6, ge=1)
    #: images per identity of the dataset figures of a row (its first ones); all of them when None
    figure_images: int | None = Field(None, ge=2)
    #: the rows to make, in table order; none: all of ``rows``
    only: list[str] | None = None
    #: ``--tiny``: apply each row's ``tiny`` overrides
    tiny: bool = False
    #: the quickstart recipe whose assets the study starts from (and whose LDM stage trains the extra LDMs)
    quickstart: StageConfig = Field(default_factory=partial(StageConfig, config="conf/quickstart.yaml"))
    build: BuildConfig = BuildConfig()
    context_faces: ContextFacesConfig = ContextFacesConfig()
    domain_real: DomainRealConfig = DomainRealConfig()
    real: StageConfig = Field(default_factory=partial(StageConfig, config="conf/synth/world.yaml"))
    student: StageConfig = Field(default_factory=partial(StageConfig, config="conf/train/world_tiny.yaml"))
    rows: dict[str, RowConfig] = Field(default_factory=dict)
    claims: dict[str, ClaimConfig] = Field(default_factory=dict)
    tracking: TrackingConfig = Field(default_factory=partial(TrackingConfig, experiment="synray-study"))

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        names = set(self.rows)
        for name, row in self.rows.items():
            if row.kind == "same_data" and row.data not in names:
                raise ValueError(f"rows.{name}.data: no row named {row.data!r}")
        if self.only is not None:
            unknown = sorted(set(self.only) - names)
            if unknown:
                raise ValueError(f"only: unknown rows {unknown}; rows are {sorted(names)}")
        return self

    @property
    def synth_identities(self) -> int:
        return self.identities or self.world.train_identities

    @property
    def synth_images(self) -> int:
        return self.images_per_identity or self.world.images_per_identity

    def writes(self) -> dict[str, OutputConfig]:
        return {"output": OutputConfig(uri=self.output)}
