"""The nightly comparison, pure: tonight's metrics against the last good night of the same suite and label.

`Night` (one night's metrics, eval params and status) and `Comparison` (deltas, regressed metrics, the rule that
judged each, verdict) are the data that `vidgen.eval.nightly` computes and `vidgen.eval.report` renders;
`last_good` picks the baseline and `compare` judges tonight against it. Nothing here touches MLflow, Ray or
storage.

A metric `m` may come with a noise interval as the metrics `m_lo` and `m_hi` (FVD and KVD from
`vidgen.eval.bootstrap`: where `m` on a fresh draw of as many clips would fall, e.g. `fvd_lo`,
`windows/early/fvd_hi`); NaN bounds mean intervals were off. How a judged metric (one with a threshold) is
judged, see `compare`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LO, HI = "_lo", "_hi"
HIGHER, LOWER, NEITHER, COUNT = "higher is better", "lower is better", "neither (descriptive)", "count"
# Each known metric's direction by its definition. FVD, KVD (distances to the real set) and VBench's flicker MAE
# (mean absolute difference of consecutive frames, 0..255) are lower-is-better; VBench's temporal_flickering_score
# is (255 - mae) / 255, 1 for no flicker; motion magnitude only describes how much moves. Unknown metrics are
# lower-is-better unless `nightly.higher_is_better` names them.
KNOWN_DIRECTIONS = {"fvd": LOWER, "kvd": LOWER, "temporal_flickering_mae": LOWER,
                    "temporal_flickering_score": HIGHER, "motion_magnitude": NEITHER}
RULE_INTERVAL, RULE_THRESHOLD, RULE_MISSING = "interval", "threshold", "missing"


@dataclass
class Night:
    """One night of one (suite, checkpoint label): what the report and the comparison need."""

    date: str
    metrics: dict[str, float]
    run_id: str = ""
    status: str = "FINISHED"  # MLflow run status
    regressed: bool = False
    params: dict[str, str] = field(default_factory=dict)  # what the numbers depend on: "fvd.protocol", ...

    @property
    def good(self) -> bool:
        return self.status == "FINISHED" and not self.regressed


@dataclass
class Comparison:
    baseline: Night | None
    deltas: dict[str, float]  # relative change (tonight - baseline) / |baseline| per shared metric
    regressed: list[str]  # judged metrics that moved for the worse beyond their noise and threshold
    # per judged metric compared, the rule that judged it (regressed or not): "interval" (both nights had a
    # noise interval), "threshold" (at least one had none) or "missing" (NaN or absent tonight)
    rules: dict[str, str] = field(default_factory=dict)

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


def bounds(metrics: Mapping[str, float], name: str) -> tuple[float, float] | None:
    """(lo, hi) of `name`'s noise interval when the metrics carry a finite one, else None."""
    lo, hi = metrics.get(name + LO), metrics.get(name + HI)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return float(lo), float(hi)


def is_bound(name: str, metrics: Mapping[str, float]) -> bool:
    """Whether `name` is the lower or upper end of another metric's interval in `metrics` (`fvd_lo` beside
    `fvd`), rather than a metric of its own."""
    return name.endswith((LO, HI)) and name[: -len(LO)] in metrics


def direction(name: str, higher_is_better: Iterable[str] = ()) -> str:
    """HIGHER, LOWER, NEITHER or COUNT for a metric name as logged (`windows/early/fvd`,
    `temporal_flickering_score_mean`); names in `higher_is_better` are HIGHER whatever vidgen knows of them."""
    if name in set(higher_is_better):
        return HIGHER
    if name.startswith(("n_", "generate/")):
        return COUNT
    base = name.rsplit("/", 1)[-1]
    for key in (base, base.removesuffix("_mean"), base.removesuffix("_median")):
        if key in KNOWN_DIRECTIONS:
            return KNOWN_DIRECTIONS[key]
    return LOWER


def compare(tonight: Mapping[str, float], baseline: Night | None, thresholds: Mapping[str, float],
            higher_is_better: Iterable[str] = ()) -> Comparison:
    """Relative deltas for every metric both nights have (interval bounds aside); judged metrics (those with a
    threshold) that moved for the worse beyond the noise are regressions.

    A judged metric m with a finite interval (m_lo, m_hi) on both nights regresses only when tonight's value is
    worse beyond both intervals: outside the baseline's interval and the baseline's value outside tonight's, on
    the worse side (lower is better: tonight's m > the baseline's m_hi and the baseline's m < tonight's m_lo).
    Each interval is where a rerun of that night on fresh clips would land (95%), so a night that merely drew
    other clips stays within them; the test is about a 5% one on the difference. AND its relative change must
    be worse than its threshold: the threshold is
    then the smallest effect worth a red night, the intervals keep noise out (threshold 0: the intervals alone
    judge). Without an interval on either night (older runs, intervals off) the threshold alone judges, as
    before: worse by more than `thresholds[m]`, relative. Either way a judged metric that is NaN tonight (a
    failed computation) regresses; one missing tonight too, since a metric that silently disappears must not
    pass. `Comparison.rules` says which rule judged each.
    """
    if baseline is None:
        return Comparison(None, {}, [])
    up = {k for k in [*tonight, *thresholds] if direction(k, higher_is_better) == HIGHER}
    base = baseline.metrics
    deltas = {k: relative_change(v, base[k]) for k, v in tonight.items()
              if k in base and not (math.isnan(v) or math.isnan(base[k])) and not is_bound(k, tonight)}
    regressed, rules = [], {}
    for name, limit in sorted(thresholds.items()):
        if name not in base:
            continue  # nothing to compare with
        if name not in deltas:
            regressed.append(name)  # missing or NaN tonight
            rules[name] = RULE_MISSING
            continue
        worse = -deltas[name] if name in up else deltas[name]
        now, then = bounds(tonight, name), bounds(base, name)
        if now is not None and then is not None:
            rules[name] = RULE_INTERVAL
            value, base_value = tonight[name], base[name]
            beyond_noise = (value < then[0] and base_value > now[1]) if name in up else \
                (value > then[1] and base_value < now[0])
            bad = beyond_noise and worse > limit
        else:
            rules[name] = RULE_THRESHOLD
            bad = worse > limit
        if bad:
            regressed.append(name)
    return Comparison(baseline, deltas, regressed, rules)
