"""Argument conventions shared by every job command: ``CONFIG`` and repeated ``--set key=value``."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("config", nargs=None if required else "?", help="YAML config (see conf/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value by its dotted key, e.g. --set train.lr=0.05 (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also when CI is set)")
