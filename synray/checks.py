"""``synray <command> CONFIG --check``: every file a config names, loaded and checked against the recipe, in seconds.

Weights load with the same strict loaders the jobs use (:mod:`synray.models`); context files, datasets, image
folders and ``.bin`` sets are read; the shapes the recipe states are compared with what the files hold (context
width, latent shape, embedding sizes, class counts). Every problem is collected, each naming its config key, so
one run lists them all before a cluster is booked. Nothing starts Ray and nothing is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydantic import BaseModel

from synray.config.distill import DistillConfig
from synray.config.export import ExportConfig
from synray.config.paths import NAMED_MODELS
from synray.config.ldm import LDMConfig
from synray.config.report import ReportConfig
from synray.config.synth import SynthConfig
from synray.config.train import TrainConfig
from synray.evaluation.binset import load_bin_blob
from synray.evaluation.evaluate import find_bins
from synray.io import storage
from synray.models.ldm_checkpoint import load_unet, load_vq_decoder, load_vq_encoder
from synray.models.registry import build_backbone
from synray.models.unet import ConditionalUNet
from synray.models.vq import VQConfig
from synray.redact import redact_text

__all__ = ["Problems", "check_job", "CHECKERS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class Problems:
    """Problems found so far, one line each: ``<config key>: <what is wrong>``."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.keys: set[str] = set()

    def add(self, key: str, message: str) -> None:
        message = redact_text(str(message).strip())
        line = message if message.startswith(f"{key}:") else f"{key}: {message}"
        if line not in self.items:
            self.items.append(line)
            self.keys.add(key)

    @contextmanager
    def under(self, key: str) -> Iterator[None]:
        """Run a check; any exception becomes a problem of ``key`` (the check goes on with the next one)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the others
            self.add(key, str(exc) or type(exc).__name__)


def _file(p: Problems, key: str, uri: str | None) -> bool:
    """The named file or folder exists (a problem of ``key`` otherwise)."""
    if not uri:
        return False
    with p.under(key):
        if storage.exists(uri):
            return True
        p.add(key, f"{uri} does not exist")
    return False


def _unet(p: Problems, key: str, path: str | None, latent_shape: tuple[int, int, int], context_key: str | None,
          context_dim: int | None) -> ConditionalUNet | None:
    """A published diffusion checkpoint, strictly; its latent channels, downsampling and context width vs the recipe."""
    if not _file(p, key, path):
        return None
    unet = None
    with p.under(key):
        unet = load_unet(path)
    if unet is None:
        return None
    uc = unet.config
    if uc.input_channels != latent_shape[0]:
        p.add("latent_shape" if "." not in key else f"{key.rsplit('.', 1)[0]}.latent_shape",
              f"{list(latent_shape)} has {latent_shape[0]} channels, the UNet {path} takes {uc.input_channels}")
    factor = 2 ** (len(uc.channel_multipliers) - 1)
    if latent_shape[1] % factor or latent_shape[2] % factor:
        p.add(f"{key.rsplit('.', 1)[0]}.latent_shape", f"{list(latent_shape)}: height and width must be multiples of "
              f"{factor}, the UNet's downsampling ({len(uc.channel_multipliers)} levels)")
    if context_key and context_dim is not None and uc.context_input_channels != context_dim:
        p.add(context_key, f"{context_dim}-d contexts, the UNet {path} takes {uc.context_input_channels}-d")
    return unet


def _vq(p: Problems, section: str, decoder: str | None, vq_config: dict | None, latent_channels: int,
        encoder: str | None = None) -> VQConfig | None:
    """VQ files (those given) strictly into the configured architecture (default: the published VQ-f4), and its
    latent channels vs the recipe's."""
    vq_cfg = None
    with p.under(f"{section}.vq_config" if section != "vq" else "vq.config"):
        vq_cfg = VQConfig.from_dict(vq_config, key=f"{section}.vq_config") if vq_config else VQConfig()
    if vq_cfg is None:
        return None
    for key, path, loader in ((f"{section}.vq_encoder" if section != "vq" else "vq.encoder", encoder, load_vq_encoder),
                              (f"{section}.vq_decoder" if section != "vq" else "vq.decoder", decoder, load_vq_decoder)):
        if _file(p, key, path):
            with p.under(key):
                loader(path, vq_cfg)
    if vq_cfg.embed_dim != latent_channels:
        p.add(f"{section}.latent_shape" if section != "vq" else "unet.architecture.input_channels",
              f"{latent_channels} latent channels, the first stage's embed_dim is {vq_cfg.embed_dim}")
    return vq_cfg


