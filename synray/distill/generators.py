"""Latent -> face generators for SynthDistill, behind one interface.

SynthDistill needs more from a generator than the synthesis pipeline does: it draws latents, maps
them to the space it resamples in (StyleGAN's W), perturbs them there and renders the perturbed
latents again. Every generator here is frozen and exposes

* ``z_dim`` and :meth:`map`: ``z ~ N(0, I)`` [B, z_dim] -> ``w`` [B, num_ws, w_dim] (identity map
  with ``num_ws = 1`` for generators without a mapping network);
* :meth:`synthesize`: ``w`` -> images [B, 3, H, W] in [0, 1];
* ``crop``: how its output becomes the 112x112 face crop (``ffhq``: SynthDistill's fixed eye crop
  for FFHQ-aligned StyleGAN output; ``resize``: output that is already a face crop).

Generators: NVlabs StyleGAN2 pickles (needs the user's copy of NVlabs' ``dnnlib``/``torch_utils``
on ``sys.path``), the DigiFace-trained DCGAN of the ``gan-face-generate`` package, synray's
identity-conditioned LDM (the latent is the identity context), and the built-in world, whose latent
drives its identity factors continuously (see :class:`WorldLatentGenerator`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from synray.config.distill import DistillGeneratorConfig
from synray.diffusion.sampling import sample
from synray.distill.resample import crop_and_resize
from synray.errors import UserError

__all__ = [
    "GeneratorError", "LatentGenerator", "StyleGAN2Generator", "DCGANLatentGenerator", "LDMLatentGenerator",
    "WorldLatentGenerator", "load_stylegan2", "build_latent_generator", "face_crops",
]


class GeneratorError(UserError, RuntimeError):
    """A generator cannot be loaded (missing code, package or file) or was given bad latents."""


class LatentGenerator(Protocol):
    name: str
    z_dim: int
    w_dim: int
    num_ws: int
    crop: str

    def map(self, z: Tensor) -> Tensor:
        """[B, z_dim] -> [B, num_ws, w_dim]."""

    def synthesize(self, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, num_ws, w_dim] -> [B, 3, H, W] in [0, 1]."""

    def to(self, device: torch.device | str) -> LatentGenerator:
        ...


def _check_w(w: Tensor, num_ws: int, w_dim: int, name: str) -> None:
    if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[1] != num_ws or w.shape[2] != w_dim:
        raise GeneratorError(f"{name}: latents must be [B, {num_ws}, {w_dim}], got {tuple(getattr(w, 'shape', ()))}")


def _to01(x: Tensor) -> Tensor:
    """[-1, 1] generator output -> [0, 1] (SynthDistill: clamp, then (x + 1) / 2)."""
    return (x.float().clamp(-1, 1) + 1) / 2


def face_crops(images: Tensor, mode: str, size: int = 112) -> Tensor:
    """Generator output [B, 3, H, W] in [0, 1] -> face crops [B, 3, size, size].

    ``ffhq`` cuts SynthDistill's fixed FFHQ eye box (to 112, then to ``size``); ``resize`` resizes.
    """
    if mode == "ffhq":
        images = crop_and_resize(images)
    elif mode != "resize":
        raise ValueError(f"unknown crop mode {mode!r}; expected 'ffhq' or 'resize'")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    down = images.shape[-1] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=down)


# --------------------------------------------------------------------------------------------
# StyleGAN2 (NVlabs pickles)


