"""The world renderer's head geometry and drawing primitives: pose, projection, landmarks, sub-pixel shapes.

A :class:`Camera` poses canonical head-surface points (template pixels around the rotation axis at
(``OX``, ``OY``)), projects them orthographically and maps them onto the output crop; the crop transform
aligns the posed five landmarks (:func:`canonical_landmarks`) onto the ArcFace template with a
least-squares similarity (:func:`synray.align.umeyama`), then applies the aligner's scale/shift/roll
error. Shapes are drawn with OpenCV's anti-aliased polygons at ``SHIFT`` fractional bits.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synray.align import ARCFACE_TEMPLATE, umeyama
from synray.world.factors import IdentityFactors, NuisanceFactors

__all__ = [
    "OX", "OY", "ZF", "SHIFT", "ONE", "AA", "ANGLES", "COS", "SIN", "U5", "U7", "U9", "U13", "tint", "mix", "Camera",
    "canonical_landmarks", "to_fixed", "fill_poly", "polyline", "blend_poly", "ellipse_pts", "ellipse_poly", "head_cap",
]

OX, OY = 56.0, 62.0  # canonical origin (template px): the head's vertical rotation axis
ZF = 40.0  # depth of the face front from that axis
SHIFT = 4  # fractional bits for cv2 sub-pixel drawing
ONE = 1 << SHIFT
AA = cv2.LINE_AA
ANGLES = np.linspace(0.0, 2.0 * math.pi, 33)[:-1]
COS, SIN = np.cos(ANGLES), np.sin(ANGLES)
U5, U7, U9, U13 = (np.linspace(0.0, 1.0, k) for k in (5, 7, 9, 13))


def tint(rgb, k: float = 1.0) -> tuple[float, float, float]:
    """An RGB colour scaled by ``k``, clipped at 255."""
    return (min(255.0, rgb[0] * k), min(255.0, rgb[1] * k), min(255.0, rgb[2] * k))


def mix(a, b, t: float) -> tuple[float, float, float]:
    """The colour ``t`` of the way from ``a`` to ``b``."""
    return (a[0] * (1 - t) + b[0] * t, a[1] * (1 - t) + b[1] * t, a[2] * (1 - t) + b[2] * t)


class Camera:
    """Pose rotation + orthographic projection + 2D crop transform, in output pixels."""

    def __init__(self, ident: IdentityFactors, nuis: NuisanceFactors, size: int):
        yaw, pitch = math.radians(nuis.yaw), math.radians(nuis.pitch)
        cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
        # R = Rx(pitch) @ Ry(yaw); only the two image rows are needed.
        self.rot = np.array([[cy, 0.0, sy], [sp * sy, cp, -sp * cy]])
        self.inv_ax = 1.0 / (ident.face_width + 7.0)
        landmarks = self.posed(canonical_landmarks(ident, nuis))
        align = umeyama(landmarks, ARCFACE_TEMPLATE)
        r = math.radians(nuis.roll)
        cx, cyy = 56.0, 60.0
        jit = np.array(
            [
                [nuis.scale * math.cos(r), -nuis.scale * math.sin(r), 0.0],
                [nuis.scale * math.sin(r), nuis.scale * math.cos(r), 0.0],
                [0.0, 0.0, 1.0],
            ]
        )
        jit[:2, 2] = np.array([cx, cyy]) + np.array(nuis.shift) - jit[:2, :2] @ np.array([cx, cyy])
        k = size / 112.0
        m = np.diag([k, k, 1.0]) @ jit @ align
        self.m = m[:2]
        self.lin = m[:2, :2]
        self.k = math.sqrt(abs(np.linalg.det(self.lin)))  # template px -> output px

        proj = self.lin @ self.rot  # 3D canonical -> output pixels, linear part
        off = self.lin @ np.array([OX, OY]) + self.m[:, 2]
        self.proj, self.off = proj, off

    def z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Depth of the face surface at canonical (x, y), template px relative to the origin."""
        t = x * self.inv_ax
        r = np.sqrt(np.maximum(1.0 - t * t, 0.03))
        return r * (ZF - (ZF * 0.00005) * y * y)

    def pix(self, xt, yt, dz=0.0) -> np.ndarray:
        """Output pixel coordinates of face-surface points at template (x, y), lifted by ``dz``."""
        x = np.asarray(xt, np.float64)
        y = np.asarray(yt, np.float64)
        if x.shape != y.shape:
            x, y = np.broadcast_arrays(x, y)
        p = np.empty(x.shape + (3,))
        px, py = x - OX, y - OY
        p[..., 0] = px
        p[..., 1] = py
        p[..., 2] = self.z(px, py) + dz
        return p @ self.proj.T + self.off

    def surf(self, xt, yt, dz=0.0) -> np.ndarray:
        """3D canonical points on the face surface at template (x, y), lifted by ``dz``."""
        x = np.asarray(xt, np.float64) - OX
        y = np.asarray(yt, np.float64) - OY
        x, y = np.broadcast_arrays(x, y)
        return np.stack([x, y, self.z(x, y) + dz], -1)

    def posed(self, p: np.ndarray) -> np.ndarray:
        """3D canonical points -> posed 2D template coordinates (before the crop transform)."""
        q = p @ self.rot.T
        q[:, 0] += OX
        q[:, 1] += OY
        return q

    def img(self, p: np.ndarray) -> np.ndarray:
        """3D canonical points -> output pixel coordinates."""
        return p @ self.proj.T + self.off

    def flat(self, pts2: np.ndarray) -> np.ndarray:
        """Template 2D points that do not rotate with the head (shoulders, occluders) -> pixels."""
        return np.asarray(pts2, np.float64) @ self.lin.T + self.m[:, 2]


