"""Parametric face renderer of the mini world: OpenCV primitives on a pseudo-3D head.

Every facial feature is a set of points on a simple head surface (a cylinder-like front, an ellipsoid
skull). Pose rotates those points and projects them orthographically, so the nose swings further than
the eyes and the far cheek narrows, as in a real head turn. The posed five landmarks are then aligned
onto the ArcFace 112x112 template with a least-squares similarity (:func:`synray.align.umeyama`),
exactly as an ArcFace crop is made, and the aligner's scale/shift/roll error is applied on top. Shapes are drawn directly at the output
size with sub-pixel anti-aliased polygons (no image warp), then lit with a Lambert + specular model on
the head ellipsoid, and degraded (resolution, blur, noise, JPEG).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synray.align import ARCFACE_TEMPLATE, umeyama
from synray.world.factors import IdentityFactors, NuisanceFactors, perturb_identity

_OX, _OY = 56.0, 62.0  # canonical origin (template px): the head's vertical rotation axis
_ZF = 40.0  # depth of the face front from that axis
_SHIFT = 4  # fractional bits for cv2 sub-pixel drawing
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA
_T = np.linspace(0.0, 2.0 * math.pi, 33)[:-1]
_COS, _SIN = np.cos(_T), np.sin(_T)
_U5, _U7, _U9, _U13 = (np.linspace(0.0, 1.0, k) for k in (5, 7, 9, 13))
_GRID: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID:
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        _GRID[size] = (xs, ys)
    return _GRID[size]


def _c(rgb, k: float = 1.0) -> tuple[float, float, float]:
    return (min(255.0, rgb[0] * k), min(255.0, rgb[1] * k), min(255.0, rgb[2] * k))


def _mixc(a, b, t: float) -> tuple[float, float, float]:
    return (a[0] * (1 - t) + b[0] * t, a[1] * (1 - t) + b[1] * t, a[2] * (1 - t) + b[2] * t)


class _Camera:
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
        off = self.lin @ np.array([_OX, _OY]) + self.m[:, 2]
        self.proj, self.off = proj, off

    def z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Depth of the face surface at canonical (x, y), template px relative to the origin."""
        t = x * self.inv_ax
        r = np.sqrt(np.maximum(1.0 - t * t, 0.03))
        return r * (_ZF - (_ZF * 0.00005) * y * y)

    def pix(self, xt, yt, dz=0.0) -> np.ndarray:
        """Output pixel coordinates of face-surface points at template (x, y), lifted by ``dz``."""
        x = np.asarray(xt, np.float64)
        y = np.asarray(yt, np.float64)
        if x.shape != y.shape:
            x, y = np.broadcast_arrays(x, y)
        p = np.empty(x.shape + (3,))
        px, py = x - _OX, y - _OY
        p[..., 0] = px
        p[..., 1] = py
        p[..., 2] = self.z(px, py) + dz
        return p @ self.proj.T + self.off

    def surf(self, xt, yt, dz=0.0) -> np.ndarray:
        """3D canonical points on the face surface at template (x, y), lifted by ``dz``."""
        x = np.asarray(xt, np.float64) - _OX
        y = np.asarray(yt, np.float64) - _OY
        x, y = np.broadcast_arrays(x, y)
        return np.stack([x, y, self.z(x, y) + dz], -1)

    def posed(self, p: np.ndarray) -> np.ndarray:
        """3D canonical points -> posed 2D template coordinates (before the crop transform)."""
        q = p @ self.rot.T
        q[:, 0] += _OX
        q[:, 1] += _OY
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
        return _ZF * math.sqrt(max(1.0 - (x / fx) ** 2, 0.03)) * (1.0 - 0.00005 * y * y)

    es, ey = ident.eye_spacing, ident.eye_y - _OY
    mw = ident.mouth_width * (1.0 + 0.12 * nuis.smile)
    my = ident.mouth_y - _OY - 2.8 * nuis.smile
    ny = ident.nose_y - _OY
    return np.array(
        [
            [-es, ey, zf(-es, ey) + 1.0],
            [es, ey, zf(es, ey) + 1.0],
            [0.0, ny, zf(0.0, ny) + ident.nose_depth],
            [-mw, my, zf(-mw, my) + 1.0],
            [mw, my, zf(mw, my) + 1.0],
        ]
    )


def _fx(p: np.ndarray) -> np.ndarray:
    return np.round(p * _ONE).astype(np.int32)


def _poly(img, pts, colour) -> None:
    cv2.fillPoly(img, [_fx(pts)], colour, _AA, _SHIFT)


