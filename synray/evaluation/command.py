"""synray eval: verification accuracy of a backbone checkpoint on insightface .bin sets.

Example:

    synray eval --backbone iresnet50 --checkpoint backbone.pth --bins data/val/
    synray eval --checkpoint outputs/train/backbone.pt --bins outputs/world-bins/   # a synray checkpoint
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="10-fold verification accuracy on .bin sets (LFW, CFP-FP, AgeDB-30, ...)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from synray.evaluation.binset import BinSetError
    from synray.evaluation.evaluate import evaluate_bins, format_table
    from synray.models.checkpoint import CheckpointError
    from synray.models.export import load_exported_backbone
    from synray.models.registry import load_backbone

    if args.batch_size < 1:
        print(f"synray eval: --batch-size must be positive, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        model = (load_backbone(args.backbone, args.checkpoint) if args.backbone
                 else load_exported_backbone(args.checkpoint))
        results = evaluate_bins(
            model, args.bins, batch_size=args.batch_size, flip=not args.no_flip, bgr=args.bgr,
            image_size=tuple(args.image_size) if args.image_size else None,
        )
    except (ValueError, CheckpointError, BinSetError, FileNotFoundError) as exc:
        print(f"synray eval: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    return 0
