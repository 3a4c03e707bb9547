"""One entry point over the samplers: a sampler config in, a denoised latent out.

Synthesis (``LDMGenerator``), distillation (the LDM latent generator) and sweep objectives all call
:func:`sample` with the ``sampler:`` block of their config (:mod:`synray.config.sampler`), so a method
and its options mean the same everywhere and every default is the config's. The samplers themselves
(``ddpm_sample``, ``ddim_sample``, ``uiface_sample``, ``dpmpp_2m_sample``, ``unipc_sample``) stay plain
functions of tensors; this module only maps config fields onto their arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import TypeAdapter
from torch import Tensor, nn

from synray.config.base import StrictModel
from synray.config.sampler import (
    METHODS,
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMppSampler,
    SamplerConfig,
    UIFaceSampler,
    UniPCSampler,
)
from synray.diffusion.ddim import Generators, ddim_sample
from synray.diffusion.ddpm import ddpm_sample
from synray.diffusion.dpm_solver import dpmpp_2m_sample
from synray.diffusion.schedule import DiffusionSchedule, linear_schedule
from synray.diffusion.uiface import uiface_sample
from synray.diffusion.unipc import unipc_sample

__all__ = ["METHODS", "Sampler", "sample", "sampler_config", "register_sampler"]

Sampler = DDPMSampler | DDIMSampler | UIFaceSampler | DPMppSampler | UniPCSampler
_ADAPTER: TypeAdapter = TypeAdapter(SamplerConfig)


def register_sampler(config: type[StrictModel], run: Callable[..., Tensor]) -> None:
    """Add a sampling method: ``config`` is its config class (a ``method: Literal["name"]`` field, every option
    typed), ``run(cfg, model, x_T, context, generator, schedule)`` returns the final latent. Configs name it
    with ``sampler: {method: name, ...}`` once the module that registers it is imported (``plugins``)."""
    method = config.model_fields["method"].default
    SAMPLERS[method] = config
    _RUN[method] = run


def sampler_config(value: Sampler | Mapping[str, Any]) -> Sampler:
    """A validated sampler config from a mapping (``{"method": "unipc", "steps": 5}``) or a config object."""
    if isinstance(value, tuple(SAMPLERS.values())):
        return value
    return _ADAPTER.validate_python(dict(value) if isinstance(value, Mapping) else value)


def _ddpm(cfg: DDPMSampler, model, x_T, context, generator, schedule) -> Tensor:
    if cfg.steps != schedule.T:
        raise ValueError(f"method 'ddpm' always runs all T={schedule.T} steps, got steps={cfg.steps}")
    return ddpm_sample(model, x_T, context, mode=cfg.mode, generator=generator, guidance_scale=cfg.guidance,
                       schedule=schedule)


def _ddim(cfg: DDIMSampler, model, x_T, context, generator, schedule) -> Tensor:
    return ddim_sample(model, x_T, context, steps=cfg.steps, mode=cfg.mode, eta=cfg.eta, guidance_scale=cfg.guidance,
                       generator=generator, schedule=schedule)


def _uiface(cfg: UIFaceSampler, model, x_T, context, generator, schedule) -> Tensor:
    return uiface_sample(model, x_T, context, steps=cfg.steps, step_th=cfg.two_stage.step_th,
                         mse_th=cfg.two_stage.mse_th, cfg_scale=cfg.guidance, eta=cfg.eta, mode=cfg.mode,
                         generator=generator, schedule=schedule).x


def _dpmpp(cfg: DPMppSampler, model, x_T, context, generator, schedule) -> Tensor:
    return dpmpp_2m_sample(model, x_T, context, steps=cfg.steps, spacing=cfg.spacing, guidance_scale=cfg.guidance,
                           schedule=schedule)


def _unipc(cfg: UniPCSampler, model, x_T, context, generator, schedule) -> Tensor:
    return unipc_sample(model, x_T, context, steps=cfg.steps, order=cfg.order, variant=cfg.variant,
                        spacing=cfg.spacing, guidance_scale=cfg.guidance, schedule=schedule)


_RUN: dict[str, Callable[..., Tensor]] = {"ddpm": _ddpm, "ddim": _ddim, "uiface": _uiface, "dpmpp": _dpmpp,
                                          "unipc": _unipc}


def sample(
    cfg: Sampler | Mapping[str, Any],
    model: Callable,
    x_T: Tensor,
    context: Tensor | None = None,
    *,
    generator: Generators = None,
    schedule: DiffusionSchedule | None = None,
) -> Tensor:
    """Denoise x_T with the configured sampler; returns the final latent (no decoding).

    `generator` feeds the noise of stochastic samplers (``ddpm``; ``ddim``/``uiface`` with eta > 0):
    a list with one generator per sample keeps each sample independent of its batch mates; None draws
    from torch's global RNG. Deterministic samplers never draw. `schedule` defaults to the linear one.
    """
    cfg = sampler_config(cfg)
    if (isinstance(model, nn.Module) or hasattr(model, "training")) and model.training:
        raise ValueError("model is in train mode (CPD dropout would be active while sampling); call model.eval() first")
    return _RUN[cfg.method](cfg, model, x_T, context, generator, schedule or linear_schedule())
