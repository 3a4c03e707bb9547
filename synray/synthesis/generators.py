"""Image generators behind one interface: identities + contexts -> uint8 RGB images.

Each image ``(identity, sample)`` gets its own seed from ``(run_seed, identity, sample)``, so results do
not depend on how identities are batched, which actor runs them, or whether the run was resumed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from synray.config.synth import SynthConfig
from synray.diffusion.sampling import sample
from synray.seeds import sample_seed, torch_generator


class Generator(Protocol):
    name: str

    def generate(self, ids: np.ndarray, contexts: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """``samples[k]`` images for ``ids[k]`` -> uint8 ``[sum, H, W, 3]``, identity-major order.

        ``contexts`` is ``[ids, D]`` (one per identity) or ``[ids, images, D]`` (one per image: identity mixup).
        """


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC (the references' ``(x + 1) / 2`` then clamp and round)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class WorldGenerator:
    """The built-in parametric world: a cheap, exact-identity generator (contexts are unused)."""

    name = "world"

    def __init__(self, cfg: SynthConfig):
        from synray.world.world import World

        self.world = World(seed=cfg.seed, num_identities=cfg.identities.start + cfg.identities.count,
                           difficulty=cfg.generator.world_difficulty)

    def generate(self, ids: np.ndarray, contexts: np.ndarray, samples: np.ndarray) -> np.ndarray:
        return np.stack([self.world.render(int(i), int(s)) for i, n in zip(ids, samples) for s in range(int(n))])


class LDMGenerator:
    """Identity-conditioned latent diffusion: UNet + sampler + VQ decode, loaded once per actor."""

    name = "ldm"

    def __init__(self, cfg: SynthConfig, device: str | None = None):
        from synray.models.ldm_checkpoint import load_unet, load_vq_decoder
        from synray.models.vq import VQConfig

        g = cfg.generator
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() and g.num_gpus > 0 else "cpu"))
        self.unet = load_unet(g.unet, device=self.device).eval()
        vq_cfg = VQConfig.from_dict(g.vq_config, key="generator.vq_config") if g.vq_config else None
        self.vq = load_vq_decoder(g.vq_decoder, vq_cfg, device=self.device).eval()
        self.cfg = cfg
        self.batch_size = g.batch_size

    def _x_T(self, seeds: list[int]) -> torch.Tensor:
        shape = tuple(self.cfg.generator.latent_shape)
        return torch.stack([torch.randn(shape, generator=torch_generator(s)) for s in seeds]).to(self.device)

    @torch.no_grad()
    def generate(self, ids: np.ndarray, contexts: np.ndarray, samples: np.ndarray) -> np.ndarray:
        s = self.cfg.generator.sampler
        empty = self.cfg.contexts.source == "empty"  # unconditional: the UNet's empty context
        jobs = [(int(i), k, c[k] if c.ndim == 2 else c) for i, n, c in zip(ids, samples, contexts) for k in range(int(n))]
        out = []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            seeds = [sample_seed(self.cfg.seed, i, k) for i, k, _ in chunk]
            ctx = None if empty else torch.from_numpy(np.stack([c for _, _, c in chunk])).float().to(self.device)
            # per-image noise streams keep a stochastic sampler's result independent of the batch composition
            noise = [torch_generator(sd ^ 0x5EED) for sd in seeds] if s.stochastic else None
            z = sample(s, self.unet, self._x_T(seeds), ctx, generator=noise)
            out.append(to_uint8(self.vq.decode(z)))
        return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


class DCGANGenerator:
    """The DigiFace-trained DCGAN from the ``gan-face-generate`` package (64x64, nz=100).

    The context is the identity latent; each sample adds ``0.3 * N(0, I)`` from its own seed, which keeps
    a face recognisably the same person.
    """

    name = "dcgan"
    nz = 100
    jitter = 0.3

    def __init__(self, cfg: SynthConfig):
        import importlib.resources as ir

        try:
            from gan_face_generate.models import Generator as DCGAN
        except ImportError as exc:
            raise RuntimeError("generator.type 'dcgan' needs the optional assets: pip install -e '.[assets]'") from exc
        self.net = DCGAN(ngpu=0, nc=3, nz=self.nz, ngf=64).eval()
        ck = torch.load(ir.files("gan_face_generate") / "weights.tar", map_location="cpu", weights_only=True)
        self.net.load_state_dict(ck["netG_state_dict"], strict=True)
        self.cfg = cfg

    @torch.no_grad()
    def generate(self, ids: np.ndarray, contexts: np.ndarray, samples: np.ndarray) -> np.ndarray:
        if contexts.shape[-1] != self.nz:
            raise ValueError(f"the DCGAN takes {self.nz}-d latents; set contexts.dim: {self.nz}")
        zs = []
        for i, n, c in zip(ids, samples, contexts):
            for k in range(int(n)):
                eps = torch.randn(self.nz, generator=torch_generator(sample_seed(self.cfg.seed, int(i), k)))
                zs.append(torch.from_numpy(c[k] if c.ndim == 2 else c).float() * np.sqrt(self.nz) + self.jitter * eps)
        return to_uint8(self.net(torch.stack(zs)[:, :, None, None]))


def build_generator(cfg: SynthConfig) -> Generator:
    kind = cfg.generator.type
    if kind == "world":
        return WorldGenerator(cfg)
    if kind == "ldm":
        return LDMGenerator(cfg)
    if kind == "dcgan":
        return DCGANGenerator(cfg)
    raise ValueError(f"unknown generator type {kind!r}; valid: world, ldm, dcgan")