def load_stylegan2(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``G_ema`` of an NVlabs stylegan2-ada-pytorch / stylegan3 pickle (e.g. ``stylegan2-ffhq-256x256.pkl``).

    The pickles reference NVlabs' own modules, so their code must be importable: clone
    stylegan2-ada-pytorch (or stylegan3) and put its root on ``PYTHONPATH``. A pickle can run code
    when loaded: only load files you trust.
    """
    path = os.fspath(path)
    missing = [m for m in ("dnnlib", "torch_utils") if importlib.util.find_spec(m) is None]
    if missing:
        raise GeneratorError(
            f"loading the StyleGAN2 pickle {path} needs NVlabs' code: modules {missing} are not importable; "
            "put a checkout of NVlabs/stylegan2-ada-pytorch (or stylegan3) on PYTHONPATH")
    if not os.path.exists(path):
        raise GeneratorError(f"StyleGAN2 pickle not found: {path}")
    with open(path, "rb") as fh:
        if importlib.util.find_spec("legacy") is not None:
            import legacy  # NVlabs' loader also converts the original TensorFlow pickles

            data = legacy.load_network_pkl(fh)
        else:
            data = pickle.load(fh)  # noqa: S301 - the NVlabs format is a pickle (see docstring)
    if not isinstance(data, dict) or "G_ema" not in data:
        raise GeneratorError(f"{path} holds no 'G_ema' (keys: {list(data)[:8] if isinstance(data, dict) else type(data)})")
    g = data["G_ema"]
    for attr in ("z_dim", "w_dim", "mapping", "synthesis"):
        if not hasattr(g, attr):
            raise GeneratorError(f"{path}: G_ema has no '{attr}'; not a StyleGAN2 generator")
    return g.eval().requires_grad_(False).to(device)


class StyleGAN2Generator:
    """NVlabs ``G_ema``: ``w = mapping(z, c=None, truncation_psi)``; images cut with the FFHQ eye crop."""

    name = "stylegan2"
    crop = "ffhq"

    def __init__(self, net: torch.nn.Module, truncation_psi: float = 1.0) -> None:
        self.net = net
        self.truncation_psi = float(truncation_psi)
        self.z_dim, self.w_dim = int(net.z_dim), int(net.w_dim)
        self.num_ws = int(getattr(net, "num_ws", getattr(net.mapping, "num_ws", 1)))
        self.c_dim = int(getattr(net, "c_dim", 0))

    @torch.no_grad()
    def map(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise GeneratorError(f"stylegan2: z must be [B, {self.z_dim}], got {tuple(z.shape)}")
        c = torch.zeros(z.shape[0], self.c_dim, device=z.device) if self.c_dim else None
        return self.net.mapping(z, c, truncation_psi=self.truncation_psi)

    @torch.no_grad()
    def synthesize(self, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_w(w, self.num_ws, self.w_dim, self.name)
        return _to01(self.net.synthesis(w))

    def to(self, device) -> StyleGAN2Generator:
        self.net.to(device)
        return self


# --------------------------------------------------------------------------------------------
# DigiFace DCGAN (gan-face-generate)


class DCGANLatentGenerator:
    """The ``gan-face-generate`` DCGAN (64x64, nz=100); no mapping network, output is a face crop."""

    name = "dcgan"
    crop = "resize"
    num_ws = 1

    def __init__(self) -> None:
        from synray.config.synth import SynthConfig
        from synray.synthesis.generators import DCGANGenerator

        loaded = DCGANGenerator(SynthConfig.model_validate({"generator": {"type": "dcgan"}}))
        self.net = loaded.net.eval().requires_grad_(False)
        self.z_dim = self.w_dim = DCGANGenerator.nz

    def map(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise GeneratorError(f"dcgan: z must be [B, {self.z_dim}], got {tuple(z.shape)}")
        return z[:, None, :]

    @torch.no_grad()
    def synthesize(self, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_w(w, 1, self.w_dim, self.name)
        return _to01(self.net(w[:, 0, :, None, None]))

    def to(self, device) -> DCGANLatentGenerator:
        self.net.to(device)
        return self


# --------------------------------------------------------------------------------------------
# synray's identity-conditioned LDM


class LDMLatentGenerator:
    """Identity-conditioned LDM: the latent is the identity context (projected onto the unit sphere,
    as IDiff-Face's synthetic identities are), sampled by ``generator.sampler``; the start noise comes
    from the caller's generator."""

    name = "ldm"
    crop = "resize"
    num_ws = 1

    def __init__(self, cfg: DistillGeneratorConfig, device: str | torch.device = "cpu") -> None:
        from synray.models.ldm_checkpoint import load_unet, load_vq_decoder
        from synray.models.vq import VQConfig

        self.device = torch.device(device)
        self.unet = load_unet(cfg.path, device=self.device).eval().requires_grad_(False)
        vq = VQConfig.from_dict(cfg.vq_config, key="generator.vq_config") if cfg.vq_config else None
        self.vq = load_vq_decoder(cfg.vq_decoder, vq, device=self.device).eval().requires_grad_(False)
        self.latent_shape = tuple(cfg.latent_shape)
        self.sampler = cfg.sampler
        self.z_dim = self.w_dim = int(self.unet.config.context_input_channels)

    def map(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise GeneratorError(f"ldm: z must be [B, {self.z_dim}], got {tuple(z.shape)}")
        return F.normalize(z, dim=1)[:, None, :]

    @torch.no_grad()
    def synthesize(self, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images of contexts ``w``; x_T, then a stochastic sampler's noise, come from ``generator``."""
        _check_w(w, 1, self.w_dim, self.name)
        ctx = F.normalize(w[:, 0, :].float(), dim=1).to(self.device)
        x_T = torch.randn((w.shape[0], *self.latent_shape), generator=generator).to(self.device)
        z = sample(self.sampler, self.unet, x_T, ctx, generator=generator)
        return _to01(self.vq.decode(z))

    def to(self, device) -> LDMLatentGenerator:
        self.device = torch.device(device)
        self.unet.to(device)
        self.vq.to(device)
        return self


# --------------------------------------------------------------------------------------------
# the built-in world


_N_ANCHORS = 8
_NUISANCE_DIMS = 6  # yaw, pitch, roll, smile, light direction (2)


class WorldLatentGenerator:
    """The mini world's renderer driven by a continuous latent, so that resampling moves faces smoothly.

    Latent layout (``z ~ N(0, I)``): one coordinate per continuous identity factor, mapped through the
    normal CDF onto that factor's range (``synray.world.factors.RANGES``); ``8`` coordinates whose
    softmax blends the colouring of 8 anchor identities (discrete traits such as hair style come from
    the heaviest anchor); and ``6`` nuisance coordinates (yaw, pitch, roll, smile, light direction)
    scaled by ``difficulty``. Nearby latents are therefore the same-looking person.
    """

    name = "world"
    crop = "resize"
    num_ws = 1

    def __init__(self, seed: int = 0, size: int = 64, difficulty: float = 0.5) -> None:
        from synray.world.factors import RANGES, identity_factors

        self.seed, self.size, self.difficulty = int(seed), int(size), float(difficulty)
        self.ranges = list(RANGES.items())
        self.anchors = [identity_factors(self.seed, k) for k in range(_N_ANCHORS)]
        self.z_dim = self.w_dim = len(self.ranges) + _N_ANCHORS + _NUISANCE_DIMS

    def map(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise GeneratorError(f"world: z must be [B, {self.z_dim}], got {tuple(z.shape)}")
        return z[:, None, :]

    def factors(self, w: np.ndarray) -> tuple[Any, Any]:
        """Identity and nuisance factors of one latent (1-D array of ``z_dim`` values)."""
        from synray.world.factors import NuisanceFactors

        n = len(self.ranges)
        u = 0.5 * (1 + np.vectorize(math.erf)(w[:n] / math.sqrt(2)))
        logits = 2.0 * w[n:n + _N_ANCHORS]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = self.anchors[int(np.argmax(p))]

        def blend(attr: str) -> tuple[float, float, float]:
            c = sum(pk * np.asarray(getattr(a, attr)) for pk, a in zip(p, self.anchors))
            return tuple(float(x) for x in c)

        continuous = {name: lo + (hi - lo) * float(uk) for (name, (lo, hi)), uk in zip(self.ranges, u)}
        ident = replace(top, **continuous, skin=blend("skin"), lip=blend("lip"), hair=blend("hair"),
                        brow=blend("brow"), iris=blend("iris"))
        g = w[n + _N_ANCHORS:]
        d = self.difficulty
        az = math.atan2(float(g[5]), float(g[4]))
        tilt = min(1.2, d * 0.5 * math.hypot(float(g[4]), float(g[5])))
        light = (math.sin(tilt) * math.cos(az), math.sin(tilt) * math.sin(az), math.cos(tilt))
        nuis = NuisanceFactors(
            yaw=float(np.clip(20 * d * g[0], -60, 60)), pitch=float(np.clip(10 * d * g[1], -35, 35)),
            roll=float(np.clip(4 * d * g[2], -20, 20)), smile=float(np.clip(0.5 * d * (g[3] + 0.5), 0, 1)),
            light_dir=light,
        )
        return ident, nuis

    @torch.no_grad()
    def synthesize(self, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        from synray.world.render import render_face

        _check_w(w, 1, self.w_dim, self.name)
        lat = w[:, 0, :].detach().float().cpu().numpy().astype(np.float64)
        imgs = np.stack([render_face(*self.factors(v), self.size) for v in lat])
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().float().div_(255).to(w.device)

    def to(self, device) -> WorldLatentGenerator:
        return self


def build_latent_generator(cfg: DistillGeneratorConfig, device: str | torch.device = "cpu") -> LatentGenerator:
    """The configured generator on ``device``, frozen."""
    if cfg.type == "stylegan2":
        return StyleGAN2Generator(load_stylegan2(cfg.path, device), cfg.truncation_psi)
    if cfg.type == "dcgan":
        try:
            return DCGANLatentGenerator().to(device)
        except RuntimeError as exc:
            raise GeneratorError(str(exc)) from exc
    if cfg.type == "ldm":
        return LDMLatentGenerator(cfg, device)
    if cfg.type == "world":
        w = cfg.world
        return WorldLatentGenerator(w.seed, w.size, w.difficulty)
    raise GeneratorError(f"unknown generator type {cfg.type!r}; valid: stylegan2, dcgan, ldm, world")
