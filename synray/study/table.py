"""The study's table: one line per row (verification, dataset figures, images/s), then the claims."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["COLUMNS", "format_table", "format_claims"]

#: (header, source, key, format): source ``v`` = verification accuracy (%), ``f`` = dataset figure, ``r`` = row field
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("frontal", "v", "world-frontal", "{:.1f}"),
    ("hard", "v", "world-hard", "{:.1f}"),
    ("avg", "v", "average", "{:.1f}"),
    ("cons", "f", "consistency", "{:.3f}"),
    ("FDR", "f", "fdr", "{:.2f}"),
    ("near-oth", "f", "nearest_other", "{:.3f}"),
    ("emb-spr", "f", "embedding_spread", "{:.3f}"),
    ("pose°", "f", "spread/pose", "{:.1f}"),
    ("expr", "f", "spread/expression", "{:.3f}"),
    ("light", "f", "spread/light", "{:.3f}"),
    ("near-trn", "f", "nearest_training", "{:.3f}"),
    ("img/s", "r", "images_per_second", "{:.1f}"),
)


def _cell(row: Any, source: str, key: str, fmt: str) -> str:
    if source == "v":
        v = (row.verification or {}).get(key)
        return "-" if v is None else fmt.format(100 * v["accuracy"])
    v = row.figures.get(key) if source == "f" else getattr(row, key, None)
    return "-" if v is None else fmt.format(v)


def format_table(rows: Mapping[str, Any], width: int = 34) -> str:
    """Rows in order; ``*`` marks training data with real images in it."""
    head = f"{'row':<{width}}" + "".join(f"{h:>9}" for h, *_ in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows.values():
        label = (r.label + (" *" if r.uses_real and r.name != "real" else ""))[:width - 1]
        lines.append(f"{label:<{width}}" + "".join(f"{_cell(r, *c[1:]):>9}" for c in COLUMNS))
    lines += ["", "frontal/hard/avg: student verification accuracy (%) on world-frontal / world-hard; figures by the "
                  "teacher on each row's training images:",
              "cons: mean cosine to the identity centroid; FDR: Fisher ratio of genuine vs impostor cosines; near-oth: "
              "nearest other identity (centroid cosine);",
              "emb-spr: within-identity cosine distance; pose°/expr/light: within-identity spread of the nuisance "
              "(world: true factors; generated: read by the regressor);",
              "near-trn: nearest LDM-training identity (leakage); img/s: synthesis images/s end to end "
              "(distillation: student images/s); * real images in the training data"]
    return "\n".join(lines)


def format_claims(results: Mapping[str, Any], asserted: Sequence[str] = ()) -> str:
    lines = ["claims (each seed paper's headline, on this run's numbers):"]
    for name, c in results.items():
        mark = {True: "holds", False: "DOES NOT HOLD", None: "not measured"}[c.holds]
        figs = ", ".join(f"{k} {v:.4g}" for k, v in c.figures.items() if isinstance(v, (int, float)))
        ci = " [asserted in CI]" if name in asserted else ""
        lines.append(f"  {c.paper}: {c.text} -> {mark}{ci}\n      {figs}")
    return "\n".join(lines)
