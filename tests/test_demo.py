"""`vidgen demo` end to end at smaller sizes, logging to a real MLflow server on loopback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vidgen.config import load_config
from vidgen.demo import DEMO_OVERRIDES, DemoSizes, run_demo

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEMO_YAML = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"


def test_demo_yaml_holds_the_demo_settings():
    from_yaml = load_config(DEMO_YAML).to_dict()
    embedded = load_config(None, DEMO_OVERRIDES).to_dict()
    from_yaml["run"].pop("workdir"), embedded["run"].pop("workdir")
    assert from_yaml == embedded


def test_demo_end_to_end(ray_session, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    overrides = [f"tracking.uri={mlflow_server}", "train.max_steps=3", "train.checkpoint_every=3",
                 "generate.num_frames=8", "generate.fifo.partitions=1", "eval.num_frames=8"]
    summary = run_demo(str(tmp_path / "demo"), overrides, DemoSizes(videos=4, frames=8, generated=2))

    assert summary.steps == 3 and math.isfinite(summary.first_loss) and math.isfinite(summary.last_loss)
    assert len(summary.videos) == 2 and all(Path(v).stat().st_size > 0 for v in summary.videos)
    from vidgen.data.video import read_video

    frames, fps = read_video(summary.videos[0])
    assert frames.shape == (8, 64, 64, 3) and fps == pytest.approx(7)  # longer than the 4-frame window
    assert math.isfinite(summary.fvd) and summary.fvd > 0

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.flavor"] == "tiny"
    losses = client.get_metric_history(summary.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3]
    # timestamped when each step ended on the worker: in step order, inside the demo's run
    stamps = [m.timestamp for m in losses]
    assert stamps == sorted(stamps) and run.info.start_time <= stamps[0], (stamps, run.info.start_time)
    assert "train/time" not in run.data.metrics
    assert run.data.metrics["fvd"] == pytest.approx(summary.fvd)
    artifacts = [a.path for a in client.list_artifacts(summary.run_id)]
    assert "config.yaml" in artifacts
    videos = [a.path for a in client.list_artifacts(summary.run_id, "videos")]
    assert len(videos) >= 1 and all(v.endswith(".mp4") for v in videos)
    assert summary.ui_command.startswith(mlflow_server) and summary.run_id in summary.text()
