"""Stopping a training run (Ctrl-C, SIGTERM) loses nothing; concurrent first runs; refused credentials.

One `vidgen train` subprocess is interrupted with SIGINT after a few checkpoints: one line on stderr, exit 130,
retention holds, the MLflow run is KILLED with every step up to the newest complete checkpoint, and a rerun's
tracker continues that run. Which checkpoint a rerun resumes from, retention over a stopped run's leftovers,
SIGTERM, the MLflow store's first use by two processes at once and refused credentials are checked without a fit.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vidgen.access import credentials_refused
from vidgen.errors import ConfigError
from vidgen.signals import Interrupted, raising
from vidgen.tracking import Tracker
from vidgen.train import checkpoints
from vidgen.train.manifest import write_manifest

ROOT = Path(__file__).resolve().parents[2]


def fake_checkpoint(run_dir: Path, name: str, step: int, parts: int = 2, skip_part: int | None = None) -> Path:
    """A checkpoint folder as the workers leave it: each rank's files and its manifest part."""
    d = run_dir / name
    (d / f"step{step:08d}").mkdir(parents=True)
    for rank in range(parts):
        rel = f"step{step:08d}/rank{rank}.pt"
        (d / rel).write_bytes(os.urandom(64 + rank))
        if rank != skip_part:
            write_manifest(d, files=[rel], part=rank, parts=parts, meta={"step": step, "config_hash": "h"})
    return d


def test_a_rerun_resumes_from_the_newest_complete_checkpoint_and_retention_holds(tmp_path):
    """Ray's registry names step 5; steps 10 and 15 are complete on disk; later folders are incomplete (a rank's
    manifest missing, no manifest at all, a file cut short). The newest complete one wins; keep=2 leaves 2."""
    run = tmp_path / "run"
    fake_checkpoint(run, "checkpoint_2026-01-01_00-00-01.000001", 5)
    fake_checkpoint(run, "checkpoint_2026-01-01_00-00-02.000001", 10)
    fake_checkpoint(run, "checkpoint_2026-01-01_00-00-03.000001", 15)
    fake_checkpoint(run, "checkpoint_2026-01-01_00-00-04.000001", 20, skip_part=1)
    (run / "checkpoint_2026-01-01_00-00-05.000001").mkdir()
    cut = fake_checkpoint(run, "checkpoint_2026-01-01_00-00-06.000001", 18)
    with open(cut / "step00000018" / "rank0.pt", "r+b") as f:
        f.truncate(10)
    (run / checkpoints.RAY_REGISTRY).write_text(json.dumps({"latest": "checkpoint_2026-01-01_00-00-01.000001"}))

    found = checkpoints.scan(str(run))
    assert [(f.step, f.complete) for f in found] == [(5, True), (10, True), (15, True), (None, False), (None, False),
                                                     (None, False)]
    assert [f.problem for f in found[3:]] == ["manifest part 1 of 2 is missing", "no manifest (its writers did not "
                                              "finish)", "step00000018/rank0.pt: 10, expected 64 bytes"]
    newest = checkpoints.reset(str(run), keep=2)
    assert newest is not None and (newest.step, newest.name) == (15, "checkpoint_2026-01-01_00-00-03.000001")
    assert sorted(os.listdir(run)) == ["checkpoint_2026-01-01_00-00-02.000001", "checkpoint_2026-01-01_00-00-03.000001"]
    assert [f.step for f in checkpoints.prune(str(run), keep=1)] == [10]
    assert os.listdir(run) == ["checkpoint_2026-01-01_00-00-03.000001"]
    assert checkpoints.reset(str(tmp_path / "none"), keep=2) is None


def test_a_continued_run_is_the_same_mlflow_run(tmp_path):
    """The interrupted run is KILLED; the rerun's tracker reopens it (RUNNING, then FINISHED), its metrics go on
    where they stopped, and a changed resumable setting does not fail the params MLflow already holds."""
    from mlflow import MlflowClient

    uri, run_file = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "train" / "r" / "vidgen-mlflow-run.json")
    with pytest.raises(KeyboardInterrupt), Tracker(uri, "e", "r", run_file=run_file) as first:
        first.log_config({"train": {"max_steps": 4, "lr": 0.1}})
        for step in (1, 2):
            first.log_metrics({"train/loss": 1.0 / step}, step=step)
        raise Interrupted(signal.SIGINT)
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert json.loads(Path(run_file).read_text())["run_id"] == first.run_id
    with Tracker(uri, "e", "r", run_file=run_file) as again:
        assert again.run_id == first.run_id and client.get_run(again.run_id).info.status == "RUNNING"
        again.log_config({"train": {"max_steps": 6, "lr": 0.1}})
        again.log_metrics({"train/loss": 0.25}, step=3)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.max_steps": "4", "train.lr": "0.1"}
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [1, 2, 3]
    with Tracker(uri, "other", "r", run_file=run_file) as elsewhere:  # another experiment: a run of its own
        assert elsewhere.run_id != first.run_id
    assert json.loads(Path(run_file).read_text())["run_id"] == elsewhere.run_id


STORE_USER = """
import os, sys, time
import mlflow  # imported before the start line, so that both processes reach the store together
from vidgen.tracking import Tracker
open(f"{sys.argv[2]}.ready{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
with Tracker(sys.argv[1], "e", "r") as t:
    t.log_metrics({"x": 1.0}, step=1)
"""


