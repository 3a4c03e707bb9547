"""Reading a face image's nuisance factors (pose, expression, light) back off the pixels.

The world knows the nuisance factors of every render; a generated image has none recorded. To measure the
intra-class diversity of generated sets in the world's own terms, a small regressor is fitted on world
renders whose factors are known and then applied to any image: a registry backbone (the students' tiny
iresnet at 32x32) whose ``embedding_dim`` outputs are the standardised factors of :data:`FACTORS`, trained
with MSE. Renders are drawn over the range of difficulties the study sees (frontal to hard), from identities
of their own; the fit is scored on renders of other identities (R^2 per factor). Plain torch, no Ray.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synray.models.export import load_exported_backbone, read_exported, save_backbone
from synray.models.inputs import normalize_images
from synray.models.registry import build_backbone
from synray.seeds import derive
from synray.world.factors import NuisanceFactors

__all__ = ["FACTORS", "factor_values", "render_set", "fit_regressor", "NuisanceRegressor", "r2_scores"]

#: what the regressor reads: head pose (degrees), expression (0..1), light direction and exposure (log)
FACTORS: tuple[str, ...] = ("yaw", "pitch", "roll", "smile", "mouth_open", "light_x", "light_y", "log_exposure")
BACKBONE = "iresnet18"
KWARGS: dict[str, Any] = {"layers": [1, 1, 1, 1], "widths": [8, 16, 32, 64], "embedding_dim": len(FACTORS),
                          "input_size": [32, 32]}


def factor_values(n: NuisanceFactors) -> np.ndarray:
    """The :data:`FACTORS` of one render's nuisance."""
    return np.array([n.yaw, n.pitch, n.roll, n.smile, n.mouth_open, n.light_dir[0], n.light_dir[1],
                     math.log(n.exposure)], np.float64)


def render_set(world_seed: int, identities: range | list[int], samples: int, difficulties: tuple[float, float],
               size: int = 32, sample_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images [N, size, size, 3], factors [N, F])``: ``samples`` renders per identity, each at a difficulty
    drawn uniformly from ``difficulties`` (per render, from ``(world_seed, identity, sample)``)."""
    from synray.world.factors import identity_factors, nuisance_factors
    from synray.world.render import render_face

    images, values = [], []
    for i in identities:
        ident = identity_factors(world_seed, int(i))
        for s in range(sample_offset, sample_offset + samples):
            d = float(np.random.default_rng(derive(world_seed, int(i), s, 0x4E5)).uniform(*difficulties))
            n = nuisance_factors(world_seed, int(i), s, d)
            # rendered at 112 and resized, as the study's data are
            img = render_face(ident, n, 112)
            images.append(img if size == 112 else _resize(img, size))
            values.append(factor_values(n))
    return np.stack(images), np.stack(values)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def r2_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column."""
    ss_res = ((truth - pred) ** 2).sum(0)
    ss_tot = ((truth - truth.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


class NuisanceRegressor:
    """A fitted regressor: images -> factors in their own units (:data:`FACTORS`)."""

    def __init__(self, model: torch.nn.Module, mean: np.ndarray, std: np.ndarray, meta: dict[str, Any] | None = None):
        self.model, self.mean, self.std = model.eval(), np.asarray(mean, np.float64), np.asarray(std, np.float64)
        self.meta = dict(meta or {})

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 RGB ``[N, H, W, 3]`` (any size; resized to the model's input) -> factors ``[N, F]``."""
        size = tuple(self.model.input_size)
        out = []
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2).float()
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=x.shape[-1] > size[1])
            out.append(self.model(normalize_images(self.model, x)).double().numpy())
        z = np.concatenate(out) if out else np.zeros((0, len(FACTORS)))
        return z * self.std + self.mean

    def save(self, path: str | os.PathLike) -> None:
        save_backbone(path, BACKBONE, self.model, KWARGS,
                      extra={"factors": list(FACTORS), "factor_mean": self.mean.tolist(), "factor_std": self.std.tolist(),
                             "fit": self.meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> NuisanceRegressor:
        blob = read_exported(path)
        if blob.get("factors") != list(FACTORS):
            raise ValueError(f"{os.fspath(path)} is not a nuisance regressor for factors {list(FACTORS)}")
        return cls(load_exported_backbone(path), np.array(blob["factor_mean"]), np.array(blob["factor_std"]),
                   blob.get("fit"))


def fit_regressor(images: np.ndarray, factors: np.ndarray, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                  seed: int = 0) -> NuisanceRegressor:
    """MSE on standardised factors, Adam with a cosine schedule, horizontal flips with yaw/roll/light_x negated."""
    torch.manual_seed(seed)
    model = build_backbone(BACKBONE, **{k: tuple(v) if isinstance(v, list) else v for k, v in KWARGS.items()})
    mean, std = factors.mean(0), np.maximum(factors.std(0), 1e-6)
    y_all = torch.from_numpy((factors - mean) / std).float()
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    mirror = torch.tensor([-1.0 if f in ("yaw", "roll", "light_x") else 1.0 for f in FACTORS])
    mirror_shift = torch.from_numpy(np.where(mirror.numpy() < 0, 2 * mean / std, 0.0)).float()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x, y = x_all[idx].float(), y_all[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        # mirrored factor in standardised units: (-v - mean) / std = -z - 2 mean / std
        y = torch.where(flip[:, None], y * mirror - mirror_shift, y)
        loss = F.mse_loss(model(normalize_images(model, x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return NuisanceRegressor(model.eval(), mean, std, {"steps": steps, "images": len(images), "seed": seed})
