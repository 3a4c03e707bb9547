"""Synthesis job config (``kind: synth``): contexts -> generation -> alignment -> ID augmentation -> shards."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from synray.config.base import JobConfig, OutputConfig, StrictModel
from synray.config.paths import URI, ModelRef
from synray.config.run import Precision
from synray.config.sampler import DDIMSampler, SamplerConfig
from synray.synthesis.registry import generator_entry


def _batch_size(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("a batch size is an integer >= 1 or 'auto'")


#: images per batch, or ``auto``
BatchSize = Annotated[int | Literal["auto"], PlainValidator(_batch_size)]


class IdentitiesConfig(StrictModel):
    """Identities ``start .. start+count-1`` grouped into fixed work units (one shard each)."""

    count: int = Field(256, ge=1)
    start: int = Field(0, ge=0)
    unit_size: int = Field(64, ge=1, le=100_000)


class SeparationConfig(StrictModel):
    """Reject a context whose cosine to an already accepted one exceeds ``max_cosine``."""

    max_cosine: float | None = Field(None, gt=-1.0, le=1.0)
    max_tries: int = Field(100, ge=1)


class ContextMixupConfig(StrictModel):
    """SynFace identity mixup: every image of identity i blends i's code with a partner's, weight ``phi`` on i.

    As SynFace (``data/syn_images.py``) does it, each image draws its own partner and its own ``phi`` from
    ``weights`` (default SynFace's grid 0, 0.05, ..., 1), so one class spans a range of mixes; a one-value list
    gives every image the same weight.
    """

    weights: list[float] | None = None

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not 0.0 <= w <= 1.0 for w in v)):
            raise ValueError(f"must be a non-empty list of values in [0, 1], got {v}")
        return v


class ContextsConfig(StrictModel):
    #: ``empty``: the model's empty context for every image, i.e. unconditional samples (e.g. the faces of a context
    #: database: ADMIS embeds faces of an unconditional model)
    source: Literal["gaussian", "embeddings_file", "face_embeddings", "mixup", "empty"] = "gaussian"
    dim: int = Field(512, ge=2)
    #: embeddings file (.npy / .parquet; for mixup: the rows it blends) or a folder of context face images
    path: URI | None = None
    embedder: ModelRef | None = None  # FR model for face_embeddings: "world_teacher" or "<registry name>:<checkpoint>"
    #: face_embeddings: also embed the mirrored face and add the two (flip fusion); ADMIS embeds each face once
    flip: bool = False
    separation: SeparationConfig = SeparationConfig()
    mixup: ContextMixupConfig = ContextMixupConfig()

    @model_validator(mode="after")
    def _needs_path(self) -> ContextsConfig:
        if self.source == "embeddings_file" and not self.path:
            raise ValueError("contexts.path is required for source 'embeddings_file'")
        return self


class GeneratorConfig(StrictModel):
    """Which generator makes the images and how its actor pool is sized."""

    #: a name of :data:`synray.synthesis.registry.GENERATORS` (built in: ldm, world, dcgan; plugins add more)
    type: str = "ldm"
    #: settings of a generator that declares them (validated by its registered options model)
    options: dict[str, Any] = Field(default_factory=dict)
    unet: URI | None = None  # diffusion checkpoint (published layout)
    vq_decoder: URI | None = None
    #: VQ architecture overrides (e.g. {ch: 32, ch_mult: [1, 2]}) for non-published decoders; None = published f4
    vq_config: dict[str, Any] | None = None
    latent_shape: tuple[int, int, int] = (3, 32, 32)
    sampler: SamplerConfig = DDIMSampler()  # ADMIS's DDIM-50 (see synray.config.sampler)
    images_per_identity: int = Field(50, ge=1)
    #: images per sampler batch; ``auto``: 50 on CPU (the references' batch), on a GPU the most that fit (<= 1024)
    batch_size: BatchSize = "auto"
    #: UNet, guidance and VQ decode under autocast: auto = bf16 on CUDA (fp16 without bf16), fp32 on CPU
    precision: Precision = "auto"
    #: NHWC activations (None: off; the UNet and decoder are GroupNorm-heavy, ``benchmarks/gpu.py`` measures both)
    channels_last: bool | None = None
    #: ``torch.compile`` the UNet and the decoder (once per actor; the first batches wait for it)
    compile: bool = False
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    world_difficulty: float = Field(1.0, ge=0.0)

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        generator_entry(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        entry = generator_entry(self.type)
        if entry.options is not None:
            try:
                self.__dict__["options"] = entry.options.model_validate(self.options).model_dump(mode="json")
            except ValidationError as err:  # reported at generator.options.<key>
                raise ValidationError.from_exception_data("options", [
                    {"type": e["type"], "loc": ("options", *e["loc"]), "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e else {})}
                    for e in err.errors()]) from None
        elif self.options:
            raise ValueError(f"generator.options: generator {self.type!r} takes no options, got {sorted(self.options)}")
        if self.type == "ldm" and not (self.unet and self.vq_decoder):
            raise ValueError("generator.unet and generator.vq_decoder are required for type 'ldm'")
        if self.max_actors < self.min_actors:
            raise ValueError("generator.max_actors must be >= generator.min_actors")
        return self


class AlignmentConfig(StrictModel):
    """``resize`` (ADMIS/UIFace), ``landmarks`` (IDiff-Face: detector + 5-point similarity) or ``none``."""

    mode: Literal["resize", "landmarks", "none"] = "resize"
    size: tuple[int, int] = (112, 112)
    #: landmark detector for ``mode: landmarks``; the world generator renders aligned faces (use ``mode: none``)
    detector: Literal["retinaface"] = "retinaface"
    num_cpus: float = Field(0.5, gt=0.0)


class QualityConfig(StrictModel):
    """Identity-consistency score (cosine of each image's embedding to its identity's context/mean)."""

    embedder: ModelRef | None = None
    threshold: float | None = Field(None, ge=-1.0, le=1.0)


class IDAugmentConfig(StrictModel):
    """ADMIS/DCFace ID augmentation: add the context face ``context_repeats`` times per identity."""

    context_repeats: int = Field(0, ge=0, le=100)


class SynthConfig(JobConfig):
    kind: Literal["synth"] = "synth"
    name: str = "synth"
    seed: int = Field(0, ge=0)
    output: OutputConfig = Field(default_factory=partial(OutputConfig, uri="outputs/synth"))
    identities: IdentitiesConfig = IdentitiesConfig()
    contexts: ContextsConfig = ContextsConfig()
    generator: GeneratorConfig = Field(default_factory=partial(GeneratorConfig, type="world"))
    alignment: AlignmentConfig = AlignmentConfig()
    augment: IDAugmentConfig = IDAugmentConfig()
    quality: QualityConfig = QualityConfig()
    image_format: Literal["png", "jpg"] = "png"
    #: ``kind`` recorded for generated images: ``real`` when a generator stands in for real data (the world's real split)
    label_kind: Literal["generated", "real"] = "generated"
    #: run the stages in a plain loop in this process, without Ray (small runs, the benchmarks' baseline)
    local: bool = False
