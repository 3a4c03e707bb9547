"""``synray sweep CONFIG``: Ray Tune over a distillation or LDM-training config, every trial an MLflow run."""

from __future__ import annotations

import argparse
import json

from synray.commands.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep (resampling_coef, CPD ratio, ...) tracked in MLflow (re-run to resume)")
    add_config_args(p)
    p.set_defaults(func=run)


def sweep(config: str, overrides: list[str] | None = None, quiet: bool = False):
    """Load and validate the sweep and its target config, run (or resume) it, return the :class:`SweepOutcome`."""
    from synray.config import ConfigError
    from synray.config.jobs import load_job_config
    from synray.distill.generators import GeneratorError
    from synray.distill.teachers import TeacherError
    from synray.runtime import init_ray
    from synray.ldm.data import LDMDataError
    from synray.tuning.sweep import load_target, run_sweep

    overrides = list(overrides or [])
    if quiet:
        overrides.append("ray.quiet=true")
    cfg = load_job_config(config, overrides, kind="sweep")
    load_target(cfg)  # the target config and every searched value must validate before Ray starts
    started = init_ray(cfg.ray)
    try:
        return run_sweep(cfg)
    except (TeacherError, GeneratorError, LDMDataError) as exc:
        raise ConfigError(f"invalid config {config}: {exc}") from None
    finally:
        if started:
            import ray

            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    out = sweep(args.config, args.overrides, args.quiet)
    print(json.dumps({"experiment": out.path, "best": out.best_params, "metric": out.metric,
                      "best_value": out.best_metric, "parent_run_id": out.parent_run_id, "errors": out.errors},
                     indent=2, default=str))
    return 0 if not out.errors else 1
