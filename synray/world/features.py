"""The facial features of the world renderer, each drawn on the posed head: outline, eyes, brows, nose,
mouth, facial hair, glasses and occluders (identity factors shape them, nuisance factors pose and move them)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from synray.world.factors import IdentityFactors, NuisanceFactors
from synray.world.geometry import (
    AA,
    ANGLES,
    ONE,
    OX,
    OY,
    SHIFT,
    U7,
    U9,
    Camera,
    blend_poly,
    ellipse_pts,
    fill_poly,
    mix,
    polyline,
    tint,
)

__all__ = [
    "face_outline", "draw_eye", "draw_brow", "draw_nose", "mouth_geometry", "draw_mouth", "draw_facial_hair",
    "draw_glasses", "draw_occluder",
]


def face_outline(ident: IdentityFactors, top_y: float) -> tuple[np.ndarray, np.ndarray]:
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
    return np.concatenate([w1, w2, w3]) + OX, np.concatenate([ys1, ys2, ys3])


def draw_eye(img, cam: Camera, ident: IdentityFactors, n: NuisanceFactors, side: int, skin) -> None:
    ex, ey, ew = OX + side * ident.eye_spacing, ident.eye_y, ident.eye_width
    op = n.eye_open
    eh_up = ew * ident.eye_height * op
    eh_lo = ew * ident.eye_height * 0.62 * min(1.0, op + 0.25)
    tilt = math.tan(math.radians(ident.eye_tilt))
    t = U9
    xl = (t - 0.5) * 2.0 * ew
    lift = -tilt * (xl * side)  # positive tilt lifts the outer corner
    up_y = ey + lift - eh_up * np.sin(math.pi * t) ** 0.8
    lo_y = ey + lift + eh_lo * np.sin(math.pi * t) ** 1.1
    # Socket shadow, then the opening.
    sx, sy = ellipse_pts(ex, ey - 1.0, ew * 1.45, ew * 0.95, 16)
    fill_poly(img, cam.pix(sx, sy, 0.5), tint(skin, 0.9))
    opening = cam.pix(np.concatenate([ex + xl, (ex + xl)[::-1]]), np.concatenate([up_y, lo_y[::-1]]), 1.0)
    fill_poly(img, opening, (232.0, 226.0, 220.0))
    ir = ident.iris_size * ew
    icx, icy = ex + n.gaze[0] * ew * 0.45, ey + n.gaze[1] * ew * 0.45
    clip = opening.astype(np.float32)
    for r, col in ((ir, ident.iris), (ir * 0.42, (12.0, 10.0, 10.0))):
        px, py = ellipse_pts(icx, icy, r, r, 16)
        circ = cam.pix(px, py, 1.2).astype(np.float32)
        if op > 0.15:
            area, inter = cv2.intersectConvexConvex(circ, clip)
            if inter is not None and area > 0:
                fill_poly(img, inter[:, 0, :].astype(np.float64), col)
    if op > 0.3:
        hx, hy = cam.pix([icx + ir * 0.3], [icy - ir * 0.3], 1.5)[0]
        cv2.circle(img, (int(hx * ONE), int(hy * ONE)), int(max(0.6, 0.7 * cam.k) * ONE), (250, 250, 250), -1, AA, SHIFT)
    k = cam.k
    polyline(img, cam.pix(ex + xl, up_y, 1.2), (25.0, 18.0, 16.0), 1.3 * k)
    polyline(img, cam.pix(ex + xl[1:-1], lo_y[1:-1], 1.0), tint(skin, 0.72), 0.8 * k)
    crease = ey + lift - (eh_up + 2.2) * np.sin(math.pi * t) ** 0.9
    polyline(img, cam.pix(ex + xl[1:-1] * 1.05, crease[1:-1], 1.0), tint(skin, 0.7), 0.8 * k)


def draw_brow(img, cam: Camera, ident: IdentityFactors, n: NuisanceFactors, side: int) -> None:
    ex = OX + side * ident.eye_spacing
    bl = ident.brow_length
    t = U7
    x = ex + side * (-0.4 * bl + bl * t)
    base = ident.eye_y - ident.brow_gap - 2.8 * n.brow_raise
    y = base - (ident.brow_arch + 1.2 * max(n.brow_raise, 0.0)) * np.sin(math.pi * t * 0.85) - ident.brow_tilt * t
    th = ident.brow_thickness * (1.2 - 0.65 * t)
    pts = cam.pix(np.concatenate([x, x[::-1]]), np.concatenate([y - th / 2, (y + th / 2)[::-1]]), 1.5)
    fill_poly(img, pts, ident.brow)


def draw_nose(img, cam: Camera, ident: IdentityFactors, skin) -> None:
    ny, nw, nb, nd = ident.nose_y, ident.nose_width, ident.nose_bridge, ident.nose_depth
    top = ident.eye_y - 2.0
    mid = (top + ny) / 2
    xs = np.array([nb, nb * 1.1, nw * 0.55, nw, nw * 0.45])
    ys = np.array([top, mid, ny - 2.0, ny + 1.0, ny + 4.0])
    dz = np.array([2.0, nd * 0.45, nd * 0.85, nd * 0.3, nd * 0.5])
    right = cam.surf(OX + xs, ys, dz)
    left = cam.surf(OX - xs, ys, dz)
    colu = cam.surf([OX], [ny + 4.5], nd * 0.6)
    body = cam.img(np.concatenate([right, colu, left[::-1]]))
    fill_poly(img, body, tint(skin, 0.95))
    k = cam.k
    for s, pts in ((1, right), (-1, left)):
        polyline(img, cam.img(pts[:4]), tint(skin, 0.74), 0.9 * k)
        nx, nyy = ellipse_pts(OX + s * nw * 0.45, ny + 2.6, nw * 0.26, 1.3, 8)
        fill_poly(img, cam.pix(nx, nyy, nd * 0.45), tint(skin, 0.35))
        ax, ay = ellipse_pts(OX + s * nw * 0.78, ny + 0.5, nw * 0.3, 2.6, 16)
        polyline(img, cam.pix(ax[8:16], ay[8:16], nd * 0.3), tint(skin, 0.7), 0.8 * k)
    hx, hy = ellipse_pts(OX, ny - 1.5, nw * 0.28, 1.8, 8)
    fill_poly(img, cam.pix(hx, hy, nd), tint(skin, 1.08))
    sx = np.linspace(-nw * 0.6, nw * 0.6, 5)
    polyline(img, cam.pix(OX + sx, ny + 6.0 + 0.02 * sx**2, 1.0), tint(skin, 0.86), 1.0 * k)


def mouth_geometry(ident: IdentityFactors, n: NuisanceFactors):
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


def draw_mouth(img, cam: Camera, ident: IdentityFactors, n: NuisanceFactors, skin) -> None:
    x, line, up_top, lo_top, lo_bot = mouth_geometry(ident, n)
    xs = OX + x
    dz = 2.5 * (1 - (x / x[-1]) ** 2) + 0.5
    if n.mouth_open > 0.05:
        inner = cam.pix(np.concatenate([xs, xs[::-1]]), np.concatenate([line, lo_top[::-1]]), dz.tolist() + dz[::-1].tolist())
        fill_poly(img, inner, (60.0, 20.0, 24.0))
        if n.smile > 0.25 or n.mouth_open > 0.3:
            th = np.minimum(line + 2.2, lo_top)
            teeth = cam.pix(np.concatenate([xs[2:-2], xs[2:-2][::-1]]), np.concatenate([line[2:-2], th[2:-2][::-1]]), np.concatenate([dz[2:-2], dz[2:-2][::-1]]))
            fill_poly(img, teeth, (235.0, 230.0, 220.0))
    upper = cam.pix(np.concatenate([xs, xs[::-1]]), np.concatenate([up_top, line[::-1]]), np.concatenate([dz, dz[::-1]]))
    lower = cam.pix(np.concatenate([xs, xs[::-1]]), np.concatenate([lo_top, lo_bot[::-1]]), np.concatenate([dz, dz[::-1]]))
    fill_poly(img, upper, tint(ident.lip, 0.9))
    fill_poly(img, lower, ident.lip)
    polyline(img, cam.pix(xs, line, dz), tint(ident.lip, 0.45), 0.9 * cam.k)
    # Shadow under the lower lip.
    sx = x[2:-2] * 0.7
    polyline(img, cam.pix(OX + sx, lo_bot[2:-2] + 2.0, 0.5), tint(skin, 0.85), 1.2 * cam.k)


def draw_facial_hair(img, cam: Camera, ident: IdentityFactors, outline: tuple[np.ndarray, np.ndarray]) -> None:
    kind = ident.facial_hair_name
    if kind == "none":
        return
    ox, oy = outline
    dens = ident.facial_hair_density
    col = tint(ident.hair, 0.9)
    mw, my, ny, nw = ident.mouth_width, ident.mouth_y, ident.nose_y, ident.nose_width
    if kind in ("stubble", "beard"):
        # Lower face outline, closed by a line over the cheeks and under the nose.
        sel = oy > ident.eye_y + 8.0
        rx, ry = ox[sel], oy[sel]
        inner, outer = mw + 4.0, ident.face_width * 0.75
        up_x = np.array([OX - outer, OX - inner, OX, OX + inner, OX + outer])
        up_y = np.array([ident.eye_y + 14.0, ny + 3.0, ny + 5.5, ny + 3.0, ident.eye_y + 14.0])
        xs = np.concatenate([rx, 2 * OX - rx[::-1], up_x])
        ys = np.concatenate([ry, ry[::-1], up_y])
        pts = cam.pix(xs, ys, 1.0)
        alpha = (0.22 + 0.2 * dens) if kind == "stubble" else (0.55 + 0.4 * dens)
        blend_poly(img, pts, col if kind == "beard" else tint(col, 0.8), alpha)
        return
    mous_x = np.array([mw + 2.0, mw * 0.6, nw * 0.8, 0.0])
    mous_y = np.array([my + 1.0, my - 3.5, ny + 5.0, ny + 5.5])
    xs = np.concatenate([OX + mous_x, OX - mous_x[::-1]])
    blend_poly(img, cam.pix(xs, np.concatenate([mous_y, mous_y[::-1]]), 2.0), col, 0.6 + 0.4 * dens)
    if kind == "goatee":
        gx = np.array([mw * 0.75, mw * 0.55, 0.0])
        gy = np.array([my + 2.0, ident.chin_y - 2.5, ident.chin_y])
        xs = np.concatenate([OX + gx, OX - gx[::-1]])
        ys = np.concatenate([gy, gy[::-1]])
        blend_poly(img, cam.pix(xs, ys, 1.5), col, 0.6 + 0.4 * dens)


def draw_glasses(img, cam: Camera, ident: IdentityFactors, n: NuisanceFactors) -> None:
    k = cam.k
    col = n.glasses_colour
    ew = ident.eye_width
    rims = []
    for side in (-1, 1):
        ex = OX + side * ident.eye_spacing
        c = np.cos(ANGLES[::2])
        s = np.sin(ANGLES[::2])
        px = ex + (ew + 4.5) * np.sign(c) * np.abs(c) ** 0.6
        py = ident.eye_y + 1.0 + (ew * 0.75 + 3.5) * np.sign(s) * np.abs(s) ** 0.6
        rim = cam.pix(px, py, 5.0)
        rims.append(rim)
        if n.glasses == 2:
            blend_poly(img, rim, (18.0, 18.0, 24.0), 0.88)
    for rim in rims:
        polyline(img, rim, col, 1.4 * k, closed=True)
    # Bridge and temples.
    y = ident.eye_y - 1.0
    inner = ident.eye_spacing - ew - 4.5
    polyline(img, cam.pix([OX - inner, OX, OX + inner], [y, y - 1.5, y], [5.0, 6.0, 5.0]), col, 1.4 * k)
    for side in (-1, 1):
        x0 = ident.eye_spacing + ew + 4.5
        p = cam.surf([OX + side * x0], [y], 5.0)
        q = np.array([[side * (ident.face_width + 1.0), ident.ear_y - 6.0 - OY, -4.0]])
        polyline(img, cam.img(np.concatenate([p, q])), col, 1.4 * k)


def draw_occluder(img, cam: Camera, n: NuisanceFactors) -> None:
    cx, cy, hw, hh, ang = n.occluder_box
    a = math.radians(ang)
    ca, sa = math.cos(a), math.sin(a)
    if n.occluder == 2:  # box
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        pts = corners @ np.array([[ca, sa], [-sa, ca]]) + [cx, cy]
        pts = cam.flat(pts)
        fill_poly(img, pts, n.occluder_colour)
        polyline(img, pts, tint(n.occluder_colour, 0.6), cam.k, closed=True)
    else:  # hand: palm plus fingers, in a skin tone of its own
        tone = mix(n.occluder_colour, (230.0, 180.0, 150.0), 0.75)
        px, py = ellipse_pts(0.0, 0.0, hw, hh * 0.8, 32)
        rot = np.array([[ca, sa], [-sa, ca]])
        palm = np.stack([px, py], -1) @ rot + [cx, cy]
        fill_poly(img, cam.flat(palm), tone)
        for i in range(4):
            fx = -hw * 0.6 + i * hw * 0.4
            f = np.array([[fx, -hh * 0.5], [fx * 1.1, -hh * 0.5 - hw * (0.9 + 0.15 * (i in (1, 2)))]]) @ rot + [cx, cy]
            polyline(img, cam.flat(f), tone, hw * 0.32 * cam.k)
            polyline(img, cam.flat(f), tint(tone, 0.8), 0.7 * cam.k)
            polyline(img, cam.flat(f + [0.3, 0.3]), tone, hw * 0.22 * cam.k)
