"""``ray job submit --working-dir . -- python jobs/export.py URI DEST --format rec|folder [--set key=value]``: re-submitting resumes."""
from synray.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("export"))
