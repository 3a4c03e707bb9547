"""``ray job submit --working-dir . -- python jobs/distill.py --config conf/distill/<recipe>.yaml [--set key=value]``: re-submitting resumes."""
from synray.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("distill"))
