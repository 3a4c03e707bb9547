"""Identity-conditioned LDM training config (``kind: train_ldm``): images + contexts -> VQ latents -> DDP UNet.

Defaults reproduce the IDiff-Face / ADMIS recipe (generation spec §3.2): 128x128 images, VQ-f4 latents
3x32x32 (unquantised, no scale factor), ElasticFace contexts (L2-normalised), T = 1000 linear schedule,
eps objective, Adam 1e-4 with CosineAnnealingWarmRestarts(10k, x2) per step, the references' EMA
(inv_gamma 1, power 0.75, max 0.9999), CPD 0.25, image flip with the context unflipped, seed 0.
UIFace is ``unet.flavour: uiface`` (learnable empty context, ``unconditioned_probability`` 0.2).

``unet.architecture`` and ``vq.config`` are checked by building the ``UNetConfig`` / ``VQConfig`` they
describe when the config loads, so a bad key or value is a config error naming the dotted key, raised
before any encoding or Ray work.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from synray.config.base import (
    JobConfig,
    OutputConfig,
    StrictModel,
    TrackingConfig,
    build_dataclass,
)
from synray.config.paths import URI, ModelRef
from synray.config.run import CheckpointConfig, ScalingConfig
from synray.models.unet_config import FLAVOURS, UNetConfig

if TYPE_CHECKING:
    from synray.models.vq import VQConfig

#: context width the architecture is checked with at load time; the real one is known once the contexts are
CONTEXT_WIDTH_PLACEHOLDER = 512


class LDMDataConfig(StrictModel):
    """Training images: CASIA-style folders (one sub-folder per identity) or a synray shard dataset."""

    source: Literal["folders", "shards"] = "folders"
    path: URI | None = None
    image_size: tuple[int, int] = (128, 128)
    extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp"])
    max_images: int | None = Field(None, ge=1)  # use only the first N images (canonical order)
    unit_size: int = Field(1024, ge=1)  # images per latent shard (the unit of resumable encoding)
    allow_incomplete: bool = False  # shards: read a dataset without its completion marker (a half-finished synthesis)
    #: the ``latents/`` folder of an earlier run on the same images, contexts and first stage (its fingerprint must
    #: match this config's): the first stage fit and the encoding are skipped, e.g. for a second UNet recipe (CPD 0,
    #: UIFace) on the latents of the first
    latents: URI | None = None
    #: encoded latents up to this many bytes are read once into Ray's object store before training, so each pass
    #: reads memory: a pass over the files re-runs Ray Data's read tasks, which wait for the CPUs the training
    #: workers hold (12 s per pass on 2 cores for a 2.5 MB set). Larger sets stream from storage; 0: always stream
    cache_bytes: int = Field(2**30, ge=0)


class LDMContextsConfig(StrictModel):
    """Per-image contexts: FR embeddings computed by a frozen ``embedder`` or read from a ``file``.

    ``file``: ``.npy`` [N, D] in the dataset's canonical order (sorted folder paths / shard rows), or
    ``.npz`` with ``names`` (relative image paths, as ADMIS's ``image_names.pkl`` lists them) and
    ``embeddings``. Contexts are L2-normalised either way.
    """

    source: Literal["embedder", "file"] = "embedder"
    embedder: ModelRef | None = None  # "<registry name>:<checkpoint>" or a synray checkpoint path
    path: URI | None = None
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LDMContextsConfig:
        if self.source == "embedder" and not self.embedder:
            raise ValueError("contexts.embedder is required for source 'embedder'")
        if self.source == "file" and not self.path:
            raise ValueError("contexts.path is required for source 'file'")
        return self


class VQFitConfig(StrictModel):
    """Fit a small first stage when no VQ weights are given: autoencoder, then a k-means codebook."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    images: int = Field(2048, ge=1)  # images sampled (canonical order) for fitting
    n_embed: int = Field(256, ge=2)
    kmeans_iters: int = Field(10, ge=0)


class LDMVQConfig(StrictModel):
    """The first stage: published ``first_stage_{encoder,decoder}_state_dict.pt`` files, or ``fit``."""

    encoder: URI | None = None
    decoder: URI | None = None
    config: dict[str, Any] | None = None  # VQConfig fields; None = the published VQ-f4
    fit: VQFitConfig = VQFitConfig()

    @model_validator(mode="after")
    def _check(self) -> LDMVQConfig:
        given = (self.encoder is not None, self.decoder is not None)
        if given[0] != given[1]:
            raise ValueError("vq.encoder and vq.decoder must be given together")
        if not given[0] and self.fit.steps == 0:
            raise ValueError("no first stage: give vq.encoder and vq.decoder, or vq.fit.steps > 0 to fit one")
        if given[0] and self.fit.steps:
            raise ValueError("vq.fit.steps must be 0 when vq.encoder/vq.decoder are given")
        self.vq_config()
        return self

    def vq_config(self) -> VQConfig:
        """The first stage's VQConfig: ``config`` (default: the published VQ-f4), with ``fit.n_embed`` entries
        when fitting and ``config`` leaves the codebook size open."""
        from synray.models.vq import VQConfig  # torch

        base = dict(self.config or {})
        if self.fit.steps and "n_embed" not in base:
            base["n_embed"] = self.fit.n_embed
        return VQConfig.from_dict(base, key="vq.config")


_UNET_FLAGS = frozenset({"context_dropout", "unconditioned_probability", "learn_empty_context"})  # set by flavour/CPD


class LDMUNetConfig(StrictModel):
    """The denoiser: a published flavour plus CPD / UIFace settings and architecture overrides."""

    flavour: Literal["idiff_face", "admis", "uiface"] = "idiff_face"
    context_dropout: float = Field(0.25, ge=0.0, lt=1.0)  # CPD ratio
    unconditioned_probability: float | None = Field(None, ge=0.0, lt=1.0)  # default: the flavour's (UIFace 0.2)
    #: other UNetConfig fields, e.g. {initial_channels: 32, channel_multipliers: [1, 2]}; context_input_channels
    #: defaults to the context dimension
    architecture: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> LDMUNetConfig:
        reserved = _UNET_FLAGS & set(self.architecture)
        if reserved:
            raise ValueError(f"unet.architecture must not set {sorted(reserved)}; use unet.flavour / unet.context_dropout")
        self.unet_config(CONTEXT_WIDTH_PLACEHOLDER)
        return self

    def unet_config(self, context_dim: int) -> UNetConfig:
        """The UNetConfig: the flavour's flags, CPD, the architecture overrides and ``context_dim`` as the
        context width unless ``architecture.context_input_channels`` sets it. A bad entry is a ValueError
        naming ``unet.architecture.<key>``."""
        flags = dict(FLAVOURS[self.flavour])
        flags["context_dropout"] = self.context_dropout
        if self.unconditioned_probability is not None:
            flags["unconditioned_probability"] = self.unconditioned_probability
        return build_dataclass(UNetConfig, {"context_input_channels": context_dim, **self.architecture, **flags},
                      "unet.architecture", hidden=_UNET_FLAGS)


class EMAConfig(StrictModel):
    inv_gamma: float = Field(1.0, gt=0.0)
    power: float = Field(0.75, gt=0.0)
    max_decay: float = Field(0.9999, ge=0.0, le=1.0)
    reference_compat: bool = False  # the references' EMA bug (a plain copy); see synray.diffusion.training


class LDMTrainingConfig(StrictModel):
    steps: int = Field(150_000, ge=1)
    batch_size: int = Field(512, ge=1)  # global (64 per device on 8 GPUs in the references)
    lr: float = Field(1e-4, gt=0.0)
    restart_period: int = Field(10_000, ge=1)
    restart_mult: int = Field(2, ge=1)
    flip: bool = True  # flip the image (its latent), not the context
    ema: EMAConfig = EMAConfig()
    checkpoint_every: int = Field(5000, ge=1)
    log_every: int = Field(100, ge=1)


class EncodeConfig(StrictModel):
    """The encoding pre-stage (contexts + VQ latents once per image): one Ray task per unit."""

    num_cpus: float = Field(1.0, gt=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    max_in_flight: int = Field(4, ge=1)


class LDMConfig(JobConfig):
    kind: Literal["train_ldm"] = "train_ldm"
    name: str = Field("ldm", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # Ray Train run name: re-runs resume
    seed: int = Field(0, ge=0)
    data: LDMDataConfig = LDMDataConfig()
    contexts: LDMContextsConfig = Field(default_factory=partial(LDMContextsConfig, embedder="elasticface_iresnet100:Elastic_R100_295672backbone.pth"))
    vq: LDMVQConfig = Field(default_factory=partial(LDMVQConfig, encoder="first_stage_encoder_state_dict.pt", decoder="first_stage_decoder_state_dict.pt"))
    unet: LDMUNetConfig = LDMUNetConfig()
    training: LDMTrainingConfig = LDMTrainingConfig()
    scaling: ScalingConfig = ScalingConfig()
    encode: EncodeConfig = EncodeConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = Field(default_factory=partial(OutputConfig, uri="outputs/ldm"))
    tracking: TrackingConfig = Field(default_factory=partial(TrackingConfig, experiment="synray-ldm"))

    @model_validator(mode="after")
    def _check(self) -> LDMConfig:
        if not self.data.path:
            raise ValueError("data.path (an identity-folder root or a shard dataset URI) is required")
        bad = [n for n in self.scaling.worker_counts if self.training.batch_size % n]
        if bad:
            raise ValueError(f"training.batch_size {self.training.batch_size} must be divisible by "
                             f"scaling.num_workers (every worker count it allows: {bad} do not divide it)")
        factor = self.vq.vq_config().downsampling
        if self.data.image_size[0] % factor or self.data.image_size[1] % factor:
            raise ValueError(f"data.image_size {list(self.data.image_size)} must be divisible by the first stage's "
                             f"downsampling {factor} (vq.config.ch_mult)")
        return self
