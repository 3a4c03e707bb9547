"""Config plumbing shared by every job.

Configs are pydantic models with ``extra="forbid"`` so that a typo is an error, validated before any
Ray work starts. Errors name the dotted key (``train.lr``) and the offending value (secrets masked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from synray.config.paths import URI, TrackingURI
from synray.errors import UserError
from synray.redact import MASK, is_secret_key, redact, redact_text

T = TypeVar("T", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A config file or override is unreadable, has an unknown key, or a bad value.

    The message is redacted: config errors echo input values, and they end up on consoles and in job logs.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(redact_text(str(message)))


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, frozen=False)


class OutputConfig(StrictModel):
    """Where a job writes: a local path (made absolute when the config loads) or ``s3://bucket/prefix``.

    On a cluster of more than one node a local path is each node's own disk; ``shared: true`` declares it a
    mount every node sees (NFS, FSx), which is the only way a local output is accepted there.
    """

    uri: URI = Field("outputs/run", min_length=1)
    shared: bool = False


class TrackingConfig(StrictModel):
    """MLflow tracking; ``uri=None`` means ``$MLFLOW_TRACKING_URI`` or SQLite under the working dir."""

    enabled: bool = True
    uri: TrackingURI | None = None
    experiment: str = "synray"
    run_name: str | None = None


class RayConfig(StrictModel):
    """How to reach Ray: ``address=None`` attaches to a running cluster if any, else starts a local one."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    quiet: bool = False


class JobConfig(StrictModel):
    """What every job config has: where it writes, how it is tracked, how it reaches Ray, which plugins it needs."""

    kind: str
    #: modules that register generators, samplers, backbones or heads; imported before the rest of the config is
    #: read, in every process that reads it (so they must be importable on every node: installed, or in the job's
    #: --working-dir)
    plugins: list[str] = Field(default_factory=list)
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        for i, name in enumerate((data.get("plugins") or []) if isinstance(data, dict) else []):
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ValidationError.from_exception_data("plugins", [{"type": PydanticCustomError(
                    "plugin_import", "cannot import {name}: {error}", {"name": repr(name), "error": str(exc)}),
                    "loc": ("plugins", i), "input": name}]) from None
        return data

    def writes(self) -> dict[str, OutputConfig]:
        """The locations the job writes, by dotted key (checked against the cluster before Ray work)."""
        return {"output.uri": self.output}


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without the snippet of the input PyYAML quotes (it may hold a secret)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or type(exc).__name__}{where}"


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML (numbers, bools, lists, null)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': cannot parse value: {_yaml_problem(exc)}") from None
        set_dotted(data, key, value)
    return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = MASK if is_secret_key(key) else redact_text(repr(redact(e.get("input"))))
            lines.append(f"  {key}: {e['msg']} (got {got})")
    return "\n".join(lines)


def validate(schema: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Validate a plain dict into ``schema``, raising :class:`ConfigError` naming each bad key."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def build_dataclass(cls: type[T], values: Mapping[str, Any], key: str, hidden: frozenset[str] = frozenset()) -> T:
    """``cls(**values)`` for a model's config dataclass (``UNetConfig``, ``VQConfig``), lists standing for
    tuples, with every bad entry a ``ValueError`` naming its dotted key under ``key``
    (``vq.config.ch_mult.0: ...``); ``hidden``: fields set elsewhere, not listed as valid keys."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = ", ".join(k for k in known if k not in hidden)
        raise ValueError("; ".join(f"{key}.{k}: unknown key (valid: {valid})" for k in unknown))
    try:
        return TypeAdapter(cls).validate_python(dict(values))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field, msg = ".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")
            named = re.match(rf"{cls.__name__}\.(\w+) ", msg)  # __post_init__ names the field it rejects
            if field:
                msg += f" (got {e['input']!r})"
            elif named:
                field, msg = named.group(1), msg[named.end():]
            problems.append(f"{key}.{field}: {msg}" if field else f"{key}: {msg}")
        raise ValueError("; ".join(problems)) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, schema: type[T], overrides: list[str] | None = None) -> T:
    """Read YAML (or start empty when ``path`` is None), apply overrides, validate into ``schema``."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    return validate(schema, data, os.fspath(path) if path is not None else "<overrides>")


def to_yaml(cfg: BaseModel) -> str:
    """Resolved config as YAML, secrets redacted: safe to save next to outputs and log."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def config_hash(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """Stable short hash of the config content that determines a dataset (used in shard metadata)."""
    data = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
