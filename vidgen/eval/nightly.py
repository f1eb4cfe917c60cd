"""The nightly eval: generate a prompt suite with each checkpoint, score it (FVD, KVD, model-free metrics), log
one MLflow run per checkpoint tagged with the suite and the date, and compare it with the last good night.

    night = run_nightly(cfg)                  # cfg.nightly: suite, date, checkpoints, thresholds
    sys.exit(exit_status(night))              # 1 when any checkpoint regressed

"Good" night: its run FINISHED and was not tagged regressed. Tonight regresses when a judged metric
(`nightly.thresholds`) moved for the worse against the last good night of the same suite and checkpoint label:
when both nights carry its noise interval (`fvd_lo`/`fvd_hi`, `vidgen.eval.bootstrap`), only beyond both
intervals and by more than its relative threshold; without intervals, by more than its relative threshold
(`vidgen.eval.compare.compare`). The run then carries `nightly.regressed=true` and the rule that judged each
regressed metric (`nightly.regressed_rules`), and the job exits 1.

Idempotent per date: tonight's run is found by its tags (suite, date, label) and reused, and the output
folder `<output>/<suite>/<date>/<label>/` is the same, so generation skips the videos already written.
The comparison logic is pure (`vidgen.eval.compare`); MLflow and Ray live in the thin shells around it.
`vidgen.eval.nightly_job` is the entrypoint and the `ray job submit` side (one submission id per suite and
date; only SUCCEEDED counts as success). The report is `vidgen.eval.report`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vidgen import storage
from vidgen.config import VidgenConfig
from vidgen.errors import ConfigError, JobError, VidgenError
from vidgen.eval.compare import Comparison, Night, compare, last_good
from vidgen.eval.report import write_report
from vidgen.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)

TAG_SUITE, TAG_DATE, TAG_LABEL = "nightly.suite", "nightly.date", "nightly.checkpoint"
TAG_REGRESSED, TAG_VERDICT = "nightly.regressed", "nightly.verdict"
EXIT_OK, EXIT_REGRESSED = 0, 1


# ------------------------------------------------------------------------------------------- pure core


def night_date(date: str | None, now: dt.datetime | None = None) -> str:
    """The night being evaluated: the configured date, else today's UTC date."""
    return date or (now or dt.datetime.now(dt.UTC)).date().isoformat()


def submission_id(suite: str, date: str) -> str:
    return f"nightly-{suite}-{date}"


def result_metrics(result: Any) -> dict[str, float]:
    """Scalar metrics of an eval result, tolerant of its shape: fields, nested dicts, per-video rows.

    Counts get the CLI's names (`n_real`, `n_fake`); a dict of metrics (`metrics`, `model_free`, ...) is
    flattened under its own keys, other dicts under `<field>/<key>[/<key>]` (`windows/early/fvd`); without
    such a summary, a list of per-video rows contributes the mean of each numeric column.
    """
    if dataclasses.is_dataclass(result):
        raw = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    elif isinstance(result, Mapping):
        raw = dict(result)
    else:
        raw = dict(vars(result))
    rename = {"num_real": "n_real", "num_generated": "n_fake", "num_fake": "n_fake"}
    out: dict[str, float] = {}
    nested: list[tuple[str, Mapping]] = []
    rows: list[tuple[str, list]] = []
    for key, value in raw.items():
        if key == "params":
            continue
        if _is_number(value):
            out[rename.get(key, key)] = float(value)
        elif isinstance(value, Mapping):
            nested.append((key, value))
        elif isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
            rows.append((key, list(value)))
    summaries = ("metrics", "model_free", "summary", "extra", "video_metrics")
    for key, value in nested:
        for k, v in value.items():
            name = str(k) if key in summaries else f"{key}/{k}"
            if _is_number(v):
                out.setdefault(name, float(v))
            elif isinstance(v, Mapping):  # e.g. windows: {"early": {"fvd": .., "kvd": ..}}
                for k2, v2 in v.items():
                    if _is_number(v2):
                        out.setdefault(f"{name}/{k2}", float(v2))
    if any(key in summaries for key, _ in nested):
        rows = []  # the summary already has the per-video aggregates
    for _, value in rows:
        columns = {k for r in value for k, v in r.items() if _is_number(v)}
        for k in sorted(columns):
            vals = [float(r[k]) for r in value if _is_number(r.get(k))]
            out.setdefault(k, sum(vals) / len(vals))
    return out


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    return hasattr(v, "item") and getattr(v, "ndim", 1) == 0 and isinstance(v.item(), int | float)


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    metrics: dict[str, float]
    videos: list[str]  # generated videos, for the report's gallery
    params: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)  # the videos' prompts, for the gallery's captions


def real_set(cfg: VidgenConfig) -> str:
    real = cfg.eval.real or cfg.data.source
    if not real:
        raise ConfigError("eval.real: required for the nightly eval (the suite's real reference clips)")
    return real


