"""``synray`` command line: one subcommand per job, each taking a YAML config plus ``--set`` overrides."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand modules; each exposes ``register(subparsers)`` that sets ``func`` on its parser.
COMMANDS = (
    "synray.commands.config_cmd",
    "synray.commands.quickstart",
    "synray.evaluation.command",
    "synray.synthesis.command",
    "synray.training.command",
    "synray.distill.command",
    "synray.training.ldm_command",
    "synray.tuning.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synray", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        try:
            importlib.import_module(mod).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    from synray.config import ConfigError
    from synray.io.storage import StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, StorageError) as exc:
        print(f"synray {args.command}: {exc}", file=sys.stderr)
        return 2


def job_main(command: str, argv: list[str]) -> int:
    """``jobs/*.py`` entry points: ``--config PATH`` plus the command's own flags."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        argv = [argv[i + 1], *argv[:i], *argv[i + 2:]]
    return main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
