"""``synray config CONFIG``: validate a config and print it resolved (secrets redacted)."""

from __future__ import annotations

import argparse

from synray.commands.common import add_config_args
from synray.config import to_yaml
from synray.config.jobs import load_job_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate a config file and print it resolved")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_job_config(args.config, args.overrides)
    print(to_yaml(cfg), end="")
    return 0
