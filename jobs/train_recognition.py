"""``ray job submit --working-dir . -- python jobs/train_recognition.py --config conf/train/<recipe>.yaml [--set key=value]``: re-submitting resumes."""
from synray.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("train"))
