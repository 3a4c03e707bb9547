"""Parametric face renderer of the mini world: OpenCV primitives on a pseudo-3D head.

Every facial feature is a set of points on a simple head surface (a cylinder-like front, an ellipsoid
skull). Pose rotates those points and projects them orthographically, so the nose swings further than
the eyes and the far cheek narrows, as in a real head turn; the posed landmarks are aligned onto the
ArcFace template as an ArcFace crop is made (:mod:`synray.world.geometry`). :func:`render_face` draws
the background, clothing, ears, skull and hair, then the face and its features
(:mod:`synray.world.features`) directly at the output size with sub-pixel anti-aliased polygons (no
image warp), lights them with a Lambert + specular model on the head ellipsoid, and degrades the image
(resolution, blur, noise, JPEG).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synray.world.factors import IdentityFactors, NuisanceFactors, perturb_identity
from synray.world.features import (
    draw_brow,
    draw_eye,
    draw_facial_hair,
    draw_glasses,
    draw_mouth,
    draw_nose,
    draw_occluder,
    face_outline,
)
from synray.world.geometry import (
    AA,
    COS,
    ONE,
    OX,
    OY,
    SHIFT,
    SIN,
    U13,
    ZF,
    Camera,
    blend_poly,
    canonical_landmarks,
    ellipse_pts,
    fill_poly,
    head_cap,
    mix,
    polyline,
    tint,
)

_GRID: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID:
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        _GRID[size] = (xs, ys)
    return _GRID[size]


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
            polyline(img, pts, c2, th)
    elif kind == 3:  # blobs
        for i in range(4):
            cx, cy = p[i] * size, p[(i + 3) % 8] * size
            r = size * (0.08 + 0.18 * p[(i + 5) % 8])
            col = mix(c2, c1, 0.3 * i / 3)
            cv2.circle(img, (int(cx * ONE), int(cy * ONE)), int(r * ONE), col, -1, AA, SHIFT)
    elif kind == 4:  # tiles
        xs, ys = _grid(size)
        s = size * (0.1 + 0.15 * p[0])
        m = ((np.floor(xs / s + p[1]) + np.floor(ys / s + p[2])) % 2).astype(bool)
        img[m] = np.array(c2, np.float32).astype(np.uint8)


def _shade(img: np.ndarray, cam: Camera, ident: IdentityFactors, n: NuisanceFactors) -> np.ndarray:
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
    cam = Camera(ident, n, size)
    k = cam.k
    img = np.empty((size, size, 3), np.uint8)
    _background(img, n, size)
    skin = ident.skin
    fw = ident.face_width
    style = ident.hair_style_name

    # Clothing and neck do not turn with the head's yaw as much; approximate with shallow depth.
    fill_poly(img, cam.flat([[-30, 170], [-30, 112], [6, 104], [40, 112], [72, 112], [106, 104], [142, 112], [142, 170]]), n.clothing)
    if style == "long":
        v = ident.hair_volume
        back = np.array([[-(fw + v), ident.eye_y - OY - 4.0, -14.0], [fw + v, ident.eye_y - OY - 4.0, -14.0], [fw + v + 8.0, 90.0, -14.0], [-(fw + v + 8.0), 90.0, -14.0]])
        fill_poly(img, cam.img(back), tint(ident.hair, 0.85))
    jw = fw * ident.jaw_width
    neck = np.array([[-jw * 0.85, ident.jaw_y - OY - 8.0, 2.0], [jw * 0.85, ident.jaw_y - OY - 8.0, 2.0], [fw * 0.72, 100.0, -4.0], [-fw * 0.72, 100.0, -4.0]])
    fill_poly(img, cam.img(neck), tint(skin, 0.72))

    covered_ears = style in ("medium", "long", "curly")

    def ears() -> None:
        for side in (-1, 1):
            a = ident.ear_size * 0.5
            base = np.array([side * (fw - 0.5), ident.ear_y - OY, float(cam.z(np.array(fw - 0.5), np.array(0.0))) - 8.0])
            uax = np.array([side * 0.55, 0.0, -0.83])
            pts = base + a * uax + (a * COS[::2])[:, None] * uax + (ident.ear_size * SIN[::2])[:, None] * np.array([0.0, 1.0, 0.0])
            fill_poly(img, cam.img(pts), tint(skin, 0.9))
            inner = base + a * uax + (a * 0.55 * COS[::2])[:, None] * uax + (ident.ear_size * 0.62 * SIN[::2])[:, None] * np.array([0.0, 1.0, 0.0])
            fill_poly(img, cam.img(inner), tint(skin, 0.72))

    if covered_ears:
        ears()
    # Skull (skin), then the hair mass on it, then the face.
    skull_c = np.array([0.0, -22.0, -10.0])
    skull_r = np.array([fw + 3.0, 58.0, 50.0])
    skull = head_cap(cam, skull_c, skull_r, ident.ear_y + ident.ear_size * 0.5)
    if len(skull) >= 3:
        fill_poly(img, skull, tint(skin, 0.96))
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
        cap = head_cap(cam, skull_c, skull_r + np.array([grow, grow, grow]), cut, bump=0.06 if style == "curly" else 0.0)
        hair_col = mix(ident.hair, skin, 0.45) if style == "buzz" else ident.hair
        if len(cap) >= 3:
            fill_poly(img, cap, hair_col)
    if not covered_ears:
        ears()

    # Face: hairline across the top, outline down to the chin.
    top_y = ident.eye_y - 22.0
    ox, oy = face_outline(ident, top_y)
    s = 2.0 * U13 - 1.0
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
    face_x = np.concatenate([OX + s * wt, ox[1:], [OX], (2 * OX - ox[1:])[::-1]])
    face_y = np.concatenate([hl, oy[1:], [ident.chin_y + 0.5], oy[1:][::-1]])
    fill_poly(img, cam.pix(face_x, face_y), skin)
    if style == "side_part":
        px = OX + ident.part_side * wt * 0.45
        polyline(img, cam.pix([px, px + ident.part_side * 3.0], [hl[3] - 1.0, -15.0], 0.5), tint(skin, 0.9), 1.0 * k)
    if style not in ("bald", "buzz"):  # a few strands give the hair a texture that follows pose
        for i in (-4, -2, 0, 2, 4):
            sx = OX + i * wt * 0.2
            j = 6 + i
            polyline(img, cam.pix([sx, sx + ident.part_side * 4.0], [hl[j] - 1.5, hl[j] - 9.0], 1.0), tint(ident.hair, 0.7), 0.9 * k)

    # Cheek warmth, chin shading, facial hair, mole.
    for side in (-1, 1):
        bx, by = ellipse_pts(OX + side * fw * 0.55, ident.nose_y + 2.0, 7.0, 4.5, 16)
        blend_poly(img, cam.pix(bx, by, 0.5), (skin[0] * 1.02, skin[1] * 0.82, skin[2] * 0.82), 0.35)
    draw_facial_hair(img, cam, ident, (ox, oy))
    if ident.mole[2] > 0:
        mx, my = ellipse_pts(ident.mole[0], ident.mole[1], ident.mole[2], ident.mole[2], 8)
        fill_poly(img, cam.pix(mx, my, 0.8), tint(skin, 0.45))
    for side in (-1, 1):
        draw_brow(img, cam, ident, n, side)
        draw_eye(img, cam, ident, n, side, skin)
    draw_nose(img, cam, ident, skin)
    draw_mouth(img, cam, ident, n, skin)

    if n.glasses:
        draw_glasses(img, cam, ident, n)
    if n.hat:
        hat = head_cap(cam, skull_c, skull_r + np.array([vol * 0.5 + 3.0] * 3), ident.eye_y - ident.brow_gap - 8.0)
        if len(hat) >= 3:
            fill_poly(img, hat, n.hat_colour)
        by = ident.eye_y - ident.brow_gap - 8.0 - OY
        t = np.linspace(0.0, math.pi, 9)
        rr = fw + 3.0
        rimx = rr * np.cos(t)
        rimz = ZF - 4.0 + 16.0 * np.sin(t)
        brim = np.concatenate(
            [np.stack([rimx, np.full_like(t, by), rimz], -1), np.stack([rimx[::-1], np.full_like(t, by + 2.5), rimz[::-1]], -1)]
        )
        fill_poly(img, cam.img(brim), tint(n.hat_colour, 0.8))
    if n.occluder:
        draw_occluder(img, cam, n)

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
