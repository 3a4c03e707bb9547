"""One Ray Train runner for every training job (recognition, distillation, LDM).

A job's loop is a plain function ``loop(cfg, hooks, **extra) -> metrics``. Called directly it trains in
one process (the unit tests do that); under Ray Train every rank calls it with :class:`Hooks` built
from its train context; a Tune trial builds them from the trial's context (:func:`tune_hooks`). The
loop reports metrics and, where it has one, a checkpoint folder through ``hooks.report``, and restores
from ``hooks.restore`` (a :class:`CheckpointReader`: single files are read without downloading the whole
checkpoint, which matters for class-centre shards).

:func:`fit` is the only place a ``TorchTrainer`` is built: elastic or fixed scaling with custom resources,
failure retries, checkpoints on the job's storage through atomic uploads (:func:`run_storage`), and the
job's MLflow run fed from the controller.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer
from torch import nn

from synray.config.run import CheckpointConfig, ScalingConfig
from synray.io import storage
from synray.io.s3 import run_storage
from synray.progress import Board, JobProgress, Throttle, watch_board
from synray.tracking import TrainMetricsToMLflow
from synray.training.checkpointing import CheckpointReader, write_verification

__all__ = ["Callback", "Hooks", "TrainResult", "fit", "tune_hooks", "local_hooks", "guarded_settings", "check_resume",
           "RUN_FILE"]

#: the settings a run was started with, beside its checkpoints: a re-run may change only the allow-listed ones
RUN_FILE = "synray_run.json"


class Callback:
    """Watches a loop on every rank: subclasses override what they need (tests inject faults here)."""

    def after_step(self, hooks: Hooks, step: int) -> None:
        """After optimiser step ``step`` (counted from 1) finished on this rank."""

    def after_report(self, hooks: Hooks, metrics: Mapping[str, Any], checkpointed: bool) -> None:
        """After this rank reported ``metrics`` (with a checkpoint when ``checkpointed``)."""


@dataclass
class Hooks:
    """All a training loop knows of what runs it."""

    rank: int = 0
    world_size: int = 1
    device: str | torch.device = "cpu"
    wrap: Callable[[nn.Module], nn.Module] | None = None  # DDP on more than one rank
    send: Callable[[dict[str, Any], str | None], None] | None = None  # (metrics, checkpoint folder or None)
    restore: CheckpointReader | None = None  # the checkpoint to resume from
    datasets: Mapping[str, Any] = field(default_factory=dict)  # Ray Data shards of this rank, by name
    callbacks: Sequence[Callback] = ()
    quiet: bool = False
    post: Callable[[dict[str, Any], bool], None] | None = None  # rank 0's live counters to the driver's display

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report metrics (every rank calls this at the same points); rank 0 passes the checkpoint folder."""
        if self.send is not None:
            self.send(metrics, checkpoint_dir)
        for cb in self.callbacks:
            cb.after_report(self, metrics, checkpoint_dir is not None)

    def report_checkpoint(self, metrics: dict[str, Any], save: Callable[[str], None] | None,
                          verification: Mapping[str, Any] | None = None, every_rank: bool = False,
                          scores: Mapping[str, Any] | None = None) -> None:
        """Report ``metrics`` with a checkpoint: ``save(folder)`` fills a fresh folder on rank 0 (on every rank
        with ``every_rank``: each writes its own files, Ray Train merges them) and rank 0 adds ``verification``
        (:func:`~synray.training.checkpointing.write_verification`). ``save`` None: no checkpoint."""
        if save is None:
            self.report(metrics)
            return
        writes = every_rank or self.rank == 0
        with tempfile.TemporaryDirectory() as d:
            if writes:
                save(d)
            if self.rank == 0 and verification:
                write_verification(d, verification, scores)
            self.report(metrics, d if writes else None)

    def step_done(self, step: int) -> None:
        for cb in self.callbacks:
            cb.after_step(self, step)

    def progress(self, step: int, total: int, final: bool = False, **fields: Any) -> None:
        """Live counters for the job's progress display (rank 0; throttled, a no-op when quiet)."""
        if self.rank == 0 and self.post is not None:
            self.post({"step": step, "total": total, **fields}, final)

    def log(self, message: str) -> None:
        """A progress line from rank 0 (silent when quiet). Written to stdout, not through ``print``: Ray Train
        patches ``print`` in its workers to log the message *and* echo it when stdout is wrapped, so each line
        reached the driver twice."""
        if self.rank == 0 and not self.quiet:
            sys.stdout.write(message + "\n")
            sys.stdout.flush()


