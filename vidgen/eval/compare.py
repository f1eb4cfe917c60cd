"""The nightly comparison, pure: tonight's metrics against the last good night of the same suite and label.

`Night` (one night's metrics and status) and `Comparison` (deltas, regressed metrics, verdict) are the data
that `vidgen.eval.nightly` computes and `vidgen.eval.report` renders; `last_good` picks the baseline and
`compare` judges tonight against it. Nothing here touches MLflow, Ray or storage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass
class Night:
    """One night of one (suite, checkpoint label): what the report and the comparison need."""

    date: str
    metrics: dict[str, float]
    run_id: str = ""
    status: str = "FINISHED"  # MLflow run status
    regressed: bool = False

    @property
    def good(self) -> bool:
        return self.status == "FINISHED" and not self.regressed


@dataclass
class Comparison:
    baseline: Night | None
    deltas: dict[str, float]  # relative change (tonight - baseline) / |baseline| per shared metric
    regressed: list[str]  # judged metrics that moved for the worse beyond their threshold

    @property
    def verdict(self) -> str:
        return "first" if self.baseline is None else "regressed" if self.regressed else "ok"


def last_good(nights: Iterable[Night], date: str) -> Night | None:
    """The latest good night strictly before `date` (ISO dates sort as strings)."""
    earlier = [n for n in nights if n.good and n.date < date]
    return max(earlier, key=lambda n: n.date, default=None)


def relative_change(value: float, base: float) -> float:
    if base == value:
        return 0.0
    return (value - base) / abs(base) if base else math.copysign(math.inf, value - base)


def compare(tonight: Mapping[str, float], baseline: Night | None, thresholds: Mapping[str, float],
            higher_is_better: Iterable[str] = ()) -> Comparison:
    """Relative deltas for every metric both nights have; the judged ones beyond threshold are regressions.

    A judged metric that is NaN tonight (a failed computation) regresses; one missing tonight too, since a
    metric that silently disappears must not pass.
    """
    if baseline is None:
        return Comparison(None, {}, [])
    up = set(higher_is_better)
    deltas = {k: relative_change(v, baseline.metrics[k]) for k, v in tonight.items()
              if k in baseline.metrics and not (math.isnan(v) or math.isnan(baseline.metrics[k]))}
    regressed = []
    for name, limit in sorted(thresholds.items()):
        if name not in baseline.metrics:
            continue  # nothing to compare with
        if name not in deltas:
            regressed.append(name)  # missing or NaN tonight
            continue
        worse = -deltas[name] if name in up else deltas[name]
        if worse > limit:
            regressed.append(name)
    return Comparison(baseline, deltas, regressed)
