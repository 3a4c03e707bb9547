"""``synray train CONFIG``: train a face-recognition model on shards with Ray Train (re-run to resume)."""

from __future__ import annotations

import argparse
import json

from synray.commands.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a face-recognition model on shards with Ray Train (re-run to resume)")
    add_config_args(p)
    p.set_defaults(func=run)


def train(config: str, overrides: list[str] | None = None, quiet: bool = False):
    """Load and validate the config, train, and return the :class:`TrainOutcome`."""
    from synray.config import ConfigError
    from synray.config.jobs import load_job_config
    from synray.io.shards import ShardError
    from synray.runtime import init_ray
    from synray.training.data import DataError
    from synray.training.recognition import plan_training, run_training

    overrides = list(overrides or [])
    if quiet:
        overrides.append("ray.quiet=true")
    cfg = load_job_config(config, overrides, kind="train")
    try:
        plan_training(cfg)  # the data must fit the config before Ray starts
    except (DataError, ShardError) as exc:
        raise ConfigError(f"invalid config {config}: {exc}") from None
    started = init_ray(cfg.ray)
    try:
        return run_training(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    outcome = train(args.config, args.overrides, args.quiet)
    print(json.dumps({"output": outcome.output_uri, "checkpoint": outcome.checkpoint_uri,
                      "metrics": outcome.metrics}, indent=2, default=str))
    return 0
