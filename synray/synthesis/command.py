"""``synray synth CONFIG``: make a sharded, identity-labelled dataset (resumable)."""

from __future__ import annotations

import argparse
import json

from synray.commands.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="synthesise a sharded face dataset on Ray (re-run to resume)")
    add_config_args(p)
    p.add_argument("--local", action="store_true", help="run the stages in a plain loop in this process (no Ray)")
    p.set_defaults(func=run)


def synthesize(config: str, overrides: list[str], quiet: bool = False, local: bool = False) -> dict:
    from synray.config.jobs import load_job_config
    from synray.runtime import init_ray
    from synray.synthesis.pipeline import check_config, run_local, run_synthesis
    from synray.tracking import job_run

    if quiet:
        overrides = [*overrides, "ray.quiet=true"]
    cfg = load_job_config(config, overrides, kind="synth")
    try:
        check_config(cfg)
    except ValueError as exc:
        from synray.config import ConfigError

        raise ConfigError(f"invalid config {config}: {exc}") from None
    with job_run(cfg, "synth") as tracker:
        if local:
            return run_local(cfg, tracker)
        started = init_ray(cfg.ray)
        try:
            return run_synthesis(cfg, tracker)
        finally:
            if started:
                import ray

                ray.shutdown()


def run(args: argparse.Namespace) -> int:
    summary = synthesize(args.config, args.overrides, args.quiet, args.local)
    print(json.dumps(summary, indent=2, default=str))
    return 0
