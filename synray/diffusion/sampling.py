"""One entry point over the samplers, used by the synthesis pipeline.

``method``: ``"ddpm"`` (IDiff-Face, all T steps), ``"ddim"`` (ADMIS), ``"uiface"`` (two-stage),
``"dpmpp"`` (DPM-Solver++ 2M). ``mode`` picks the reference-compatible or the textbook variant where
they differ (default "reference"; DPM-Solver++ has no modes). ``guidance`` is the classifier-free
guidance scale: IDiff-Face rule w*c - (w-1)*u for ddpm/ddim/dpmpp (None = no guidance, two passes
per step otherwise), UIFace rule (1+w)*c - w*u for uiface (None = the published w = 1).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from synray.diffusion.ddim import Generators, ddim_sample
from synray.diffusion.ddpm import ddpm_sample
from synray.diffusion.dpm_solver import dpmpp_2m_sample
from synray.diffusion.schedule import linear_schedule
from synray.diffusion.uiface import uiface_sample

METHODS: tuple[str, ...] = ("ddpm", "ddim", "uiface", "dpmpp")
DEFAULT_STEPS = {"ddim": 50, "uiface": 50, "dpmpp": 20}
OPTIONS = {
    "ddpm": {"schedule", "dropout_mask", "callback", "guidance_rule"},
    "ddim": {"schedule", "dropout_mask", "callback", "guidance_rule", "eta"},
    "uiface": {"schedule", "eta", "step_th", "mse_th"},
    "dpmpp": {"schedule", "dropout_mask", "callback", "guidance_rule", "spacing"},
}


def sample(
    model: Callable,
    x_T: Tensor,
    context: Tensor | None = None,
    method: str = "ddim",
    steps: int | None = None,
    mode: str | None = None,
    guidance: float | None = None,
    generator: Generators = None,
    **options,
) -> Tensor:
    """Denoise x_T to a latent with the chosen sampler; returns the final x (no decoding)."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; valid: {list(METHODS)}")
    unknown = set(options) - OPTIONS[method]
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {method!r}; valid: {sorted(OPTIONS[method])}")
    if isinstance(model, nn.Module) and model.training:
        raise ValueError("model is in train mode (CPD dropout would be active while sampling); call model.eval() first")
    if method == "dpmpp" and mode is not None:
        raise ValueError(f"method 'dpmpp' has no modes, got mode={mode!r}")
    mode = mode or "reference"
    rule = options.pop("guidance_rule", "idiff")

    if method == "ddpm":
        T = (options.get("schedule") or linear_schedule()).T
        if steps is not None and steps != T:
            raise ValueError(f"method 'ddpm' always runs all T={T} steps, got steps={steps}; "
                             "use 'ddim' or 'dpmpp' for fewer")
        return ddpm_sample(model, x_T, context, mode=mode, generator=generator, guidance_scale=guidance,
                           guidance_rule_name=rule, **options)
    steps = DEFAULT_STEPS[method] if steps is None else steps
    if method == "ddim":
        return ddim_sample(model, x_T, context, steps=steps, mode=mode, guidance_scale=guidance,
                           guidance_rule_name=rule, generator=generator, **options)
    if method == "uiface":
        cfg = 1.0 if guidance is None else guidance
        return uiface_sample(model, x_T, context, steps=steps, cfg_scale=cfg, mode=mode, generator=generator,
                             **options).x
    return dpmpp_2m_sample(model, x_T, context, steps=steps, guidance_scale=guidance, guidance_rule_name=rule,
                           **options)
