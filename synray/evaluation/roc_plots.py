"""ROC figures and threshold tables of verification scores, written beside a model and logged to MLflow.

One figure per verification set (``roc_<set>.png``: TAR vs FAR on a log axis, one curve per model, dots at the
FAR targets the pairs can measure) and one text table (``thresholds.txt``). A training job publishes its final
model's; the quickstart draws its students on shared axes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from synray.evaluation.roc import SCORES_FILE, format_threshold_table, load_scores, roc_curve, threshold_table
from synray.io import storage
from synray.plots import roc_png

__all__ = ["roc_artifacts", "log_artifacts", "publish_roc"]


def roc_artifacts(runs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, bytes]:
    """``{model label: {set: {"dist", "issame"}}}`` -> ``{"roc_<set>.png": png, "thresholds.txt": text}``."""
    sets = list(dict.fromkeys(name for scores in runs.values() for name in scores))
    out: dict[str, bytes] = {}
    text = []
    for name in sets:
        curves, marks, tables = {}, {}, {}
        for label, scores in runs.items():
            if name not in scores:
                continue
            s = scores[name]
            curves[label] = roc_curve(s["dist"], s["issame"])
            table = threshold_table(s["dist"], s["issame"])
            marks[label] = [(r["far"], r["tar"]) for r in table if r["measurable"] and r["far"] > 0]
            tables[label] = table
        pairs = max(int(scores[name]["issame"].size) for scores in runs.values() if name in scores)
        out[f"roc_{name}.png"] = roc_png(curves, f"{name} ({pairs} pairs)", marks)
        text.append(format_threshold_table({f"{name} / {label}": t for label, t in tables.items()}))
    out["thresholds.txt"] = ("\n\n".join(text) + "\n").encode()
    return out


def log_artifacts(tracker: Any, files: Mapping[str, bytes], artifact_path: str | None = None) -> None:
    """Log in-memory files as MLflow artifacts (through the Tracker, which redacts text)."""
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            path = os.path.join(d, name)
            with open(path, "wb") as fh:
                fh.write(data)
            tracker.log_artifact(path, artifact_path)


def publish_roc(scores_npz: bytes, folder: str, tracker: Any, label: str) -> dict[str, Any]:
    """Write the scores, ROC figures and threshold table to ``folder`` (local or S3) and log them; returns their URIs."""
    files = roc_artifacts({label: load_scores(scores_npz)})
    storage.write_bytes_atomic(storage.join(folder, SCORES_FILE), scores_npz)
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(folder, name), data)
    log_artifacts(tracker, files, "roc")
    return {"verification_scores": storage.join(folder, SCORES_FILE),
            "roc": {name: storage.join(folder, name) for name in files}}
