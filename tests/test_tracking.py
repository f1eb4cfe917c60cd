"""vidgen.tracking against a real `mlflow server` on loopback and against a sqlite store."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import yaml

from vidgen import storage
from vidgen.errors import ConfigError
from vidgen.tracking import MAX_PARAM_VALUE_LENGTH, Tracker, resolve_tracking_uri


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('work')}/mlflow.db"


@pytest.fixture(params=["sqlite", "server"])
def store(request, sqlite_uri) -> str:
    return sqlite_uri if request.param == "sqlite" else request.getfixturevalue("mlflow_server")


def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def download(uri: str, run_id: str, artifact: str, dst: Path) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst),
                                                    tracking_uri=uri))


CONFIG = {
    "run": {"name": "tiny", "workdir": "/w"},
    "train": {"lr": 1e-4, "betas": [0.9, 0.999], "steps": 3, "resume": None},
    "data": {"paths[0]": "s3://bkt/clips"},
    "notes": "x" * 7000,  # over MLflow's param value limit
    "sweep": {f"k{i:03d}": i for i in range(150)},  # over one log_batch's 100 params
}


def test_run_is_logged(store, tmp_path):
    video = tmp_path / "sample_0.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with Tracker(store, experiment(), "tiny-svd") as t:
        t.log_config(CONFIG)
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            t.log_metrics({"train/loss": loss, "lr": 1e-4}, step=step)
        t.log_metrics({"train/step_time_s": 0.5}, step=2, timestamp=1_800_000_000.25)  # when it was measured
        t.log_video(str(video))
        t.set_tags({"recipe": "svd_lora"})

    mlflow = client(store)
    assert [r.info.run_id for r in mlflow.search_runs([t.experiment_id])] == [t.run_id]  # one run
    run = mlflow.get_run(t.run_id)
    assert (run.info.status, run.info.run_name, run.data.tags["recipe"]) == ("FINISHED", "tiny-svd", "svd_lora")

    params = run.data.params
    assert params["train.lr"] == "0.0001" and params["train.steps"] == "3"
    assert params["train.betas"] == "[0.9, 0.999]" and params["run.workdir"] == "/w"
    assert params["data.paths_0_"] == "s3://bkt/clips"  # '[' and ']' are not allowed in MLflow keys
    assert len(params["notes"]) == MAX_PARAM_VALUE_LENGTH and params["notes"].endswith("...")
    assert sum(k.startswith("sweep.") for k in params) == 150

    history = mlflow.get_metric_history(t.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.9), (1, 0.5), (2, 0.25)]
    (timed,) = mlflow.get_metric_history(t.run_id, "train/step_time_s")
    assert (timed.step, timed.value, timed.timestamp) == (2, 0.5, 1_800_000_000_250)

    assert sorted(a.path for a in mlflow.list_artifacts(t.run_id)) == ["config.yaml", "videos"]
    assert [a.path for a in mlflow.list_artifacts(t.run_id, "videos")] == ["videos/sample_0.mp4"]
    config_yaml = download(store, t.run_id, "config.yaml", tmp_path / "dl")
    assert yaml.safe_load(config_yaml.read_text()) == CONFIG  # whole, untruncated
    assert download(store, t.run_id, "videos/sample_0.mp4", tmp_path / "dl").read_bytes() == video.read_bytes()

    if store.startswith("sqlite"):
        assert t.ui_command() == f"mlflow ui --backend-store-uri {store} --port 5000"
        db = Path(store.removeprefix("sqlite:///"))
        assert run.info.artifact_uri.startswith((db.parent / "mlartifacts").as_uri())
    else:
        assert t.ui_command() == f"{store}/#/experiments/{t.experiment_id}/runs/{t.run_id}"


def test_escaping_exception_fails_the_run(store):
    name = experiment()
    with pytest.raises(RuntimeError, match="boom"), Tracker(store, name, "crash") as crashed:
        crashed.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), Tracker(store, name, "ctrl-c") as stopped:
        raise KeyboardInterrupt
    mlflow = client(store)
    assert mlflow.get_run(crashed.run_id).info.status == "FAILED"
    assert mlflow.get_run(crashed.run_id).info.end_time is not None
    assert mlflow.get_run(stopped.run_id).info.status == "KILLED"
    assert mlflow.get_run(crashed.run_id).data.metrics == {"loss": 1.0}


def test_disabled_tracker_does_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/never/mlflow.db"
    with Tracker(uri, "e", "r", enabled=False) as t:
        t.log_config(CONFIG)
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, step=0)
        t.log_artifact(str(tmp_path / "missing.bin"))
        t.log_video(str(tmp_path / "missing.mp4"))
        t.set_tags({"a": "b"})
    assert (t.run_id, t.experiment_id, t.ui_command(), t.tracking_uri) == (None, None, "", uri)
    assert not (tmp_path / "never").exists()


def test_bad_store_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    for uri in ("nosuch://host/x", f"sqlite:///{tmp_path}/file/mlflow.db"):
        with pytest.raises(ConfigError, match=f"^tracking.uri={re.escape(repr(uri))}: cannot start an MLflow run"):
            Tracker(uri, "e", "r").__enter__()


def test_resolve_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{os.getcwd()}/work/mlflow.db"
    assert resolve_tracking_uri(None, "work") == default  # relative workdir made absolute
    assert resolve_tracking_uri(None, "file://" + os.path.join(os.getcwd(), "work")) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, "work") == "http://127.0.0.1:5999"  # env beats the default
    assert resolve_tracking_uri("sqlite:////x/db", "work") == "sqlite:////x/db"  # explicit beats env
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="run.workdir='s3://bkt/w' is remote.*tracking.uri"):
        resolve_tracking_uri(None, "s3://bkt/w")


def test_two_stores_in_one_process(sqlite_uri, mlflow_server, tmp_path):
    import mlflow

    global_uri = mlflow.get_tracking_uri()
    (tmp_path / "a.txt").write_text("a")
    name = experiment()
    with Tracker(sqlite_uri, name, "local") as a, Tracker(mlflow_server, name, "remote") as b:
        a.log_metrics({"x": 1.0}, step=0)
        b.log_metrics({"x": 2.0}, step=0)
        a.log_artifact(str(tmp_path / "a.txt"))
        b.log_artifact(str(tmp_path / "a.txt"), "sub")
    assert client(sqlite_uri).get_run(a.run_id).data.metrics == {"x": 1.0}
    assert client(mlflow_server).get_run(b.run_id).data.metrics == {"x": 2.0}
    assert [f.path for f in client(sqlite_uri).list_artifacts(a.run_id)] == ["a.txt"]
    assert [f.path for f in client(mlflow_server).list_artifacts(b.run_id, "sub")] == ["sub/a.txt"]
    assert b.run_id not in {r.info.run_id for r in client(sqlite_uri).search_runs([a.experiment_id])}
    assert mlflow.active_run() is None and mlflow.get_tracking_uri() == global_uri


def test_remote_video_is_logged(s3_server, sqlite_uri):
    """Workers write videos to object storage and return URIs; the driver logs them from there."""
    uri = s3_server.bucket() + "/generated/prompt-0.mp4"
    storage.write_bytes(uri, b"remote video bytes")
    with Tracker(sqlite_uri, experiment(), "remote-video") as t:
        t.log_video(uri)
    [video] = client(sqlite_uri).list_artifacts(t.run_id, "videos")
    assert (video.path, video.file_size) == ("videos/prompt-0.mp4", len(b"remote video bytes"))
