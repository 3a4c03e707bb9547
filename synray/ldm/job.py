"""The ``synray train-ldm`` job: first stage and encoding, then the LDM loop on the shared Ray Train runner.

Its own module because it is the only LDM code that needs a Ray cluster: the driver runs the first
stage and the encoding pre-stage (:func:`~synray.ldm.encode.prepare_latents`), then trains
:func:`~synray.ldm.learner.ldm_loop` on Ray Train workers fed by Ray Data, copies the final checkpoint
beside the run and returns the synthesis ``generator:`` settings that sample it.
"""

from __future__ import annotations

import json
from typing import Any

import ray.data

from synray.config.ldm import LDMConfig
from synray.io import storage
from synray.jobs import JobContext, Need, Outcome
from synray.ldm.data import list_images
from synray.ldm.encode import prepare_latents
from synray.ldm.first_stage import DECODER_FILE, VQ_CONFIG_FILE
from synray.ldm.learner import EMA_FILE, META_FILE, ldm_loop, unet_config
from synray.training.runner import fit, guarded_settings

__all__ = ["synthesis_generator", "check", "needs", "run", "RESUMABLE"]

#: settings a re-run may change and still continue the run
RESUMABLE = ("kind", "name", "training.steps", "training.checkpoint_every", "training.log_every", "scaling", "encode",
             "checkpoint", "output", "tracking", "ray", "data.allow_incomplete")


def synthesis_generator(checkpoints_uri: str, meta: dict[str, Any], vq_config: dict[str, Any]) -> dict[str, Any]:
    """``generator:`` settings of a synth config (``type: ldm``) for a finished run."""
    return {"type": "ldm", "unet": storage.join(checkpoints_uri, EMA_FILE),
            "vq_decoder": storage.join(checkpoints_uri, DECODER_FILE), "vq_config": vq_config,
            "latent_shape": list(meta["latent_shape"])}


def check(cfg: LDMConfig) -> None:
    """The training images must be there before Ray starts."""
    list_images(cfg)


def needs(cfg: LDMConfig) -> list[Need]:
    e = cfg.encode
    return [Need.workers(cfg.scaling), Need.data(1.0, "(Ray Data read tasks)"),
            Need("an encoding task", "encode.num_cpus, encode.num_gpus",
                 {"CPU": e.num_cpus, **({"GPU": e.num_gpus} if e.num_gpus else {})}, phase="encoding")]


def run(cfg: LDMConfig, ctx: JobContext) -> Outcome:
    """Encode (resumable), then train on Ray Train; re-running with the same output and name resumes."""
    tracker = ctx.tracker
    run_uri = storage.join(cfg.output.uri, cfg.name)
    info = prepare_latents(cfg, run_uri)
    unet_config(cfg, info.context_dim)  # contexts of another width than the architecture's fail before the workers
    tracker.log_params({"latents.rows": info.rows, "latents.shape": str(list(info.latent_shape)),
                        "latents.context_dim": info.context_dim})
    stage = json.loads(storage.read_bytes(storage.join(info.first_stage, VQ_CONFIG_FILE)))
    tracker.log_metrics({f"first_stage/{k}": v for k, v in stage.items() if isinstance(v, float)})
    loc = storage.resolve(info.uri)
    paths = [storage.resolve(f).path for f in info.files]
    ds = ray.data.read_parquet(paths, filesystem=loc.fs, columns=["latent", "latent_flip", "context"])
    if sum(i.size or 0 for i in loc.fs.get_file_info(paths)) <= cfg.data.cache_bytes:
        ds = ds.materialize()
    result = fit(ldm_loop, cfg, name=f"{cfg.name}-train", output_uri=cfg.output.uri, scaling=cfg.scaling,
                 checkpoint=cfg.checkpoint, extra={"latents": info.to_dict()}, datasets={"train": ds},
                 callbacks=ctx.callbacks, tracker=tracker, job="train-ldm", quiet=ctx.quiet,
                 find_unused_parameters=cfg.unet.flavour == "uiface",  # an empty context may get no gradient
                 settings=guarded_settings(cfg, RESUMABLE))
    outcome = Outcome("train_ldm", run_uri, result.metrics, extra={"latents": info.to_dict()})
    reader = result.checkpoint
    if reader is not None:
        outcome.checkpoint_uri = storage.join(run_uri, "checkpoints")
        for name in reader.names():
            storage.write_bytes_atomic(storage.join(outcome.checkpoint_uri, name), reader.read_bytes(name))
        meta = json.loads(reader.read_bytes(META_FILE))
        generator = synthesis_generator(outcome.checkpoint_uri, meta, info.vq_config)
        outcome.model_uri = generator["unet"]
        outcome.extra["generator"] = generator
        tracker.log_text(json.dumps(generator, indent=2), "synthesis_generator.json")
    outcome.write_summary(storage.join(run_uri, "summary.json"))
    return outcome
