"""PNG figures for MLflow and reports: ROC curves, histograms, image grids.

matplotlib draws through its Agg canvas on a bare ``Figure`` (no pyplot, no global state, no display), so
figures can be made in any process, driver or Ray worker. Image grids are plain numpy.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from synray.io.images import decode_image
from synray.io.sources import ImageSource

__all__ = ["roc_png", "histogram_png", "bar_png", "image_grid", "dataset_grid", "encode_png", "write_png"]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def roc_png(curves: Mapping[str, Mapping[str, np.ndarray]], title: str,
            marks: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> bytes:
    """TAR vs FAR on a log FAR axis, one line per label (``{"far", "tar"}``); ``marks``: (FAR, TAR) points per label."""
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.add_subplot()
    floor = 1.0
    for label, c in curves.items():
        far, tar = np.asarray(c["far"], float), np.asarray(c["tar"], float)
        keep = far > 0
        if keep.any():
            floor = min(floor, float(far[keep].min()))
            line, = ax.step(far[keep], tar[keep], where="post", label=label)
            for x, y in (marks or {}).get(label, []):
                ax.plot([x], [y], "o", color=line.get_color(), markersize=4)
    ax.set_xscale("log")
    ax.set_xlim(max(floor, 1e-6), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def histogram_png(series: Mapping[str, np.ndarray], title: str, xlabel: str, bins: int = 40,
                  vlines: Mapping[str, float] | None = None, log_y: bool = False) -> bytes:
    """Overlaid histograms (density when several series share the axis) with optional labelled vertical lines."""
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.add_subplot()
    data = {k: np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for k, v in series.items()}
    data = {k: v for k, v in data.items() if v.size}
    if data:
        lo = min(float(v.min()) for v in data.values())
        hi = max(float(v.max()) for v in data.values())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for label, v in data.items():
            ax.hist(v, bins=edges, alpha=0.55, label=f"{label} (n={v.size})", density=len(data) > 1)
    for label, x in (vlines or {}).items():
        ax.axvline(x, color="black", linestyle="--", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", fontsize=8, va="top")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if len(data) > 1 else "count")
    ax.set_title(title)
    if data:
        ax.legend(fontsize=8)
    return _png(fig)


def bar_png(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, ylabel: str) -> bytes:
    """A bar chart (e.g. identities per images-per-identity count)."""
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values)
    step = max(1, len(labels) // 12)
    ax.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(fig)


def image_grid(rows: Sequence[Sequence[np.ndarray]], tile: int, gap: int = 2) -> np.ndarray:
    """RGB uint8 grid: one row per list (e.g. an identity), tiles resized to ``tile`` x ``tile``, blank where a row
    is shorter than the longest."""
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    grid = np.full((max(n_rows, 1) * (tile + gap) - gap, max(n_cols, 1) * (tile + gap) - gap, 3), 255, np.uint8)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            if img.shape[:2] != (tile, tile):
                interp = cv2.INTER_AREA if img.shape[0] > tile else cv2.INTER_LINEAR
                img = cv2.resize(img, (tile, tile), interpolation=interp)
            grid[r * (tile + gap):r * (tile + gap) + tile, c * (tile + gap):c * (tile + gap) + tile] = img
    return grid


def dataset_grid(src: ImageSource, identities: int = 8, samples: int = 8, tile: int | None = None) -> np.ndarray:
    """The sample grid of a dataset: ``identities`` rows spread evenly over its identities, ``samples`` images each
    (an identity's first ones); tiles at the images' own size up to 112 px unless ``tile`` is given."""
    ids = src.identities
    if not ids.size:
        return image_grid([], tile or 8)
    picked = [int(i) for i in dict.fromkeys(ids[np.linspace(0, ids.size - 1, min(identities, ids.size)).round().astype(int)])]
    rows = src.identity_rows(picked, samples)
    flat = [r for i in picked for r in rows[i]]
    data = src.read_rows(flat)
    images = iter(decode_image(bytes(b), str(p)) for b, p in zip(data["image"], data["path"]))
    grid_rows = [[next(images) for _ in rows[i]] for i in picked]
    size = tile or min(112, max((im.shape[0] for r in grid_rows for im in r), default=8))
    return image_grid(grid_rows, size)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode an image of shape {rgb.shape} as PNG")
    return buf.tobytes()


def write_png(folder: str, name: str, png: bytes) -> str:
    """Write ``png`` to ``folder/name`` (local) and return the path (for ``Tracker.log_artifact``)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as fh:
        fh.write(png)
    return path