def local_hooks(restore_dir: str | None = None, **kwargs: Any) -> Hooks:
    """Hooks for a loop run in this process, resuming from a local checkpoint folder if given."""
    return Hooks(restore=CheckpointReader.from_uri(restore_dir) if restore_dir else None, **kwargs)


def _checkpoint_name(metrics: Mapping[str, Any]) -> str:
    return f"checkpoint_{int(metrics['step']):09d}"


def quiet_report_log() -> None:
    """Ray Train logs every report (its whole metrics dict, from every rank) at INFO on a logger named by its source
    file's path, which the run's ``LoggingConfig`` level (it filters ``ray.train.*``) misses: a user saw two such
    lines per epoch under synray's own. That logger keeps its warnings."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker(config: dict[str, Any]) -> None:
    """The function every Ray Train rank runs: hooks from the train context, then the job's loop."""
    quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    ddp = config["ddp"]

    def send(metrics: dict[str, Any], directory: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=_checkpoint_name(metrics))

    ckpt = ray.train.get_checkpoint()
    board = config["board"]
    hooks = Hooks(
        rank=rank, world_size=world, device=ray.train.torch.get_device(),
        wrap=(lambda m: ray.train.torch.prepare_model(m, move_to_device=False, parallel_strategy_kwargs=ddp))
        if world > 1 else None,
        send=send, restore=CheckpointReader.from_checkpoint(ckpt) if ckpt is not None else None,
        datasets={name: ray.train.get_dataset_shard(name) for name in config["datasets"]},
        callbacks=config["callbacks"], quiet=config["quiet"],
        post=Throttle(lambda fields: board.post.remote(fields)) if board is not None and rank == 0 else None,
    )
    config["loop"](config["cfg"], hooks, **config["extra"])


def tune_hooks(callbacks: Sequence[Callback] = (), quiet: bool = True) -> Hooks:
    """Hooks for a loop run inside a Tune trial (one process): reports and checkpoints go to Tune."""
    from ray import tune  # sweeps only

    def send(metrics: dict[str, Any], directory: str | None) -> None:
        tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    ckpt = tune.get_checkpoint()
    return Hooks(send=send, restore=CheckpointReader.from_checkpoint(ckpt) if ckpt is not None else None,
                 callbacks=callbacks, quiet=quiet)


def guarded_settings(cfg: Any, allowed: Sequence[str]) -> dict[str, Any]:
    """The config's settings as dotted keys, without those a resumed run may change (``allowed`` prefixes)."""
    from synray.config.base import flatten

    flat = flatten(cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if not any(k == a or k.startswith(a + ".") for a in allowed)}


