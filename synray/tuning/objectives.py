"""Downstream objectives for LDM sweeps: how good are the identities a trained LDM samples?

The CPD ratio trades identity fidelity against diversity, and the diffusion loss does not show that
trade-off. These objectives sample ``identities x images_per_identity`` faces from the EMA model
(with ``objective.sampler``, DDIM-10 by default) and measure them with a frozen FR embedder:

* ``consistency``: mean cosine of each sample to its identity's mean embedding (same person?);
* ``separability``: mean same-identity pair cosine minus mean different-identity pair cosine;
* ``verification_accuracy``: best-threshold accuracy on every genuine pair and as many impostor pairs;
* ``student_accuracy`` (costlier): train a small student on the sampled set and report its verification
  accuracy on ``.bin`` sets (the papers' protocol, in miniature).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from synray.diffusion.sampling import Sampler, sample
from synray.evaluation.evaluate import evaluate_bins
from synray.models.inputs import embed_faces
from synray.world.teacher import fit_identity_model

__all__ = ["sample_identities", "identity_metrics", "training_contexts", "ldm_objective", "OBJECTIVES"]

OBJECTIVES = ("consistency", "separability", "verification_accuracy", "student_accuracy")


@torch.no_grad()
def sample_identities(unet: nn.Module, decoder: nn.Module, contexts: np.ndarray, images_per_identity: int,
                      latent_shape: tuple[int, ...], sampler: Sampler | dict, seed: int = 0,
                      batch_size: int = 32) -> np.ndarray:
    """uint8 RGB [K * M, H, W, 3], identity-major, sampled by ``sampler`` (a sampler config) on unit contexts [K, D].

    x_T and a stochastic sampler's noise come from one generator seeded ``seed``.
    """
    from synray.synthesis.generators import to_uint8

    was = unet.training
    unet.eval()
    ctx = torch.from_numpy(np.repeat(np.asarray(contexts, np.float32), images_per_identity, axis=0))
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((len(ctx), *latent_shape), generator=gen)
    device = next(unet.parameters()).device
    out = []
    try:
        for s in range(0, len(ctx), batch_size):
            z = sample(sampler, unet, noise[s:s + batch_size].to(device), ctx[s:s + batch_size].to(device), generator=gen)
            out.append(to_uint8(decoder.decode(z)))
    finally:
        unet.train(was)
    return np.concatenate(out)


def identity_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Consistency, separability and verification accuracy of L2-normalised embeddings with identity labels."""
    emb = np.asarray(embeddings, np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("identity metrics need at least two identities")
    cons = []
    for i in np.unique(labels):
        e = emb[labels == i]
        m = e.mean(0)
        cons.append(e @ (m / max(np.linalg.norm(m), 1e-12)))
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(same, dtype=bool), 1)
    genuine, impostor = sim[same & upper], sim[~same & upper]
    if genuine.size == 0:
        raise ValueError("identity metrics need at least two images per identity")
    rng = np.random.default_rng(0)
    impostor_bal = rng.choice(impostor, size=min(len(impostor), len(genuine)), replace=False)
    scores = np.concatenate([genuine, impostor_bal])
    truth = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor_bal), bool)])
    acc = max(float(np.mean((scores >= t) == truth)) for t in np.unique(scores))
    return {"consistency": float(np.mean(np.concatenate(cons))),
            "separability": float(genuine.mean() - impostor.mean()),
            "verification_accuracy": acc}


def training_contexts(info, identities: int) -> np.ndarray:
    """The L2-normalised mean training context of the first ``identities`` identities of an encoded set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synray.io import storage

    tables = []
    for uri in info.files:
        loc = storage.resolve(uri)
        with loc.fs.open_input_file(loc.path) as fh:
            tables.append(pq.read_table(fh, columns=["identity", "context"]))
    t = pa.concat_tables(tables)
    ids = t.column("identity").to_numpy()
    ctx = np.stack([np.frombuffer(b, np.float32) for b in t.column("context").to_pylist()])
    chosen = np.unique(ids)[:identities]
    if len(chosen) < 2:
        raise ValueError(f"{info.uri}: the objective needs at least 2 training identities, found {len(chosen)}")
    means = np.stack([ctx[ids == i].mean(0) for i in chosen])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def ldm_objective(unet: nn.Module, decoder: nn.Module, embedder: nn.Module, contexts: np.ndarray,
                  latent_shape: tuple[int, ...], objective: Any, seed: int = 0) -> dict[str, float]:
    """Sample, embed and score; ``objective`` is a :class:`synray.config.sweep.ObjectiveConfig`.

    Returns ``objective/consistency``, ``objective/separability``, ``objective/verification_accuracy``
    and, for ``student_accuracy``, ``objective/student_accuracy``.
    """
    m = objective.images_per_identity
    images = sample_identities(unet, decoder, contexts, m, latent_shape, objective.sampler, seed)
    labels = np.repeat(np.arange(len(contexts)), m)
    emb = embed_faces(embedder, images, flip=False)
    out = {f"objective/{k}": v for k, v in identity_metrics(emb, labels).items()}
    if objective.name == "student_accuracy":
        out["objective/student_accuracy"] = student_accuracy(images, labels, objective, seed)
    return out


def student_accuracy(images: np.ndarray, labels: np.ndarray, objective: Any, seed: int = 0) -> float:
    """Average verification accuracy on ``objective.bins`` of a small student trained on the samples."""
    s = objective.student
    model, _ = fit_identity_model(images, labels, backbone=s.name, kwargs=s.kwargs, steps=s.steps,
                                  batch_size=s.batch_size, lr=s.lr, seed=seed)
    return float(evaluate_bins(model, objective.bins, flip=True)["average"]["accuracy"])