def _need_tracking(cfg: VidgenConfig) -> None:
    if not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled=false: the nightly eval needs MLflow to find and record past nights")


def check_config(cfg: VidgenConfig) -> None:
    """What the config alone can refuse, before Ray starts and before an MLflow run or a folder is made."""
    from vidgen.eval.job import check_weights  # lazy: heavy (torch)
    from vidgen.generate.pipelines import check_family

    _need_tracking(cfg)
    real_set(cfg)
    for _, unet in checkpoints(cfg):  # the family's refusals and weights (model.path, each checkpoint's UNet, ...)
        check_family(cfg.model, cfg.generate.model_copy(update={"unet": unet}))
    check_weights(cfg)  # the feature network's


def measure_checkpoint(cfg: VidgenConfig, night_dir: str) -> Measured:
    """Generation with the job's settings into `night_dir/generated`, then FVD/KVD against eval.real."""
    from vidgen.eval.job import run_eval  # lazy: heavy (PIL, torch)
    from vidgen.generate.job import output_dir, run_generation

    real = real_set(cfg)
    rows = run_generation(cfg)  # raises past generate.max_failed_fraction; fewer failures are counted below
    made = [r for r in rows if r.get("status") in ("generated", "skipped") and (r.get("path") or r.get("uri"))]
    videos = [r.get("path") or r.get("uri") for r in made]
    if len(videos) < 2:
        raise JobError(f"generation: {len(videos)} of {len(rows)} videos made; FVD needs at least 2")
    res = run_eval(cfg, real, output_dir(cfg))  # the videos folder only (no gifs, manifest)
    counts = {"failed": 0}  # always logged, so a threshold on generate/failed has a value to judge
    for r in rows:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    params = dict(getattr(res, "params", None) or {})
    return Measured(result_metrics(res) | {f"generate/{k}": v for k, v in counts.items()},
                    videos, params, [str(r.get("prompt") or "") for r in made])


Measure = Callable[[VidgenConfig, str], Measured]


# ------------------------------------------------------------------------------------------- MLflow shell


