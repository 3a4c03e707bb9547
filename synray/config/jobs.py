"""Which config schema a YAML file is, by its top-level ``kind``."""

from __future__ import annotations

import importlib
import os
from typing import Any

from pydantic import BaseModel

from synray.config.base import ConfigError, apply_overrides, read_yaml, validate

#: kind -> "module:Class" (imported lazily so validating a config stays cheap)
JOB_KINDS: dict[str, str] = {
    "synth": "synray.config.synth:SynthConfig",
    "train": "synray.config.train:TrainConfig",
    "distill": "synray.config.distill:DistillConfig",
    "train_ldm": "synray.config.ldm:LDMConfig",
    "sweep": "synray.config.sweep:SweepConfig",
    "quickstart": "synray.config.quickstart:QuickstartConfig",
}


def schema_for(kind: Any, source: str = "config") -> type[BaseModel]:
    if kind not in JOB_KINDS:
        raise ConfigError(f"{source}: kind: unknown job kind {kind!r}; expected one of {sorted(JOB_KINDS)}")
    mod, cls = JOB_KINDS[kind].split(":")
    return getattr(importlib.import_module(mod), cls)


def load_job_config(path: str | os.PathLike, overrides: list[str] | None = None, kind: str | None = None) -> BaseModel:
    """Load a job config; ``kind`` (from the calling command) must agree with the file's ``kind``."""
    source = os.fspath(path)
    data = apply_overrides(read_yaml(path), overrides)
    file_kind = data.get("kind", kind)
    if kind is not None and file_kind != kind:
        raise ConfigError(f"{source}: kind: this command takes kind {kind!r}, the file says {file_kind!r}")
    data["kind"] = file_kind
    return validate(schema_for(file_kind, source), data, source)