def _has_checkpoints(run_uri: str) -> bool:
    import pyarrow.fs as pafs

    loc = storage.resolve(run_uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return any(i.type == pafs.FileType.Directory and os.path.basename(i.path).startswith("checkpoint_") for i in infos)


def check_resume(run_uri: str, settings: Mapping[str, Any]) -> None:
    """Refuse to continue a run whose checkpoints were made with other settings (naming the changed keys);
    record the settings when the run starts afresh."""
    import json

    from synray.config.base import ConfigError

    marker = storage.join(run_uri, RUN_FILE)
    if storage.exists(marker) and _has_checkpoints(run_uri):
        before = json.loads(storage.read_bytes(marker))["settings"]
        changed = sorted(k for k in set(before) | set(settings) if before.get(k, "<unset>") != settings.get(k, "<unset>"))
        if changed:
            lines = "\n".join(f"  {k}: {before.get(k, '<unset>')!r} -> {settings.get(k, '<unset>')!r}" for k in changed[:20])
            raise ConfigError(f"{run_uri} holds checkpoints of a run started with other settings; a re-run with the "
                              f"same name and output resumes it, so these changes would mix two runs:\n{lines}\n"
                              "use another name (or output.uri) for a new run, or the settings the run was started with")
        return
    storage.write_bytes_atomic(marker, json.dumps({"settings": dict(settings)}, indent=2, default=str).encode())


@dataclass
class TrainResult:
    """What :func:`fit` leaves: the last reported metrics and the last checkpoint (None if none was reported)."""

    metrics: dict[str, Any]
    checkpoint: CheckpointReader | None
    checkpoint_uri: str | None

    def publish_evaluation(self, outcome: Any, folder: str, tracker: Any, label: str) -> None:
        """The last checkpoint's verification table on ``outcome`` and its ROC curves beside the run (``folder``)."""
        from synray.evaluation.roc_plots import publish_roc

        if self.checkpoint is None:
            return
        if (verification := self.checkpoint.verification()) is not None:
            outcome.set_verification(verification, tracker)
        if (scores := self.checkpoint.scores()) is not None:
            outcome.extra.update(publish_roc(scores, folder, tracker, label))


#: Ray Train's controller collects a worker's report when it polls the workers (every 2 s by default), and a
#: worker's next report waits until the last one was collected (a queue of one): a job whose epochs are shorter than
#: the interval waits for the poll at every epoch's report, and for the last one at the end. synray polls every
#: 0.5 s unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set (the controller inherits the driver's value).
POLL_INTERVAL_S = "0.5"


def fit(
    loop: Callable[..., Any],
    cfg: Any,
    *,
    name: str,
    output_uri: str,
    scaling: ScalingConfig,
    checkpoint: CheckpointConfig,
    extra: Mapping[str, Any] | None = None,
    datasets: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    tracker: Any = None,
    job: str = "train",
    quiet: bool = False,
    find_unused_parameters: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Run ``loop`` on Ray Train; a re-run with the same ``output_uri`` and ``name`` resumes from its last checkpoint.

    ``settings``: what the run must not change between re-runs (see :func:`check_resume`).
    """
    if settings is not None:
        check_resume(storage.join(output_uri, name), settings)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S)
    storage_path, fs = run_storage(output_uri)
    board = None if quiet else ray.remote(num_cpus=0)(Board).remote()
    train_callbacks = []
    if tracker is not None and tracker.run_id is not None:
        train_callbacks.append(TrainMetricsToMLflow(tracker.uri, tracker.run_id, job))
    workers = tuple(scaling.num_workers) if isinstance(scaling.num_workers, tuple) else scaling.num_workers
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "loop": loop, "cfg": cfg, "extra": dict(extra or {}), "datasets": sorted(datasets or {}),
            "callbacks": list(callbacks), "quiet": quiet, "board": board,
            "threads": scaling.torch_threads or max(1, int(scaling.cpus_per_worker)),
            "ddp": {"find_unused_parameters": find_unused_parameters},
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker={"CPU": scaling.cpus_per_worker, **scaling.resources}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoint.num_to_keep),
            callbacks=train_callbacks,
            # Ray Train's per-report INFO lines would bury synray's progress line; its warnings still show
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=dict(datasets or {}),
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    stop_display = watch_board(board, JobProgress(job, None, "step", quiet)) if board is not None else None
    try:
        result = trainer.fit()
    finally:
        if stop_display is not None:
            stop_display()
            ray.kill(board)
    reader = uri = None
    if result.checkpoint is not None:
        reader = CheckpointReader.from_checkpoint(result.checkpoint)
        uri = ("s3://" + reader.path) if storage.is_s3(output_uri) \
            else storage.join(output_uri, os.path.relpath(reader.path, storage_path))
    return TrainResult(dict(result.metrics or {}), reader, uri)
