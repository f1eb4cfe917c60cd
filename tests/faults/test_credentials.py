"""Credentials never leak: canary secrets planted where users keep theirs (S3 keys and an MLflow token in the
environment, a password in the tracking URI) must appear in no log line, no error message, no printed output,
no MLflow param, tag or artifact, while a job logs to a real MLflow server and reads the S3 API (moto); and a
whole `vidgen train` on its own local Ray cluster leaves them in none of Ray's files (logs, session state) and
none of the run's outputs."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vidgen.errors import VidgenError
from vidgen.redact import RedactFilter

VIDGEN = Path(sys.executable).parent / "vidgen"
CANARIES = {"AWS_SECRET_ACCESS_KEY": "canary-aws-secret-7Qx2LmV9", "AWS_SESSION_TOKEN": "canary-aws-session-Zr81",
            "MLFLOW_TRACKING_TOKEN": "canary-mlflow-token-Pk44"}
PASSWORD = "canary-uri-password-Hb63"


def leaks(text: str) -> list[str]:
    return [c for c in [*CANARIES.values(), PASSWORD] if c in text]


def files_with_canaries(root: Path) -> dict[str, list[str]]:
    """Every file under root (text or binary, logs, pickles, checkpoints) that holds a canary, with the canaries."""
    found = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.is_socket():
            hits = leaks(p.read_bytes().decode("latin-1"))
            if hits:
                found[str(p.relative_to(root))] = hits
    return found


@pytest.mark.ray  # not Ray: the session's S3 and MLflow servers, started like the Ray-using tests' servers
def test_canary_secrets_reach_no_log_error_param_or_artifact(s3_server, mlflow_server, tmp_path, monkeypatch,
                                                             caplog, capfd, faults):
    from mlflow import MlflowClient

    from vidgen import storage
    from vidgen.config import load_config
    from vidgen.tracking import Tracker

    for k, v in CANARIES.items():
        monkeypatch.setenv(k, v)  # moto accepts any secret; the server ignores the token
    url = mlflow_server.replace("http://", f"http://vidgen:{PASSWORD}@")
    bucket = s3_server.bucket()
    storage.write_text(f"{bucket}/notes/hello.txt", "hello\n")
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(RedactFilter())  # as `vidgen` puts one on its log handlers (install_log_filter)

    cfg = load_config(None, [f"tracking.uri={url}", f"data.source={bucket}/clips", f"run.workdir={tmp_path}"])
    errors = []
    with Tracker(url, "canary", "canary-run") as tracker:
        tracker.log_config(cfg.to_dict())
        tracker.set_tags({"source": f"{bucket}/clips", "tracking": url})
        tracker.log_params({"endpoint": url})
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_artifact(f"{bucket}/notes/hello.txt", "notes")
        for bad in (f"{bucket}/missing.txt", f"s3://vidgen:{PASSWORD}@{bucket[5:]}/x"):
            with pytest.raises(VidgenError) as e:
                storage.read_bytes(bad)
            errors.append(str(e.value))
        run_id = tracker.run_id
        ui = tracker.ui_command()
    with pytest.raises(VidgenError) as e:  # a server that is not there: the error names the URI, masked
        Tracker(f"http://vidgen:{PASSWORD}@127.0.0.1:9/", "canary", "down").__enter__()
    errors.append(str(e.value))
    assert "***@127.0.0.1:9" in errors[-1]

    env = {**os.environ, **CANARIES}
    cli = [subprocess.run([str(VIDGEN), *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
           for args in (["config", "show", f"tracking.uri={url}"],
                        ["data", "inspect", f"{bucket}/nothing-here"],
                        ["generate", f"tracking.uri={url}", f"generate.prompts={bucket}/none.txt"])]
    assert cli[0].returncode == 0 and f"vidgen:***@{mlflow_server[7:]}" in cli[0].stdout
    assert cli[1].returncode == 2 and cli[2].returncode == 2

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    stored = [*run.data.params.values(), *run.data.params.keys(), *run.data.tags.values()]
    assert run.data.params["tracking.uri"] == url.replace(PASSWORD, "***")
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run_id, "", str(artifacts))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "hello.txt"}

    captured = capfd.readouterr()
    places = {"log records": caplog.text, "error messages": "\n".join(errors), "stdout/stderr": captured.out
              + captured.err, "CLI output": "\n".join(p.stdout + p.stderr for p in cli), "MLflow params and tags":
              "\n".join(stored), "MLflow artifacts": "\n".join(p.read_text(errors="replace") for p in files),
              "UI command": ui}
    found = {where: leaks(text) for where, text in places.items() if leaks(text)}
    assert not found, f"canary secrets leaked: {found}"
    faults.record("canary secrets (S3 keys, MLflow token, URI password) planted", injected=4, survived=True,
                  lost=0, detail=f"absent from {', '.join(places)}")


@pytest.mark.ray
@pytest.mark.slow
def test_canary_secrets_reach_no_ray_file_or_run_output(s3_server, mlflow_server, tmp_path, faults):
    """`vidgen train` as a user runs it: its own local Ray cluster, data read from S3 by Ray Data tasks, 2
    DeepSpeed workers, a checkpoint and an export, metrics to MLflow. Ray logs every runtime env in plain text
    (runtime_env_agent.log) and keeps it in its GCS, so credentials must reach workers by inheritance, never
    through a runtime env; the run's own folder (Ray Train's experiment state, checkpoints, export) must not
    hold them either."""
    from mlflow import MlflowClient

    from vidgen.data.synth import make_moving_shapes

    bucket = s3_server.bucket()
    make_moving_shapes(f"{bucket}/clips", 2, 4, 64, 64, seed=0)
    url = mlflow_server.replace("http://", f"http://vidgen:{PASSWORD}@")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, **CANARIES, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "work"
    try:
        proc = subprocess.run(
            [str(VIDGEN), "train", "--config", "jobs/configs/demo.yaml", f"data.source={bucket}/clips",
             f"run.workdir={work}", "run.name=canary", f"tracking.uri={url}",
             "tracking.experiment=canary-ray", "train.max_steps=2", "train.checkpoint_every=2"],
            capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, proc.stderr[-3000:]
        ray_files = sum(1 for p in ray_tmp.rglob("*") if p.is_file())
        assert any(ray_tmp.rglob("runtime_env_agent.log")), "Ray's logs were not where the test looks"
        found = {"Ray's temp dir": files_with_canaries(ray_tmp)}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("canary-ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "train/loss" in runs[0].data.metrics
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(runs[0].info.run_id, "", str(artifacts))
    run_files = sum(1 for p in work.rglob("*") if p.is_file())
    assert any(work.rglob("*.safetensors")) and run_files > 10, "the run wrote no checkpoint or export"
    found |= {"run folder": files_with_canaries(work), "MLflow artifacts": files_with_canaries(artifacts),
              "CLI output": leaks(proc.stdout + proc.stderr),
              "MLflow params and tags": leaks("\n".join([*runs[0].data.params.values(), *runs[0].data.tags.values()]))}
    found = {where: hits for where, hits in found.items() if hits}
    assert not found, f"canary secrets leaked: {found}"
    faults.record("canary secrets in the environment of a whole `vidgen train` on its own Ray", injected=4,
                  survived=True, lost=0, detail=f"absent from {ray_files} files of Ray's, {run_files} of the run's, "
                                                "MLflow and the CLI output")


@pytest.mark.ray  # not Ray: the session's S3 server
@pytest.mark.parametrize("argv", [["data", "inspect", "{bucket}/clips"], ["prepare", "synth", "{bucket}/out"]])
def test_missing_s3_credentials_say_what_to_set(s3_server, tmp_path, argv):
    """No keys, profile or instance role: one line naming the URI and what to set, exit 2, nothing written."""
    bucket = s3_server.bucket()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    args = [a.format(bucket=bucket) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "vidgen.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"vidgen: error: {args[2]}") and "failed: no S3 credentials found: set " \
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE" in line and "VIDGEN_S3_ENDPOINT_URL" in line
    assert s3_server.client().list_objects_v2(Bucket=bucket[5:]).get("KeyCount") == 0
