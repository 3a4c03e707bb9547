"""Path-valued config fields, made absolute when a config loads.

Ray Train changes every worker's working directory and ``ray job submit`` runs the driver in a
temporary copy of the working dir, so a relative path means something else on every process. Every
local path a config names is therefore resolved once, on the driver, against the directory the
command was started in; URIs with a scheme (``s3://``, ``http://``) are kept as they are. Workers
re-validating a config see absolute paths, so resolving again changes nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

__all__ = [
    "URI", "ModelRef", "TrackingURI", "ConfigRef", "absolute", "is_uri", "is_local", "project_conf_dir",
]

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
#: dataset formats read beside synray's own shards (``synray.io.sources``), whose paths are made absolute too
DATASET_SCHEMES = ("rec://", "folder://")
#: model references that name a built-in model rather than a file
NAMED_MODELS = {"dlib", "world_teacher"}


def is_uri(value: str) -> bool:
    """True for ``scheme://...`` (``s3://``, ``http://``...); ``file://`` counts as a local path."""
    return bool(_SCHEME.match(value)) and not value.startswith("file://")


def is_local(value: str | None) -> bool:
    return bool(value) and not is_uri(value)


def absolute(value: str) -> str:
    """An absolute local path (``~`` expanded, ``file://`` dropped); URIs unchanged.

    Dataset URIs of other formats keep their scheme and get an absolute path: ``rec://data/train.rec`` ->
    ``rec:///<cwd>/data/train.rec`` (``folder://`` likewise; ``rec+s3://`` is a URI).
    """
    for scheme in DATASET_SCHEMES:
        if value.startswith(scheme) and value[len(scheme):]:
            return scheme + absolute(value[len(scheme):])
    if value.startswith("file://"):
        value = value[len("file://"):]
    if is_uri(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def _model_ref(value: str) -> str:
    """``name``, ``<registry name>:<checkpoint>`` or a checkpoint path: the file part made absolute."""
    if value in NAMED_MODELS or is_uri(value):
        return value
    name, sep, path = value.partition(":")
    if sep and name and "/" not in name and not os.path.exists(value):
        return f"{name}:{absolute(path)}"
    return absolute(value)


def _tracking(value: str) -> str:
    """``sqlite:///relative.db`` -> ``sqlite:////abs/relative.db``; servers and absolute stores unchanged."""
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return "sqlite:///" + absolute(value[len("sqlite:///"):])
    if value.startswith("file:") or "://" not in value:
        return absolute(value.removeprefix("file:"))
    return value


def project_conf_dir() -> Path | None:
    """The ``conf/`` folder shipped beside the package (a clone or an editable install)."""
    conf = Path(__file__).resolve().parents[2] / "conf"
    return conf if conf.is_dir() else None


def config_ref(value: str) -> str:
    """A config file: relative to the working dir, else a recipe of the project's ``conf/`` (``conf/...``)."""
    path = absolute(value)
    if os.path.exists(path) or os.path.isabs(os.path.expanduser(value)):
        return path
    conf = project_conf_dir()
    if conf is not None:
        rel = Path(value)
        candidate = conf.parent / rel if rel.parts[:1] == ("conf",) else conf / rel
        if candidate.exists():
            return str(candidate)
    return path


#: a file, a folder or storage a job reads or writes: a local path (made absolute) or ``s3://...``
URI = Annotated[str, AfterValidator(absolute)]
#: a model: ``dlib``, ``world_teacher``, ``<registry name>:<checkpoint>`` or a checkpoint path
ModelRef = Annotated[str, AfterValidator(_model_ref)]
#: an MLflow tracking URI
TrackingURI = Annotated[str, AfterValidator(_tracking)]
#: another YAML config (quickstart stages, a sweep's base)
ConfigRef = Annotated[str, AfterValidator(config_ref)]
