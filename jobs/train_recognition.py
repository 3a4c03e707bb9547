"""Entry point for ``ray job submit --working-dir . -- python jobs/train_recognition.py --config conf/train/<recipe>.yaml [--set k=v]``.

Attaches to the cluster the job runs on. Re-submitting the same config (same ``output.uri`` and
``name``) resumes from the run's last checkpoint, on however many workers are available.
"""

import argparse
import sys

from synray.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (kind: train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    argv = ["train", args.config, *[f"--set={o}" for o in args.overrides], *(["--quiet"] if args.quiet else [])]
    sys.exit(main(argv))
