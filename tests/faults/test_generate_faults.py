"""Generation actors killed mid-video: no partial file under a video name, and exactly the missing videos made.

The hook VIDGEN_FAULT_GENERATE (vidgen/faults.py) kills an actor's process while it writes a video.
"""

from __future__ import annotations

import json
import os

import pytest
from test_generate_job import GEN, MODEL, _jsonl, _manifest, _png

from vidgen.config import VidgenConfig
from vidgen.data.video import read_video
from vidgen.errors import JobError
from vidgen.generate.job import run_generation, summarize


@pytest.mark.ray
def test_actor_killed_mid_job_then_rerun_makes_exactly_the_missing_videos(ray_session, tmp_path, monkeypatch,
                                                                           faults):
    images = [_png(tmp_path / f"img{i}.png", 20 + i) for i in range(3)]
    prompts = _jsonl(tmp_path / "prompts.jsonl", [json.dumps({"image": p}) for p in images])
    root = tmp_path / "out"
    cfg = VidgenConfig(model=MODEL, generate={**GEN, "prompts": prompts, "output": str(root), "actor_restarts": 0})
    marker = tmp_path / "killed"
    monkeypatch.setenv("VIDGEN_FAULT_GENERATE", f"1@{marker}")  # dies while writing its second video
    with pytest.raises(JobError, match="rerun to do the rest"):
        run_generation(cfg)
    assert marker.exists()
    entries = os.listdir(root / "videos")
    first = [e for e in entries if not e.startswith(".vidgen-tmp-")]
    assert len(first) == 1  # one finished; the killed write left nothing under a video name
    leftovers = [e for e in entries if e.startswith(".vidgen-tmp-")]
    assert len(leftovers) == 1  # the killed writer's temp folder (hidden from storage listings)
    statuses = [m["status"] for m in _manifest(root)]
    assert statuses.count("generated") == 1 and statuses.count("missing") == 2
    stamp = os.stat(root / "videos" / first[0]).st_mtime_ns

    rerun = run_generation(cfg)
    assert summarize(rerun) == {"skipped": 1, "generated": 2}
    assert [r["status"] for r in rerun if os.path.basename(r["path"]) == first[0]] == ["skipped"]
    assert os.stat(root / "videos" / first[0]).st_mtime_ns == stamp
    assert sorted(os.listdir(root / "videos")) == sorted(os.path.basename(r["path"]) for r in rerun)  # no temps
    for r in rerun:
        assert read_video(r["path"])[0].shape == (6, 32, 32, 3)
    made = sorted(os.path.basename(r["path"]) for r in rerun)
    faults.record("generation actor killed while writing its 2nd of 3 videos (no restarts), rerun", injected=1,
                  survived=True, lost=3 - len(made), detail="no partial file; rerun made exactly the 2 missing")


@pytest.mark.ray
def test_killed_actor_is_restarted_and_its_video_retried_by_default(ray_session, tmp_path, monkeypatch, faults):
    images = [_png(tmp_path / f"img{i}.png", 30 + i) for i in range(2)]
    prompts = _jsonl(tmp_path / "prompts.jsonl", [json.dumps({"image": p}) for p in images])
    root = tmp_path / "out"
    cfg = VidgenConfig(model=MODEL, generate={**GEN, "prompts": prompts, "output": str(root)})
    assert cfg.generate.actor_restarts == -1
    marker = tmp_path / "killed"
    monkeypatch.setenv("VIDGEN_FAULT_GENERATE", f"0@{marker}")  # dies while writing its first video
    results = run_generation(cfg)
    assert marker.exists()  # it did die once
    assert summarize(results) == {"generated": 2}
    assert sorted(e for e in os.listdir(root / "videos") if not e.startswith(".")) == sorted(
        os.path.basename(r["path"]) for r in results)
    assert [m["status"] for m in _manifest(root)] == ["generated", "generated"]
    faults.record("generation actor killed while writing its 1st video (restarted by Ray)", injected=1,
                  survived=True, lost=2 - summarize(results).get("generated", 0), detail="video retried")
