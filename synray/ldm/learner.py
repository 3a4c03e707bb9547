"""LDM training in plain torch: the UNet config of a run, the learner, batches of latents, the loop.

Its own module because the same loop runs in a Ray Train worker (every rank, DDP), in a Tune trial and
in one process (tests); what differs comes in through the runner's :class:`~synray.training.runner.Hooks`. eps-MSE with CPD / UIFace's
unconditioned probability inside the UNet (train mode), Adam + cosine warm restarts per step, the
references' EMA, and checkpoints every ``checkpoint_every`` steps in the published layout
(``model.ckpt``, ``ema_averaged_model.ckpt``, ``optimization.ckpt``) plus the first stage, so synray's
sampler and the original code load them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from synray.config.ldm import LDMConfig
from synray.diffusion.schedule import linear_schedule
from synray.diffusion.training import EMA, reference_optimizer, training_step
from synray.io import storage
from synray.ldm.data import LDMDataError
from synray.ldm.encode import LatentsInfo
from synray.ldm.first_stage import DECODER_FILE, ENCODER_FILE, VQ_CONFIG_FILE
from synray.models.checkpoint import load_strict
from synray.models.ldm_checkpoint import normalize_unet_state, save_unet_checkpoint
from synray.models.precision import (
    maybe_compile,
    needs_loss_scaling,
    resolve_precision,
    to_channels_last,
    use_channels_last,
)
from synray.models.unet import ConditionalUNet, UNetConfig
from synray.seeds import derive
from synray.training.checkpointing import CheckpointReader
from synray.training.collective import all_reduce_sum, synced_next
from synray.training.runner import Hooks

__all__ = ["MODEL_FILE", "EMA_FILE", "OPT_FILE", "META_FILE", "unet_config", "LDMLearner", "decode_batch",
           "LocalLatents", "ldm_loop"]

MODEL_FILE, EMA_FILE, OPT_FILE, META_FILE = "model.ckpt", "ema_averaged_model.ckpt", "optimization.ckpt", "meta.json"


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
        self.cfg, self.info, self.rank, self.world_size = cfg, info, rank, world_size
        self.device = torch.device(device)
        self.unet_config = unet_config(cfg, info.context_dim)
        sc = cfg.scaling
        self.precision = resolve_precision(sc.precision_setting, self.device)
        self.channels_last = use_channels_last(sc.channels_last, self.device, default_on_cuda=False)  # GroupNorm UNet
        torch.manual_seed(cfg.seed)
        self.module = to_channels_last(ConditionalUNet(self.unet_config).to(self.device), self.channels_last)
        self.model = maybe_compile(wrap(self.module) if wrap is not None else self.module, sc.compile)
        t = cfg.training
        self.optimizer, self.scheduler = reference_optimizer(self.module, t.lr, t.restart_period, t.restart_mult,
                                                             fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_loss_scaling(self.precision))
        e = t.ema
        self.ema = EMA(self.module, inv_gamma=e.inv_gamma, power=e.power, max_decay=e.max_decay,
                       reference_compat=e.reference_compat)
        self.schedule = linear_schedule().to(self.device)
        self.step_count = 0

    def step(self, batch: dict[str, Any]) -> float:
        lat, lat_f, ctx = decode_batch(batch, self.info)
        gen = torch.Generator().manual_seed(derive(self.cfg.seed, self.step_count, self.rank))
        # CPD / uncond masks come from torch's global RNG inside the UNet: one stream per (step, rank),
        # so ranks drop different context elements and a resumed run repeats the same masks
        torch.manual_seed(derive(self.cfg.seed, self.step_count, self.rank, 1))
        x0 = torch.from_numpy(lat)
        if self.cfg.training.flip:
            flip = torch.rand(x0.shape[0], generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], torch.from_numpy(lat_f), x0)
        x0 = x0.to(self.device, non_blocking=True)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = training_step(self.model, self.optimizer, x0, torch.from_numpy(ctx).to(self.device, non_blocking=True),
                             schedule=self.schedule, lr_scheduler=self.scheduler, generator=gen,
                             precision=self.precision, scaler=self.scaler)
        self.ema.update(self.module, self.step_count)
        self.step_count += 1
        return loss

    def save(self, directory: str, meta: dict[str, Any]) -> None:
        """The published layout (``model.ckpt``, ``ema_averaged_model.ckpt``) + optimiser state + first stage."""
        save_unet_checkpoint(self.module, os.path.join(directory, MODEL_FILE), linear_schedule())
        save_unet_checkpoint(self.ema.averaged_model, os.path.join(directory, EMA_FILE), linear_schedule())
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                    "ema_step": self.ema.optimization_step, "global_step": self.step_count,
                    "scaler": self.scaler.state_dict()},
                   os.path.join(directory, OPT_FILE))
        for name in (ENCODER_FILE, DECODER_FILE, VQ_CONFIG_FILE):
            with open(os.path.join(directory, name), "wb") as fh:
                fh.write(storage.read_bytes(storage.join(self.info.first_stage, name)))
        unet = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.unet_config).items()}
        with open(os.path.join(directory, META_FILE), "w") as fh:
            json.dump({**meta, "step": self.step_count, "unet_config": unet, "latent_shape": list(self.info.latent_shape),
                       "context_dim": self.info.context_dim}, fh, indent=2)

    def restore(self, reader: CheckpointReader) -> dict[str, Any]:
        for name, module in ((MODEL_FILE, self.module), (EMA_FILE, self.ema.averaged_model)):
            load_strict(module, normalize_unet_state(reader.load(name)), what=f"checkpoint {reader.path}/{name}")
        opt = reader.load(OPT_FILE)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["lr_scheduler"])
        if opt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(opt["scaler"])
        self.ema.optimization_step = int(opt["ema_step"])
        self.step_count = int(opt["global_step"])
        return json.loads(reader.read_bytes(META_FILE))


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
        order = np.random.default_rng(derive(seed, 0xDA7A, epoch)).permutation(self.table.num_rows)[rank::world_size]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = self.table.take(pa.array(order[start:start + batch_size]))
            yield {c: rows.column(c).to_pylist() for c in ("latent", "latent_flip", "context")}


# --------------------------------------------------------------------------------------------
# the loop, shared by Ray Train workers and Tune trials


def _pass_batches(cfg: LDMConfig, info: LatentsInfo, hooks: Hooks) -> Callable[[int], Iterator[dict[str, Any]]]:
    """Pass index -> this rank's batches: its Ray Data shard under Ray Train, else the latent files read here."""
    per_rank = cfg.training.batch_size // hooks.world_size
    shard = hooks.datasets.get("train")
    if shard is not None:
        return lambda p: shard.iter_batches(batch_size=per_rank, drop_last=True, batch_format="numpy",
                                            local_shuffle_buffer_size=4 * per_rank,
                                            local_shuffle_seed=derive(cfg.seed, p, hooks.rank))
    local = LocalLatents(info)
    return lambda p: local.batches(per_rank, cfg.seed, p, hooks.rank, hooks.world_size)


