"""Dataset report config (``kind: report``): counts, identity statistics under an FR model, leakage, a sample grid.

``synray report URI --model MODEL`` fills ``source`` and ``model``.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field, model_validator

from synray.config.base import JobConfig, OutputConfig, StrictModel
from synray.config.paths import URI, ModelRef


class GridConfig(StrictModel):
    """The sample grid: one row per identity, one column per image."""

    identities: int = Field(8, ge=1, le=64)
    samples: int = Field(8, ge=1, le=64)
    tile: int | None = Field(None, ge=16, le=512)  # None: the images' own size, up to 112


class ReportConfig(JobConfig):
    kind: Literal["report"] = "report"
    name: str = "report"
    seed: int = Field(0, ge=0)
    #: a synray dataset folder, ``rec://...`` or ``folder://...``
    source: URI | None = None
    allow_incomplete: bool = False
    #: FR model for the identity statistics: a synray checkpoint or ``<registry name>:<published weights>``
    model: ModelRef | None = None
    #: identities embedded (all when fewer; an evenly spread subset otherwise) and images per identity
    identities: int = Field(1000, ge=2)
    images_per_identity: int = Field(8, ge=2)
    batch_size: int = Field(64, ge=1)
    #: identity centres closer than this (cosine) are reported as near-duplicate identities
    duplicate_threshold: float = Field(0.7, ge=-1.0, le=1.0)
    #: the generator's training identities: an embeddings file (.npy/.npz/.parquet [N, D]) or a dataset URI
    reference: URI | None = None
    reference_identities: int = Field(1000, ge=1)  # when ``reference`` is a dataset: identities embedded
    leakage_threshold: float = Field(0.5, ge=-1.0, le=1.0)  # nearest reference identity above this: leaked
    grid: GridConfig = GridConfig()
    bins: int = Field(40, ge=5, le=200)  # histogram bins of the plots
    output: OutputConfig = Field(default_factory=partial(OutputConfig, uri="outputs/report"))

    @model_validator(mode="after")
    def _check(self) -> ReportConfig:
        if not self.source:
            raise ValueError("source (the dataset to report on) is required")
        if self.reference and not self.model:
            raise ValueError("reference needs model (its identities are compared in the model's embedding space)")
        return self
