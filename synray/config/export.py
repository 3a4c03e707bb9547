"""Dataset export config (``kind: export``): any dataset synray reads -> insightface RecordIO or an image-folder tree.

``synray export URI DEST --format rec|folder`` fills ``source``, ``output.uri`` and ``format``.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field, model_validator

from synray.config.base import JobConfig, OutputConfig
from synray.config.paths import URI


class ExportConfig(JobConfig):
    kind: Literal["export"] = "export"
    name: str = "export"
    #: a synray dataset folder, ``rec://<train.rec or its folder>`` or ``folder://<root>`` (local or S3)
    source: URI | None = None
    #: ``rec``: ``train.rec``, ``train.idx``, ``property`` (arcface_torch's MXFaceDataset layout);
    #: ``folder``: ``<identity>/<n>.<ext>``
    format: Literal["rec", "folder"] = "rec"
    #: ``keep`` copies the encoded bytes as they are (lossless); ``jpg``/``png`` re-encode
    image_format: Literal["keep", "jpg", "png"] = "keep"
    jpeg_quality: int = Field(95, ge=1, le=100)
    #: resize every image to (height, width) (re-encodes; ``keep`` then means PNG)
    image_size: tuple[int, int] | None = None
    rows_per_task: int = Field(1024, ge=1)  # RecordIO / folder sources; a shard is always one task
    num_cpus: float = Field(1.0, gt=0.0)  # per export task
    allow_incomplete: bool = False  # export a synray dataset whose synthesis has not finished
    output: OutputConfig = Field(default_factory=partial(OutputConfig, uri="outputs/export"))

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if not self.source:
            raise ValueError("source (the dataset to export) is required")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {list(self.image_size)}")
        return self
