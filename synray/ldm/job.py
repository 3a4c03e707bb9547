"""The ``synray train-ldm`` job on Ray: the Ray Train worker function and the driver.

Its own module because it is the only LDM code that needs a Ray cluster: the driver runs the first
stage and the encoding pre-stage (:func:`~synray.ldm.encode.prepare_latents`), then trains
:func:`~synray.ldm.learner.ldm_loop` on Ray Train workers fed by Ray Data, copies the final checkpoint
beside the run and returns the synthesis ``generator:`` settings that sample it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from synray.config.ldm import LDMConfig
from synray.io import storage
from synray.ldm.encode import LatentsInfo, prepare_latents
from synray.ldm.first_stage import DECODER_FILE, VQ_CONFIG_FILE
from synray.ldm.learner import EMA_FILE, META_FILE, LDMHooks, derive_seed, ldm_loop, unet_config

__all__ = ["ldm_loop_per_worker", "LDMOutcome", "synthesis_generator", "run_train_ldm"]


def ldm_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker function: batches come from this worker's Ray Data shard."""
    import ray.train
    import ray.train.torch

    cfg = LDMConfig.model_validate(loop_config["cfg"])
    info = LatentsInfo.from_dict(loop_config["latents"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.training.batch_size // world

    def batches(epoch: int) -> Iterator[dict[str, Any]]:
        return shard.iter_batches(batch_size=per_worker, drop_last=True, batch_format="numpy",
                                  local_shuffle_buffer_size=4 * per_worker,
                                  local_shuffle_seed=derive_seed(cfg.seed, epoch, rank))

    def report(metrics: dict, directory: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{metrics['step']:09d}")

    unused = cfg.unet.flavour == "uiface"  # a learnable empty context may see no gradient in a step
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False,
                                                     parallel_strategy_kwargs={"find_unused_parameters": unused})) \
        if world > 1 else None
    ckpt = ray.train.get_checkpoint()
    hooks = LDMHooks(rank, world, device, wrap, report, batches=batches)
    if ckpt is None:
        ldm_loop(cfg, info, hooks)
        return
    with ckpt.as_directory() as directory:
        hooks.restore_dir = directory
        ldm_loop(cfg, info, hooks)


@dataclass
class LDMOutcome:
    metrics: dict[str, Any]
    checkpoint_uri: str | None  # <run>/checkpoints: the published layout + first stage
    output_uri: str
    generator: dict[str, Any] | None  # the synthesis ``generator:`` settings that sample this model


def synthesis_generator(checkpoints_uri: str, meta: dict[str, Any], vq_config: dict[str, Any]) -> dict[str, Any]:
    """``generator:`` settings of a synth config (``type: ldm``) for a finished run."""
    return {"type": "ldm", "unet": storage.join(checkpoints_uri, EMA_FILE),
            "vq_decoder": storage.join(checkpoints_uri, DECODER_FILE), "vq_config": vq_config,
            "latent_shape": list(meta["latent_shape"])}


def run_train_ldm(cfg: LDMConfig, workdir: str | None = None) -> LDMOutcome:
    """Encode (resumable), then train on Ray Train; re-running with the same output and name resumes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from synray.runtime import init_ray, is_quiet
    from synray.tracking import job_run, resolve_tracking_uri
    from synray.tuning.tracking import TrainMetricsToMLflow

    init_ray(cfg.ray)
    run_uri = storage.join(cfg.output.uri, cfg.name)
    with job_run(cfg, "train_ldm", workdir=workdir) as tracker:
        info = prepare_latents(cfg, run_uri)
        unet_config(cfg, info.context_dim)  # contexts of another width than the architecture's fail before the workers
        tracker.log_params({"latents.rows": info.rows, "latents.shape": str(list(info.latent_shape)),
                            "latents.context_dim": info.context_dim})
        stage = json.loads(storage.read_bytes(storage.join(info.first_stage, VQ_CONFIG_FILE)))
        tracker.log_metrics({f"first_stage/{k}": v for k, v in stage.items() if isinstance(v, float)})
        import ray.data

        loc = storage.resolve(info.uri)
        ds = ray.data.read_parquet([storage.resolve(f).path for f in info.files], filesystem=loc.fs,
                                   columns=["latent", "latent_flip", "context"])
        callbacks = []
        if tracker.run_id is not None:
            callbacks.append(TrainMetricsToMLflow(resolve_tracking_uri(cfg.tracking, workdir), tracker.run_id, "train-ldm"))
        s = cfg.scaling
        out = storage.resolve(cfg.output.uri)
        trainer = TorchTrainer(
            ldm_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "latents": info.to_dict()},
            scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                                   resources_per_worker={"CPU": s.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=f"{cfg.name}-train", storage_path=out.path, storage_filesystem=out.fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                callbacks=callbacks,
            ),
            datasets={"train": ds},
        )
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        ckpt_uri, generator = None, None
        if result.checkpoint is not None:
            from synray.training.checkpointing import CheckpointReader

            reader = CheckpointReader.from_checkpoint(result.checkpoint)
            ckpt_uri = storage.join(run_uri, "checkpoints")
            for name in reader.names():
                storage.write_bytes_atomic(storage.join(ckpt_uri, name), reader.read_bytes(name))
            meta = json.loads(reader.read_bytes(META_FILE))
            generator = synthesis_generator(ckpt_uri, meta, info.vq_config)
            tracker.log_text(json.dumps(generator, indent=2), "synthesis_generator.json")
        summary = {"metrics": metrics, "checkpoints": ckpt_uri, "generator": generator, "latents": info.to_dict()}
        storage.write_bytes_atomic(storage.join(run_uri, "summary.json"), json.dumps(summary, indent=2, default=str).encode())
        if not is_quiet(cfg.ray) and generator:
            print(f"[synray train-ldm] checkpoints in {ckpt_uri}; sample with generator: {json.dumps(generator)}")
    return LDMOutcome(metrics, ckpt_uri, run_uri, generator)
