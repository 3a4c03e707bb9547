"""LDM training in plain torch: the UNet config of a run, the learner, batches of latents, the loop.

Its own module because the same loop runs in a Ray Train worker (every rank, DDP) and in a Tune trial
(one process); what differs comes in through :class:`LDMHooks`. eps-MSE with CPD / UIFace's
unconditioned probability inside the UNet (train mode), Adam + cosine warm restarts per step, the
references' EMA, and checkpoints every ``checkpoint_every`` steps in the published layout
(``model.ckpt``, ``ema_averaged_model.ckpt``, ``optimization.ckpt``) plus the first stage, so synray's
sampler and the original code load them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from synray.config.ldm import LDMConfig
from synray.io import storage
from synray.ldm.data import LDMDataError
from synray.ldm.encode import LatentsInfo
from synray.ldm.first_stage import DECODER_FILE, ENCODER_FILE, VQ_CONFIG_FILE
from synray.models.unet import ConditionalUNet, UNetConfig
from synray.training.hooks import RunnerHooks

__all__ = ["MODEL_FILE", "EMA_FILE", "OPT_FILE", "META_FILE", "derive_seed", "unet_config", "LDMLearner",
           "decode_batch", "LocalLatents", "local_batches", "LDMHooks", "ldm_loop"]

MODEL_FILE, EMA_FILE, OPT_FILE, META_FILE = "model.ckpt", "ema_averaged_model.ckpt", "optimization.ckpt", "meta.json"


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integer parts (run seed, step, rank, ...) via ``numpy.random.SeedSequence``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] & ((1 << 62) - 1))


def unet_config(cfg: LDMConfig, context_dim: int) -> UNetConfig:
    """The UNetConfig of a run (see :meth:`LDMUNetConfig.unet_config`) for contexts of width ``context_dim``.

    The architecture was checked when the config loaded; what is left is whether the contexts have the width
    ``unet.architecture.context_input_channels`` asks for.
    """
    uc = cfg.unet.unet_config(context_dim)
    if uc.context_input_channels != context_dim:
        raise LDMDataError(f"unet.architecture.context_input_channels is {uc.context_input_channels} but the "
                           f"contexts are {context_dim}-d")
    return uc


class LDMLearner:
    """UNet (+ DDP wrapper), Adam + warm restarts, EMA, and one training step on a latent batch."""

    def __init__(self, cfg: LDMConfig, info: LatentsInfo, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        from synray.diffusion.schedule import linear_schedule
        from synray.diffusion.training import EMA, reference_optimizer

        self.cfg, self.info, self.rank, self.world_size = cfg, info, rank, world_size
        self.device = torch.device(device)
        self.unet_config = unet_config(cfg, info.context_dim)
        torch.manual_seed(cfg.seed)
        self.module = ConditionalUNet(self.unet_config).to(self.device)
        self.model = wrap(self.module) if wrap is not None else self.module
        t = cfg.training
        self.optimizer, self.scheduler = reference_optimizer(self.module, t.lr, t.restart_period, t.restart_mult)
        e = t.ema
        self.ema = EMA(self.module, inv_gamma=e.inv_gamma, power=e.power, max_decay=e.max_decay,
                       reference_compat=e.reference_compat)
        self.schedule = linear_schedule().to(self.device)
        self.step_count = 0

    def step(self, batch: dict[str, Any]) -> float:
        from synray.diffusion.training import training_step

        lat, lat_f, ctx = decode_batch(batch, self.info)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.step_count, self.rank))
        # CPD / uncond masks come from torch's global RNG inside the UNet: one stream per (step, rank),
        # so ranks drop different context elements and a resumed run repeats the same masks
        torch.manual_seed(derive_seed(self.cfg.seed, self.step_count, self.rank, 1))
        x0 = torch.from_numpy(lat)
        if self.cfg.training.flip:
            flip = torch.rand(x0.shape[0], generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], torch.from_numpy(lat_f), x0)
        loss = training_step(self.model, self.optimizer, x0.to(self.device), torch.from_numpy(ctx).to(self.device),
                             schedule=self.schedule, lr_scheduler=self.scheduler, generator=gen)
        self.ema.update(self.module, self.step_count)
        self.step_count += 1
        return loss

    def save(self, directory: str, meta: dict[str, Any]) -> None:
        """The published layout (``model.ckpt``, ``ema_averaged_model.ckpt``) + optimiser state + first stage."""
        from synray.diffusion.schedule import linear_schedule
        from synray.models.ldm_checkpoint import save_unet_checkpoint

        save_unet_checkpoint(self.module, os.path.join(directory, MODEL_FILE), linear_schedule())
        save_unet_checkpoint(self.ema.averaged_model, os.path.join(directory, EMA_FILE), linear_schedule())
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                    "ema_step": self.ema.optimization_step, "global_step": self.step_count},
                   os.path.join(directory, OPT_FILE))
        for name in (ENCODER_FILE, DECODER_FILE, VQ_CONFIG_FILE):
            with open(os.path.join(directory, name), "wb") as fh:
                fh.write(storage.read_bytes(storage.join(self.info.first_stage, name)))
        unet = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.unet_config).items()}
        with open(os.path.join(directory, META_FILE), "w") as fh:
            json.dump({**meta, "step": self.step_count, "unet_config": unet, "latent_shape": list(self.info.latent_shape),
                       "context_dim": self.info.context_dim}, fh, indent=2)

    def restore(self, directory: str) -> dict[str, Any]:
        from synray.models.checkpoint import load_strict, read_checkpoint
        from synray.models.ldm_checkpoint import normalize_unet_state

        for name, module in ((MODEL_FILE, self.module), (EMA_FILE, self.ema.averaged_model)):
            path = os.path.join(directory, name)
            load_strict(module, normalize_unet_state(read_checkpoint(path)), what=f"checkpoint {path}")
        opt = torch.load(os.path.join(directory, OPT_FILE), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["lr_scheduler"])
        self.ema.optimization_step = int(opt["ema_step"])
        self.step_count = int(opt["global_step"])
        with open(os.path.join(directory, META_FILE)) as fh:
            return json.load(fh)


# --------------------------------------------------------------------------------------------
# batches of latents


def decode_batch(batch: dict[str, Any], info: LatentsInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parquet/Ray Data rows -> (latent, latent_flip, context) float32 arrays."""
    def stack(col: Any, dtype, shape) -> np.ndarray:
        return np.stack([np.frombuffer(b, dtype) for b in col]).reshape(len(col), *shape).astype(np.float32)

    return (stack(batch["latent"], np.float16, info.latent_shape), stack(batch["latent_flip"], np.float16, info.latent_shape),
            stack(batch["context"], np.float32, (info.context_dim,)))


