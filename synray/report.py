"""``synray report``: what is in a dataset, for any dataset synray reads (its shards, ``rec://``, ``folder://``).

Counts and the images-per-identity histogram come from the whole dataset (footers, index, listing and identity
columns; no image is decoded). With ``model`` an evenly spread subset (``identities`` x ``images_per_identity``) is
embedded on this process: identity consistency, genuine/impostor separability, each identity's nearest other one,
near-duplicate identities and, with ``reference``, each identity's nearest reference identity (leakage from the
generator's training identities). The result is printed as a table and written as ``report.json`` with PNG plots
and a sample grid to ``output.uri``, and logged to the job's MLflow run.

The work is bounded by the subset, not the dataset's size, so it runs without Ray.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from synray.config.base import ConfigError
from synray.config.report import ReportConfig
from synray.errors import UserError
from synray.evaluation import identity_stats as S
from synray.evaluation.roc_plots import log_artifacts
from synray.io import storage
from synray.io.images import decode_image
from synray.io.sources import ImageSource, is_foreign, open_source
from synray.jobs import JobContext, Outcome
from synray.plots import bar_png, dataset_grid, encode_png, histogram_png
from synray.synthesis.contexts import ContextError, load_embeddings
from synray.synthesis.embedders import Embedder

__all__ = ["ReportError", "spread", "count_stats", "embed_identities", "load_reference", "build_report", "check",
           "needs", "run"]

EMBEDDING_FILES = (".npy", ".npz", ".parquet")


class ReportError(UserError, ValueError):
    """The report cannot be made as configured (no rows, a reference of another embedding width, ...)."""


def spread(ids: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` of the sorted ``ids``, evenly spaced (all when there are fewer)."""
    if ids.size <= k:
        return ids
    return ids[np.unique(np.linspace(0, ids.size - 1, k).round().astype(int))]


def count_stats(src: ImageSource) -> dict[str, Any]:
    """Rows, identities, images per identity (summary and histogram) and, for synray shards, rows per kind."""
    ident = src.row_identity()
    _, counts = np.unique(ident, return_counts=True)
    values, freq = np.unique(counts, return_counts=True)
    out: dict[str, Any] = {
        "source": src.uri, "kind": src.kind, "rows": int(src.rows), "identities": int(counts.size),
        "images_per_identity": {"min": int(counts.min()), "median": float(np.median(counts)), "mean": float(counts.mean()),
                                "max": int(counts.max())} if counts.size else None,
        "images_per_identity_histogram": {str(int(v)): int(f) for v, f in zip(values, freq)},
    }
    if src.kind == "shards":
        kinds: dict[str, int] = {}
        for meta in src.detail.metas.values():
            for k, c in (meta.get("stats") or {}).get("kinds", {}).items():
                kinds[k] = kinds.get(k, 0) + int(c)
        out["kinds"] = kinds
    return out


