"""``synray`` command line: one subcommand per job (``CONFIG`` plus ``--set`` overrides), ``config`` and ``eval``.

Every job subcommand, and every ``jobs/*.py`` entry point for ``ray job submit``, goes through
:func:`synray.jobs.load_job` and :func:`synray.jobs.run_job`. Errors a user can fix (a config key, a file,
the cluster's size) print as one message and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from synray.config import to_yaml
from synray.config.paths import config_ref, project_conf_dir
from synray.errors import UserError
from synray.jobs import JOBS, Job, load_job, run_job

#: per-command flags that stand for config overrides
FLAGS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "synth": {"--local": ("run the stages in a plain loop in this process (no Ray)", ["local=true"])},
    "quickstart": {
        "--tiny": ("CI size (a few minutes on 2 cores)", []),  # filled from synray.quickstart.TINY
        "--distill": ("also distil a student from the dlib teacher on DCGAN faces", ["distill.enabled=true"]),
        "--rebuild-assets": ("retrain the shipped world teacher and LDM first (what produced synray/assets/world)",
                             ["rebuild_assets=true"]),
        "--assets-only": ("only (re)build the world teacher and LDM into assets=DIR (default: synray/assets/world)",
                          ["assets_only=true"]),
    },
    "study": {
        # filled from synray.study.job.TINY
        "--tiny": ("CI size: 24 identities x 6 images a row (about 9 minutes on 2 idle cores)", []),
        "--rebuild-assets": ("retrain the study's extra world assets first (CPD 0 and UIFace LDMs, nuisance regressor, "
                             "CFSM model)", ["rebuild_assets=true"]),
        "--assets-only": ("only (re)build the study's world assets into assets=DIR (default: synray/assets/world)",
                          ["assets_only=true"]),
    },
}
#: per-command flags whose overrides live in the job's module (``--tiny``), imported only when asked for (torch)
FLAG_SOURCES = {("quickstart", "--tiny"): ("synray.quickstart", "TINY"), ("study", "--tiny"): ("synray.study.job", "TINY")}
#: commands whose CONFIG may be left out (the project's recipe is used)
DEFAULT_CONFIG = {"quickstart": "quickstart.yaml", "study": "study/world.yaml"}
#: commands that take config keys as positional arguments (``synray export URI DEST``) instead of CONFIG
POSITIONAL: dict[str, list[tuple[str, str, str]]] = {
    "export": [("source", "URI", "the dataset: a synray dataset folder, rec://<train.rec> or folder://<root> (or +s3)"),
               ("output.uri", "DEST", "where to write (a new folder, local or s3://)")],
    "report": [("source", "URI", "the dataset: a synray dataset folder, rec://<train.rec> or folder://<root> (or +s3)")],
}
#: per-command options with a value that stand for a config key: flag -> (key, choices, help)
OPTIONS: dict[str, dict[str, tuple[str, list[str] | None, str]]] = {
    "export": {"--format": ("format", ["rec", "folder"], "rec: train.rec, train.idx, property; folder: <identity>/<n>.<ext>")},
    "report": {"--model": ("model", None, "FR model for identity statistics: a synray checkpoint or <registry name>:<weights>"),
               "--reference": ("reference", None, "the generator's training identities: embeddings file or dataset URI")},
}
#: commands with ``--check``: load and validate every file the config names, then stop (no Ray)
CHECK_COMMANDS = ("synth", "train", "distill", "train-ldm", "export", "report")


def _flag_overrides(command: str, args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, (_, overrides) in FLAGS.get(command, {}).items():
        if getattr(args, flag.lstrip("-").replace("-", "_"), False):
            if (command, flag) in FLAG_SOURCES:
                import importlib

                module, name = FLAG_SOURCES[(command, flag)]
                overrides = getattr(importlib.import_module(module), name)
            out += overrides
    return out


def _dest(key: str) -> str:
    return "pos_" + key.replace(".", "_")


def _add_job(sub: argparse._SubParsersAction, job: Job) -> None:
    p = sub.add_parser(job.command, help=job.help, description=job.help)
    if job.command in POSITIONAL:
        for key, metavar, text in POSITIONAL[job.command]:
            p.add_argument(_dest(key), metavar=metavar, help=text)
        p.add_argument("--config", help="YAML config with further settings (positional arguments override it)")
    else:
        p.add_argument("config", nargs="?" if job.command in DEFAULT_CONFIG else None, help="YAML config (see conf/)")
    for flag, (key, choices, text) in OPTIONS.get(job.command, {}).items():
        p.add_argument(flag, dest=_dest(key), choices=choices, metavar=None if choices else key.upper(),
                       help=f"{text} (config key {key})")
    if job.command in CHECK_COMMANDS:
        p.add_argument("--check", action="store_true",
                       help="load and validate every file the config names (weights, contexts, data), report all "
                            "problems at once and stop; no Ray is started")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="only summary lines and errors (also when CI is set)")
    for flag, (text, _) in FLAGS.get(job.command, {}).items():
        p.add_argument(flag, action="store_true", help=text)
    p.set_defaults(func=_run, job=job)


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config:  # relative to the working dir, else the project's recipe of that name (conf/...)
        return config_ref(args.config)
    if args.job.command not in DEFAULT_CONFIG:
        return None
    conf = project_conf_dir()
    name = DEFAULT_CONFIG[args.job.command]
    return str(conf / name) if conf is not None and (conf / name).exists() else None


def _run(args: argparse.Namespace) -> int:
    command = args.job.command
    keys = [key for key, _, _ in POSITIONAL.get(command, [])] + [key for key, _, _ in OPTIONS.get(command, {}).values()]
    given = [f"{key}={json.dumps(getattr(args, _dest(key)))}" for key in keys if getattr(args, _dest(key), None) is not None]
    overrides = [*_flag_overrides(command, args), *given, *args.overrides, *(["ray.quiet=true"] if args.quiet else [])]
    cfg = load_job(_config_path(args), overrides, kind=args.job.kind)
    if getattr(args, "check", False):
        from synray.checks import check_job

        problems = check_job(cfg)
        if problems:
            print(f"synray {command} --check: {len(problems)} problem{'s' if len(problems) > 1 else ''}:", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
        print("ok")
        return 0
    outcome = run_job(cfg)
    print(outcome.console(), flush=True)
    return 0 if outcome.ok else 1


def _config(args: argparse.Namespace) -> int:
    print(to_yaml(load_job(args.config, args.overrides)), end="")
    return 0


def _eval(args: argparse.Namespace) -> int:
    # torch and the models only for this command: ``synray --help`` and the job commands stay fast to start
    from synray.evaluation.evaluate import evaluate_bins, format_table
    from synray.models.export import load_exported_backbone
    from synray.models.registry import load_backbone

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        model = load_backbone(args.backbone, args.checkpoint) if args.backbone else load_exported_backbone(args.checkpoint)
        results = evaluate_bins(model, args.bins, batch_size=args.batch_size, flip=not args.no_flip, bgr=args.bgr,
                                image_size=tuple(args.image_size) if args.image_size else None)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(format_table(results))
    return 0


EVAL_EPILOG = """examples:
  synray eval --backbone iresnet50 --checkpoint backbone.pth --bins data/val/
  synray eval --checkpoint outputs/train/final/model.pt --bins outputs/world-bins/   # a synray checkpoint
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synray", description="Identity-labelled synthetic face datasets and face-recognition training on Ray. "
        "Every job takes a YAML config (see conf/) and --set key=value overrides.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for job in JOBS.values():
        _add_job(sub, job)
    p = sub.add_parser("config", help="validate a config file and print it resolved (secrets redacted)")
    p.add_argument("config", help="YAML config (see conf/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_config)
    p = sub.add_parser("eval", help="10-fold verification accuracy on .bin sets (LFW, CFP-FP, AgeDB-30, ...)",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", metavar="NAME",
                   help="backbone registry name for published weights, e.g. iresnet50, tface_ir50, tinyfar_a"
                        " (omit for checkpoints written by synray, which name their architecture)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="state dict (loaded strictly, weights only)")
    p.add_argument("--bins", required=True, nargs="+", metavar="DIR_OR_FILE", help=".bin files or folders holding them")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--no-flip", action="store_true", help="do not add the embeddings of mirrored images")
    p.add_argument("--bgr", action="store_true", default=None,
                   help="feed BGR channel order (default: what the backbone declares; AdaFace weights are BGR)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize images to H W if needed (default: the backbone's input size, e.g. 112 96 for SynFace)")
    p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Ray's token authentication, on for every Ray this command starts or joins: Ray reads the mode once, when it
    # is first imported, and a client naming a cluster's address uses the token only when the mode says so
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"synray {args.command}: {exc}", file=sys.stderr)
        return 2


def job_main(command: str, argv: list[str] | None = None) -> int:
    """``jobs/*.py``: ``--config PATH`` plus the command's own flags, e.g. ``--set key=value --quiet``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv and command not in POSITIONAL:
        i = argv.index("--config")
        argv = [*argv[i + 1:i + 2], *argv[:i], *argv[i + 2:]]
    return main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
