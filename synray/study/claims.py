"""The seed papers' headline claims as comparisons of the study's numbers (``claims:`` of a study config).

A claim holds when its row's figure beats its baseline row's (or reaches ``at_least``), and every ``also``
condition holds with it. Verification figures are the accuracies on the world's ``.bin`` sets
(``world-frontal``, ``world-hard``, ``average``); any other name is a dataset figure of the row
(``consistency``, ``spread/pose``, ...). ``gap_to_real`` compares how far below the real row each side is.
A claim whose rows were not made is ``None`` (not measured), never counted as holding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from synray.config.study import ClaimConfig

__all__ = ["ClaimResult", "figure_value", "evaluate", "evaluate_all"]

VERIFICATION = ("world-frontal", "world-hard", "average")


@dataclass
class ClaimResult:
    name: str
    paper: str
    text: str
    holds: bool | None
    figures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def figure_value(rows: Mapping[str, Any], row: str, figure: str) -> float | None:
    """A row's figure (a verification accuracy or a dataset figure), None when the row or figure is missing."""
    r = rows.get(row)
    if r is None:
        return None
    if figure in VERIFICATION:
        v = (r.verification or {}).get(figure)
        return None if v is None else float(v["accuracy"])
    v = r.figures.get(figure)
    return None if v is None else float(v)


def _side(rows: Mapping[str, Any], claim: ClaimConfig, row: str) -> float | None:
    v = figure_value(rows, row, claim.figure)
    if v is None or not claim.gap_to_real:
        return v
    real = figure_value(rows, "real", claim.figure)
    return None if real is None else real - v


def evaluate(name: str, claim: ClaimConfig, rows: Mapping[str, Any]) -> ClaimResult:
    """Whether ``claim`` holds on ``rows`` (name -> :class:`~synray.study.rows.RowResult`), with the figures it used."""
    what = f"gap to real {claim.figure}" if claim.gap_to_real else claim.figure
    res = ClaimResult(name, claim.paper, claim.text, None)
    mine = _side(rows, claim, claim.row)
    res.figures[f"{claim.row} {what}"] = mine
    if claim.baseline is not None:
        other = _side(rows, claim, claim.baseline)
        res.figures[f"{claim.baseline} {what}"] = other
        if mine is not None and other is not None:
            if claim.gap_to_real:  # a smaller gap is better
                res.holds = mine <= other if claim.allow_equal else mine < other
            else:
                res.holds = mine >= other if claim.allow_equal else mine > other
    elif mine is not None:
        res.figures["at least"] = claim.at_least
        res.holds = mine >= claim.at_least
    for k, sub in enumerate(claim.also):
        part = evaluate(f"{name}.also.{k}", sub, rows)
        res.figures.update(part.figures)
        if res.holds is not None:
            res.holds = None if part.holds is None else (res.holds and part.holds)
    return res


def evaluate_all(claims: Mapping[str, ClaimConfig], rows: Mapping[str, Any]) -> dict[str, ClaimResult]:
    return {name: evaluate(name, c, rows) for name, c in claims.items()}
