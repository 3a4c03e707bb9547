"""The sampler block shared by synthesis, distillation and sweep configs, tagged by ``method``.

Each method admits only its own options, so a setting that would not apply is an error naming the
dotted key (``generator.sampler.eta: unknown key`` for ``method: dpmpp``) instead of being dropped.
The defaults written here are the only ones: :func:`synray.diffusion.sampling.sample` passes every
field to the sampler, and a test checks that the samplers' keyword defaults agree with them.

| method | what | options |
|---|---|---|
| ``ddpm`` | ancestral DDPM over all T steps (IDiff-Face) | mode, guidance |
| ``ddim`` | DDIM (ADMIS) | steps, mode, eta, guidance |
| ``uiface`` | UIFace two-stage DDIM: adaptive switch, attention injection | steps, mode, eta, guidance, two_stage |
| ``dpmpp`` | DPM-Solver++(2M) | steps, spacing, guidance |
| ``unipc`` | UniPC multistep predictor-corrector (B(h)), the few-step sampler | steps, order, variant, spacing, guidance |

``guidance`` is the classifier-free guidance scale: IDiff-Face's rule ``w*c - (w-1)*u`` (None = no
guidance, one model pass per step) for every method but ``uiface``, which uses UIFace's rule
``(1+w)*c - w*u`` with the published ``w = 1``. A missing ``method`` means ``ddim``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from synray.config.base import StrictModel

#: T of the linear schedule every synray model is trained with (``synray.diffusion.schedule.T_DEFAULT``)
TRAIN_STEPS = 1000
DEFAULT_METHOD = "ddim"

Mode = Literal["reference", "textbook"]
Spacing = Literal["logsnr", "time_uniform"]


class DDPMSampler(StrictModel):
    """Ancestral DDPM (IDiff-Face): every one of the T steps; ``mode: reference`` adds no noise at t = 1 and 0."""

    method: Literal["ddpm"] = "ddpm"
    #: always T; stated so that a config shows the cost (use ddim / dpmpp / unipc for fewer steps)
    steps: int = TRAIN_STEPS
    mode: Mode = "reference"
    guidance: float | None = Field(None, ge=0.0)

    @field_validator("steps")
    @classmethod
    def _all_steps(cls, steps: int) -> int:
        if steps != TRAIN_STEPS:
            raise ValueError(f"method 'ddpm' always runs all T={TRAIN_STEPS} steps, got steps={steps}; "
                             "use 'ddim', 'dpmpp' or 'unipc' for fewer")
        return steps

    @property
    def stochastic(self) -> bool:
        return True


class DDIMSampler(StrictModel):
    """DDIM (ADMIS: 50 steps, eta 0, the reference's alpha_bar index convention)."""

    method: Literal["ddim"] = "ddim"
    steps: int = Field(50, ge=1, le=TRAIN_STEPS)
    mode: Mode = "reference"
    eta: float = Field(0.0, ge=0.0)
    guidance: float | None = Field(None, ge=0.0)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0


class TwoStageConfig(StrictModel):
    """UIFace's adaptive stage partition (published values)."""

    step_th: int = Field(500, ge=0, le=TRAIN_STEPS)
    mse_th: float = Field(0.006, ge=0.0)


class UIFaceSampler(StrictModel):
    """UIFace two-stage DDIM with attention injection; guidance by UIFace's rule (published w = 1)."""

    method: Literal["uiface"] = "uiface"
    steps: int = Field(50, ge=1, le=TRAIN_STEPS)
    mode: Mode = "reference"
    eta: float = Field(0.0, ge=0.0)
    guidance: float = Field(1.0, ge=0.0)
    two_stage: TwoStageConfig = TwoStageConfig()

    @property
    def stochastic(self) -> bool:
        return self.eta > 0


class DPMppSampler(StrictModel):
    """DPM-Solver++(2M): deterministic, ``steps`` model evaluations ending at t = 0."""

    method: Literal["dpmpp"] = "dpmpp"
    steps: int = Field(20, ge=1, le=TRAIN_STEPS)
    spacing: Spacing = "logsnr"
    guidance: float | None = Field(None, ge=0.0)

    @property
    def stochastic(self) -> bool:
        return False


class UniPCSampler(StrictModel):
    """UniPC (B(h) predictor-corrector, data prediction): deterministic, ``steps`` model evaluations."""

    method: Literal["unipc"] = "unipc"
    steps: int = Field(5, ge=1, le=TRAIN_STEPS)
    order: int = Field(3, ge=1, le=3)
    variant: Literal["bh1", "bh2"] = "bh2"
    spacing: Spacing = "time_uniform"
    guidance: float | None = Field(None, ge=0.0)

    @property
    def stochastic(self) -> bool:
        return False


#: method -> its config class; :func:`synray.diffusion.sampling.register_sampler` adds methods
SAMPLERS: dict[str, type[StrictModel]] = {
    "ddpm": DDPMSampler, "ddim": DDIMSampler, "uiface": UIFaceSampler, "dpmpp": DPMppSampler, "unipc": UniPCSampler,
}

#: the built-in methods
METHODS: tuple[str, ...] = tuple(SAMPLERS)


def _sampler_block(value: Any) -> StrictModel:
    """The block as its method's config (the table is read at validation time, so registered methods count);
    errors are reported at ``sampler.<key>``."""
    if isinstance(value, tuple(SAMPLERS.values())):
        return value
    valid = ", ".join(SAMPLERS)
    if not isinstance(value, dict):
        raise PydanticCustomError("sampler_block", "a sampler is a mapping with a 'method' ({valid})", {"valid": valid})
    method = value.get("method", DEFAULT_METHOD)
    if method not in SAMPLERS:
        raise ValidationError.from_exception_data("sampler", [{"type": PydanticCustomError(
            "sampler_method", "unknown sampler method '{method}'; valid: {valid}", {"method": str(method), "valid": valid}),
            "loc": ("method",), "input": method}])
    cls = SAMPLERS[method]
    try:
        return cls.model_validate({**value, "method": method})
    except ValidationError as err:
        details: list[Any] = []
        for e in err.errors():
            if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
                details.append({"type": PydanticCustomError(
                    "extra_forbidden", "unknown key for method '{method}' (its keys: {keys})",
                    {"method": method, "keys": ", ".join(cls.model_fields)}), "loc": e["loc"], "input": e["input"]})
                continue
            detail = {"type": e["type"], "loc": e["loc"], "input": e["input"]}
            if "ctx" in e:
                detail["ctx"] = e["ctx"]
            details.append(detail)
        raise ValidationError.from_exception_data("sampler", details) from None


#: the sampler block of every config: one of the methods of :data:`SAMPLERS`
SamplerConfig = Annotated[
    StrictModel,
    PlainValidator(_sampler_block),
    PlainSerializer(lambda v, info: v.model_dump(mode=info.mode)),
]
