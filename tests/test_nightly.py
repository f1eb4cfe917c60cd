"""The nightly eval: comparison with the last good night, MLflow runs per (suite, date, checkpoint), idempotent
reruns, exit status, and the submit side's status handling. Runs against a real `mlflow server`.

Most nights are simulated through `run_nightly`'s `measure` seam (metric values chosen by the test, tiny
real mp4s written), so five nights take seconds; one night runs for real (tiny SVD -> tiny I3D on Ray).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from vidgen import storage
from vidgen.config import load_config
from vidgen.data.video import write_video
from vidgen.errors import JobError
from vidgen.eval.compare import Night, compare, last_good
from vidgen.eval.nightly import (
    Measured,
    exit_status,
    past_nights,
    result_metrics,
    run_nightly,
    submission_id,
)
from vidgen.eval.nightly_job import main, nightly_entrypoint, submit_nightly

# The token-authenticated Ray head on loopback that test_job_submit.py submits to (a module fixture).
ray_head = importlib.import_module("test_job_submit").ray_head


# ------------------------------------------------------------------------------------------- pure core


def test_compare_relative_per_metric_and_direction():
    base = Night("2026-01-01", {"fvd": 100.0, "kvd": 0.5, "clip_score": 0.30, "flicker": 2.0})
    thresholds = {"fvd": 0.10, "kvd": 0.25, "clip_score": 0.05}
    ok = compare({"fvd": 109.9, "kvd": 0.62, "clip_score": 0.29, "flicker": 9.0}, base, thresholds, ["clip_score"])
    assert ok.regressed == [] and ok.verdict == "ok"
    assert ok.deltas["fvd"] == pytest.approx(0.099) and ok.deltas["flicker"] == pytest.approx(3.5)  # not judged
    bad = compare({"fvd": 110.1, "kvd": 0.3, "clip_score": 0.28, "flicker": 2.0}, base, thresholds, ["clip_score"])
    assert bad.regressed == ["clip_score", "fvd"] and bad.verdict == "regressed"  # 6.7% lower clip score
    assert compare({"fvd": 10.0}, None, thresholds).verdict == "first"


def test_compare_nan_missing_and_zero_baseline():
    base = Night("d", {"fvd": 100.0, "kvd": 0.0})
    th = {"fvd": 0.1, "kvd": 0.1}
    assert compare({"fvd": math.nan, "kvd": 0.0}, base, th).regressed == ["fvd"]  # a failed metric never passes
    assert compare({"kvd": 0.0}, base, th).regressed == ["fvd"]  # nor a vanished one
    r = compare({"fvd": 100.0, "kvd": 0.01}, base, th)
    assert r.regressed == ["kvd"] and math.isinf(r.deltas["kvd"])
    assert compare({"fvd": 100.0, "kvd": 0.0}, base, th).regressed == []
    assert compare({"fvd": 1.0}, Night("d", {"clip": 1.0}), th).regressed == []  # nothing to compare with


def _ci(name: str, value: float, half: float) -> dict[str, float]:
    """A metric with its noise interval, as night metrics carry it."""
    return {name: value, f"{name}_lo": value - half, f"{name}_hi": value + half}


def test_compare_with_intervals_knows_noise_from_regression():
    th = {"fvd": 0.10}
    base = Night("d", _ci("fvd", 100.0, 15.0))  # [85, 115]
    noise = compare(_ci("fvd", 112.0, 15.0), base, th)  # +12%, past the threshold, but inside [85, 115]
    assert noise.regressed == [] and noise.rules == {"fvd": "interval"} and noise.verdict == "ok"
    assert noise.deltas == {"fvd": pytest.approx(0.12)}  # the bounds are no metrics of their own
    # Beyond the baseline's interval is not enough: the baseline must lie outside tonight's too.
    assert compare(_ci("fvd", 118.0, 20.0), base, th).regressed == []  # 118 > 115, but 100 is in [98, 138]
    assert compare(_ci("fvd", 120.0, 15.0), base, th).regressed == ["fvd"]  # 120 > 115 and 100 < 105
    bad = compare(_ci("fvd", 140.0, 10.0), base, th)  # 140 > 115, 100 < 130, and +40%
    assert bad.regressed == ["fvd"] and bad.rules == {"fvd": "interval"}
    assert compare(_ci("fvd", 60.0, 10.0), base, th).regressed == []  # better beyond the noise: fine
    # The threshold stays the smallest effect worth flagging: +5% beyond tight intervals is real but small.
    tight = Night("d", _ci("fvd", 100.0, 1.0))
    assert compare(_ci("fvd", 105.0, 1.0), tight, th).regressed == []
    assert compare(_ci("fvd", 105.0, 1.0), tight, {"fvd": 0.0}).regressed == ["fvd"]  # 0: intervals alone
    # Per-window metrics carry their own intervals.
    w = "windows/early/fvd"
    r = compare(_ci(w, 112.0, 15.0) | _ci("fvd", 100.0, 1.0), Night("d", _ci(w, 100.0, 15.0) | _ci("fvd", 100.0, 1.0)),
                {w: 0.1, "fvd": 0.1})
    assert r.regressed == [] and r.rules == {w: "interval", "fvd": "interval"}


def test_compare_without_intervals_on_either_night_falls_back_to_the_threshold():
    th = {"fvd": 0.10}
    old = Night("d", {"fvd": 100.0})  # a night from before intervals
    r = compare(_ci("fvd", 120.0, 15.0), old, th)
    assert r.regressed == ["fvd"] and r.rules == {"fvd": "threshold"}
    off = Night("d", {"fvd": 100.0, "fvd_lo": math.nan, "fvd_hi": math.nan})  # intervals were off
    assert compare(_ci("fvd", 120.0, 15.0), off, th).rules == {"fvd": "threshold"}
    tonight_off = {"fvd": 109.0, "fvd_lo": math.nan, "fvd_hi": math.nan}
    r = compare(tonight_off, Night("d", _ci("fvd", 100.0, 1.0)), th)
    assert r.regressed == [] and r.rules == {"fvd": "threshold"}
    failed = compare({"fvd": math.nan, "fvd_lo": math.nan, "fvd_hi": math.nan}, Night("d", _ci("fvd", 100.0, 5.0)), th)
    assert failed.regressed == ["fvd"] and failed.rules == {"fvd": "missing"}  # a failed metric never passes


def test_compare_with_intervals_higher_is_better_mirrored():
    th, up = {"clip": 0.05}, ["clip"]
    base = Night("d", _ci("clip", 0.30, 0.02))  # [0.28, 0.32]
    assert compare(_ci("clip", 0.282, 0.02), base, th, up).regressed == []  # -6%, but inside [0.28, 0.32]
    bad = compare(_ci("clip", 0.24, 0.02), base, th, up)  # 0.24 < 0.28, 0.30 > 0.26, -20%
    assert bad.regressed == ["clip"] and bad.rules == {"clip": "interval"}
    assert compare(_ci("clip", 0.40, 0.02), base, th, up).regressed == []  # better beyond the noise
    assert compare(_ci("clip", 0.29, 0.001), Night("d", _ci("clip", 0.30, 0.001)), th, up).regressed == []


def test_last_good_skips_regressed_failed_and_later_nights():
    nights = [Night("2026-01-01", {}, "a"), Night("2026-01-02", {}, "b", regressed=True),
              Night("2026-01-03", {}, "c", status="FAILED"), Night("2026-01-05", {}, "e")]
    assert last_good(nights, "2026-01-04").run_id == "a"
    assert last_good(nights, "2026-01-06").run_id == "e"
    assert last_good(nights, "2026-01-01") is None


def test_result_metrics_tolerates_field_names():
    @dataclass
    class Old:
        fvd: float
        kvd: float
        num_real: int
        num_generated: int
        params: dict

    @dataclass
    class New:
        fvd: float
        kvd: float
        n_real: int
        n_fake: int
        metrics: dict = field(default_factory=dict)
        per_video: list = field(default_factory=list)
        windows: dict = field(default_factory=dict)
        warnings: list = field(default_factory=list)

    assert result_metrics(Old(1.0, 2.0, 3, 4, {"x": 1})) == {"fvd": 1.0, "kvd": 2.0, "n_real": 3.0, "n_fake": 4.0}
    rows = [{"video": "a", "temporal_flickering": 0.0, "motion": 1.0}, {"video": "b", "motion": 3.0}]
    got = result_metrics(New(1.0, 2.0, 3, 4, {"temporal_flickering_mean": 0.9}, rows,
                             {"early": {"fvd": np.float64(5.0), "n_fake": 2}, "x": 1}, ["few clips"]))
    assert got == {"fvd": 1.0, "kvd": 2.0, "n_real": 3.0, "n_fake": 4.0, "temporal_flickering_mean": 0.9,
                   "windows/early/fvd": 5.0, "windows/early/n_fake": 2.0, "windows/x": 1.0}
    no_summary = result_metrics({"fvd": 1.0, "per_video": rows, "real_cache": "hit"})
    assert no_summary == {"fvd": 1.0, "temporal_flickering": 0.0, "motion": 2.0}


def test_ids_and_entrypoint_pin_the_date():
    assert submission_id("vbench", "2026-01-31") == "nightly-vbench-2026-01-31"
    cmd = nightly_entrypoint("jobs/configs/nightly_eval.yaml", ["nightly.suite=a b", "nightly.date=2020-01-01"],
                             "2026-01-31")
    assert cmd == ("python jobs/nightly_eval.py --config jobs/configs/nightly_eval.yaml 'nightly.suite=a b' "
                   "nightly.date=2026-01-31")


# ------------------------------------------------------------------------------------------- nights on MLflow


class FakeNight:
    """The measure seam: writes real tiny mp4s (skipping existing ones, like generation) and returns the
    metrics the test chose for that date."""

    def __init__(self, values: dict[str, dict[str, float]], params: dict[str, str] | None = None):
        self.values, self.calls = values, []
        self.params = params or {"eval.resize": "squash"}

    def __call__(self, cfg, night_dir: str) -> Measured:
        out = cfg.generate.output
        assert out == storage.join(night_dir, "generated")
        written = 0
        for i in range(3):
            path = storage.join(out, f"v{i}.mp4")
            if not storage.exists(path):
                frames = np.random.default_rng(i).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
                write_video(path, frames, fps=7)
                written += 1
        self.calls.append((cfg.nightly.date, cfg.generate.unet, written))
        key = (cfg.nightly.date, cfg.generate.unet)
        metrics = dict(self.values.get(key) or self.values[cfg.nightly.date])
        return Measured(metrics, [storage.join(out, f"v{i}.mp4") for i in range(3)], dict(self.params),
                        [f"shape {i} <moving>" for i in range(3)])


def _cfg(tmp_path, mlflow_server, experiment, date, *extra):
    return load_config(None, [f"run.workdir={tmp_path}/work", f"tracking.uri={mlflow_server}",
                              f"tracking.experiment={experiment}", "nightly.suite=tiny",
                              f"nightly.date={date}", "nightly.checkpoints.main=/ckpt/unet", *extra])


@pytest.fixture()
def experiment():
    return f"nightly-test-{uuid.uuid4().hex[:8]}"


def test_three_nights_improve_stable_regress(tmp_path, mlflow_server, experiment):
    from mlflow import MlflowClient

    values = {"2026-01-01": {"fvd": 100.0, "kvd": 1.0}, "2026-01-02": {"fvd": 80.0, "kvd": 0.8},  # improve
              "2026-01-03": {"fvd": 84.0, "kvd": 0.9},   # stable: +5% FVD, +12.5% KVD, under 10% / 25%
              "2026-01-04": {"fvd": 96.0, "kvd": 0.85},  # regress: FVD +14.3% over the 3rd
              "2026-01-05": {"fvd": 90.0, "kvd": 0.9}}   # compared with the 3rd, not the regressed 4th
    measure = FakeNight(values)
    verdicts = {}
    for date in values:
        results = run_nightly(_cfg(tmp_path, mlflow_server, experiment, date), measure=measure)
        (r,) = results
        verdicts[date] = (r.comparison.verdict, exit_status(results),
                          r.comparison.baseline.date if r.comparison.baseline else None)
    assert verdicts == {"2026-01-01": ("first", 0, None), "2026-01-02": ("ok", 0, "2026-01-01"),
                        "2026-01-03": ("ok", 0, "2026-01-02"), "2026-01-04": ("regressed", 1, "2026-01-03"),
                        "2026-01-05": ("ok", 0, "2026-01-03")}
    assert [c[1] for c in measure.calls] == ["/ckpt/unet"] * 5

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    nights = past_nights(client, exp.experiment_id, "tiny", "main")
    assert [n.date for n in nights] == list(values)
    assert all(n.status == "FINISHED" for n in nights)
    assert [n.regressed for n in nights] == [False, False, False, True, False]
    bad = client.get_run(nights[3].run_id)
    assert bad.data.tags["nightly.regressed_metrics"] == "fvd"
    assert bad.data.tags["nightly.regressed_rules"] == "fvd=threshold"  # no intervals on these nights
    assert bad.data.tags["nightly.baseline_run"] == nights[2].run_id
    assert bad.data.metrics["delta/fvd"] == pytest.approx(96 / 84 - 1)
    assert bad.data.tags["nightly.date"] == "2026-01-04" and bad.data.tags["nightly.suite"] == "tiny"
    assert bad.data.params["eval.resize"] == "squash"
    arts = {a.path for a in client.list_artifacts(bad.info.run_id, "report")}
    assert {"report/index.html", "report/fvd_trend.png", "report/videos"} <= arts
    page = (tmp_path / "work/nightly/tiny/2026-01-04/main/report/index.html").read_text()
    assert 'id="verdict">regressed<' in page and "videos/00-v0.mp4" in page
    assert '<figcaption>shape 0 &lt;moving&gt;<span class="file">00-v0.mp4</span></figcaption>' in page  # prompts


def test_nights_with_intervals_are_judged_beyond_the_noise(tmp_path, mlflow_server, experiment):
    """Intervals travel through MLflow with the metrics: +11% inside the noise is ok, beyond it regresses; the
    rule, the intervals and the protocol reach the tags and the report."""
    from mlflow import MlflowClient

    values = {"2026-07-01": _ci("fvd", 100.0, 12.0) | {"n_real": 2048.0, "n_fake": 2048.0},
              "2026-07-02": _ci("fvd", 111.0, 15.0) | {"n_real": 2048.0, "n_fake": 2048.0},  # within [88, 112]
              "2026-07-03": _ci("fvd", 160.0, 15.0) | {"n_real": 2048.0, "n_fake": 2048.0}}  # [145, 175]: not
    measure = FakeNight(values, {"fvd.protocol": "stylegan-v", "fvd.cov_norm": "n-1", "eval.resize": "squash"})
    got = {}
    for date in values:
        (r,) = run_nightly(_cfg(tmp_path, mlflow_server, experiment, date), measure=measure)
        got[date] = (r.comparison.verdict, r.comparison.rules, r.comparison.baseline and r.comparison.baseline.date)
    assert got == {"2026-07-01": ("first", {}, None), "2026-07-02": ("ok", {"fvd": "interval"}, "2026-07-01"),
                   "2026-07-03": ("regressed", {"fvd": "interval"}, "2026-07-02")}
    client = MlflowClient(mlflow_server)
    nights = past_nights(client, client.get_experiment_by_name(experiment).experiment_id, "tiny", "main")
    assert nights[1].metrics["fvd_lo"] == 96.0 and nights[1].params["fvd.protocol"] == "stylegan-v"
    assert "eval.resize" not in nights[1].params  # only the protocol's params ride along
    assert client.get_run(nights[2].run_id).data.tags["nightly.regressed_rules"] == "fvd=interval"
    page = (tmp_path / "work/nightly/tiny/2026-07-03/main/report/index.html").read_text()
    assert "Regressed beyond both nights' noise intervals and the threshold: <b>fvd</b>" in page
    assert '160 <span class="ci">[145, 175]</span>' in page and '111 <span class="ci">[96, 126]</span>' in page
    assert "FVD protocol <b>stylegan-v</b>; 2048 real and 2048 generated clips." in page


def test_rerun_same_date_resumes_run_and_folder(tmp_path, mlflow_server, experiment):
    from mlflow import MlflowClient

    measure = FakeNight({"2026-02-01": {"fvd": 50.0, "kvd": 0.1}})
    (first,) = run_nightly(_cfg(tmp_path, mlflow_server, experiment, "2026-02-01"), measure=measure)
    # Same night again, with a changed setting: same run, the videos already there are not made again.
    (again,) = run_nightly(_cfg(tmp_path, mlflow_server, experiment, "2026-02-01", "nightly.gallery=2"),
                           measure=measure)
    assert not first.resumed and again.resumed and again.night.run_id == first.night.run_id
    assert [c[2] for c in measure.calls] == [3, 0]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["nightly.gallery"] == "8"  # MLflow params are write-once: the first value stays
    page = Path(storage.local_path(again.report)).read_text()
    assert page.count("<video ") == 2  # the report itself follows the rerun's settings


def test_failed_night_is_not_a_baseline(tmp_path, mlflow_server, experiment):
    def broken(cfg, night_dir):
        raise JobError("generation failed")

    ok = FakeNight({"2026-03-01": {"fvd": 10.0}, "2026-03-03": {"fvd": 10.5}})
    run_nightly(_cfg(tmp_path, mlflow_server, experiment, "2026-03-01"), measure=ok)
    with pytest.raises(JobError):
        run_nightly(_cfg(tmp_path, mlflow_server, experiment, "2026-03-02"), measure=broken)
    (r,) = run_nightly(_cfg(tmp_path, mlflow_server, experiment, "2026-03-03"), measure=ok)
    assert r.comparison.baseline.date == "2026-03-01" and r.comparison.verdict == "ok"


def test_checkpoints_are_judged_separately(tmp_path, mlflow_server, experiment):
    values = {("2026-06-01", "/a"): {"fvd": 10.0}, ("2026-06-01", "/b"): {"fvd": 50.0},
              ("2026-06-02", "/a"): {"fvd": 10.5}, ("2026-06-02", "/b"): {"fvd": 56.0}}
    labels = ["nightly.checkpoints={a: /a, b: /b}"]
    for date, code in (("2026-06-01", 0), ("2026-06-02", 1)):
        cfg = load_config(None, [f"run.workdir={tmp_path}/work", f"tracking.uri={mlflow_server}",
                                 f"tracking.experiment={experiment}", "nightly.suite=two", f"nightly.date={date}",
                                 *labels])
        results = run_nightly(cfg, measure=FakeNight(values))
        assert exit_status(results) == code
    assert [(r.label, r.comparison.verdict) for r in results] == [("a", "ok"), ("b", "regressed")]
    assert results[1].comparison.deltas["fvd"] == pytest.approx(0.12)  # b against b's night, not a's

    def half_broken(cfg, night_dir):
        if cfg.generate.unet == "/a":
            raise JobError("out of memory")
        return FakeNight({"2026-06-03": {"fvd": 50.0}})(cfg, night_dir)

    cfg = load_config(None, [f"run.workdir={tmp_path}/work", f"tracking.uri={mlflow_server}",
                             f"tracking.experiment={experiment}", "nightly.suite=two", "nightly.date=2026-06-03",
                             *labels])
    with pytest.raises(JobError, match="out of memory"):
        run_nightly(cfg, measure=half_broken)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment).experiment_id
    b = past_nights(client, exp, "two", "b")[-1]
    a = past_nights(client, exp, "two", "a")[-1]
    assert (b.date, b.status, a.date, a.status) == ("2026-06-03", "FINISHED", "2026-06-03", "FAILED")


# ------------------------------------------------------------------------------------------- submit side


@dataclass
class Job:
    submission_id: str
    status: str


class Cluster:
    """Ray's JobSubmissionClient surface that submit_nightly uses, over a scripted list of statuses."""

    def __init__(self, jobs=(), script=("PENDING", "RUNNING", "SUCCEEDED")):
        self.jobs = {j.submission_id: j for j in jobs}
        self.script, self.submitted, self.polls = list(script), [], 0

    def list_jobs(self):
        return list(self.jobs.values())

    def submit_job(self, entrypoint, submission_id, **kw):
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists")
        self.submitted.append((submission_id, entrypoint))
        self.jobs[submission_id] = Job(submission_id, "PENDING")
        return submission_id

    def get_job_status(self, sid):
        if self.script and self.jobs[sid].status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            self.jobs[sid].status = self.script.pop(0)
        self.polls += 1
        return self.jobs[sid].status

    def get_job_logs(self, sid):
        return "Traceback ...\nboom\n"


