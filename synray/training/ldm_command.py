"""``synray train-ldm CONFIG``: encode images (resumable) and train the identity-conditioned LDM on Ray Train."""

from __future__ import annotations

import argparse
import json

from synray.commands.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-ldm", help="train an identity-conditioned LDM (CPD, EMA) on Ray Train (re-run to resume)")
    add_config_args(p)
    p.set_defaults(func=run)


def train_ldm(config: str, overrides: list[str] | None = None, quiet: bool = False):
    """Load and validate the config, encode and train; returns the :class:`~synray.ldm.job.LDMOutcome`."""
    from synray.config import ConfigError
    from synray.config.jobs import load_job_config
    from synray.runtime import init_ray
    from synray.ldm.data import LDMDataError, list_images
    from synray.ldm.job import run_train_ldm

    overrides = list(overrides or [])
    if quiet:
        overrides.append("ray.quiet=true")
    cfg = load_job_config(config, overrides, kind="train_ldm")
    try:
        list_images(cfg)  # the data must be there before Ray starts
    except LDMDataError as exc:
        raise ConfigError(f"invalid config {config}: {exc}") from None
    started = init_ray(cfg.ray)
    try:
        return run_train_ldm(cfg)
    except LDMDataError as exc:
        raise ConfigError(f"invalid config {config}: {exc}") from None
    finally:
        if started:
            import ray

            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    out = train_ldm(args.config, args.overrides, args.quiet)
    print(json.dumps({"output": out.output_uri, "checkpoints": out.checkpoint_uri, "generator": out.generator,
                      "metrics": out.metrics}, indent=2, default=str))
    return 0
