"""``ray job submit --working-dir . -- python jobs/sweep.py --config conf/sweep/<sweep>.yaml [--set key=value]``: re-submitting resumes."""
from synray.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("sweep"))
