"""What makes two synthesis runs the same dataset: the content settings and the bytes of every input file.

:func:`content_hash` is stored in every shard's footer; a re-run whose hash differs refuses the shards
already there. Inputs count by their bytes (streamed SHA-256, :func:`file_digest`), not their paths:
retraining a model into the same checkpoint path makes a new dataset, moving the same file does not.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json

import pyarrow.fs as pafs

from synray.config.synth import SynthConfig
from synray.io import storage
from synray.models.registry import list_backbones

__all__ = ["NON_CONTENT", "IMAGE_EXTENSIONS", "input_files", "file_digest", "content_hash"]

#: fields that change how fast a dataset is made, never what it contains
NON_CONTENT = {"name": True, "output": True, "tracking": True, "ray": True, "local": True,
               "generator": {"batch_size", "num_gpus", "num_cpus", "min_actors", "max_actors", "precision",
                             "channels_last", "compile"},
               "alignment": {"num_cpus"}}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_DIGESTS: dict[tuple[str, int, int | None], str] = {}


def _embedder_file(spec: str) -> tuple[str, str]:
    """``(kept prefix, file)`` of an embedder spec ``"<registry name>:<checkpoint>"`` or ``"<checkpoint>"``."""
    name, sep, path = spec.partition(":")
    if sep and name in list_backbones():
        return f"{name}:", path
    return "", spec


def input_files(cfg: SynthConfig) -> dict[str, tuple[str, str]]:
    """``{dotted key: (kept prefix, file or folder)}`` of every input whose bytes shape the dataset."""
    g, c = cfg.generator, cfg.contexts
    files: dict[str, tuple[str, str]] = {}
    if g.type == "ldm":
        files["generator.unet"] = ("", g.unet)
        files["generator.vq_decoder"] = ("", g.vq_decoder)
    if g.type == "dcgan" and importlib.util.find_spec("gan_face_generate") is not None:
        files["generator.weights"] = ("", str(importlib.resources.files("gan_face_generate") / "weights.tar"))
    if c.path and c.source in ("embeddings_file", "face_embeddings", "mixup"):
        files["contexts.path"] = ("", c.path)
    if c.embedder and c.source == "face_embeddings":
        files["contexts.embedder"] = _embedder_file(c.embedder)
    if cfg.quality.embedder:
        files["quality.embedder"] = _embedder_file(cfg.quality.embedder)
    return files


def file_digest(uri: str, key: str = "input") -> str:
    """``sha256:<hex>`` of a file's bytes (streamed), or of a folder's image files and their names.

    Cached per (file, size, modification time), so a repeated check in one process reads nothing.
    """
    loc = storage.resolve(uri)
    try:
        info = loc.fs.get_file_info(loc.path)
    except Exception as exc:
        raise storage.StorageError(f"{key}: cannot reach {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{key}: {uri} does not exist")
    if info.type == pafs.FileType.Directory:
        h = hashlib.sha256()
        entries = loc.fs.get_file_info(pafs.FileSelector(loc.path))
        for e in sorted((e for e in entries if e.type == pafs.FileType.File and e.path.lower().endswith(IMAGE_EXTENSIONS)),
                        key=lambda e: e.path):
            name = e.path.rsplit("/", 1)[-1]
            h.update(f"{name}\0{file_digest(storage.join(uri, name), key)}\n".encode())
        return f"sha256:{h.hexdigest()}"
    cache_key = (loc.uri, info.size, info.mtime_ns)
    if cache_key not in _DIGESTS:
        h = hashlib.sha256()
        with loc.fs.open_input_stream(loc.path) as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _DIGESTS[cache_key] = f"sha256:{h.hexdigest()}"
    return _DIGESTS[cache_key]


def content_hash(cfg: SynthConfig) -> str:
    """Hash of what determines the dataset: the content settings, and the bytes (not paths) of every input file."""
    data = cfg.model_dump(mode="json", exclude=NON_CONTENT)
    for key, (prefix, uri) in input_files(cfg).items():
        section, name = key.split(".")
        data[section][name] = prefix + file_digest(uri, key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