class LocalLatents:
    """The latent files read once into this process (Tune trials, tests); sweeps at scale should subsample
    with ``data.max_images``, since every trial holds the table in memory."""

    def __init__(self, info: LatentsInfo) -> None:
        tables = []
        for uri in info.files:
            loc = storage.resolve(uri)
            with loc.fs.open_input_file(loc.path) as fh:
                tables.append(pq.read_table(fh, columns=["latent", "latent_flip", "context"]))
        self.table = pa.concat_tables(tables)

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """One shuffled pass: this rank's share of the rows in full batches."""
        order = np.random.default_rng(derive_seed(seed, 0xDA7A, epoch)).permutation(self.table.num_rows)[rank::world_size]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = self.table.take(pa.array(order[start:start + batch_size]))
            yield {c: rows.column(c).to_pylist() for c in ("latent", "latent_flip", "context")}


def local_batches(info: LatentsInfo, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[dict[str, Any]]:
    """One shuffled pass over the latent files in this process (reads them; see :class:`LocalLatents`)."""
    return LocalLatents(info).batches(batch_size, seed, epoch, rank, world_size)


# --------------------------------------------------------------------------------------------
# the loop, shared by Ray Train workers and Tune trials


@dataclass
class LDMHooks(RunnerHooks):
    batches: Callable[[int], Iterator[dict[str, Any]]] | None = None  # pass index -> this rank's batches
    on_checkpoint: Callable[[LDMLearner], dict[str, float]] | None = None  # extra metrics (e.g. a sweep objective)
    stop_after_step: int | None = None  # tests: stop (as if killed) after the checkpoint at this step


def _synced(batch: Any, world_size: int, device: torch.device) -> bool:
    """True on every rank while all ranks still have a batch (keeps DDP collectives aligned)."""
    if world_size == 1:
        return batch is not None
    import torch.distributed as dist

    flag = torch.tensor([0 if batch is None else 1], device=device)
    dist.all_reduce(flag, dist.ReduceOp.MIN)
    return bool(flag.item())


def ldm_loop(cfg: LDMConfig, info: LatentsInfo, hooks: LDMHooks) -> dict[str, Any]:
    """Train (or resume) to ``training.steps``; reports every ``log_every`` and checkpoints every ``checkpoint_every``."""
    if hooks.batches is None:
        raise ValueError("ldm_loop needs a batch source (hooks.batches)")
    learner = LDMLearner(cfg, info, hooks.rank, hooks.world_size, hooks.device, hooks.wrap)
    t = cfg.training
    resumed_from = -1
    if hooks.restore_dir is not None:
        learner.restore(hooks.restore_dir)
        resumed_from = learner.step_count
        if hooks.rank == 0:
            print(f"[synray train-ldm] resumed from step {resumed_from}", flush=True)
    passes = learner.step_count * (t.batch_size // hooks.world_size) // max(info.rows // hooks.world_size, 1)
    loss_sum, n, t0 = 0.0, 0, time.time()
    metrics: dict[str, Any] = {}
    it, got = iter(hooks.batches(passes)), False
    while learner.step_count < t.steps:
        try:
            batch = next(it)
        except StopIteration:
            batch = None
        if not _synced(batch, hooks.world_size, learner.device):
            if not got:
                raise LDMDataError(f"{info.uri}: a pass over {info.rows} rows gives no batch of "
                                   f"{t.batch_size // hooks.world_size} per worker; lower training.batch_size")
            passes += 1
            it, got = iter(hooks.batches(passes)), False
            continue
        got = True
        loss = learner.step(batch)
        if not math.isfinite(loss):
            raise FloatingPointError(f"LDM loss is {loss} at step {learner.step_count}; lower training.lr")
        loss_sum, n = loss_sum + loss, n + 1
        s = learner.step_count
        ckpt = s % t.checkpoint_every == 0 or s == t.steps
        if s % t.log_every == 0 or ckpt:
            total, count = loss_sum, n
            if hooks.world_size > 1:
                import torch.distributed as dist

                v = torch.tensor([loss_sum, n], dtype=torch.float64, device=learner.device)
                dist.all_reduce(v)
                total, count = v.tolist()
            metrics = {"step": s, "loss": total / max(count, 1), "lr": learner.scheduler.get_last_lr()[0],
                       "ema_decay": learner.ema.decay_at(s - 1), "passes": passes, "world_size": hooks.world_size,
                       "resumed_from_step": resumed_from,
                       "latents_per_second": count * (t.batch_size // hooks.world_size) / max(time.time() - t0, 1e-9)}
            loss_sum, n, t0 = 0.0, 0, time.time()
            if ckpt and hooks.rank == 0 and hooks.on_checkpoint is not None:
                metrics.update(hooks.on_checkpoint(learner))
            with tempfile.TemporaryDirectory() as tmp:
                if ckpt and hooks.rank == 0:
                    learner.save(tmp, {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
                if hooks.report is not None:
                    hooks.report(metrics, tmp if ckpt and hooks.rank == 0 else None)
            if ckpt and hooks.stop_after_step is not None and s >= hooks.stop_after_step and s < t.steps:
                raise RuntimeError(f"stopped after step {s} (stop_after_step)")
    return metrics
