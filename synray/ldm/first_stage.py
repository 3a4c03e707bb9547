"""The first stage (VQ autoencoder) of a run: copied from the published files, or fitted here.

Its own module because it is a stage with its own files and resume rule: ``<run>/first_stage`` holds
the encoder (used by the encoding pre-stage), the decoder (used by the sampler) and ``vq_config.json``,
and a re-run reuses them rather than refitting.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synray.config.ldm import LDMConfig
from synray.io import storage
from synray.ldm.data import ImageItems, LDMDataError, load_images
from synray.models.ldm_checkpoint import load_vq_decoder, load_vq_encoder
from synray.models.vq import VQConfig, VQDecoder, VQEncoder

__all__ = ["ENCODER_FILE", "DECODER_FILE", "VQ_CONFIG_FILE", "to_unit", "fit_first_stage", "prepare_first_stage",
           "load_stage"]

ENCODER_FILE = "first_stage_encoder_state_dict.pt"
DECODER_FILE = "first_stage_decoder_state_dict.pt"
VQ_CONFIG_FILE = "vq_config.json"


def to_unit(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def fit_first_stage(images: np.ndarray, vq_cfg: VQConfig, steps: int, batch_size: int = 32, lr: float = 1e-3,
                    kmeans_iters: int = 10, seed: int = 0) -> tuple[VQEncoder, VQDecoder, dict[str, float]]:
    """Fit encoder + decoder as an autoencoder (MSE on unquantised latents), then the codebook by k-means.

    The codebook is initialised from encoder outputs and refined with Lloyd iterations, so decoding with
    quantisation (what sampling does) reproduces decoding without it up to the codebook's resolution.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise LDMDataError(f"first-stage images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    torch.manual_seed(seed)
    enc, dec = VQEncoder(vq_cfg), VQDecoder(vq_cfg)
    x_all = to_unit(images)
    params = list(enc.parameters()) + [p for n, p in dec.named_parameters() if not n.startswith("quantize.")]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (min(batch_size, len(x_all)),), generator=gen)
        x = x_all[idx]
        z = enc.encode(x)
        loss = F.mse_loss(dec.decode(z, quantize=False), x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    dec.eval()
    with torch.no_grad():
        z = torch.cat([enc.encode(x_all[i:i + 64]) for i in range(0, len(x_all), 64)])
        vecs = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        k = vq_cfg.n_embed
        pick = torch.randperm(len(vecs), generator=gen)[:k]
        book = vecs[pick].clone()
        if len(book) < k:  # fewer latent vectors than entries: repeat with a little jitter
            book = torch.cat([book, book[torch.randint(0, len(book), (k - len(book),), generator=gen)]
                              + 1e-3 * torch.randn(k - len(book), vecs.shape[1], generator=gen)])
        sub = vecs[torch.randperm(len(vecs), generator=gen)[:50_000]]
        for _ in range(kmeans_iters):
            assign = torch.cdist(sub, book).argmin(1)
            sums = torch.zeros_like(book).index_add_(0, assign, sub)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            book = torch.where(counts > 0, sums / counts.clamp(min=1), book)
        dec.quantize.embedding.weight.copy_(book)
        xs = x_all[:64]
        zz = enc.encode(xs)
        rec = float(F.mse_loss(dec.decode(zz, quantize=False), xs))
        rec_q = float(F.mse_loss(dec.decode(zz, quantize=True), xs))
    return enc, dec, {"fit_loss": float(loss.detach()), "reconstruction_mse": rec, "reconstruction_mse_quantized": rec_q}


def prepare_first_stage(cfg: LDMConfig, run_uri: str, items: ImageItems) -> tuple[str, dict[str, Any]]:
    """Copy (or fit) the first stage into ``<run>/first_stage``; returns that URI and the VQConfig dict.

    Existing files are reused, so a re-run never refits.
    """
    out = storage.join(run_uri, "first_stage")
    vq_cfg = cfg.vq.vq_config()
    vq_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(vq_cfg).items()}
    names = (ENCODER_FILE, DECODER_FILE, VQ_CONFIG_FILE)
    if all(storage.exists(storage.join(out, n)) for n in names):
        stored = json.loads(storage.read_bytes(storage.join(out, VQ_CONFIG_FILE)))
        if stored.get("config") != vq_dict:
            raise LDMDataError(f"{out} holds a first stage with another VQ config {stored.get('config')}; "
                               "choose another run name or output")
        return out, vq_dict
    if cfg.vq.encoder:
        for src in (cfg.vq.encoder, cfg.vq.decoder):
            if not os.path.exists(src):
                raise LDMDataError(f"vq: first-stage file not found: {src}")
        enc = load_vq_encoder(cfg.vq.encoder, vq_cfg)  # strict: a wrong file or config fails here
        dec = load_vq_decoder(cfg.vq.decoder, vq_cfg)
        info: dict[str, Any] = {"source": "given", "encoder": cfg.vq.encoder, "decoder": cfg.vq.decoder}
    else:
        f = cfg.vq.fit
        n = min(f.images, len(items))
        images = load_images(items, np.arange(n), tuple(cfg.data.image_size))
        enc, dec, stats = fit_first_stage(images, vq_cfg, f.steps, f.batch_size, f.lr, f.kmeans_iters, cfg.seed)
        info = {"source": "fitted", "images": n, **stats}
    for name, module in ((ENCODER_FILE, enc), (DECODER_FILE, dec)):
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
        storage.write_bytes_atomic(storage.join(out, name), buf.getvalue())
    storage.write_bytes_atomic(storage.join(out, VQ_CONFIG_FILE), json.dumps({"config": vq_dict, **info}, indent=2).encode())
    return out, vq_dict


def load_stage(first_stage_uri: str, name: str, vq_dict: dict, device: str | torch.device = "cpu") -> nn.Module:
    """The stored encoder (``ENCODER_FILE``) or decoder (``DECODER_FILE``) of ``<run>/first_stage``, loaded strictly."""
    vq_cfg = VQConfig.from_dict(vq_dict)
    loader = load_vq_encoder if name == ENCODER_FILE else load_vq_decoder
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(storage.join(first_stage_uri, name)))
        return loader(path, vq_cfg, device=device)
