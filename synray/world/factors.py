"""Identity and nuisance factors of the built-in mini world.

A face image is ``render(identity factors, nuisance factors)``. Identity factors are what a face
recogniser must learn (head and feature geometry, colouring, hair, marks); nuisance factors are what
it must ignore (pose, expression, lighting, background, occluders, degradations, crop jitter, and a
small per-image drift of the identity itself, e.g. hair or beard growth).

Every draw is deterministic: identity factors come from
``SeedSequence(world_seed, spawn_key=(identity,))`` and nuisance factors from
``SeedSequence(world_seed, spawn_key=(identity, sample))``, so any machine regenerates the same image
for the same ``(world_seed, identity, sample)``. Nuisance variates are drawn in a fixed order before
``difficulty`` scales them, so a sample at a higher difficulty is the same scene pushed further, and
``difficulty=0`` gives every sample of an identity the same canonical image.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, fields, replace

import numpy as np

Colour = tuple[float, float, float]

HAIR_STYLES = ("bald", "buzz", "short", "side_part", "fringe", "medium", "long", "curly")
FACIAL_HAIR = ("none", "stubble", "moustache", "goatee", "beard")
BACKGROUNDS = ("flat", "gradient", "stripes", "blobs", "tiles")
OCCLUDERS = ("none", "hand", "box")
GLASSES = ("none", "clear", "sun")

# Skin tones, light to dark (RGB); an identity sits at a continuous position on this ramp.
_SKIN = np.array(
    [[250, 220, 200], [238, 196, 170], [224, 172, 138], [198, 140, 104], [160, 106, 72], [118, 76, 50], [82, 54, 38]],
    np.float64,
)
_HAIR = np.array(
    [[22, 18, 16], [48, 32, 22], [86, 58, 36], [128, 82, 46], [150, 64, 30], [196, 160, 100], [150, 146, 140], [226, 220, 200]],
    np.float64,
)  # black, dark brown, brown, light brown, auburn, blond, grey, white-blond
_HAIR_P_LIGHT = np.array([0.12, 0.2, 0.2, 0.14, 0.08, 0.16, 0.07, 0.03])
_HAIR_P_DARK = np.array([0.55, 0.28, 0.1, 0.02, 0.01, 0.0, 0.04, 0.0])
_IRIS = np.array([[70, 42, 24], [40, 26, 18], [104, 82, 44], [74, 104, 60], [70, 112, 160], [112, 124, 136]], np.float64)
_IRIS_P_LIGHT = np.array([0.25, 0.1, 0.15, 0.15, 0.25, 0.1])
_IRIS_P_DARK = np.array([0.45, 0.5, 0.05, 0.0, 0.0, 0.0])
_HAIR_STYLE_P = np.array([0.06, 0.1, 0.2, 0.14, 0.12, 0.14, 0.16, 0.08])
_FACIAL_HAIR_P = np.array([0.55, 0.12, 0.1, 0.08, 0.15])

# Continuous identity factors: name -> (low, high), in template pixels at 112 px unless stated.
# ``perturb_identity`` jitters these in the unit interval, which is why their ranges live in one table.
RANGES: dict[str, tuple[float, float]] = {
    "face_width": (35.0, 43.0),  # half-width at the cheekbones
    "jaw_width": (0.62, 0.9),  # half-width at the jaw angle / face_width
    "jaw_y": (86.0, 100.0),  # height of the jaw angle
    "chin_y": (106.0, 118.0),  # bottom of the chin
    "chin_square": (1.6, 3.2),  # superellipse exponent of the chin: higher is squarer
    "forehead_width": (0.86, 1.0),  # temple half-width / face_width
    "hairline_y": (8.0, 22.0),  # forehead hairline height
    "hairline_peak": (-4.0, 5.0),  # widow's peak (positive) or rounded (negative)
    "eye_spacing": (16.0, 19.5),  # half distance between the eye centres
    "eye_y": (49.0, 55.0),
    "eye_width": (5.6, 7.6),  # half-width of the eye opening
    "eye_height": (0.36, 0.6),  # opening height / width
    "eye_tilt": (-9.0, 9.0),  # degrees, positive lifts the outer corner
    "iris_size": (0.48, 0.64),  # iris radius / eye half-width
    "brow_gap": (6.5, 11.0),  # brow above the eye centre
    "brow_thickness": (1.3, 3.8),
    "brow_arch": (0.0, 3.2),
    "brow_length": (14.0, 20.0),
    "brow_tilt": (-3.0, 3.0),  # outer end higher (positive) or lower
    "nose_y": (67.0, 76.0),  # nose tip height
    "nose_width": (6.5, 11.5),  # half-width of the alar base
    "nose_depth": (8.0, 15.0),  # protrusion of the tip
    "nose_bridge": (2.0, 4.2),  # half-width of the bridge
    "mouth_y": (88.0, 95.0),
    "mouth_width": (12.0, 17.5),  # half-width corner to corner
    "upper_lip": (1.4, 4.0),
    "lower_lip": (2.2, 5.5),
    "ear_size": (8.0, 13.0),  # half-height of the ear
    "ear_y": (56.0, 66.0),
    "hair_volume": (1.0, 9.0),
    "skin_tone": (0.0, 1.0),  # position on the skin ramp
    "facial_hair_density": (0.35, 1.0),
}
_CONTINUOUS = tuple(RANGES)


@dataclass(frozen=True)
class IdentityFactors:
    """What makes a person: fixed for every image of an identity (up to the small per-image drift)."""

    face_width: float
    jaw_width: float
    jaw_y: float
    chin_y: float
    chin_square: float
    forehead_width: float
    hairline_y: float
    hairline_peak: float
    eye_spacing: float
    eye_y: float
    eye_width: float
    eye_height: float
    eye_tilt: float
    iris_size: float
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    brow_length: float
    brow_tilt: float
    nose_y: float
    nose_width: float
    nose_depth: float
    nose_bridge: float
    mouth_y: float
    mouth_width: float
    upper_lip: float
    lower_lip: float
    ear_size: float
    ear_y: float
    hair_volume: float
    skin_tone: float
    facial_hair_density: float
    skin: Colour  # RGB albedo
    lip: Colour
    hair: Colour
    brow: Colour
    iris: Colour
    hair_style: int  # index into HAIR_STYLES
    facial_hair: int  # index into FACIAL_HAIR
    part_side: int  # -1 / +1: side of the parting and of asymmetric details
    mole: tuple[float, float, float]  # (x, y, radius) in template px; radius 0 means none

    @property
    def hair_style_name(self) -> str:
        return HAIR_STYLES[self.hair_style]

    @property
    def facial_hair_name(self) -> str:
        return FACIAL_HAIR[self.facial_hair]


@dataclass(frozen=True)
class NuisanceFactors:
    """How one photo of a person happens to look. All-zero magnitudes give the canonical photo."""

    yaw: float = 0.0  # degrees, positive turns the face towards image right
    pitch: float = 0.0  # degrees, positive looks up
    roll: float = 0.0  # degrees of in-plane rotation left after alignment
    smile: float = 0.0  # 0..1
    mouth_open: float = 0.0  # 0..1
    eye_open: float = 1.0  # 0 closed .. 1 normal .. 1.25 wide
    brow_raise: float = 0.0  # -1 frown .. 1 raised
    gaze: tuple[float, float] = (0.0, 0.0)  # iris offset in eye half-widths
    light_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)  # unit vector towards the light (x right, y down, z to camera)
    diffuse: float = 0.35  # share of directional light
    exposure: float = 1.0
    light_colour: Colour = (1.0, 1.0, 1.0)  # per-channel gain
    background: int = 0  # index into BACKGROUNDS
    bg_colour: Colour = (150.0, 150.0, 150.0)
    bg_colour2: Colour = (120.0, 120.0, 120.0)
    bg_params: tuple[float, ...] = (0.0,) * 8  # texture phase/positions in [0, 1)
    clothing: Colour = (70.0, 80.0, 100.0)
    glasses: int = 0  # index into GLASSES
    glasses_colour: Colour = (30.0, 30.0, 30.0)
    hat: bool = False
    hat_colour: Colour = (60.0, 60.0, 140.0)
    occluder: int = 0  # index into OCCLUDERS
    occluder_box: tuple[float, float, float, float, float] = (56.0, 100.0, 20.0, 14.0, 0.0)  # cx, cy, half-w, half-h, angle (template px, deg)
    occluder_colour: Colour = (180.0, 60.0, 60.0)
    blur: float = 0.0  # Gaussian sigma in template px
    downscale: float = 1.0  # <1: rendered through a lower resolution
    noise: float = 0.0  # sensor noise sigma (0..255 scale)
    noise_seed: int = 0
    jpeg_quality: int = 0  # 0: no JPEG round trip
    scale: float = 1.0  # crop scale error of the aligner
    shift: tuple[float, float] = (0.0, 0.0)  # crop translation error, template px
    drift: tuple[float, ...] = ()  # per-image identity drift in unit range, one per RANGES entry (empty: none)


def _mix(palette: np.ndarray, t: float) -> np.ndarray:
    """Piecewise-linear interpolation along a colour ramp, ``t`` in [0, 1]."""
    x = t * (len(palette) - 1)
    i = min(int(x), len(palette) - 2)
    f = x - i
    return palette[i] * (1 - f) + palette[i + 1] * f


def _colour(c: np.ndarray) -> Colour:
    c = np.clip(c, 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def _check_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def identity_rng(world_seed: int, identity: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence(_check_int("world_seed", world_seed), spawn_key=(_check_int("identity", identity),))
    )


def sample_rng(world_seed: int, identity: int, sample: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence(
            _check_int("world_seed", world_seed),
            spawn_key=(_check_int("identity", identity), _check_int("sample", sample)),
        )
    )


def identity_factors(world_seed: int, identity: int) -> IdentityFactors:
    """The identity factors of ``identity`` in the world ``world_seed``."""
    rng = identity_rng(world_seed, identity)
    # Beta(1.6, 1.6): most people near the middle of each range, tails still used.
    u = rng.beta(1.6, 1.6, size=len(_CONTINUOUS))
    vals = {k: lo + (hi - lo) * float(x) for (k, (lo, hi)), x in zip(RANGES.items(), u)}
    extra = rng.random(16)
    tone = vals["skin_tone"]
    # Colouring is correlated with skin tone, as in people.
    p_hair = _HAIR_P_LIGHT * (1 - tone) + _HAIR_P_DARK * tone
    hair_idx = int(rng.choice(len(_HAIR), p=p_hair / p_hair.sum()))
    hair = _HAIR[hair_idx] * (0.85 + 0.3 * extra[0]) + rng.normal(0, 6, 3)
    p_iris = _IRIS_P_LIGHT * (1 - tone) + _IRIS_P_DARK * tone
    iris = _IRIS[int(rng.choice(len(_IRIS), p=p_iris / p_iris.sum()))] * (0.8 + 0.4 * extra[1]) + rng.normal(0, 6, 3)
    skin = _mix(_SKIN, tone) * (1.0 + rng.normal(0, 0.025, 3)) + np.array([6.0, 0.0, -6.0]) * (extra[2] - 0.5)
    lip = skin * np.array([0.86, 0.62, 0.62]) + np.array([25.0, 5.0, 10.0]) * extra[3]
    brow = hair * (0.55 + 0.35 * extra[4]) if hair_idx not in (5, 6, 7) else hair * 0.6
    style = int(rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_P))
    beard = int(rng.choice(len(FACIAL_HAIR), p=_FACIAL_HAIR_P))
    side = 1 if extra[5] < 0.5 else -1
    if extra[6] < 0.3:
        mole = (30.0 + 52.0 * extra[7], 58.0 + 40.0 * extra[8], 0.8 + 0.9 * extra[9])
        if abs(mole[0] - 56.0) < 10.0 and mole[1] < 80.0:  # keep it off the nose
            mole = (mole[0] + 16.0 * side, mole[1], mole[2])
    else:
        mole = (0.0, 0.0, 0.0)
    return IdentityFactors(
        **vals,
        skin=_colour(skin),
        lip=_colour(lip),
        hair=_colour(hair),
        brow=_colour(brow),
        iris=_colour(iris),
        hair_style=style,
        facial_hair=beard,
        part_side=side,
        mole=mole,
    )


def perturb_identity(ident: IdentityFactors, drift: tuple[float, ...] | np.ndarray) -> IdentityFactors:
    """Shift each continuous factor by ``drift`` (in units of its range); the look of one photo."""
    if len(drift) == 0:
        return ident
    if len(drift) != len(_CONTINUOUS):
        raise ValueError(f"drift has {len(drift)} entries; expected {len(_CONTINUOUS)} (one per continuous factor)")
    changes = {}
    for (name, (lo, hi)), d in zip(RANGES.items(), drift):
        v = getattr(ident, name) + float(d) * (hi - lo)
        changes[name] = min(max(v, lo - 0.1 * (hi - lo)), hi + 0.1 * (hi - lo))
    return replace(ident, **changes)


def _random_colour(u: np.ndarray) -> np.ndarray:
    """A colour from three uniforms (hue, saturation, value), kept within plausible photo colours."""
    r, g, b = colorsys.hsv_to_rgb(float(u[0]), (40 + 180 * float(u[1])) / 255.0, (50 + 190 * float(u[2])) / 255.0)
    return np.array([r, g, b]) * 255.0


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(float(x), lo), hi)


_NEUTRAL = NuisanceFactors()


def nuisance_factors(world_seed: int, identity: int, sample: int, difficulty: float = 1.0) -> NuisanceFactors:
    """The nuisance of photo ``sample`` of ``identity``; ``difficulty`` scales every magnitude.

    At ``difficulty=1`` (the world's default scale): yaw sd 20 deg, pitch sd 10 deg, smiles, varied
    coloured light, backgrounds, glasses on ~15% of photos, hats ~7%, hand/box occluders ~10%, blur,
    noise, JPEG on ~30%, and a small identity drift. Probabilities and magnitudes grow linearly with
    ``difficulty`` (probabilities cap at sensible values).
    """
    if not (isinstance(difficulty, (int, float, np.floating)) and math.isfinite(difficulty) and difficulty >= 0):
        raise ValueError(f"difficulty must be a finite number >= 0, got {difficulty!r}")
    d = float(difficulty)
    rng = sample_rng(world_seed, identity, sample)
    g = rng.standard_normal(24)
    u = rng.random(36)
    coin = rng.random(8)
    bg_params = tuple(float(x) for x in rng.random(8))
    drift_g = rng.standard_normal(len(_CONTINUOUS))
    if d == 0.0:
        return _NEUTRAL
    w = min(d, 1.0)  # blend weight towards fully random appearance (colours, textures)

    def event(k: int, base: float, cap: float = 0.9) -> bool:
        """Whether rare event ``k`` happens; its probability grows with difficulty up to ``cap``."""
        return bool(coin[k] < min(cap, base * d))

    yaw = float(_clamp(20.0 * d * g[0], -60, 60))
    pitch = float(_clamp(10.0 * d * g[1], -35, 35))
    roll = float(_clamp(4.0 * d * g[2], -20, 20))
    smile = float(_clamp(d * (0.55 * u[0] - 0.1), 0.0, 1.0))
    mouth_open = float(_clamp(d * (u[1] - 0.65) * 1.6, 0.0, 1.0))
    eye_open = float(_clamp(1.0 + 0.18 * d * g[3] - (0.9 if u[2] < 0.04 * d else 0.0), 0.08, 1.3))
    brow_raise = float(_clamp(0.5 * d * g[4], -1.0, 1.0))
    gaze = (float(_clamp(0.25 * d * g[5], -0.5, 0.5)), float(_clamp(0.12 * d * g[6], -0.25, 0.25)))
    # Light: tilt away from the camera axis grows with difficulty, azimuth is free.
    az = 2 * math.pi * u[3]
    tilt = min(1.35, d * (0.25 + 0.9 * u[4]))
    light_dir = (math.sin(tilt) * math.cos(az), math.sin(tilt) * math.sin(az) - 0.15 * w, math.cos(tilt))
    n = math.sqrt(sum(c * c for c in light_dir))
    light_dir = tuple(c / n for c in light_dir)
    diffuse = float(_clamp(0.35 + d * 0.35 * u[5], 0.0, 0.9))
    exposure = float(math.exp(_clamp(0.18 * d * g[7], -0.7, 0.6)))
    warm = 0.08 * d * g[8]
    gain = np.clip(1.0 + np.array([warm, 0.0, -warm]) + 0.035 * d * g[9:12], 0.5, 1.5)
    light_colour = (float(gain[0]), float(gain[1]), float(gain[2]))
    neutral_bg = np.array(_NEUTRAL.bg_colour)
    bg1 = neutral_bg * (1 - w) + _random_colour(u[6:9]) * w
    bg2 = neutral_bg * (1 - w) + _random_colour(u[9:12]) * w
    background = int(u[12] * len(BACKGROUNDS)) if u[13] < w else 0
    clothing = np.array(_NEUTRAL.clothing) * (1 - w) + _random_colour(u[14:17]) * w
    glasses = 0
    if event(0, 0.15):
        glasses = 2 if u[17] < 0.3 else 1
    glasses_colour = _random_colour(np.array([u[18], u[19], 0.3 * u[19]]))
    hat = event(1, 0.07)
    hat_colour = _random_colour(u[22:25])
    occluder = 0
    if event(2, 0.10):
        occluder = 1 if u[28] < 0.5 else 2
    occ_box = tuple(float(v) for v in (20 + 72 * u[29], 60 + 52 * u[30], 12 + 12 * u[31], 9 + 12 * u[32], 360 * u[33]))
    occ_colour = _random_colour(u[25:28])
    blur = float(abs(0.6 * d * g[12]))
    downscale = float(0.3 + 0.4 * u[20]) if event(3, 0.12, 0.6) else 1.0
    noise = float(abs(4.0 * d * g[13]))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    jpeg_quality = int(15 + 60 * u[21]) if event(4, 0.3, 0.8) else 0
    scale = float(math.exp(_clamp(0.04 * d * g[14], -0.2, 0.2)))
    shift = (float(_clamp(2.0 * d * g[15], -10, 10)), float(_clamp(2.0 * d * g[16], -10, 10)))
    drift = tuple(float(x) for x in np.clip(0.06 * d * drift_g, -0.3, 0.3))
    return NuisanceFactors(
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        smile=smile,
        mouth_open=mouth_open,
        eye_open=eye_open,
        brow_raise=brow_raise,
        gaze=gaze,
        light_dir=light_dir,
        diffuse=diffuse,
        exposure=exposure,
        light_colour=light_colour,
        background=background,
        bg_colour=_colour(bg1),
        bg_colour2=_colour(bg2),
        bg_params=bg_params,
        clothing=_colour(clothing),
        glasses=glasses,
        glasses_colour=_colour(glasses_colour),
        hat=hat,
        hat_colour=_colour(hat_colour),
        occluder=occluder,
        occluder_box=occ_box,
        occluder_colour=_colour(occ_colour),
        blur=blur,
        downscale=downscale,
        noise=noise,
        noise_seed=noise_seed,
        jpeg_quality=jpeg_quality,
        scale=scale,
        shift=shift,
        drift=drift,
    )


def identity_field_names() -> tuple[str, ...]:
    """Names of all identity factors, in dataclass order."""
    return tuple(f.name for f in fields(IdentityFactors))
