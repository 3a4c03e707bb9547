"""Entry point for ``ray job submit -- python jobs/synthesize.py --config conf/synth/<recipe>.yaml [--set k=v]``.

Attaches to the cluster the job runs on; re-submitting the same config resumes (finished shards are skipped).
"""

import sys

from synray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("synth", sys.argv[1:]))