def _embedding_dim(p: Problems, key: str, spec: str | None) -> int | None:
    """The width of an FR model's embeddings (published weights loaded strictly, or a synray checkpoint)."""
    if not spec:
        return None
    from synray.synthesis.embedders import embedding_dim

    path = spec.partition(":")[2] if ":" in spec and not os.path.exists(spec) else spec
    if path not in NAMED_MODELS and not _file(p, key, path):
        return None
    with p.under(key):
        return embedding_dim(spec)
    return None


@contextmanager
def _local(uri: str) -> Iterator[str]:
    """A local path of ``uri``: itself, or a temporary copy of an S3 object (as the job stages it)."""
    if not storage.is_s3(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, os.path.basename(uri))
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(uri))
        yield path


def _bins(p: Problems, key: str, bins: list[str]) -> None:
    """Every ``.bin`` set found and unpickled (restricted), with two images per pair."""
    if not bins:
        return
    files = []
    with p.under(key):
        files = find_bins(bins)
    for f in files:
        with p.under(key):
            images, issame = load_bin_blob(f)
            if len(images) != 2 * len(issame):
                p.add(key, f"{f}: {len(images)} images for {len(issame)} pairs")


def _images_in(p: Problems, key: str, folder: str, needed: int) -> None:
    """A folder of context images: at least ``needed`` of them (row i = identity i), the first and last decodable."""
    from synray.io.images import decode_image

    if not _file(p, key, folder):
        return
    with p.under(key):
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if len(names) < needed:
            p.add(key, f"{folder} has {len(names)} images; identities up to {needed - 1} need {needed}")
        for name in {names[0], names[min(needed, len(names)) - 1]} if names else ():
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                decode_image(fh.read(), path)


# --------------------------------------------------------------------------------------------
# per job kind


def check_synth(cfg: SynthConfig, p: Problems) -> None:
    from synray.synthesis import contexts as C
    from synray.synthesis.pipeline import check_config

    g, c = cfg.generator, cfg.contexts
    needed = cfg.identities.start + cfg.identities.count
    if g.type == "ldm":
        _unet(p, "generator.unet", g.unet, g.latent_shape, "contexts.dim", c.dim)
        _vq(p, "generator", g.vq_decoder, g.vq_config, g.latent_shape[0])
    elif g.type == "dcgan" and c.dim != 100:
        p.add("contexts.dim", f"{c.dim}: the DCGAN takes 100-d latents")
    if c.source == "embeddings_file" and _file(p, "contexts.path", c.path):
        with p.under("contexts.path"):
            C.from_table(C.load_embeddings(c.path), np.arange(cfg.identities.start, needed), c.dim, c.path)
    if c.source == "face_embeddings":
        if c.path:
            _images_in(p, "contexts.path", c.path, needed)
        dim = _embedding_dim(p, "contexts.embedder", c.embedder)
        if dim is not None and dim != c.dim:
            p.add("contexts.dim", f"{c.dim}, the embedder {c.embedder} gives {dim}-d embeddings")
    if cfg.quality.embedder and cfg.quality.embedder != c.embedder:
        _embedding_dim(p, "quality.embedder", cfg.quality.embedder)
    if cfg.alignment.mode == "landmarks":
        with p.under("alignment.detector"):
            from synray.synthesis.detectors import RetinaFaceDetector

            RetinaFaceDetector()
    if not p.items:  # cross-section rules (its file checks would repeat the ones above)
        with p.under("config"):
            check_config(cfg)


def check_train(cfg: TrainConfig, p: Problems) -> None:
    from synray.training.data import dataset_info
    from synray.training.recognition import plan_training

    ok = True
    for key, uri in (("data.train", cfg.data.train), ("mixup.domain.real", cfg.mixup.domain.real if cfg.mixup.domain.enabled else None)):
        if uri:
            before = len(p.items)
            with p.under(key):
                dataset_info(uri, allow_incomplete=cfg.data.allow_incomplete)
            ok = ok and len(p.items) == before
    model = None
    with p.under("backbone"):
        model = build_backbone(cfg.backbone.name, **cfg.backbone.kwargs)
    if ok and model is not None:
        with p.under("data"):
            plan_training(cfg)
    if cfg.cfsm.enabled and _file(p, "cfsm.checkpoint", cfg.cfsm.checkpoint):
        from synray.models.cfsm import load_generator

        with p.under("cfsm.checkpoint"), _local(cfg.cfsm.checkpoint) as path:
            load_generator(path, freeze=True, **cfg.cfsm.generator)
    _bins(p, "eval.bins", cfg.eval.bins)