def canonical_landmarks(ident: IdentityFactors, nuis: NuisanceFactors) -> np.ndarray:
    """The 5 landmarks as 3D canonical points (eyes, nose tip, mouth corners) under this expression."""
    fx = ident.face_width + 7.0

    def zf(x, y):
        return ZF * math.sqrt(max(1.0 - (x / fx) ** 2, 0.03)) * (1.0 - 0.00005 * y * y)

    es, ey = ident.eye_spacing, ident.eye_y - OY
    mw = ident.mouth_width * (1.0 + 0.12 * nuis.smile)
    my = ident.mouth_y - OY - 2.8 * nuis.smile
    ny = ident.nose_y - OY
    return np.array(
        [
            [-es, ey, zf(-es, ey) + 1.0],
            [es, ey, zf(es, ey) + 1.0],
            [0.0, ny, zf(0.0, ny) + ident.nose_depth],
            [-mw, my, zf(-mw, my) + 1.0],
            [mw, my, zf(mw, my) + 1.0],
        ]
    )


def to_fixed(p: np.ndarray) -> np.ndarray:
    return np.round(p * ONE).astype(np.int32)


def fill_poly(img, pts, colour) -> None:
    cv2.fillPoly(img, [to_fixed(pts)], colour, AA, SHIFT)


def polyline(img, pts, colour, thick: float, closed: bool = False) -> None:
    cv2.polylines(img, [to_fixed(pts)], closed, colour, max(1, int(round(thick))), AA, SHIFT)


def blend_poly(img, pts, colour, alpha: float) -> None:
    if alpha <= 0.0:
        return
    over = img.copy()
    fill_poly(over, pts, colour)
    cv2.addWeighted(over, alpha, img, 1.0 - alpha, 0.0, dst=img)


def ellipse_pts(cx, cy, rx, ry, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    step = 32 // n
    return cx + rx * COS[::step], cy + ry * SIN[::step]


def ellipse_poly(center: np.ndarray, cov: np.ndarray, bump: float = 0.0) -> np.ndarray:
    """Outline of the 2D ellipse {x: (x-c)^T cov^-1 (x-c) <= 1}, optionally with a curly outline."""
    w, v = np.linalg.eigh(cov)
    r = np.sqrt(np.maximum(w, 1e-6))
    pts = np.stack([COS * r[0], SIN * r[1]], -1)
    if bump:
        pts *= (1.0 + bump * np.abs(np.sin(ANGLES * 6.0)))[:, None]
    return center + pts @ v.T


def head_cap(cam: Camera, center3: np.ndarray, radii: np.ndarray, cut_y: float, bump: float = 0.0) -> np.ndarray:
    """Pixel outline of a skull-shaped ellipsoid seen in pose, above the canonical height ``cut_y``."""
    rot, lin = cam.rot, cam.lin
    cov = (rot * radii**2) @ rot.T  # projection of diag(radii^2) rotated: P R S R^T P^T
    cov = lin @ cov @ lin.T
    c = cam.img(center3[None])[0]
    pts = ellipse_poly(c, cov, bump)
    # Cut by the posed image of the canonical horizontal line y = cut_y (through the face front).
    a = cam.img(np.array([[-60.0, cut_y - OY, 10.0], [60.0, cut_y - OY, 10.0]]))
    d = a[1] - a[0]
    side = (pts[:, 0] - a[0, 0]) * d[1] - (pts[:, 1] - a[0, 1]) * d[0]
    keep = pts[side > 0]  # above the line (the line runs left to right, y down)
    if len(keep) < 3:
        return keep
    # Add the chord ends so the cap ends flat at the cut, then order as a convex hull.
    nxt = np.roll(side, -1)
    cross = np.nonzero((side > 0) != (nxt > 0))[0]
    t = (side[cross] / (side[cross] - nxt[cross]))[:, None]
    seg = pts[cross] + t * (np.roll(pts, -1, axis=0)[cross] - pts[cross])
    allp = np.concatenate([keep, seg]).astype(np.float32)
    return cv2.convexHull(allp)[:, 0, :].astype(np.float64)