SID = "nightly-tiny-2026-01-01"


@pytest.mark.parametrize("end,code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_counts_only_succeeded(end, code):
    c = Cluster(script=("PENDING", "RUNNING", end))
    lines = []
    assert submit_nightly(c, SID, "python jobs/nightly_eval.py", poll_s=0, echo=lines.append) == code
    assert c.submitted == [(SID, "python jobs/nightly_eval.py")] and c.polls == 3
    assert (f"{SID}: STOPPED: counted as a failure" in lines) == (end == "STOPPED")


def test_submit_is_idempotent_per_date():
    done = Cluster([Job(SID, "SUCCEEDED")])
    assert submit_nightly(done, SID, "x", poll_s=0, echo=lambda s: None) == 0 and done.submitted == []
    running = Cluster([Job(SID, "RUNNING")], script=("RUNNING", "SUCCEEDED"))
    assert submit_nightly(running, SID, "x", poll_s=0, echo=lambda s: None) == 0 and running.submitted == []
    stopped = Cluster([Job(SID, "STOPPED"), Job("nightly-tiny-2026-01-02", "FAILED")])
    assert submit_nightly(stopped, SID, "x", poll_s=0, echo=lambda s: None) == 1 and stopped.submitted == []
    assert submit_nightly(stopped, SID, "x", retry=True, poll_s=0, echo=lambda s: None) == 0
    assert submit_nightly(stopped, SID, "x", retry=True, poll_s=0, echo=lambda s: None) == 0  # succeeded now
    assert [s for s, _ in stopped.submitted] == [f"{SID}-retry1"]


# ------------------------------------------------------------------------------------------- a real night


@pytest.mark.slow
@pytest.mark.ray
def test_real_tiny_night_through_the_entrypoint(tmp_path, mlflow_server, experiment, ray_session, capsys):
    """The entrypoint end to end on Ray: tiny SVD generation (FIFO), tiny I3D FVD/KVD and model-free metrics,
    MLflow run, report; exit 0. The same night again resumes: same run, no video generated twice."""
    from mlflow import MlflowClient

    from vidgen.data.synth import make_moving_shapes

    real = tmp_path / "real"
    make_moving_shapes(str(real), 4, 8, 64, 64, seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"image": str(p), "seed": i, "prompt": f"clip {i}"}) + "\n"
                               for i, p in enumerate(sorted(real.rglob("0.png"))[:2])))
    argv = [f"run.workdir={tmp_path}/work", f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}",
            "data.layout=hotshot", "model.flavor=tiny", "model.num_frames=4", "generate.sampler=fifo",
            "generate.num_frames=8", "generate.fifo.partitions=1", "generate.min_guidance_scale=1.0",
            "generate.max_guidance_scale=1.0", "generate.height=64", "generate.width=64", f"eval.real={real}",
            "eval.num_frames=8", "eval.resolution=64", "eval.i3d_flavor=tiny", "nightly.suite=tiny-e2e",
            f"generate.prompts={prompts}", "nightly.date=2026-04-01"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (night,) = json.loads(out[out.index("["):])
    m = night["metrics"]
    assert night["verdict"] == "first" and m["n_fake"] >= 2 and m["generate/generated"] == 2
    assert math.isfinite(m["fvd"]) and math.isfinite(m["kvd"])
    assert any("flicker" in k for k in m), sorted(m)  # model-free metrics logged beside FVD
    report = Path(storage.local_path(night["report"]))
    assert report.is_file() and len(list((report.parent / "videos").glob("*.mp4"))) == 2
    assert "<figcaption>clip 0<span" in report.read_text()  # the gallery shows the prompt
    assert len(list((tmp_path / "work/nightly/tiny-e2e/2026-04-01/default/generated").rglob("*.mp4"))) == 2

    assert main(argv) == 0  # a rerun the same day
    out = capsys.readouterr().out
    (again,) = json.loads(out[out.index("["):])
    assert again["resumed"] and again["run_id"] == night["run_id"]
    assert again["metrics"]["generate/skipped"] == 2 and "generate/generated" not in again["metrics"]
    assert again["metrics"]["fvd"] == pytest.approx(m["fvd"])
    client = MlflowClient(mlflow_server)
    assert len(client.search_runs([client.get_experiment_by_name(experiment).experiment_id])) == 1


