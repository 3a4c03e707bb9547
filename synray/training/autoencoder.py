"""Training a small first-stage VQ autoencoder for a new image domain (e.g. the built-in world).

The published VQ-f4 was trained on FFHQ; a world-sized LDM needs its own. This is the VQ-VAE objective
(L1 reconstruction + codebook + 0.25 x commitment, straight-through), without the VQGAN discriminator:
enough for small, blurry-but-faithful decodes on CPU. The result is two files in the published layout
(encoder: ``encoder.*``/``quant_conv.*``; decoder: ``decoder.*``/``quantize.*``/``post_quant_conv.*``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from synray.models.vq import VQConfig, VQDecoder, VQEncoder


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [-1, 1] NCHW at ``size`` x ``size`` (area-downsampled)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] != size else x


def vq_loss(enc: VQEncoder, dec: VQDecoder, x: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, dict]:
    z = enc.encode(x)
    codes = dec.quantize.embedding.weight
    zq_st, idx = dec.quantize(z)
    zq = codes[idx].permute(0, 3, 1, 2)
    rec = dec.decoder(dec.post_quant_conv(zq_st))
    l1 = (rec - x).abs().mean()
    codebook = F.mse_loss(zq, z.detach())
    commit = F.mse_loss(z, zq.detach())
    return l1 + codebook + beta * commit, {"l1": float(l1), "codebook": float(codebook), "commit": float(commit)}


def train_vq(
    images: np.ndarray,
    config: VQConfig,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[int, dict], None] | None = None,
) -> tuple[VQEncoder, VQDecoder]:
    """Train on uint8 images resized to ``config.resolution``; deterministic for a given seed on CPU."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc, dec = VQEncoder(config), VQDecoder(config)
    data = to_tensor(images, config.resolution)
    with torch.no_grad():  # start the codebook on encoder outputs so codes are used from step 0
        z = enc.encode(data[: min(len(data), 64)]).permute(0, 2, 3, 1).reshape(-1, config.embed_dim)
        pick = torch.randint(len(z), (config.n_embed,), generator=g)
        dec.quantize.embedding.weight.copy_(z[pick] + 0.01 * torch.randn(config.n_embed, config.embed_dim, generator=g))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        batch = data[torch.randint(len(data), (batch_size,), generator=g)]
        loss, parts = vq_loss(enc, dec, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(step, {"loss": float(loss), **parts})
    return enc.eval(), dec.eval()


def save_vq(enc: VQEncoder, dec: VQDecoder, folder: str) -> tuple[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = os.path.join(folder, "vq_encoder.pt"), os.path.join(folder, "vq_decoder.pt")
    for module, path in zip((enc, dec), paths):
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp)
        os.replace(tmp, path)
    return paths
