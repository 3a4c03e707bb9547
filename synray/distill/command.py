"""``synray distill CONFIG``: SynthDistill on Ray Train (re-run to resume)."""

from __future__ import annotations

import argparse
import json

from synray.commands.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a face-recognition student from a teacher on generated faces (Ray Train)")
    add_config_args(p)
    p.set_defaults(func=run)


def distill(config: str, overrides: list[str] | None = None, quiet: bool = False):
    """Load and validate the config, distil, and return the :class:`~synray.distill.loop.DistillOutcome`."""
    from synray.config import ConfigError
    from synray.config.jobs import load_job_config
    from synray.distill.generators import GeneratorError
    from synray.distill.loop import check_distill_config, run_distill
    from synray.distill.teachers import TeacherError
    from synray.runtime import init_ray

    overrides = list(overrides or [])
    if quiet:
        overrides.append("ray.quiet=true")
    cfg = load_job_config(config, overrides, kind="distill")
    try:
        check_distill_config(cfg)  # before Ray starts: files, teacher, embedding sizes
    except (ValueError, TeacherError, GeneratorError) as exc:
        raise ConfigError(f"invalid config {config}: {exc}") from None
    started = init_ray(cfg.ray)
    try:
        return run_distill(cfg, checked=True)
    finally:
        if started:
            import ray

            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    outcome = distill(args.config, args.overrides, args.quiet)
    print(json.dumps({"output": outcome.output_uri, "student": outcome.student_uri, "metrics": outcome.metrics},
                     indent=2, default=str))
    return 0
