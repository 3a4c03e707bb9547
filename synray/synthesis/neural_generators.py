"""The torch generators: identity-conditioned latent diffusion (UNet + sampler + VQ decode) and the DCGAN.

Each image ``(identity, sample)`` gets its own seed from ``(run_seed, identity, sample)`` (see
:mod:`synray.synthesis.generators`, which names these lazily).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from synray.config.synth import SynthConfig
from synray.diffusion.sampling import sample
from synray.seeds import sample_seed, torch_generator


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC (the references' ``(x + 1) / 2`` then clamp and round)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class LDMGenerator:
    """Identity-conditioned latent diffusion: UNet + sampler + VQ decode, loaded once per actor.

    On CUDA the fast path is on by default: the UNet, guidance and decode run under bf16 autocast
    (``generator.precision``), the batch is the largest that fits (``generator.batch_size: auto``),
    inputs reach the GPU through pinned memory, and each batch is decoded on a second CUDA stream while
    the next one is sampled; the host waits once per work unit, for the last images. On CPU (fp32) the
    images are those of the plain loop, bit for bit.
    """

    name = "ldm"

    def __init__(self, cfg: SynthConfig, device: str | None = None, modules: tuple[nn.Module, nn.Module] | None = None):
        """``modules``: a (UNet, VQ decoder) pair already on ``device`` instead of ``generator.unet`` / ``vq_decoder``
        (benchmarks with random weights at the published size)."""
        from synray.models.ldm_checkpoint import load_unet, load_vq_decoder
        from synray.models.precision import (
            maybe_compile,
            resolve_precision,
            to_channels_last,
            use_channels_last,
            with_precision,
        )
        from synray.models.vq import VQConfig

        g = cfg.generator
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() and g.num_gpus > 0 else "cpu"))
        self.dtype = resolve_precision(g.precision, self.device)
        nhwc = use_channels_last(g.channels_last, self.device, default_on_cuda=False)
        if modules is None:
            vq_cfg = VQConfig.from_dict(g.vq_config, key="generator.vq_config") if g.vq_config else None
            modules = load_unet(g.unet, device=self.device), load_vq_decoder(g.vq_decoder, vq_cfg, device=self.device)
        self.unet = to_channels_last(modules[0].eval(), nhwc)
        self.vq = to_channels_last(modules[1].eval(), nhwc)
        self.cfg = cfg
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
        self.model = with_precision(maybe_compile(self.unet, g.compile), self.device, self.dtype)
        self._decode = maybe_compile(self.vq, g.compile)  # VQDecoder.forward is decode (quantise + decoder)
        self.batch_size = g.batch_size if g.batch_size != "auto" else auto_batch_size(self)
        self.decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _x_T(self, seeds: list[int]) -> torch.Tensor:
        from synray.diffusion.ddim import to_device

        shape = tuple(self.cfg.generator.latent_shape)
        x = torch.stack([torch.randn(shape, generator=torch_generator(s)) for s in seeds])
        return to_device(x, torch.empty(0, device=self.device))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (float32), the decoder under the generator's autocast."""
        from synray.models.precision import autocast

        with autocast(self.device, self.dtype):
            return self._decode(z).float()

    def _decode_behind(self, z: torch.Tensor) -> torch.Tensor:
        """Decode on the side stream while the main stream samples on; returns pinned uint8 NHWC still being filled."""
        side, main = self.decode_stream, torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            img = self.decode(z)
            u8 = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(u8, non_blocking=True)
        z.record_stream(side)  # made on the main stream: its memory stays reserved until the decode has read it
        return host

    @torch.no_grad()
    def generate(self, ids: np.ndarray, contexts: np.ndarray, samples: np.ndarray) -> np.ndarray:
        from synray.diffusion.ddim import to_device

        s = self.cfg.generator.sampler
        empty = self.cfg.contexts.source == "empty"  # unconditional: the UNet's empty context
        jobs = [(int(i), k, c[k] if c.ndim == 2 else c) for i, n, c in zip(ids, samples, contexts) for k in range(int(n))]
        out = []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            seeds = [sample_seed(self.cfg.seed, i, k) for i, k, _ in chunk]
            x_T = self._x_T(seeds)
            ctx = None if empty else to_device(torch.from_numpy(np.stack([c for _, _, c in chunk])).float(), x_T)
            # per-image noise streams keep a stochastic sampler's result independent of the batch composition
            noise = [torch_generator(sd ^ 0x5EED) for sd in seeds] if s.stochastic else None
            z = sample(s, self.model, x_T, ctx, generator=noise)
            out.append(self._decode_behind(z) if self.decode_stream is not None else to_uint8(self.decode(z)))
        if self.decode_stream is not None:
            self.decode_stream.synchronize()  # the one wait of the unit: its last images are on the host
            out = [h.numpy() for h in out]
        return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


#: images per batch with ``batch_size: auto`` on CPU (the references' batch) and the most on a GPU
CPU_BATCH, MAX_GPU_BATCH = 50, 1024


def auto_batch_size(gen: LDMGenerator, probe: int = 8, share: float = 0.45) -> int:
    """The batch that fills a GPU: the peak memory per image of two sampler steps and of a decode at a small
    batch, measured, scaled to ``share`` of the free memory (the rest: allocator slack, the decode of the
    previous batch, compiled graphs); a multiple of 8, at most :data:`MAX_GPU_BATCH`. CPU: :data:`CPU_BATCH`."""
    from synray.config.sampler import DDIMSampler
    from synray.models.precision import autocast, with_precision

    if gen.device.type != "cuda":
        return CPU_BATCH
    g = gen.cfg.generator
    s = g.sampler
    probe_cfg = DDIMSampler(steps=2, guidance=s.guidance) if s.method == "ddpm" else s.model_copy(update={"steps": 2})
    model = with_precision(gen.unet, gen.device, gen.dtype)  # eager: the probe must not compile for its own shape

    def decode(z: torch.Tensor) -> torch.Tensor:
        with autocast(gen.device, gen.dtype):
            return gen.vq(z)

    x = torch.randn((probe, *g.latent_shape), device=gen.device)
    ctx = torch.nn.functional.normalize(torch.randn(probe, gen.unet.config.context_input_channels, device=gen.device))
    peaks = []
    with torch.no_grad():
        for run in (lambda: sample(probe_cfg, model, x, ctx), lambda: decode(x)):
            torch.cuda.synchronize(gen.device)
            torch.cuda.reset_peak_memory_stats(gen.device)
            base = torch.cuda.memory_allocated(gen.device)
            run()
            torch.cuda.synchronize(gen.device)
            peaks.append(torch.cuda.max_memory_allocated(gen.device) - base)
    free, _ = torch.cuda.mem_get_info(gen.device)
    per_image = max(sum(peaks) / probe, 1.0)
    return int(max(8, min(MAX_GPU_BATCH, share * free / per_image)) // 8 * 8)


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
