"""The study's rows: each made by the jobs a user runs (``synth`` -> ``train``, ``distill``) through ``run_job``.

A row's recipe is a ``conf/`` file plus overrides (``conf/study/world.yaml``); this module adds what ties the
rows together (output folders, the world split and sizes, which world LDM samples, the teacher) and the
few study-made inputs a recipe may name with a placeholder:

* ``{context_faces}`` / ``{context_embeddings}``: the context database (ADMIS's "context faces": unconditional
  samples of the UIFace-flavour world LDM, one per identity, as a folder of PNGs, and the teacher's embeddings
  of them as an ``.npy`` with one row per identity);
* ``{domain_real}``: SynFace's small real-labelled subset for domain mixup (a world real split of its own);
* ``{cfsm}`` / ``{cfsm_generator}``: the world's CFSM synthesis model and its constructor arguments;
* ``{teacher}``: the world teacher.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synray.config.study import RowConfig, StudyConfig
from synray.jobs import load_job, run_job
from synray.quickstart import _stage, train_student, world_difficulty
from synray.study.assets import StudyAssets
from synray.study.measure import Measurer, read_images, sample_grid

__all__ = ["RowResult", "StudyRun", "expand_rows"]

#: generator actors of a study synth job: one per core of the 2-core machine the study is sized for
ACTORS = 2


@dataclass
class RowResult:
    name: str
    label: str
    kind: str
    verification: dict[str, dict[str, float]] | None = None
    figures: dict[str, float] = field(default_factory=dict)
    images_per_second: float | None = None
    dataset: str | None = None
    model: str | None = None
    seconds: float = 0.0
    uses_real: bool = False  # real images in the training data (the real row, SynFace's domain mixup)
    grid: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "grid"}


def expand_rows(cfg: StudyConfig) -> dict[str, RowConfig]:
    """The rows to make, in table order: each row, then its fast-sampler twin (``<name>_fast``) when it has one."""
    out: dict[str, RowConfig] = {}
    for name, row in cfg.rows.items():
        out[name] = row
        if row.fast is not None:
            fast = dict(row.fast) if isinstance(row.fast, dict) else row.fast.model_dump()
            label = f"{row.label} + {fast['method']}-{fast.get('steps', '')}".rstrip("-")
            out[f"{name}_fast"] = row.model_copy(update={
                "label": label, "fast": None,
                "overrides": [*row.overrides, f"generator.sampler={json.dumps(fast)}"]})
    if cfg.only is not None:
        wanted = set(cfg.only)
        out = {k: v for k, v in out.items() if k in wanted or k.removesuffix("_fast") in wanted}
    return out


class StudyRun:
    """One study run: the shared inputs (real split, bins, assets, context database) and the row makers."""

    def __init__(self, cfg: StudyConfig, assets: StudyAssets, real_uri: str, bins: str, tracking: list[str]):
        self.cfg, self.assets, self.real_uri, self.bins, self.tracking = cfg, assets, real_uri, bins, tracking
        self.measurer = Measurer(assets.teacher, assets.nuisance, assets.training_centroids)
        self.data: dict[str, RowResult] = {}
        self._inputs: dict[str, str] = {"teacher": assets.teacher, "cfsm": assets.cfsm,
                                        "cfsm_generator": json.dumps(assets.cfsm_generator)}

    # -- shared inputs ---------------------------------------------------------------------------
    def _placeholders(self, values: list[str]) -> list[str]:
        wanted = {k for v in values for k in ("context_faces", "context_embeddings", "domain_real") if "{" + k + "}" in v}
        if wanted & {"context_faces", "context_embeddings"} and "context_faces" not in self._inputs:
            self._context_database()
        if "domain_real" in wanted and "domain_real" not in self._inputs:
            self._domain_real()
        out = []
        for v in values:
            for k, x in self._inputs.items():
                v = v.replace("{" + k + "}", x)
            out.append(v)
        return out

    def _most_identities(self) -> int:
        return self.cfg.synth_identities * max((r.identity_scale for r in self.cfg.rows.values()), default=1)

    def _context_database(self) -> None:
        """ADMIS's context faces: unconditional samples of the world (the UIFace LDM's empty context), one per
        identity, written by a ``synth`` job; then a PNG folder (i-th file = identity i) and their embeddings."""
        from synray.io.images import encode_image
        from synray.synthesis.embedders import Embedder

        c = self.cfg.context_faces
        uri = os.path.join(self.cfg.output, "context_faces")
        count = self._most_identities()
        self._synth(c.config, uri, c.ldm, count, [*c.overrides, "generator.images_per_identity=1"])
        images, ids, _ = read_images(uri)
        folder = os.path.join(self.cfg.output, "context_faces_png")
        os.makedirs(folder, exist_ok=True)
        for im, i in zip(images, ids):
            path = os.path.join(folder, f"{int(i):07d}.png")
            if not os.path.exists(path):
                with open(path + ".tmp", "wb") as fh:
                    fh.write(encode_image(im, ".png"))
                os.replace(path + ".tmp", path)
        emb = np.zeros((int(ids.max()) + 1, self.assets.context_dim), np.float32)
        emb[ids] = Embedder(self.assets.teacher, flip=False).embed(images)  # ADMIS embeds each face once
        npy = os.path.join(self.cfg.output, "context_embeddings.npy")
        np.save(npy, emb)
        self._inputs.update(context_faces=folder, context_embeddings=npy)

    def _domain_real(self) -> None:
        """SynFace's few real-labelled images for domain mixup: a small world real split of its own."""
        w, d = self.cfg.world, self.cfg.domain_real
        uri = os.path.join(self.cfg.output, "domain_real")
        ids = max(2, int(round(d.fraction * self.cfg.synth_identities)))
        start = ids * -(-w.train_identities // ids)  # past the real split's identities, unit-aligned
        job = _stage(self.cfg.real, f"output.uri={uri}", f"seed={w.seed}", "generator.type=world",
                     f"generator.world_difficulty={world_difficulty(self.cfg)}", f"identities.count={ids}",
                     f"identities.start={start}", f"identities.unit_size={ids}",
                     f"generator.images_per_identity={d.images}", "alignment.mode=none", "label_kind=real",
                     "contexts.source=gaussian", "augment.context_repeats=0", "quality.embedder=null", *self.tracking)
        run_job(job)
        self._inputs["domain_real"] = uri

    # -- jobs ------------------------------------------------------------------------------------
    def _synth(self, config: str, uri: str, ldm: str, count: int, overrides: list[str]) -> dict[str, Any]:
        """A ``synth`` job of ``count`` identities in one unit per generator actor: a row's images take
        the same time on each core."""
        g = self.assets.ldms[ldm]
        base = [f"output.uri={uri}", f"seed={self.cfg.world.seed}", "identities.start=0",
                f"identities.count={count}", f"identities.unit_size={-(-count // ACTORS)}",
                f"generator.images_per_identity={self.cfg.synth_images}", "generator.type=ldm",
                f"generator.unet={g['unet']}", f"generator.vq_decoder={g['vq_decoder']}",
                f"generator.vq_config={json.dumps(g['vq_config'])}", f"generator.latent_shape={json.dumps(g['latent_shape'])}",
                "generator.num_gpus=0", "generator.batch_size=64", f"generator.max_actors={ACTORS}",
                f"generator.world_difficulty={world_difficulty(self.cfg)}", f"contexts.dim={self.assets.context_dim}",
                "contexts.path=null", f"contexts.embedder={self.assets.teacher}", "quality.embedder=null",
                "alignment.mode=none"]  # the world LDM decodes aligned faces; the student resizes
        job = load_job(config, [*base, *self._placeholders(overrides), *self.tracking], kind="synth")
        return run_job(job).metrics

    def _student(self, name: str, data: str, train: list[str]):
        # verification after the last epoch only: the table reads the final student, and on 2 cores each
        # epoch's check (~2 s on one worker while the other waits) would cost more than the epoch's training
        return train_student(self.cfg, name, data, self.bins, self.tracking,
                             extra=[f"eval.every_epochs={self.cfg.student_epochs}", *self._placeholders(train)])

    def _measure(self, res: RowResult, uri: str, kinds: tuple[str, ...] = ("generated",),
                 factors: np.ndarray | None = None) -> None:
        images, ids, samples = read_images(uri, self.cfg.figure_images, kinds)
        if factors is None and kinds == ("real",):
            factors = self._world_factors(ids, samples)
        res.figures = self.measurer.figures(images, ids, factors)
        res.grid = sample_grid(images, ids)

    def _world_factors(self, ids: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """The true nuisance factors of world renders (the world knows them)."""
        from synray.study.nuisance import factor_values
        from synray.world.world import World

        world = World(seed=self.cfg.world.seed, num_identities=int(ids.max()) + 1, difficulty=world_difficulty(self.cfg))
        return np.stack([factor_values(world.nuisance(int(i), int(s))) for i, s in zip(ids, samples)])

    # -- rows ------------------------------------------------------------------------------------
    def make(self, name: str, row: RowConfig) -> RowResult:
        t0 = time.perf_counter()
        res = RowResult(name, row.label, row.kind)
        getattr(self, f"_row_{row.kind}")(name, row, res)
        res.seconds = time.perf_counter() - t0
        self.data[name] = res
        return res

    def _row_real(self, name: str, row: RowConfig, res: RowResult) -> None:
        res.dataset, res.uses_real = self.real_uri, True
        self._measure(res, self.real_uri, kinds=("real",))
        if row.student:
            self._fill(res, self._student(f"student_{name}", self.real_uri, row.train))

    def _row_synth(self, name: str, row: RowConfig, res: RowResult) -> None:
        uri = os.path.join(self.cfg.output, "data", name)
        extra = [*row.overrides, *(row.tiny if self.cfg.tiny else [])]
        metrics = self._synth(row.config, uri, row.ldm, self.cfg.synth_identities * row.identity_scale, extra)
        res.dataset, res.images_per_second = uri, metrics.get("images_per_second")
        self._measure(res, uri)
        if row.student:
            train = [*row.train, *(row.tiny_train if self.cfg.tiny else [])]
            res.uses_real = any("mixup.domain.enabled=true" in t for t in train)
            self._fill(res, self._student(f"student_{name}", uri, train))

    def _row_same_data(self, name: str, row: RowConfig, res: RowResult) -> None:
        src = self.data.get(row.data)
        if src is None or src.dataset is None:
            raise ValueError(f"rows.{name}.data: row {row.data!r} must be made (and listed) before {name!r}")
        res.dataset, res.figures, res.grid, res.images_per_second = src.dataset, src.figures, src.grid, src.images_per_second
        res.uses_real = src.uses_real
        self._fill(res, self._student(f"student_{name}", src.dataset, row.train))

    def _row_distill(self, name: str, row: RowConfig, res: RowResult) -> None:
        g = self.assets.ldms[row.ldm or "cpd25"]
        student = load_job(self.cfg.student.config, [*self.cfg.student.overrides, "data.train=unused"], kind="train")
        kwargs = {**student.backbone.kwargs, "embedding_dim": self.assets.context_dim}
        size = kwargs.get("input_size", [112, 112])
        over = [f"name={name}", f"output.uri={os.path.join(self.cfg.output, 'distill')}", f"seed={self.cfg.world.seed}",
                "generator.type=ldm", f"generator.path={g['unet']}", f"generator.vq_decoder={g['vq_decoder']}",
                f"generator.vq_config={json.dumps(g['vq_config'])}", f"generator.latent_shape={json.dumps(g['latent_shape'])}",
                "generator.crop=resize", f"teacher={self.assets.teacher}", f"student.name={student.backbone.name}",
                f"student.kwargs={json.dumps(kwargs)}", f"crop_size={int(size[0])}", f"eval.bins=[{self.bins}]",
                *self._placeholders(row.overrides), *(row.tiny if self.cfg.tiny else []), *self.tracking]
        epochs = load_job(row.config, over, kind="distill").epochs
        out = run_job(load_job(row.config, [*over, f"eval.every_epochs={epochs}"], kind="distill"))  # the last only
        self._fill(res, out)
        res.images_per_second = out.metrics.get("images_per_second")
        res.metrics = {k: out.metrics[k] for k in ("val/cos", "val/cos_initial", "val/cos_constant") if k in out.metrics}

    @staticmethod
    def _fill(res: RowResult, outcome) -> None:
        res.verification, res.model = outcome.verification, outcome.model_uri
