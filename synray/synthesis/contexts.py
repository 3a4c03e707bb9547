"""Identity contexts, one row per identity (pure numpy; no Ray, no models).

* ``gaussian``: unit-sphere Gaussian contexts (IDiff-Face).
* ``embeddings_file``: rows of a ``.npy``/``.parquet`` file, re-normalised (UIFace, ADMIS files).
* ``mixup``: SynFace identity mixup, ``normalize(phi * c_i + (1 - phi) * c_partner)`` with a partner
  and a ``phi`` drawn for every image (SynFace's grid 0, 0.05, ..., 1), recorded as the image's soft label.
* ``face_embeddings`` is computed by an embedder in the pipeline and enters here as a file.

The separation filter rejects a context whose cosine to an accepted one exceeds ``max_cosine``; the
k-th candidate of identity i comes from ``(seed, i, k)`` so the result is independent of scheduling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from synray.errors import UserError
from synray.seeds import CONTEXT, PARTNER, rng

#: SynFace's mixing grid ``np.linspace(0, 1.05, 21, endpoint=False)`` rounded to 3 decimals: 0, 0.05, ..., 1.0; the
#: weights of identity mixup here and the lambdas of domain mixup in training (kept free of torch: synthesis workers
#: that never run a network do not import it).
SYNFACE_LAMBDAS: tuple[float, ...] = tuple(float(v) for v in np.round(np.linspace(0, 1.05, 21, endpoint=False), 3))


class ContextError(UserError, ValueError):
    """A context source is missing, malformed or too small for the requested identities."""


@dataclass
class Contexts:
    """Contexts for identities ``ids``; ``partner``/``weight`` are the soft labels (-1 / 1.0 if unmixed).

    ``vectors`` is ``[identities, D]`` (one context per identity) or ``[identities, images, D]`` (one per image,
    identity mixup), and ``partner``/``weight`` are ``[identities]`` or ``[identities, images]`` alike.
    """

    ids: np.ndarray
    vectors: np.ndarray
    partner: np.ndarray
    weight: np.ndarray


def check_rows(vectors: np.ndarray, ids: np.ndarray, source: str) -> None:
    """Refuse NaN/inf and all-zero context rows, naming the identities: they would make images of no one."""
    v = np.asarray(vectors, dtype=np.float64).reshape(len(ids), -1)
    nonfinite = ~np.isfinite(v).all(axis=1)
    zero = ~nonfinite & ~(v != 0).any(axis=1)
    problems = []
    for mask, what in ((nonfinite, "NaN/inf values"), (zero, "all zeros")):
        bad = [int(i) for i in np.asarray(ids)[mask]]
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            problems.append(f"the context of identit{'y' if len(bad) == 1 else 'ies'} {bad[:5]}{more} holds {what}")
    if problems:
        raise ContextError(f"{source}: {'; '.join(problems)}")


def _normalize(v: np.ndarray, ids: np.ndarray | None = None, source: str = "contexts") -> np.ndarray:
    rows = np.atleast_2d(v)
    check_rows(rows, np.arange(len(rows)) if ids is None else np.atleast_1d(ids), source)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / n).astype(np.float32)


def gaussian_candidate(seed: int, identity: int, dim: int, attempt: int = 0) -> np.ndarray:
    return _normalize(rng(seed, identity, CONTEXT, attempt).standard_normal(dim), np.array([identity]))


def gaussian(seed: int, ids: np.ndarray, dim: int) -> np.ndarray:
    return np.stack([gaussian_candidate(seed, int(i), dim) for i in ids]) if len(ids) else np.zeros((0, dim), np.float32)


def separated_gaussian(seed: int, ids: np.ndarray, dim: int, max_cosine: float, max_tries: int) -> np.ndarray:
    """Sequential acceptance over identities in id order; identity i is compared with all j < i."""
    accepted = np.zeros((len(ids), dim), np.float32)
    for n, i in enumerate(ids):
        for attempt in range(max_tries):
            cand = gaussian_candidate(seed, int(i), dim, attempt)
            if n == 0 or float(np.max(accepted[:n] @ cand)) <= max_cosine:
                break
        else:
            raise ContextError(
                f"identity {int(i)}: no context with cosine <= {max_cosine} to the accepted ones after {max_tries} tries;"
                " lower the number of identities or raise contexts.separation.max_cosine"
            )
        accepted[n] = cand
    return accepted


def load_embeddings(path: str) -> np.ndarray:
    """Load an ``[N, D]`` embedding table from ``.npy`` or ``.parquet`` (one list column or D float columns)."""
    if not os.path.exists(path):
        raise ContextError(f"embeddings file not found: {path}")
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        elif path.endswith(".parquet"):
            table = pq.read_table(path)
            if table.num_columns == 1:
                arr = np.stack(table.column(0).to_numpy(zero_copy_only=False))
            else:
                arr = np.stack([table.column(i).to_numpy() for i in range(table.num_columns)], axis=1)
        else:
            raise ContextError(f"embeddings file {path}: expected .npy or .parquet")
    except ContextError:
        raise
    except Exception as exc:
        raise ContextError(f"cannot read embeddings file {path}: {exc}") from exc
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ContextError(f"embeddings file {path}: expected a 2-D [identities, dim] array, got shape {arr.shape}")
    return arr


def from_table(table: np.ndarray, ids: np.ndarray, dim: int, source: str) -> np.ndarray:
    if table.shape[1] != dim:
        raise ContextError(f"{source}: embeddings have dimension {table.shape[1]}, contexts.dim is {dim}")
    if len(ids) and int(ids.max()) >= len(table):
        raise ContextError(f"{source}: {len(table)} rows, but identity {int(ids.max())} was requested")
    return _normalize(table[ids], ids, f"{source} (row = identity)")


def mixup(seed: int, ids: np.ndarray, all_ids: np.ndarray, base: np.ndarray, images_per_identity: int,
          weights: Sequence[float] | None = None) -> Contexts:
    """SynFace identity mixup per image; ``base`` holds the unmixed contexts of ``all_ids`` (the whole run).

    Image k of identity i is made from ``normalize(phi_k * c_i + (1 - phi_k) * c_{p_k})``: SynFace
    (``data/syn_images.py``) picks, for every image of an identity, another identity ``p_k`` (without
    replacement while there are enough) and ``phi_k`` uniformly from its grid ``{0, 0.05, ..., 1}``
    (``weights``), so a class spans a range of mixes. Draws come from ``(seed, i)``'s partner stream only.
    """
    if len(all_ids) < 2:
        raise ContextError("identity mixup needs at least two identities")
    grid = np.asarray(SYNFACE_LAMBDAS if weights is None else weights, np.float64)
    n = int(images_per_identity)
    index = {int(i): k for k, i in enumerate(all_ids)}
    partners = np.empty((len(ids), n), np.int64)
    phis = np.empty((len(ids), n), np.float64)
    for row, i in enumerate(ids):
        r = rng(seed, int(i), PARTNER)
        others = np.delete(np.arange(len(all_ids)), index[int(i)])  # any identity but i itself
        partners[row] = np.asarray(all_ids)[r.choice(others, size=n, replace=n > len(others))]
        phis[row] = grid[r.integers(0, len(grid), size=n)]
    own = base[[index[int(i)] for i in ids]][:, None, :]
    other = base[[[index[int(p)] for p in row] for row in partners]]
    vec = phis[..., None] * own + (1 - phis[..., None]) * other
    flat = _normalize(vec.reshape(-1, vec.shape[-1]), np.repeat(ids, n), "identity mixup")
    return Contexts(ids, flat.reshape(vec.shape), partners, phis.astype(np.float32))