def ldm_loop(cfg: LDMConfig, hooks: Hooks, latents: dict[str, Any],
             score: Callable[[LDMLearner], dict[str, float]] | None = None) -> dict[str, Any]:
    """Train (or resume) to ``training.steps``; reports every ``log_every`` and checkpoints every ``checkpoint_every``.

    ``latents``: the :class:`LatentsInfo` of the encoded set (as a dict); ``score``: extra metrics computed on
    rank 0 at every checkpoint (a sweep's objective).
    """
    info = LatentsInfo.from_dict(latents)
    batches = _pass_batches(cfg, info, hooks)
    learner = LDMLearner(cfg, info, hooks.rank, hooks.world_size, hooks.device, hooks.wrap)
    t = cfg.training
    resumed_from = -1
    if hooks.restore is not None:
        learner.restore(hooks.restore)
        resumed_from = learner.step_count
        hooks.log(f"[synray train-ldm] resumed from step {resumed_from}")
    passes = learner.step_count * (t.batch_size // hooks.world_size) // max(info.rows // hooks.world_size, 1)
    loss_sum, n, t0 = 0.0, 0, time.time()
    metrics: dict[str, Any] = {}
    it, got = iter(batches(passes)), False
    while learner.step_count < t.steps:
        batch = synced_next(it, learner.device, hooks.world_size)
        if batch is None:
            if not got:
                raise LDMDataError(f"{info.uri}: a pass over {info.rows} rows gives no batch of "
                                   f"{t.batch_size // hooks.world_size} per worker; lower training.batch_size")
            passes += 1
            it, got = iter(batches(passes)), False
            continue
        got = True
        loss = learner.step(batch)
        if not math.isfinite(loss):
            raise FloatingPointError(f"LDM loss is {loss} at step {learner.step_count}; lower training.lr")
        loss_sum, n = loss_sum + loss, n + 1
        s = learner.step_count
        hooks.step_done(s)
        hooks.progress(s, t.steps, loss=loss)
        ckpt = s % t.checkpoint_every == 0 or s == t.steps
        if s % t.log_every == 0 or ckpt:
            total, count = all_reduce_sum([loss_sum, n], learner.device, hooks.world_size)
            metrics = {"step": s, "loss": total / max(count, 1), "lr": learner.scheduler.get_last_lr()[0],
                       "ema_decay": learner.ema.decay_at(s - 1), "passes": passes, "world_size": hooks.world_size,
                       "resumed_from_step": resumed_from,
                       "latents_per_second": count * (t.batch_size // hooks.world_size) / max(time.time() - t0, 1e-9)}
            loss_sum, n, t0 = 0.0, 0, time.time()
            if ckpt and hooks.rank == 0 and score is not None:
                metrics.update(score(learner))
            meta = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            hooks.report_checkpoint(metrics, (lambda folder: learner.save(folder, meta)) if ckpt else None)
    return metrics
