"""The MLflow server stopped and restarted in the middle of a run: nothing logged is lost, nothing fails.

A real `mlflow server` on a fixed loopback port with a sqlite store that outlives it: the run logs, the server
is killed (SIGTERM to its process group), logging goes on (buffered, without blocking), a new server starts on
the same port and store, and at the end every metric step is in the store and the run is FINISHED.
"""

from __future__ import annotations

import os
import tempfile
import time

from servers import BIN, ServerProcess, free_port

from vidgen.tracking import Tracker


def mlflow_server(port: int, store: str) -> ServerProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return ServerProcess("mlflow server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                           str(port), "--workers", "1", "--backend-store-uri",
                                           f"sqlite:///{store}/mlflow.db", "--artifacts-destination",
                                           f"{store}/artifacts"],
                         url=f"http://127.0.0.1:{port}", probe_path="/health",
                         workdir=tempfile.mkdtemp(prefix="vidgen-mlflow-outage-"), env=env)


def test_mlflow_restart_mid_run_loses_no_metrics(tmp_path, faults):
    from mlflow import MlflowClient

    port, store = free_port(), str(tmp_path)
    first = mlflow_server(port, store)
    first.wait_ready(90)
    url, steps = first.url, list(range(1, 9))
    art = tmp_path / "sample.txt"
    art.write_text("made during the outage")
    with Tracker(url, "faults", "outage") as t:
        t.log_params({"train.lr": 1e-4})
        t.log_metrics({"loss": 1.0}, step=1)
        first.stop()
        started = time.monotonic()
        for step in steps[1:5]:  # the training loop keeps going while the server is down
            t.log_metrics({"loss": float(step)}, step=step)
        t.log_artifact(str(art))
        assert time.monotonic() - started < 20, "logging blocked while the server was down"
        assert t.pending >= 5  # buffered, in order
        outage = time.monotonic()
        second = mlflow_server(port, store)
        second.wait_ready(90)
        for step in steps[5:]:
            t.log_metrics({"loss": float(step)}, step=step)
        outage = time.monotonic() - outage
    try:
        client = MlflowClient(url)
        run = client.get_run(t.run_id)
        logged = sorted(m.step for m in client.get_metric_history(t.run_id, "loss"))
        arts = [a.path for a in client.list_artifacts(t.run_id)]
    finally:
        second.stop()
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.0001"
    assert logged == steps and "sample.txt" in arts
    faults.record(f"MLflow server stopped mid-run, back after {outage:.0f} s", injected=1, survived=True,
                  lost=len(set(steps) - set(logged)) + ("sample.txt" not in arts), detail="metrics, artifact")