def _line(img, pts, colour, thick: float, closed: bool = False) -> None:
    cv2.polylines(img, [_fx(pts)], closed, colour, max(1, int(round(thick))), _AA, _SHIFT)


def _blend_poly(img, pts, colour, alpha: float) -> None:
    if alpha <= 0.0:
        return
    over = img.copy()
    _poly(over, pts, colour)
    cv2.addWeighted(over, alpha, img, 1.0 - alpha, 0.0, dst=img)


def _ellipse_pts(cx, cy, rx, ry, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    step = 32 // n
    return cx + rx * _COS[::step], cy + ry * _SIN[::step]


def _face_outline(ident: IdentityFactors, top_y: float) -> tuple[np.ndarray, np.ndarray]:
    """Right half of the face outline from the temple (``top_y``) to the chin, template px."""
    fw = ident.face_width
    cheek_y = ident.eye_y + 7.0
    jaw_y, chin_y = ident.jaw_y, ident.chin_y
    ys1 = np.linspace(top_y, cheek_y, 4)
    t1 = (ys1 - top_y) / max(cheek_y - top_y, 1e-6)
    w1 = fw * (ident.forehead_width + (1 - ident.forehead_width) * np.sin(t1 * math.pi / 2))
    ys2 = np.linspace(cheek_y, jaw_y, 5)[1:]
    t2 = (ys2 - cheek_y) / (jaw_y - cheek_y)
    w2 = fw * (1.0 - (1.0 - ident.jaw_width) * (3 * t2**2 - 2 * t2**3))
    t3 = np.linspace(0.0, 1.0, 9)[1:]
    cs = ident.chin_square
    w3 = fw * ident.jaw_width * (1.0 - t3**cs) ** (1.0 / cs)
    ys3 = jaw_y + t3 * (chin_y - jaw_y)
    return np.concatenate([w1, w2, w3]) + _OX, np.concatenate([ys1, ys2, ys3])


def _ellipse_poly(center: np.ndarray, cov: np.ndarray, bump: float = 0.0) -> np.ndarray:
    """Outline of the 2D ellipse {x: (x-c)^T cov^-1 (x-c) <= 1}, optionally with a curly outline."""
    w, v = np.linalg.eigh(cov)
    r = np.sqrt(np.maximum(w, 1e-6))
    pts = np.stack([_COS * r[0], _SIN * r[1]], -1)
    if bump:
        pts *= (1.0 + bump * np.abs(np.sin(_T * 6.0)))[:, None]
    return center + pts @ v.T


def _head_cap(cam: _Camera, center3: np.ndarray, radii: np.ndarray, cut_y: float, bump: float = 0.0) -> np.ndarray:
    """Pixel outline of a skull-shaped ellipsoid seen in pose, above the canonical height ``cut_y``."""
    rot, lin = cam.rot, cam.lin
    cov = (rot * radii**2) @ rot.T  # projection of diag(radii^2) rotated: P R S R^T P^T
    cov = lin @ cov @ lin.T
    c = cam.img(center3[None])[0]
    pts = _ellipse_poly(c, cov, bump)
    # Cut by the posed image of the canonical horizontal line y = cut_y (through the face front).
    a = cam.img(np.array([[-60.0, cut_y - _OY, 10.0], [60.0, cut_y - _OY, 10.0]]))
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


def _background(img: np.ndarray, n: NuisanceFactors, size: int) -> None:
    c1, c2, p = n.bg_colour, n.bg_colour2, n.bg_params
    img[:] = np.array(c1, np.float32).astype(np.uint8)
    kind = n.background
    if kind == 1:  # linear gradient
        xs, ys = _grid(size)
        a = 2 * math.pi * p[0]
        g = (math.cos(a) * (xs - size / 2) + math.sin(a) * (ys - size / 2)) / size + 0.5
        g = np.clip(g, 0.0, 1.0)[..., None]
        img[:] = (np.array(c1, np.float32) * (1 - g) + np.array(c2, np.float32) * g).astype(np.uint8)
    elif kind == 2:  # stripes
        a = math.pi * p[0]
        gap = size * (0.08 + 0.12 * p[1])
        th = max(1, int(gap * (0.2 + 0.4 * p[2])))
        dx, dy = math.cos(a), math.sin(a)
        for i in range(-12, 13):
            o = (i + p[3]) * gap
            cx, cy = size / 2 - dy * o, size / 2 + dx * o
            pts = np.array([[cx - dx * size * 1.5, cy - dy * size * 1.5], [cx + dx * size * 1.5, cy + dy * size * 1.5]])
            _line(img, pts, c2, th)
    elif kind == 3:  # blobs
        for i in range(4):
            cx, cy = p[i] * size, p[(i + 3) % 8] * size
            r = size * (0.08 + 0.18 * p[(i + 5) % 8])
            col = _mixc(c2, c1, 0.3 * i / 3)
            cv2.circle(img, (int(cx * _ONE), int(cy * _ONE)), int(r * _ONE), col, -1, _AA, _SHIFT)
    elif kind == 4:  # tiles
        xs, ys = _grid(size)
        s = size * (0.1 + 0.15 * p[0])
        m = ((np.floor(xs / s + p[1]) + np.floor(ys / s + p[2])) % 2).astype(bool)
        img[m] = np.array(c2, np.float32).astype(np.uint8)


def _draw_eye(img, cam: _Camera, ident: IdentityFactors, n: NuisanceFactors, side: int, skin) -> None:
    ex, ey, ew = _OX + side * ident.eye_spacing, ident.eye_y, ident.eye_width
    op = n.eye_open
    eh_up = ew * ident.eye_height * op
    eh_lo = ew * ident.eye_height * 0.62 * min(1.0, op + 0.25)
    tilt = math.tan(math.radians(ident.eye_tilt))
    t = _U9
    xl = (t - 0.5) * 2.0 * ew
    lift = -tilt * (xl * side)  # positive tilt lifts the outer corner
    up_y = ey + lift - eh_up * np.sin(math.pi * t) ** 0.8
    lo_y = ey + lift + eh_lo * np.sin(math.pi * t) ** 1.1
    # Socket shadow, then the opening.
    sx, sy = _ellipse_pts(ex, ey - 1.0, ew * 1.45, ew * 0.95, 16)
    _poly(img, cam.pix(sx, sy, 0.5), _c(skin, 0.9))
    opening = cam.pix(np.concatenate([ex + xl, (ex + xl)[::-1]]), np.concatenate([up_y, lo_y[::-1]]), 1.0)
    _poly(img, opening, (232.0, 226.0, 220.0))
    ir = ident.iris_size * ew
    icx, icy = ex + n.gaze[0] * ew * 0.45, ey + n.gaze[1] * ew * 0.45
    clip = opening.astype(np.float32)
    for r, col in ((ir, ident.iris), (ir * 0.42, (12.0, 10.0, 10.0))):
        px, py = _ellipse_pts(icx, icy, r, r, 16)
        circ = cam.pix(px, py, 1.2).astype(np.float32)
        if op > 0.15:
            area, inter = cv2.intersectConvexConvex(circ, clip)
            if inter is not None and area > 0:
                _poly(img, inter[:, 0, :].astype(np.float64), col)
    if op > 0.3:
        hx, hy = cam.pix([icx + ir * 0.3], [icy - ir * 0.3], 1.5)[0]
        cv2.circle(img, (int(hx * _ONE), int(hy * _ONE)), int(max(0.6, 0.7 * cam.k) * _ONE), (250, 250, 250), -1, _AA, _SHIFT)
    k = cam.k
    _line(img, cam.pix(ex + xl, up_y, 1.2), (25.0, 18.0, 16.0), 1.3 * k)
    _line(img, cam.pix(ex + xl[1:-1], lo_y[1:-1], 1.0), _c(skin, 0.72), 0.8 * k)
    crease = ey + lift - (eh_up + 2.2) * np.sin(math.pi * t) ** 0.9
    _line(img, cam.pix(ex + xl[1:-1] * 1.05, crease[1:-1], 1.0), _c(skin, 0.7), 0.8 * k)


def _draw_brow(img, cam: _Camera, ident: IdentityFactors, n: NuisanceFactors, side: int) -> None:
    ex = _OX + side * ident.eye_spacing
    bl = ident.brow_length
    t = _U7
    x = ex + side * (-0.4 * bl + bl * t)
    base = ident.eye_y - ident.brow_gap - 2.8 * n.brow_raise
    y = base - (ident.brow_arch + 1.2 * max(n.brow_raise, 0.0)) * np.sin(math.pi * t * 0.85) - ident.brow_tilt * t
    th = ident.brow_thickness * (1.2 - 0.65 * t)
    pts = cam.pix(np.concatenate([x, x[::-1]]), np.concatenate([y - th / 2, (y + th / 2)[::-1]]), 1.5)
    _poly(img, pts, ident.brow)


def _draw_nose(img, cam: _Camera, ident: IdentityFactors, skin) -> None:
    ny, nw, nb, nd = ident.nose_y, ident.nose_width, ident.nose_bridge, ident.nose_depth
    top = ident.eye_y - 2.0
    mid = (top + ny) / 2
    xs = np.array([nb, nb * 1.1, nw * 0.55, nw, nw * 0.45])
    ys = np.array([top, mid, ny - 2.0, ny + 1.0, ny + 4.0])
    dz = np.array([2.0, nd * 0.45, nd * 0.85, nd * 0.3, nd * 0.5])
    right = cam.surf(_OX + xs, ys, dz)
    left = cam.surf(_OX - xs, ys, dz)
    colu = cam.surf([_OX], [ny + 4.5], nd * 0.6)
    body = cam.img(np.concatenate([right, colu, left[::-1]]))
    _poly(img, body, _c(skin, 0.95))
    k = cam.k
    for s, pts in ((1, right), (-1, left)):
        _line(img, cam.img(pts[:4]), _c(skin, 0.74), 0.9 * k)
        nx, nyy = _ellipse_pts(_OX + s * nw * 0.45, ny + 2.6, nw * 0.26, 1.3, 8)
        _poly(img, cam.pix(nx, nyy, nd * 0.45), _c(skin, 0.35))
        ax, ay = _ellipse_pts(_OX + s * nw * 0.78, ny + 0.5, nw * 0.3, 2.6, 16)
        _line(img, cam.pix(ax[8:16], ay[8:16], nd * 0.3), _c(skin, 0.7), 0.8 * k)
    hx, hy = _ellipse_pts(_OX, ny - 1.5, nw * 0.28, 1.8, 8)
    _poly(img, cam.pix(hx, hy, nd), _c(skin, 1.08))
    sx = np.linspace(-nw * 0.6, nw * 0.6, 5)
    _line(img, cam.pix(_OX + sx, ny + 6.0 + 0.02 * sx**2, 1.0), _c(skin, 0.86), 1.0 * k)


def _mouth_geometry(ident: IdentityFactors, n: NuisanceFactors):
    mw = ident.mouth_width * (1.0 + 0.12 * n.smile)
    x = np.linspace(-mw, mw, 11)
    r = x / mw
    line = ident.mouth_y - 2.8 * n.smile * r**2
    gap = 7.0 * n.mouth_open * (1 - r**2)
    ul = ident.upper_lip * (1 - 0.3 * n.smile)
    ll = ident.lower_lip * (1 - 0.2 * n.smile)
    cupid = 1.0 - 0.35 * np.exp(-((x / 2.2) ** 2)) + 0.12 * np.exp(-(((np.abs(x) - 3.5) / 2.0) ** 2))
    up_top = line - ul * cupid * np.sqrt(np.maximum(1 - r**2, 0.0))
    lo_top = line + gap
    lo_bot = lo_top + ll * (1 - r**2) ** 0.6
    return x, line, up_top, lo_top, lo_bot


def _draw_mouth(img, cam: _Camera, ident: IdentityFactors, n: NuisanceFactors, skin) -> None:
    x, line, up_top, lo_top, lo_bot = _mouth_geometry(ident, n)
    xs = _OX + x
    dz = 2.5 * (1 - (x / x[-1]) ** 2) + 0.5
    if n.mouth_open > 0.05:
        inner = cam.pix(np.concatenate([xs, xs[::-1]]), np.concatenate([line, lo_top[::-1]]), dz.tolist() + dz[::-1].tolist())
        _poly(img, inner, (60.0, 20.0, 24.0))
        if n.smile > 0.25 or n.mouth_open > 0.3:
            th = np.minimum(line + 2.2, lo_top)
            teeth = cam.pix(np.concatenate([xs[2:-2], xs[2:-2][::-1]]), np.concatenate([line[2:-2], th[2:-2][::-1]]), np.concatenate([dz[2:-2], dz[2:-2][::-1]]))
            _poly(img, teeth, (235.0, 230.0, 220.0))
    upper = cam.pix(np.concatenate([xs, xs[::-1]]), np.concatenate([up_top, line[::-1]]), np.concatenate([dz, dz[::-1]]))
    lower = cam.pix(np.concatenate([xs, xs[::-1]]), np.concatenate([lo_top, lo_bot[::-1]]), np.concatenate([dz, dz[::-1]]))
    _poly(img, upper, _c(ident.lip, 0.9))
    _poly(img, lower, ident.lip)
    _line(img, cam.pix(xs, line, dz), _c(ident.lip, 0.45), 0.9 * cam.k)
    # Shadow under the lower lip.
    sx = x[2:-2] * 0.7
    _line(img, cam.pix(_OX + sx, lo_bot[2:-2] + 2.0, 0.5), _c(skin, 0.85), 1.2 * cam.k)


def _draw_facial_hair(img, cam: _Camera, ident: IdentityFactors, outline: tuple[np.ndarray, np.ndarray]) -> None:
    kind = ident.facial_hair_name
    if kind == "none":
        return
    ox, oy = outline
    dens = ident.facial_hair_density
    col = _c(ident.hair, 0.9)
    mw, my, ny, nw = ident.mouth_width, ident.mouth_y, ident.nose_y, ident.nose_width
    if kind in ("stubble", "beard"):
        # Lower face outline, closed by a line over the cheeks and under the nose.
        sel = oy > ident.eye_y + 8.0
        rx, ry = ox[sel], oy[sel]
        inner, outer = mw + 4.0, ident.face_width * 0.75
        up_x = np.array([_OX - outer, _OX - inner, _OX, _OX + inner, _OX + outer])
        up_y = np.array([ident.eye_y + 14.0, ny + 3.0, ny + 5.5, ny + 3.0, ident.eye_y + 14.0])
        xs = np.concatenate([rx, 2 * _OX - rx[::-1], up_x])
        ys = np.concatenate([ry, ry[::-1], up_y])
        pts = cam.pix(xs, ys, 1.0)
        alpha = (0.22 + 0.2 * dens) if kind == "stubble" else (0.55 + 0.4 * dens)
        _blend_poly(img, pts, col if kind == "beard" else _c(col, 0.8), alpha)
        return
    mous_x = np.array([mw + 2.0, mw * 0.6, nw * 0.8, 0.0])
    mous_y = np.array([my + 1.0, my - 3.5, ny + 5.0, ny + 5.5])
    xs = np.concatenate([_OX + mous_x, _OX - mous_x[::-1]])
    _blend_poly(img, cam.pix(xs, np.concatenate([mous_y, mous_y[::-1]]), 2.0), col, 0.6 + 0.4 * dens)
    if kind == "goatee":
        gx = np.array([mw * 0.75, mw * 0.55, 0.0])
        gy = np.array([my + 2.0, ident.chin_y - 2.5, ident.chin_y])
        xs = np.concatenate([_OX + gx, _OX - gx[::-1]])
        ys = np.concatenate([gy, gy[::-1]])
        _blend_poly(img, cam.pix(xs, ys, 1.5), col, 0.6 + 0.4 * dens)


def _draw_glasses(img, cam: _Camera, ident: IdentityFactors, n: NuisanceFactors) -> None:
    k = cam.k
    col = n.glasses_colour
    ew = ident.eye_width
    rims = []
    for side in (-1, 1):
        ex = _OX + side * ident.eye_spacing
        c = np.cos(_T[::2])
        s = np.sin(_T[::2])
        px = ex + (ew + 4.5) * np.sign(c) * np.abs(c) ** 0.6
        py = ident.eye_y + 1.0 + (ew * 0.75 + 3.5) * np.sign(s) * np.abs(s) ** 0.6
        rim = cam.pix(px, py, 5.0)
        rims.append(rim)
        if n.glasses == 2:
            _blend_poly(img, rim, (18.0, 18.0, 24.0), 0.88)
    for rim in rims:
        _line(img, rim, col, 1.4 * k, closed=True)
    # Bridge and temples.
    y = ident.eye_y - 1.0
    inner = ident.eye_spacing - ew - 4.5
    _line(img, cam.pix([_OX - inner, _OX, _OX + inner], [y, y - 1.5, y], [5.0, 6.0, 5.0]), col, 1.4 * k)
    for side in (-1, 1):
        x0 = ident.eye_spacing + ew + 4.5
        p = cam.surf([_OX + side * x0], [y], 5.0)
        q = np.array([[side * (ident.face_width + 1.0), ident.ear_y - 6.0 - _OY, -4.0]])
        _line(img, cam.img(np.concatenate([p, q])), col, 1.4 * k)


def _draw_occluder(img, cam: _Camera, n: NuisanceFactors) -> None:
    cx, cy, hw, hh, ang = n.occluder_box
    a = math.radians(ang)
    ca, sa = math.cos(a), math.sin(a)
    if n.occluder == 2:  # box
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        pts = corners @ np.array([[ca, sa], [-sa, ca]]) + [cx, cy]
        pts = cam.flat(pts)
        _poly(img, pts, n.occluder_colour)
        _line(img, pts, _c(n.occluder_colour, 0.6), cam.k, closed=True)
    else:  # hand: palm plus fingers, in a skin tone of its own
        tone = _mixc(n.occluder_colour, (230.0, 180.0, 150.0), 0.75)
        px, py = _ellipse_pts(0.0, 0.0, hw, hh * 0.8, 32)
        rot = np.array([[ca, sa], [-sa, ca]])
        palm = np.stack([px, py], -1) @ rot + [cx, cy]
        _poly(img, cam.flat(palm), tone)
        for i in range(4):
            fx = -hw * 0.6 + i * hw * 0.4
            f = np.array([[fx, -hh * 0.5], [fx * 1.1, -hh * 0.5 - hw * (0.9 + 0.15 * (i in (1, 2)))]]) @ rot + [cx, cy]
            _line(img, cam.flat(f), tone, hw * 0.32 * cam.k)
            _line(img, cam.flat(f), _c(tone, 0.8), 0.7 * cam.k)
            _line(img, cam.flat(f + [0.3, 0.3]), tone, hw * 0.22 * cam.k)


def _shade(img: np.ndarray, cam: _Camera, ident: IdentityFactors, n: NuisanceFactors) -> np.ndarray:
    """Lambert + Blinn specular on the head ellipsoid, flat light on the background; returns float32.

    Lighting is smooth, so it is evaluated on a quarter-resolution grid and upsampled.
    """
    size = img.shape[0]
    low = max(8, size // 4)
    f = low / size
    xs, ys = _grid(low)
    radii = np.array([ident.face_width + 5.0, 60.0, 46.0])
    cov = cam.lin @ ((cam.rot * radii**2) @ cam.rot.T) @ cam.lin.T * (f * f)
    c = (cam.img(np.array([[0.0, -4.0, -6.0]]))[0] + 0.5) * f - 0.5
    w, v = np.linalg.eigh(cov)
    inv = (v / np.sqrt(np.maximum(w, 1e-6))) @ v.T  # symmetric inverse square root
    dx, dy = xs - np.float32(c[0]), ys - np.float32(c[1])
    ux = np.float32(inv[0, 0]) * dx + np.float32(inv[0, 1]) * dy
    uy = np.float32(inv[1, 0]) * dx + np.float32(inv[1, 1]) * dy
    r2 = ux * ux + uy * uy
    nz = np.sqrt(np.maximum(1.0 - r2, 0.0))
    lx, ly, lz = n.light_dir
    lam = np.maximum(np.float32(lx) * ux + np.float32(ly) * uy + np.float32(lz) * nz, 0.0)
    hx, hy, hz = lx, ly, lz + 1.0
    hn = math.sqrt(hx * hx + hy * hy + hz * hz)
    spec = np.maximum(np.float32(hx / hn) * ux + np.float32(hy / hn) * uy + np.float32(hz / hn) * nz, 0.0) ** 12
    amb = 1.0 - n.diffuse
    outside = amb + n.diffuse * max(lz, 0.0) * 0.9
    t = np.clip((r2 - 0.85) * 4.0, 0.0, 1.0)
    mul = (np.float32(amb) + np.float32(n.diffuse * 1.1) * lam) * (1.0 - t) + np.float32(outside) * t
    add = np.float32(38.0 * n.diffuse) * spec * (1.0 - t)
    gain = np.array(n.light_colour, np.float32) * np.float32(n.exposure)
    both = cv2.resize(np.stack([mul, add], -1), (size, size), interpolation=cv2.INTER_LINEAR)
    return img.astype(np.float32) * (both[..., :1] * gain) + both[..., 1:] * gain


_NOISE_BANK: np.ndarray | None = None


def _noise(seed: int, size: int) -> np.ndarray:
    """A deterministic unit-variance noise field (luma + chroma), cut from a fixed bank at a seeded offset."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        rng = np.random.default_rng(20240611)
        bank = rng.standard_normal((512, 512, 3), dtype=np.float32) * np.float32(0.55)
        bank += rng.standard_normal((512, 512, 1), dtype=np.float32) * np.float32(0.83)
        _NOISE_BANK = bank
    bank = _NOISE_BANK
    if size > bank.shape[0] // 2:
        return np.random.default_rng(seed).standard_normal((size, size, 3), dtype=np.float32)
    span = bank.shape[0] - size
    oy, ox = seed % span, (seed // span) % span
    tile = bank[oy : oy + size, ox : ox + size]
    return tile[:, ::-1] if (seed >> 20) & 1 else tile


def render_face(
    identity: IdentityFactors,
    nuisance: NuisanceFactors,
    size: int = 112,
    return_landmarks: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render one aligned face as uint8 RGB ``size x size x 3``.

    With ``return_landmarks`` also return the five landmarks (float32 [5, 2], output pixels, ArcFace
    order: left eye, right eye, nose tip, left and right mouth corner) after pose and crop jitter; at
    frontal pose with no jitter they sit near ``ARCFACE_TEMPLATE * size / 112``.
    """
    if not isinstance(identity, IdentityFactors):
        raise TypeError(f"identity must be IdentityFactors, got {type(identity).__name__}")
    if not isinstance(nuisance, NuisanceFactors):
        raise TypeError(f"nuisance must be NuisanceFactors, got {type(nuisance).__name__}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    size = int(size)
    ident = perturb_identity(identity, nuisance.drift)
    n = nuisance
    cam = _Camera(ident, n, size)
    k = cam.k
    img = np.empty((size, size, 3), np.uint8)
    _background(img, n, size)
    skin = ident.skin
    fw = ident.face_width
    style = ident.hair_style_name

    # Clothing and neck do not turn with the head's yaw as much; approximate with shallow depth.
    _poly(img, cam.flat([[-30, 170], [-30, 112], [6, 104], [40, 112], [72, 112], [106, 104], [142, 112], [142, 170]]), n.clothing)
    if style == "long":
        v = ident.hair_volume
        back = np.array([[-(fw + v), ident.eye_y - _OY - 4.0, -14.0], [fw + v, ident.eye_y - _OY - 4.0, -14.0], [fw + v + 8.0, 90.0, -14.0], [-(fw + v + 8.0), 90.0, -14.0]])
        _poly(img, cam.img(back), _c(ident.hair, 0.85))
    jw = fw * ident.jaw_width
    neck = np.array([[-jw * 0.85, ident.jaw_y - _OY - 8.0, 2.0], [jw * 0.85, ident.jaw_y - _OY - 8.0, 2.0], [fw * 0.72, 100.0, -4.0], [-fw * 0.72, 100.0, -4.0]])
    _poly(img, cam.img(neck), _c(skin, 0.72))

    covered_ears = style in ("medium", "long", "curly")

    def ears() -> None:
        for side in (-1, 1):
            a = ident.ear_size * 0.5
            base = np.array([side * (fw - 0.5), ident.ear_y - _OY, float(cam.z(np.array(fw - 0.5), np.array(0.0))) - 8.0])
            uax = np.array([side * 0.55, 0.0, -0.83])
            pts = base + a * uax + (a * _COS[::2])[:, None] * uax + (ident.ear_size * _SIN[::2])[:, None] * np.array([0.0, 1.0, 0.0])
            _poly(img, cam.img(pts), _c(skin, 0.9))
            inner = base + a * uax + (a * 0.55 * _COS[::2])[:, None] * uax + (ident.ear_size * 0.62 * _SIN[::2])[:, None] * np.array([0.0, 1.0, 0.0])
            _poly(img, cam.img(inner), _c(skin, 0.72))

    if covered_ears:
        ears()
    # Skull (skin), then the hair mass on it, then the face.
    skull_c = np.array([0.0, -22.0, -10.0])
    skull_r = np.array([fw + 3.0, 58.0, 50.0])
    skull = _head_cap(cam, skull_c, skull_r, ident.ear_y + ident.ear_size * 0.5)
    if len(skull) >= 3:
        _poly(img, skull, _c(skin, 0.96))
    vol = ident.hair_volume
    if style != "bald":
        cut = {
            "buzz": ident.ear_y - ident.ear_size + 1.0,
            "short": ident.ear_y - ident.ear_size + 2.0,
            "side_part": ident.ear_y - ident.ear_size + 2.0,
            "fringe": ident.ear_y - ident.ear_size + 3.0,
            "medium": ident.ear_y + ident.ear_size * 0.6,
            "long": ident.ear_y + ident.ear_size + 1.0,
            "curly": ident.ear_y + ident.ear_size * 0.8,
        }[style]
        grow = {"buzz": 0.4, "short": 0.45 * vol, "side_part": 0.6 * vol, "fringe": 0.6 * vol, "medium": vol, "long": 0.8 * vol, "curly": vol + 5.0}[style]
        cap = _head_cap(cam, skull_c, skull_r + np.array([grow, grow, grow]), cut, bump=0.06 if style == "curly" else 0.0)
        hair_col = _mixc(ident.hair, skin, 0.45) if style == "buzz" else ident.hair
        if len(cap) >= 3:
            _poly(img, cap, hair_col)
    if not covered_ears:
        ears()

    # Face: hairline across the top, outline down to the chin.
    top_y = ident.eye_y - 22.0
    ox, oy = _face_outline(ident, top_y)
    s = 2.0 * _U13 - 1.0
    wt = fw * ident.forehead_width
    if style == "bald":
        hl = np.full_like(s, -25.0)
    elif style == "fringe":
        fy = ident.eye_y - ident.brow_gap - 6.0
        hl = fy + 1.5 * np.cos(s * 9.0) - 2.0 * (1 - np.abs(s)) + (top_y - fy) * np.abs(s) ** 6
    else:
        hy = ident.hairline_y
        hl = hy + (top_y - hy) * np.abs(s) ** 3 + ident.hairline_peak * np.exp(-((s / 0.18) ** 2))
        if style == "side_part":
            hl = hl + 3.0 * ident.part_side * s
    face_x = np.concatenate([_OX + s * wt, ox[1:], [_OX], (2 * _OX - ox[1:])[::-1]])
    face_y = np.concatenate([hl, oy[1:], [ident.chin_y + 0.5], oy[1:][::-1]])
    _poly(img, cam.pix(face_x, face_y), skin)
    if style == "side_part":
        px = _OX + ident.part_side * wt * 0.45
        _line(img, cam.pix([px, px + ident.part_side * 3.0], [hl[3] - 1.0, -15.0], 0.5), _c(skin, 0.9), 1.0 * k)
    if style not in ("bald", "buzz"):  # a few strands give the hair a texture that follows pose
        for i in (-4, -2, 0, 2, 4):
            sx = _OX + i * wt * 0.2
            j = 6 + i
            _line(img, cam.pix([sx, sx + ident.part_side * 4.0], [hl[j] - 1.5, hl[j] - 9.0], 1.0), _c(ident.hair, 0.7), 0.9 * k)

    # Cheek warmth, chin shading, facial hair, mole.
    for side in (-1, 1):
        bx, by = _ellipse_pts(_OX + side * fw * 0.55, ident.nose_y + 2.0, 7.0, 4.5, 16)
        _blend_poly(img, cam.pix(bx, by, 0.5), (skin[0] * 1.02, skin[1] * 0.82, skin[2] * 0.82), 0.35)
    _draw_facial_hair(img, cam, ident, (ox, oy))
    if ident.mole[2] > 0:
        mx, my = _ellipse_pts(ident.mole[0], ident.mole[1], ident.mole[2], ident.mole[2], 8)
        _poly(img, cam.pix(mx, my, 0.8), _c(skin, 0.45))
    for side in (-1, 1):
        _draw_brow(img, cam, ident, n, side)
        _draw_eye(img, cam, ident, n, side, skin)
    _draw_nose(img, cam, ident, skin)
    _draw_mouth(img, cam, ident, n, skin)

    if n.glasses:
        _draw_glasses(img, cam, ident, n)
    if n.hat:
        hat = _head_cap(cam, skull_c, skull_r + np.array([vol * 0.5 + 3.0] * 3), ident.eye_y - ident.brow_gap - 8.0)
        if len(hat) >= 3:
            _poly(img, hat, n.hat_colour)
        by = ident.eye_y - ident.brow_gap - 8.0 - _OY
        t = np.linspace(0.0, math.pi, 9)
        rr = fw + 3.0
        rimx = rr * np.cos(t)
        rimz = _ZF - 4.0 + 16.0 * np.sin(t)
        brim = np.concatenate(
            [np.stack([rimx, np.full_like(t, by), rimz], -1), np.stack([rimx[::-1], np.full_like(t, by + 2.5), rimz[::-1]], -1)]
        )
        _poly(img, cam.img(brim), _c(n.hat_colour, 0.8))
    if n.occluder:
        _draw_occluder(img, cam, n)

    out = _shade(img, cam, ident, n)
    if n.noise > 0:
        out += _noise(n.noise_seed, size) * np.float32(n.noise)
    img = np.clip(out, 0.0, 255.0).astype(np.uint8)
    if n.downscale < 1.0:
        small = max(8, int(round(size * n.downscale)))
        img = cv2.resize(cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA), (size, size), interpolation=cv2.INTER_LINEAR)
    if n.blur > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), n.blur * size / 112.0)
    if n.jpeg_quality > 0:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(n.jpeg_quality)])
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if return_landmarks:
        return img, cam.img(canonical_landmarks(ident, n)).astype(np.float32)
    return img
