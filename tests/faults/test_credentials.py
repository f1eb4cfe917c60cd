"""Credentials never leak: canary secrets planted where users keep theirs (S3 keys and an MLflow token in the
environment, a password in the tracking URI) must appear in no log line, no error message, no printed output,
no MLflow param, tag or artifact, while a job logs to a real MLflow server and reads the S3 API (moto)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
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