def check_distill(cfg: DistillConfig, p: Problems) -> None:
    from synray.distill.teachers import load_teacher

    g = cfg.generator
    teacher = None
    if cfg.teacher not in ("dlib",):
        path = cfg.teacher.partition(":")[2] if ":" in cfg.teacher and not os.path.exists(cfg.teacher) else cfg.teacher
        _file(p, "teacher", path)
    if "teacher" not in p.keys:
        with p.under("teacher"):
            teacher = load_teacher(cfg.teacher)
    student = None
    with p.under("student"):
        student = build_backbone(cfg.student.name, **cfg.student.kwargs)
    if teacher is not None and student is not None:
        dim = int(getattr(student, "embedding_dim", 0))
        if dim != teacher.embedding_dim:
            p.add("student.kwargs.embedding_dim", f"student {cfg.student.name} gives {dim}-d embeddings, the teacher "
                  f"{teacher.embedding_dim}-d")
    if g.type == "stylegan2" and _file(p, "generator.path", g.path):
        from synray.distill.generators import load_stylegan2

        with p.under("generator.path"):
            load_stylegan2(g.path)
    if g.type == "ldm":
        _unet(p, "generator.path", g.path, g.latent_shape, None, None)
        _vq(p, "generator", g.vq_decoder, g.vq_config, g.latent_shape[0])
    _bins(p, "eval.bins", cfg.eval.bins)


def check_train_ldm(cfg: LDMConfig, p: Problems) -> None:
    from synray.ldm.data import list_images, load_context_file

    items = None
    with p.under("data.path"):
        items = list_images(cfg)
    dim = None
    if cfg.contexts.source == "file":
        if items is not None and _file(p, "contexts.path", cfg.contexts.path):
            with p.under("contexts.path"):
                dim = int(load_context_file(cfg.contexts.path, items).shape[1])
    else:
        dim = _embedding_dim(p, "contexts.embedder", cfg.contexts.embedder)
    uc = None
    with p.under("unet.architecture"):
        uc = cfg.unet.unet_config(dim or cfg.unet.architecture.get("context_input_channels", 512))
    if uc is not None and dim is not None and uc.context_input_channels != dim:
        p.add("unet.architecture.context_input_channels", f"{uc.context_input_channels}, the contexts are {dim}-d")
    if cfg.vq.encoder or cfg.vq.decoder:
        vq_cfg = _vq(p, "vq", cfg.vq.decoder, cfg.vq.config, uc.input_channels if uc is not None else 3,
                     encoder=cfg.vq.encoder)
        if vq_cfg is not None and uc is not None:
            h, w = (s // vq_cfg.downsampling for s in cfg.data.image_size)
            factor = 2 ** (len(uc.channel_multipliers) - 1)
            if h % factor or w % factor:
                p.add("data.image_size", f"{list(cfg.data.image_size)} gives {h}x{w} latents; the UNet needs multiples of {factor}")


def check_export(cfg: ExportConfig, p: Problems) -> None:
    from synray.io.sources import open_source

    with p.under("source"):
        open_source(cfg.source, allow_incomplete=cfg.allow_incomplete)


def check_report(cfg: ReportConfig, p: Problems) -> None:
    from synray.io.sources import is_foreign, open_source

    with p.under("source"):
        open_source(cfg.source, allow_incomplete=cfg.allow_incomplete)
    dim = _embedding_dim(p, "model", cfg.model)
    if cfg.reference and (is_foreign(cfg.reference) or not cfg.reference.endswith((".npy", ".npz", ".parquet"))):
        with p.under("reference"):
            open_source(cfg.reference, allow_incomplete=cfg.allow_incomplete)
    elif cfg.reference and _file(p, "reference", cfg.reference) and dim is not None:
        from synray.report import load_reference

        with p.under("reference"):
            ref, _ = load_reference(cfg, None)  # an embeddings file needs no model to read
            if ref.shape[1] != dim:
                p.add("reference", f"{ref.shape[1]}-d embeddings, the model gives {dim}-d")


CHECKERS: dict[str, Callable[[Any, Problems], None]] = {
    "synth": check_synth, "train": check_train, "distill": check_distill, "train_ldm": check_train_ldm,
    "export": check_export, "report": check_report,
}


def check_job(cfg: BaseModel) -> list[str]:
    """All problems of a job config's files, one line each (empty: ready to run)."""
    checker = CHECKERS.get(cfg.kind)
    if checker is None:
        return [f"kind: --check is not available for {cfg.kind!r} jobs (available: {', '.join(sorted(CHECKERS))})"]
    p = Problems()
    checker(cfg, p)
    return p.items
