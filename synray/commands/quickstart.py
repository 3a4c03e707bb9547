"""``synray quickstart``: mini world -> teacher -> LDM -> synthetic set -> student vs a real-data baseline."""

from __future__ import annotations

import argparse
import os

from synray.commands.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the whole synthetic-data protocol on the built-in world, on local Ray")
    add_config_args(p, required=False)
    p.add_argument("--tiny", action="store_true", help="CI size (a few minutes on 2 cores)")
    p.add_argument("--distill", action="store_true", help="also distil a student from the dlib teacher on DCGAN faces")
    p.add_argument("--rebuild-assets", action="store_true",
                   help="retrain the shipped world teacher and LDM first (what produced synray/assets/world)")
    p.add_argument("--assets-only", action="store_true",
                   help="only (re)build the world teacher and LDM into assets=DIR (default: synray/assets/world)")
    p.set_defaults(func=run)


def default_config() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "quickstart.yaml")


def run(args: argparse.Namespace) -> int:
    from synray.config import load_config
    from synray.config.quickstart import QuickstartConfig
    from synray.quickstart import TINY, run_quickstart

    overrides = [*(TINY if args.tiny else []), *args.overrides]
    path = args.config or default_config()
    cfg = load_config(path if os.path.exists(path) else None, QuickstartConfig, overrides)
    if args.quiet:
        os.environ["SYNRAY_QUIET"] = "1"
    result = run_quickstart(cfg, rebuild_assets=args.rebuild_assets, distill=args.distill, assets_only=args.assets_only)
    print()
    print(result["table"])
    done = f"assets in {result['assets']}" if args.assets_only else f"results in {cfg.output}/results.json"
    print(f"\ntook {result['seconds']:.0f} s; {done}")
    print(result["hint"])
    return 0