class NightTracker(Tracker):
    """A `Tracker` whose run is tonight's run of one (suite, date, label): found by its tags, else created.

    A rerun the same day reopens that run instead of adding a second one; params it already has are kept
    (MLflow refuses to change a logged param), new ones are added.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str]):
        super().__init__(tracking_uri, experiment, run_name, enabled=True)
        self.tags = dict(tags)
        self.resumed = False
        self._params: dict[str, str] = {}

    def __enter__(self) -> NightTracker:
        from mlflow import MlflowClient  # lazy: heavy

        try:
            self._client = MlflowClient(tracking_uri=self._uri)
            self._experiment_id = self._ensure_experiment()
            found = self._client.search_runs([self._experiment_id], _tag_filter(self.tags), max_results=10,
                                             order_by=["attributes.start_time DESC"])
        except Exception as e:
            raise ConfigError(f"tracking.uri={self._uri!r}: cannot search MLflow experiment "
                              f"{self._experiment!r}: {e}") from e
        if found:
            run = found[0]
            self._run_id, self.resumed = run.info.run_id, True
            self._params = dict(run.data.params)
            self._client.update_run(self._run_id, status="RUNNING")
            log.info("resuming nightly run %s (%s)", self._run_name, self._run_id)
        else:
            super().__enter__()
        self.set_tags(self.tags)
        return self

    @property
    def client(self) -> Any:
        return self._client

    def log_params(self, params: Mapping[str, Any]) -> None:
        fresh = {k: v for k, v in params.items() if k not in self._params}
        self._params.update({k: str(v) for k, v in fresh.items()})
        super().log_params(fresh)


def _tag_filter(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def past_nights(client: Any, experiment_id: str, suite: str, label: str, exclude: str | None = None) -> list[Night]:
    """Every night of this suite and label in the experiment, oldest first (one per date: the newest run)."""
    runs = client.search_runs([experiment_id], _tag_filter({TAG_SUITE: suite, TAG_LABEL: label}),
                              max_results=5000, order_by=["attributes.start_time ASC"])
    by_date: dict[str, Night] = {}
    for r in runs:
        if r.info.run_id == exclude or TAG_DATE not in r.data.tags:
            continue
        by_date[r.data.tags[TAG_DATE]] = Night(
            date=r.data.tags[TAG_DATE], metrics=dict(r.data.metrics), run_id=r.info.run_id,
            status=r.info.status, regressed=r.data.tags.get(TAG_REGRESSED) == "true",
            params={k: v for k, v in r.data.params.items() if k.startswith("fvd.")})  # the protocol, for the report
    return sorted(by_date.values(), key=lambda n: n.date)


# ------------------------------------------------------------------------------------------- the job


@dataclass
class NightResult:
    label: str
    night: Night  # tonight
    comparison: Comparison
    report: str  # URI of the report's index.html
    resumed: bool


def nightly_root(cfg: VidgenConfig) -> str:
    return cfg.nightly.output or storage.join(cfg.run.workdir, "nightly")


def checkpoints(cfg: VidgenConfig) -> list[tuple[str, str | None]]:
    ckpts = cfg.nightly.checkpoints or {"default": cfg.generate.unet or ""}
    return [(label, path or None) for label, path in ckpts.items()]


def run_nightly(cfg: VidgenConfig, measure: Measure = measure_checkpoint,
                now: dt.datetime | None = None) -> list[NightResult]:
    """Tonight for every checkpoint; see the module docstring. Ray must be up when `measure` needs it.

    A checkpoint whose night fails (its run is marked FAILED) does not stop the others; the first such error
    is raised once all of them have run.
    """
    _need_tracking(cfg)
    date = night_date(cfg.nightly.date, now)
    results, errors = [], []
    for label, unet in checkpoints(cfg):
        try:
            results.append(run_night(cfg, label, unet, date, measure))
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other checkpoints
            if isinstance(e, VidgenError):  # bad input: its one line, not a stack trace
                log.error("nightly %s %s [%s] failed: %s", cfg.nightly.suite, date, label, e)
            else:
                log.exception("nightly %s %s [%s] failed", cfg.nightly.suite, date, label)
            errors.append(e)
    if errors:
        raise errors[0]
    return results


def run_night(cfg: VidgenConfig, label: str, unet: str | None, date: str, measure: Measure) -> NightResult:
    n = cfg.nightly
    night_dir = storage.join(nightly_root(cfg), n.suite, date, label)
    night_cfg = cfg.model_copy(deep=True)
    night_cfg.generate.unet = unet
    night_cfg.generate.output = storage.join(night_dir, "generated")
    night_cfg.nightly.date = date
    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.run.workdir)
    tags = {TAG_SUITE: n.suite, TAG_DATE: date, TAG_LABEL: label}
    with NightTracker(uri, cfg.tracking.experiment, f"nightly-{n.suite}-{date}-{label}", tags) as t:
        t.log_config(night_cfg.to_dict())
        t.set_tags({"vidgen.job": "nightly", "nightly.output": night_dir, "nightly.unet": unet or "(model's own)"})
        measured = measure(night_cfg, night_dir)
        t.log_params(measured.params)
        t.log_metrics(measured.metrics)
        history = past_nights(t.client, t.experiment_id, n.suite, label, exclude=t.run_id)
        baseline = last_good(history, date)
        cmp = compare(measured.metrics, baseline, n.thresholds, n.higher_is_better)
        t.log_metrics({f"delta/{k}": v for k, v in cmp.deltas.items() if math.isfinite(v)})
        t.set_tags({TAG_REGRESSED: str(bool(cmp.regressed)).lower(), TAG_VERDICT: cmp.verdict,
                    "nightly.regressed_metrics": ",".join(cmp.regressed) or "-",
                    "nightly.regressed_rules": ",".join(f"{m}={cmp.rules[m]}" for m in cmp.regressed) or "-",
                    "nightly.baseline_run": baseline.run_id if baseline else "-",
                    "nightly.baseline_date": baseline.date if baseline else "-"})
        tonight = Night(date, measured.metrics, t.run_id or "", "FINISHED", bool(cmp.regressed),
                        {k: str(v) for k, v in measured.params.items()})
        shown = [h for h in history if h.date < date][-(n.history - 1):] + [tonight]
        report = write_report(storage.join(night_dir, "report"), suite=n.suite, label=label, tonight=tonight,
                              comparison=cmp, history=shown, videos=measured.videos[: n.gallery],
                              thresholds=n.thresholds, higher_is_better=n.higher_is_better,
                              captions=measured.prompts[: n.gallery])
        t.log_artifact(storage.join(night_dir, "report"), "report")
        resumed = t.resumed
    if cmp.regressed:
        log.error("nightly %s %s [%s]: regressed on %s against %s", n.suite, date, label,
                  ", ".join(f"{m} ({cmp.rules[m]})" for m in cmp.regressed), baseline.date if baseline else "-")
    return NightResult(label, tonight, cmp, report, resumed)


def exit_status(results: Iterable[NightResult]) -> int:
    return EXIT_REGRESSED if any(r.comparison.regressed for r in results) else EXIT_OK


def summary(results: Iterable[NightResult]) -> list[dict[str, Any]]:
    return [{"label": r.label, "date": r.night.date, "verdict": r.comparison.verdict, "run_id": r.night.run_id,
             "metrics": r.night.metrics, "deltas": r.comparison.deltas, "regressed": r.comparison.regressed,
             "rules": r.comparison.rules,
             "baseline": r.comparison.baseline.date if r.comparison.baseline else None, "report": r.report,
             "resumed": r.resumed} for r in results]
