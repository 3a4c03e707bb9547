"""Entry point for ``ray job submit -- python jobs/train_ldm.py --config conf/ldm/<recipe>.yaml [--set k=v]``.

Attaches to the cluster the job runs on; re-submitting the same config resumes.
"""

import sys

from synray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train-ldm", sys.argv[1:]))