def test_entrypoint_bad_input_exits_2(capsys):
    assert main(["nightly.date=tomorrow"]) == 2
    assert "nightly.date" in capsys.readouterr().err


def test_submit_refuses_credentials_in_the_runtime_env_before_connecting(tmp_path, capsys):
    """Ray writes runtime envs in plain text to its logs: a key there is refused in one line, before any
    connection (nothing listens on port 9)."""
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text("env_vars: {HF_HUB_OFFLINE: '1', AWS_SECRET_ACCESS_KEY: abc, MLFLOW_TRACKING_TOKEN: 3}\n")
    assert main(["--submit", "http://127.0.0.1:9", "--runtime-env", str(env_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nightly_eval: error: --runtime-env {env_file}: env_vars.")
    assert "AWS_SECRET_ACCESS_KEY: credentials do not belong in a runtime env" in err
    assert "MLFLOW_TRACKING_TOKEN: values must be strings, got int" in err and "abc" not in err
    env_file.write_text("- a list\n")
    assert main(["--submit", "http://127.0.0.1:9", "--runtime-env", str(env_file)]) == 2
    assert "expected a mapping (working_dir, env_vars, ...), got list" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- a real Ray head

@pytest.mark.slow
@pytest.mark.ray
def test_submit_against_a_real_ray_head(ray_head, tmp_path, monkeypatch):
    """Ray's own Jobs API: SUCCEEDED exits 0; a job stopped while we follow it, and a failing one, exit 1; the
    same id again follows the existing job instead of submitting another."""
    import threading

    from ray.job_submission import JobStatus, JobSubmissionClient

    address, _, token = ray_head
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    night = f"nightly-t{uuid.uuid4().hex[:6]}-2026-05-01"
    quiet = {"poll_s": 0.5, "echo": lambda s: None, "entrypoint_num_cpus": 0.1}

    assert submit_nightly(client, night, "python -c 'print(1)'", **quiet) == 0
    assert client.get_job_status(night) == JobStatus.SUCCEEDED
    assert submit_nightly(client, night, "python -c 'raise SystemExit(3)'", **quiet) == 0  # done: not rerun

    failing = night.replace("05-01", "05-02")
    assert submit_nightly(client, failing, "python -c 'raise SystemExit(3)'", **quiet) == 1
    assert client.get_job_status(failing) == JobStatus.FAILED

    stopped = night.replace("05-01", "05-03")

    def stop_when_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # not submitted yet
                if client.get_job_status(stopped) == JobStatus.RUNNING:
                    client.stop_job(stopped)
                    return
            time.sleep(0.2)

    stopper = threading.Thread(target=stop_when_running, daemon=True)
    stopper.start()
    assert submit_nightly(client, stopped, "python -c 'import time; time.sleep(120)'", **quiet) == 1
    stopper.join(5)
    assert client.get_job_status(stopped) == JobStatus.STOPPED
    # The stopped night is resubmitted only on request, under the next attempt's id; that one succeeds.
    assert submit_nightly(client, stopped, "python -c 'print(2)'", **quiet) == 1
    assert submit_nightly(client, stopped, "python -c 'print(2)'", retry=True, **quiet) == 0
    assert client.get_job_status(f"{stopped}-retry1") == JobStatus.SUCCEEDED

    # The entrypoint's --submit: token from the environment, id from suite and date, the date pinned. Without
    # a working_dir the job cannot find jobs/nightly_eval.py on the head, so it FAILS: exit 1.
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text("env_vars: {HF_HUB_OFFLINE: '1'}\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    suite = f"s{uuid.uuid4().hex[:6]}"
    argv = ["--submit", address, "--runtime-env", str(env_file), "--poll", "0.5", f"nightly.suite={suite}",
            "nightly.date=2026-05-04"]
    assert main(argv) == 1
    info = client.get_job_info(f"nightly-{suite}-2026-05-04")
    assert info.status == JobStatus.FAILED
    assert info.entrypoint == f"python jobs/nightly_eval.py nightly.suite={suite} nightly.date=2026-05-04"


@pytest.mark.parametrize("args,line", [
    ([], "eval.real: required for the nightly eval (the suite's real reference clips)"),
    (["eval.real=/data/real", "tracking.enabled=false"],
     "tracking.enabled=false: the nightly eval needs MLflow to find and record past nights"),
])
def test_script_config_error_is_one_line_before_ray_starts(tmp_path, args, line):
    """jobs/nightly_eval.py as a user runs it: one line, exit 2, no trace, no Ray started, nothing written."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "jobs" / "nightly_eval.py"), f"run.workdir={tmp_path}/work",
                           *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"nightly_eval: error: {line}"
    assert list(tmp_path.iterdir()) == []
