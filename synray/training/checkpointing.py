"""Training checkpoints that survive a change of worker count.

One checkpoint directory (Ray Train merges the files every rank reports) holds:

* ``meta.json`` (rank 0): completed epochs, global step, steps done in the current epoch, class count;
* ``backbone.pt`` (rank 0): the plain backbone state dict (no ``module.`` prefix; loads with
  :func:`synray.models.registry.load_backbone`);
* ``trainer_state.pt`` (rank 0): backbone optimiser, AMP scaler, the head's replicated buffers;
* ``centres-<start>-<end>.pt`` (every rank): its slice of the class centres ``kernel`` [D, n] and the
  optimiser state tensors of that slice (momentum, Adam moments);
* ``eval.json`` (rank 0, any job's checkpoint): the verification table of that epoch, if one was made.

Centre files are named by class range, not rank, so a run resumed on a different number of workers
assembles each new slice from whichever files overlap it.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import Tensor

from synray.evaluation.roc import SCORES_FILE, save_scores
from synray.io import storage

__all__ = ["CENTRES_RE", "EVAL_FILE", "centres_name", "write_rank_files", "write_verification", "CheckpointReader",
           "assemble_centres", "TrainingMeta"]

CENTRES_RE = re.compile(r"^centres-(\d+)-(\d+)\.pt$")
EVAL_FILE = "eval.json"


def centres_name(start: int, end: int) -> str:
    return f"centres-{start:010d}-{end:010d}.pt"


@dataclass
class TrainingMeta:
    epoch: int  # completed epochs
    step: int  # global optimiser steps done
    step_in_epoch: int  # steps done in epoch ``epoch`` (0 at an epoch boundary)
    num_classes: int
    embedding_size: int
    world_size: int
    config_hash: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def _save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_rank_files(
    directory: str,
    *,
    rank: int,
    start: int,
    kernel: Tensor,
    kernel_state: Mapping[str, Any],
    meta: TrainingMeta | None = None,
    backbone: Mapping[str, Tensor] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
) -> None:
    """Write this rank's files into ``directory`` (rank 0 also writes meta, backbone and trainer state)."""
    end = start + kernel.shape[1]
    state = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in kernel_state.items()}
    _save({"kernel": kernel.detach().cpu(), "state": state}, os.path.join(directory, centres_name(start, end)))
    if rank == 0:
        if meta is None or backbone is None or trainer_state is None:
            raise ValueError("rank 0 must write meta, backbone and trainer state")
        _save({k: v.detach().cpu() for k, v in backbone.items()}, os.path.join(directory, "backbone.pt"))
        _save(dict(trainer_state), os.path.join(directory, "trainer_state.pt"))
        with open(os.path.join(directory, "meta.json"), "w") as fh:
            fh.write(meta.to_json())


def write_verification(directory: str, results: Mapping[str, Any], scores: Mapping[str, Any] | None = None) -> None:
    """The verification table of a checkpoint and, if given, its pair distances for ROC curves
    (:meth:`CheckpointReader.verification` and :meth:`CheckpointReader.scores` read them back)."""
    with open(os.path.join(directory, EVAL_FILE), "w") as fh:
        json.dump(results, fh)
    if scores:
        with open(os.path.join(directory, SCORES_FILE), "wb") as fh:
            fh.write(save_scores(scores))


class CheckpointReader:
    """Reads single files of a (possibly remote) checkpoint directory without downloading all of it."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.fs, self.path = fs, path.rstrip("/")

    @classmethod
    def from_checkpoint(cls, checkpoint) -> CheckpointReader:
        """From a ``ray.train.Checkpoint`` (its ``filesystem`` and ``path``)."""
        return cls(checkpoint.filesystem, checkpoint.path)

    @classmethod
    def from_uri(cls, uri: str) -> CheckpointReader:
        loc = storage.resolve(uri)
        return cls(loc.fs, loc.path)

    def names(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.path}/{name}") as fh:
            return fh.read()

    def load(self, name: str) -> Any:
        return torch.load(io.BytesIO(self.read_bytes(name)), map_location="cpu", weights_only=True)

    def verification(self) -> dict[str, dict[str, float]] | None:
        """The verification table written with this checkpoint, or None."""
        return json.loads(self.read_bytes(EVAL_FILE)) if EVAL_FILE in self.names() else None

    def scores(self) -> bytes | None:
        """The pair distances of that verification (an ``.npz``, for ROC curves), or None."""
        return self.read_bytes(SCORES_FILE) if SCORES_FILE in self.names() else None

    def meta(self) -> TrainingMeta:
        try:
            return TrainingMeta(**json.loads(self.read_bytes("meta.json")))
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint {self.path} has no meta.json (not a synray training checkpoint)") from None

    def centre_files(self) -> list[tuple[int, int, str]]:
        out = []
        for name in self.names():
            m = CENTRES_RE.match(name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), name))
        return sorted(out)

    def centres(self, start: int, end: int) -> tuple[Tensor, dict[str, Any]]:
        """The centres of classes ``[start, end)`` and their optimiser state, from the overlapping files."""
        files = self.centre_files()
        parts = []
        for s, e, name in files:
            if e <= start or s >= end:
                continue
            blob = self.load(name)
            parts.append((s, e, blob["kernel"], blob.get("state", {})))
        return assemble_centres(parts, start, end, what=self.path)


def assemble_centres(
    parts: list[tuple[int, int, Tensor, Mapping[str, Any]]], start: int, end: int, what: str = "checkpoint"
) -> tuple[Tensor, dict[str, Any]]:
    """Concatenate the columns ``[start, end)`` out of ``(s, e, kernel [D, e-s], state)`` pieces.

    State tensors shaped like their kernel are sliced the same way; other state entries (e.g. Adam's
    step count) are taken from the first piece. Missing classes are an error naming the gap.
    """
    parts = sorted(parts, key=lambda p: p[0])
    cols, states, pos = [], {}, start
    scalar_state: dict[str, Any] = {}
    for s, e, kernel, state in parts:
        if e <= pos or s >= end:
            continue
        if s > pos:
            break
        lo, hi = pos - s, min(e, end) - s
        cols.append(kernel[:, lo:hi])
        for k, v in state.items():
            if isinstance(v, Tensor) and v.shape == kernel.shape:
                states.setdefault(k, []).append(v[:, lo:hi])
            else:
                scalar_state.setdefault(k, v)
        pos = min(e, end)
    if pos < end:
        raise FileNotFoundError(f"{what}: class centres [{pos}, {end}) are missing from the checkpoint")
    kernel = torch.cat(cols, dim=1)
    out: dict[str, Any] = dict(scalar_state)
    for k, pieces in states.items():
        if sum(p.shape[1] for p in pieces) == kernel.shape[1]:
            out[k] = torch.cat(pieces, dim=1)
    return kernel, out