def test_two_jobs_starting_on_a_fresh_store_both_succeed(tmp_path):
    """Both processes find no schema and would both migrate it; the lock lets one migrate, the other then use it
    (without it, one fails: "Online migration expected to match one row")."""
    from mlflow import MlflowClient

    uri, go = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", STORE_USER, uri, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 2 and time.monotonic() < deadline:  # both have imported mlflow
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("e").experiment_id])) == 2


class _Slow:
    def fit(self):
        time.sleep(30)


def test_sigterm_ends_a_fit_as_ctrl_c_does(monkeypatch, capsys):
    """SIGTERM (Kubernetes, `ray job stop`) during a fit raises Interrupted in the main thread (Ray's own handlers
    never see it); the CLI says it in one line and exits 143."""
    from vidgen import cli
    from vidgen.train.launch import _fit_in_thread

    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as caught:
        _fit_in_thread(_Slow())
    assert caught.value.exit_code == 143 and time.monotonic() - t0 < 5
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored

    def stopped(args, name):
        with raising():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    monkeypatch.setattr(cli, "_run_job", stopped)
    assert cli.main(["train", "run.name=x"]) == 143
    assert capsys.readouterr().err == "vidgen: interrupted by SIGTERM\n"


class _Refuse(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
        body = b"<html>401 Unauthorized</html>"
        self.send_response(401)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args):
        pass


def test_refused_credentials_name_what_to_set(monkeypatch, capsys):
    """A server answering 401 (MLflow's REST client, for real), and Ray's token authentication error: one line
    naming the variables to set, exit 2, never "internal error"."""
    import ray.exceptions
    from mlflow import MlflowClient

    from vidgen import cli

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError, match="MLflow tracking server refused the request .*: set "
                                              "MLFLOW_TRACKING_TOKEN .*MLFLOW_TRACKING_USERNAME"):
            Tracker(url, "e", "r").__enter__()
        with pytest.raises(Exception) as caught:  # refused in the middle of a job: what the CLI gets
            MlflowClient(url).log_param("0" * 32, "k", "v")
    finally:
        server.shutdown()
    wrapped = RuntimeError("training failed")
    wrapped.__cause__ = caught.value

    def raising_(e):
        def run_job(args, name):
            raise e
        return run_job

    for error in (caught.value, wrapped, ray.exceptions.AuthenticationError("Unauthenticated")):
        monkeypatch.setattr(cli, "_run_job", raising_(error))
        assert cli.main(["train"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert "internal error" not in line and line.startswith("vidgen: error: the "), line
    assert "RAY_AUTH_TOKEN" in line and "Ray cluster refused this connection (Unauthenticated)" in line
    assert credentials_refused(ValueError("401")) is None


# ---- one real fit, stopped by Ctrl-C -----------------------------------------------------------------------


@pytest.mark.ray
def test_ctrl_c_in_training_says_where_to_resume_and_keeps_retention_and_the_run(tmp_path, faults):
    from mlflow import MlflowClient

    from vidgen.data.synth import make_moving_shapes

    make_moving_shapes(str(tmp_path / "data"), 2, 4, 64, 64, seed=0)
    work, keep = tmp_path / "work", 2
    run_dir = work / "train" / "intr"
    ray_tmp = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # Ray's socket paths must stay short
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("VIDGEN_FAULT", "RAY_ADDRESS"))},
           "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidgen.cli", "train", "--config", "jobs/configs/demo.yaml",
         f"data.source={tmp_path / 'data'}", f"run.workdir={work}", "run.name=intr", "train.max_steps=1000",
         "train.checkpoint_every=1", f"train.keep_checkpoints={keep}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # until Ray's retention has deleted one
            newest = run_dir.is_dir() and checkpoints.newest_complete(checkpoints.scan(str(run_dir)))
            if newest and newest.step > keep:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    m = re.fullmatch(r"vidgen: training run 'intr' interrupted by SIGINT at step (\d+); the newest complete "
                     r"checkpoint is step (\d+) at (\S+); rerun the same command to resume", line)
    assert m, err[-3000:]
    at, step, path = int(m[1]), int(m[2]), m[3]
    complete = [f for f in checkpoints.scan(str(run_dir)) if f.complete]
    assert len(complete) <= keep and (complete[-1].step, complete[-1].uri) == (step, path) and keep < step <= at

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vidgen").experiment_id])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, step + 1))
    assert json.loads((run_dir / "vidgen-mlflow-run.json").read_text())["run_id"] == run.info.run_id

    # What the rerun does first, before its workers start: the same checkpoint, the same MLflow run.
    assert checkpoints.reset(str(run_dir), keep).uri == path and not (run_dir / checkpoints.RAY_REGISTRY).exists()
    with Tracker(f"sqlite:///{work}/mlflow.db", "vidgen", "intr", run_file=str(run_dir / "vidgen-mlflow-run.json")) \
            as again:
        assert again.run_id == run.info.run_id
    faults.record("Ctrl-C in `vidgen train`", injected=1, survived=True, lost=0,
                  detail=f"stopped at step {at}; resumes from step {step}; {len(complete)} checkpoints kept")
