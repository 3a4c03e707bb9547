"""The study's world assets: the quickstart's teacher and LDM, plus what the rows need beside them.

Beside the shipped ``teacher.pt`` / ``unet.ckpt`` (IDiff-Face flavour, CPD 0.25) / ``vq_decoder.pt``
(``synray quickstart --rebuild-assets``), ``synray study --rebuild-assets`` writes into the same folder:

* ``unet_cpd0.ckpt`` + ``vq_decoder_cpd0.pt``: the same LDM recipe with CPD 0 (IDiff-Face's ablation);
* ``unet_uiface.ckpt`` + ``vq_decoder_uiface.pt``: UIFace's flavour (learnable empty context, 20% of training
  contexts replaced by it), which its two-stage sampler and unconditional sampling need;
* ``nuisance.pt``: the pose / expression / light regressor (:mod:`synray.study.nuisance`);
* ``cfsm.pt``: a CFSM synthesis model fitted on the world (:mod:`synray.study.cfsm_world`);
* ``training_centroids.npy``: the teacher's identity centroids of the LDMs' training split (identity leakage);
* ``study.json``: what was built, how, and the fits' figures.

Every LDM is trained by ``synray train-ldm`` with the quickstart's LDM stage and overrides (the same job a
user runs), on the same real split of the assets' world.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from synray.quickstart import has_assets, load_assets

__all__ = ["STUDY_FILE", "EXTRA_LDMS", "StudyAssets", "has_study_assets", "load_study_assets", "write_study_meta"]

STUDY_FILE = "study.json"
#: the extra LDMs: name -> the train-ldm overrides that make them from the quickstart's LDM recipe
EXTRA_LDMS: dict[str, list[str]] = {"cpd0": ["unet.context_dropout=0.0"], "uiface": ["unet.flavour=uiface"]}
FILES = ("nuisance.pt", "cfsm.pt", "training_centroids.npy", STUDY_FILE)


@dataclass
class StudyAssets:
    folder: str
    teacher: str
    context_dim: int
    ldms: dict[str, dict[str, Any]]  # name -> synthesis ``generator:`` block (type ldm)
    nuisance: str
    cfsm: str
    cfsm_generator: dict[str, Any]
    training_centroids: np.ndarray
    world: dict[str, Any]  # the world split the LDMs and the teacher were trained on
    meta: dict[str, Any]


def ldm_files(name: str) -> tuple[str, str]:
    return f"unet_{name}.ckpt", f"vq_decoder_{name}.pt"


def has_study_assets(folder: str) -> bool:
    files = [*FILES, *(f for n in EXTRA_LDMS for f in ldm_files(n))]
    return has_assets(folder) and all(os.path.exists(os.path.join(folder, f)) for f in files)


def load_study_assets(folder: str) -> StudyAssets:
    """The quickstart's assets and the study's extras in ``folder``; an error names what is missing."""
    if not has_study_assets(folder):
        missing = [f for f in (*FILES, *(f for n in EXTRA_LDMS for f in ldm_files(n)))
                   if not os.path.exists(os.path.join(folder, f))]
        raise FileNotFoundError(f"study assets missing in {folder}: {missing or 'the quickstart assets'}; "
                                "run `synray study --rebuild-assets` (with --set assets=DIR for another folder)")
    base = load_assets(folder)
    with open(os.path.join(folder, STUDY_FILE)) as fh:
        meta = json.load(fh)
    ldms = {"cpd25": base["generator"]}
    for name in EXTRA_LDMS:
        gen = dict(meta["ldms"][name])
        unet, vq = ldm_files(name)
        ldms[name] = {**gen, "unet": os.path.join(folder, unet), "vq_decoder": os.path.join(folder, vq)}
    return StudyAssets(folder=folder, teacher=base["teacher"], context_dim=int(base["meta"]["context_dim"]), ldms=ldms,
                       nuisance=os.path.join(folder, "nuisance.pt"), cfsm=os.path.join(folder, "cfsm.pt"),
                       cfsm_generator=dict(meta["cfsm"]["generator"]),
                       training_centroids=np.load(os.path.join(folder, "training_centroids.npy")),
                       world=dict(base["meta"]["world"]), meta=meta)


def copy_ldm(generator: dict[str, Any], folder: str, name: str) -> dict[str, Any]:
    """Copy a finished train-ldm run's EMA UNet and decoder into ``folder``; returns their generator block."""
    from synray.io import storage

    unet, vq = ldm_files(name)
    for key, file in (("unet", unet), ("vq_decoder", vq)):
        with open(os.path.join(folder, file), "wb") as fh:
            fh.write(storage.read_bytes(generator[key]))
    return {**generator, "unet": unet, "vq_decoder": vq}


def write_study_meta(folder: str, meta: dict[str, Any]) -> None:
    tmp = os.path.join(folder, STUDY_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=2, default=str)
    shutil.move(tmp, os.path.join(folder, STUDY_FILE))