def embed_identities(src: ImageSource, embedder: Embedder, identities: np.ndarray, per_identity: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and identity labels of up to ``per_identity`` images of each identity (its first ones)."""
    rows = src.identity_rows(identities.tolist(), per_identity)
    flat = [r for i in identities.tolist() for r in rows[int(i)]]
    labels = np.array([int(i) for i in identities.tolist() for _ in rows[int(i)]], np.int64)
    data = src.read_rows(flat)
    images = [decode_image(bytes(b), str(p)) for b, p in zip(data["image"], data["path"])]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:  # embed_faces resizes a batch to the model's input; one shape per batch
        from synray.evaluation.evaluate import fit_images

        size = max(sizes)[:2]
        images = [fit_images(im[None], size)[0] for im in images]
    emb = embedder.embed(np.stack(images)) if images else np.zeros((0, 1), np.float32)
    return emb, labels


def load_reference(cfg: ReportConfig, embedder: Embedder) -> tuple[np.ndarray, str]:
    """Reference identity embeddings (one row each): a file of embeddings, or the centres of a dataset's identities."""
    ref = cfg.reference
    if not is_foreign(ref) and ref.endswith(EMBEDDING_FILES):
        try:
            if ref.endswith(".npz"):
                import io

                with np.load(io.BytesIO(storage.read_bytes(ref)), allow_pickle=False) as blob:
                    if "embeddings" not in blob.files:
                        raise ReportError(f"reference: {ref} has no 'embeddings' array (has {blob.files})")
                    table = np.asarray(blob["embeddings"], np.float32)
            else:
                table = load_embeddings(ref)
        except ContextError as exc:
            raise ReportError(f"reference: {exc}") from None
        return S.normalize(table), "embeddings file"
    src = open_source(ref, allow_incomplete=cfg.allow_incomplete)
    emb, labels = embed_identities(src, embedder, spread(src.identities, cfg.reference_identities), cfg.images_per_identity)
    return S.centres(emb, labels)[1], f"{src.kind} dataset"


def build_report(cfg: ReportConfig, src: ImageSource, embedder: Embedder | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``(report, {file name: PNG})``."""
    report = count_stats(src)
    hist = report["images_per_identity_histogram"]
    files = {"images_per_identity.png": bar_png(list(hist), list(hist.values()), "images per identity",
                                                 "images of an identity", "identities")}
    files["samples.png"] = encode_png(dataset_grid(src, cfg.grid.identities, cfg.grid.samples, cfg.grid.tile))
    if embedder is None:
        return report, files
    picked = spread(src.identities, cfg.identities)
    emb, labels = embed_identities(src, embedder, picked, cfg.images_per_identity)
    ids, c = S.centres(emb, labels)
    cons = S.consistency(emb, labels)
    genuine, impostor = S.pair_cosines(emb, labels, seed=cfg.seed)
    near_j, near_cos = S.nearest_other(c) if len(c) > 1 else (np.zeros(0, int), np.zeros(0))
    dups = S.duplicate_pairs(ids, c, cfg.duplicate_threshold)
    report["model"] = {"spec": cfg.model, "embedding_dim": int(emb.shape[1]), "identities_embedded": int(ids.size),
                       "images_embedded": int(labels.size)}
    report["consistency"] = _summary(cons)
    report["separability"] = {"genuine": _summary(genuine), "impostor": _summary(impostor),
                              "fisher_ratio": S.fisher_ratio(genuine, impostor)}
    report["nearest_identity"] = _summary(near_cos)
    report["near_duplicates"] = {"threshold": cfg.duplicate_threshold, "pairs": len(dups),
                                 "top": [{"a": a, "b": b, "cosine": s} for a, b, s in dups[:20]]}
    files["similarity.png"] = histogram_png({"genuine pairs": genuine, "impostor pairs": impostor},
                                            "image-pair cosine", "cosine", cfg.bins)
    files["nearest_identity.png"] = histogram_png({"nearest other identity": near_cos}, "identity centres: nearest other",
                                                  "cosine", cfg.bins, {"duplicate": cfg.duplicate_threshold})
    if cfg.reference:
        ref, what = load_reference(cfg, embedder)
        if ref.shape[1] != c.shape[1]:
            raise ReportError(f"reference: {ref.shape[1]}-d embeddings, the model gives {c.shape[1]}-d")
        j, cos = S.nearest_reference(c, ref)
        leaked = cos > cfg.leakage_threshold
        order = np.argsort(-cos, kind="stable")[:20]
        report["leakage"] = {"reference": cfg.reference, "reference_kind": what, "reference_identities": int(len(ref)),
                             "threshold": cfg.leakage_threshold, "leaked": int(leaked.sum()),
                             "fraction": float(leaked.mean()) if leaked.size else 0.0, "nearest": _summary(cos),
                             "top": [{"identity": int(ids[k]), "reference_row": int(j[k]), "cosine": float(cos[k])}
                                     for k in order]}
        files["leakage.png"] = histogram_png({"nearest reference identity": cos}, "leakage: nearest reference identity",
                                             "cosine", cfg.bins, {"leak": cfg.leakage_threshold})
    return report, files


def _summary(x: np.ndarray) -> dict[str, float] | None:
    x = np.asarray(x, np.float64)
    if not x.size:
        return None
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "p05": float(np.percentile(x, 5)), "median": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "max": float(x.max())}


def format_report(r: dict[str, Any]) -> str:
    """The report as the console table."""
    lines = [f"{'dataset':<38} {r['source']} ({r['kind']})"]
    ipi = r["images_per_identity"] or {}
    lines.append(f"{'images / identities':<38} {r['rows']} / {r['identities']}")
    if ipi:
        lines.append(f"{'images per identity':<38} min {ipi['min']}  median {ipi['median']:g}  mean {ipi['mean']:.1f}  "
                     f"max {ipi['max']}")
    if r.get("kinds"):
        lines.append(f"{'images by kind':<38} " + "  ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items())))
    if "model" in r:
        m = r["model"]
        lines.append(f"{'model':<38} {m['spec']} ({m['embedding_dim']}-d; {m['identities_embedded']} identities, "
                     f"{m['images_embedded']} images embedded)")
        c, s = r["consistency"], r["separability"]
        lines.append(f"{'identity consistency (cos to centre)':<38} mean {c['mean']:.3f}  p05 {c['p05']:.3f}  min {c['min']:.3f}")
        g, i = s["genuine"], s["impostor"]
        if g and i:
            lines.append(f"{'genuine / impostor pair cosine':<38} {g['mean']:.3f} / {i['mean']:.3f}  "
                         f"Fisher ratio {s['fisher_ratio']:.2f}")
        n = r["nearest_identity"]
        if n:
            lines.append(f"{'nearest other identity (cosine)':<38} mean {n['mean']:.3f}  p95 {n['p95']:.3f}  max {n['max']:.3f}")
        d = r["near_duplicates"]
        top = ", ".join(f"({p['a']}, {p['b']}) {p['cosine']:.3f}" for p in d["top"][:3])
        lines.append(f"{'near-duplicate identities':<38} {d['pairs']} pair(s) above {d['threshold']:g}" + (f": {top}" if top else ""))
    if "leakage" in r:
        lk = r["leakage"]
        lines.append(f"{'leakage (nearest reference cosine)':<38} {lk['leaked']} of {r['model']['identities_embedded']} "
                     f"identities above {lk['threshold']:g} ({100 * lk['fraction']:.1f}%); max {lk['nearest']['max']:.3f} "
                     f"vs {lk['reference_identities']} reference identities")
    return "\n".join(lines)


def check(cfg: ReportConfig) -> None:
    """The dataset opens and the model loads before anything is computed."""
    open_source(cfg.source, allow_incomplete=cfg.allow_incomplete)
    if cfg.model:
        try:
            Embedder(cfg.model, batch_size=1)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"model: {exc}") from None


def needs(cfg: ReportConfig) -> None:
    return None  # bounded work on this process (see the module docstring)


def run(cfg: ReportConfig, ctx: JobContext) -> Outcome:
    t0 = time.perf_counter()
    src = open_source(cfg.source, allow_incomplete=cfg.allow_incomplete)
    if src.rows == 0:
        raise ReportError(f"{cfg.source}: no rows")
    embedder = Embedder(cfg.model, batch_size=cfg.batch_size) if cfg.model else None
    report, files = build_report(cfg, src, embedder)
    report["seconds"] = time.perf_counter() - t0
    table = format_report(report)
    files = {"report.json": json.dumps(report, indent=2).encode(), "report.txt": (table + "\n").encode(), **files}
    out = cfg.output.uri
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(out, name), data)
    log_artifacts(ctx.tracker, files)
    metrics = {"rows": report["rows"], "identities": report["identities"]}
    if "model" in report:
        metrics.update({"consistency_mean": report["consistency"]["mean"], "near_duplicate_pairs": report["near_duplicates"]["pairs"],
                        "fisher_ratio": report["separability"]["fisher_ratio"]})
    if "leakage" in report:
        metrics.update({"leakage_fraction": report["leakage"]["fraction"], "leakage_max": report["leakage"]["nearest"]["max"]})
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if v is not None and np.isfinite(v)})
    return Outcome("report", out, metrics, table=f"{table}\n\nfiles: {'  '.join(sorted(files))}",
                   extra={"files": {name: storage.join(out, name) for name in files}})
