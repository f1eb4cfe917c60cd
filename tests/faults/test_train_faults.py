"""Training under faults: workers killed at random steps, a damaged checkpoint.

Kill points (rank, step) are drawn from fixed seeds (reproducible, but not picked by hand) and injected with
the VIDGEN_FAULT_TRAIN hook (vidgen/faults.py): the rank's process exits right after that optimizer step.
Each fit is a real Ray Train + DeepSpeed ZeRO-2 run of the tiny SVD UNet on 2 CPU workers; each attempt (the
first and one per kill) costs ~35 s on 2 cores, so the two fits check everything between them.
"""

from __future__ import annotations

import logging
import os
import random
import uuid

import numpy as np
import pytest
import torch

from vidgen import faults as fault_hooks
from vidgen.config import load_config
from vidgen.errors import ModelError
from vidgen.train.manifest import verify_manifest, write_manifest

SEEDS = (11, 23)  # fit 1, fit 2 (the rerun after the damaged checkpoint)
KILLS, RERUN_KILLS = 2, 1  # in fit 1 and in fit 2; each kill costs a restart (~35 s on 2 idle cores)
MAX_STEPS, EVERY = 4, 2


def kill_points(seed: int, kills: int, first: int, last: int, world: int = 2) -> list[tuple[int, int]]:
    """(rank, step) pairs at distinct steps in first..last, drawn from the seed."""
    rng = random.Random(seed)
    return [(rng.randrange(world), s) for s in sorted(rng.sample(range(first, last + 1), kills))]


def kill_spec(points: list[tuple[int, int]], marker) -> str:
    return ",".join(f"{r}:{s}" for r, s in points) + f"@{marker}"


def clips(n: int = 8):
    import ray

    clip = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    return ray.data.from_items([{"frames": clip, "fps": 7.0} for _ in range(n)])


def config(tmp_path, *overrides: str):
    return load_config(None, [f"run.workdir={tmp_path}", f"run.name=f-{uuid.uuid4().hex[:8]}", "model.num_frames=4",
                              "train.num_workers=2", "train.zero_stage=2", "train.lr=1e-3",
                              f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={EVERY}",
                              "train.keep_checkpoints=2", f"train.max_failures={KILLS + 1}", *overrides])


def lost_steps(steps: list[int], first: int, last: int) -> int:
    """Steps missing from `first..last` plus steps logged more than once."""
    want = set(range(first, last + 1))
    return len(want - set(steps)) + (len(steps) - len(set(steps))) + len(set(steps) - want)


# ---- pure parts -------------------------------------------------------------------------------------------


def test_fault_spec_parses_several_points_with_and_without_a_marker():
    assert fault_hooks.parse("TRAIN", "1:3@/tmp/k") == ([(1, 3)], "/tmp/k")
    assert fault_hooks.parse("TRAIN", "0:2,1:5,0:6@/tmp/a:b@c") == ([(0, 2), (1, 5), (0, 6)], "/tmp/a:b@c")
    assert fault_hooks.parse("LATENTS", "2") == ([(2,)], None)
    with pytest.raises(ValueError, match="VIDGEN_FAULT_TRAIN='1:x@/m': expected <point>"):
        fault_hooks.parse("TRAIN", "1:x@/m")
    points = kill_points(SEEDS[0], 3, 1, 6)
    assert points == kill_points(SEEDS[0], 3, 1, 6) and len({s for _, s in points}) == 3
    assert all(r in (0, 1) and 1 <= s <= 6 for r, s in points)


def test_manifest_names_truncated_missing_extra_and_corrupted_files(tmp_path):
    d = tmp_path / "ckpt"
    (d / "step1").mkdir(parents=True)
    (d / "latest").write_text("step1")
    (d / "step1" / "a.pt").write_bytes(os.urandom(1000))
    (d / "step1" / "b.pt").write_bytes(b"x" * 100)
    write_manifest(d)
    assert verify_manifest(d) == []

    with open(d / "step1" / "a.pt", "r+b") as f:
        f.truncate(400)
    (d / "step1" / "b.pt").write_bytes(b"y" * 100)  # same size, other bytes
    (d / "latest").unlink()
    (d / "stale.pt").write_bytes(b"old")
    problems = verify_manifest(d)
    assert problems == [
        f"{d}/latest: missing (expected 5 bytes)",
        f"{d}/step1/a.pt: 400 bytes, expected 1000 (truncated or rewritten)",
        problems[2],
        f"{d}/stale.pt: not in the manifest (a stray or stale file)",
    ]
    assert problems[2].startswith(f"{d}/step1/b.pt: sha256 ") and problems[2].endswith("(corrupted)")
    assert verify_manifest(d, allow_extra=True) == problems[:3]


def test_manifest_parts_of_several_writers(tmp_path):
    (tmp_path / "r0.pt").write_bytes(b"rank 0")
    write_manifest(tmp_path, files=["r0.pt"], part=0, parts=2)
    (tmp_path / "r1.pt").write_bytes(b"rank 1")
    assert verify_manifest(tmp_path) == [
        f"{tmp_path}: manifest part 1 of 2 is missing (vidgen-manifest.1-of-2.json)",
        f"{tmp_path}/r1.pt: not in the manifest (a stray or stale file)"]
    write_manifest(tmp_path, files=["r1.pt"], part=1, parts=2)
    assert verify_manifest(tmp_path) == []
    (tmp_path / "vidgen-manifest.1-of-2.json").write_text("{trunc")
    assert "unreadable manifest (JSONDecodeError" in verify_manifest(tmp_path)[0]
    assert verify_manifest(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a directory"]
    (tmp_path / "empty").mkdir()
    assert "no vidgen-manifest.json" in verify_manifest(tmp_path / "empty")[0]


# ---- on the real stack: two fits (each attempt costs ~35 s on 2 cores, so every fit checks several things) --


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    """Fit 1, seed SEEDS[0]: KILLS kills at random steps. (An MLflow outage during training is in
    test_tracking_faults.py: the driver's Tracker buffers whatever the job logs, so one run there covers it.)"""
    from vidgen.train.launch import fit

    tmp = tmp_path_factory.mktemp("first-run")
    marker = tmp / "killed"
    points = kill_points(SEEDS[0], KILLS, 1, MAX_STEPS)
    cfg = config(tmp)
    logged: list[int] = []
    os.environ[fault_hooks.env_name("TRAIN")] = kill_spec(points, marker)
    try:
        result = fit(cfg, clips(), on_metrics=lambda rows: logged.extend(r["step"] for r in rows))
    finally:
        del os.environ[fault_hooks.env_name("TRAIN")]
    return {"cfg": cfg, "result": result, "points": points, "fired": fault_hooks.fired(str(marker)),
            "logged": logged}


@pytest.mark.ray
def test_killed_workers_lose_no_step_and_count_no_data_twice(first_run, faults):
    result, points = first_run["result"], first_run["points"]
    steps = [r["step"] for r in result.metrics]
    assert first_run["fired"] == set(range(KILLS)), f"kills {points} were not all injected"
    assert steps == list(range(1, MAX_STEPS + 1)) and all(np.isfinite(r["loss"]) for r in result.metrics)
    assert first_run["logged"] == steps, "each step reaches the tracker once, in order"
    last = result.checkpoint_dir
    assert verify_manifest(last) == [] and sorted(f for f in os.listdir(last) if f.startswith("vidgen-manifest")) \
        == ["vidgen-manifest.0-of-2.json", "vidgen-manifest.1-of-2.json"]
    state = torch.load(f"{last}/step{MAX_STEPS:08d}/mp_rank_00_model_states.pt", weights_only=True)
    assert state["step"] == MAX_STEPS and state["batches_seen"] == [MAX_STEPS, MAX_STEPS], "data counted twice"
    faults.record(f"rank:step kills {points} in one fit (seed {SEEDS[0]})", injected=KILLS, survived=True,
                  lost=lost_steps(steps, 1, MAX_STEPS), detail=f"steps 1..{MAX_STEPS} once each, loss finite")


@pytest.mark.ray
def test_truncated_checkpoint_is_rejected_and_the_previous_used(first_run, tmp_path, monkeypatch, caplog, faults):
    """The newest checkpoint of fit 1 is truncated on disk. The export and fit 2 (a rerun with more steps and,
    seed SEEDS[1], RERUN_KILLS kill(s) at random steps) reject it in one line each and use the previous checkpoint."""
    from ray.train import Checkpoint

    from vidgen.train.launch import consolidated_state_dict, export_unet, fit

    cfg, last = first_run["cfg"], first_run["result"].checkpoint_dir
    victim = f"{last}/step{MAX_STEPS:08d}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelError, match=f"checkpoint {last}: {victim}: {size // 2} bytes, expected {size}"):
        consolidated_state_dict(last)
    caplog.set_level(logging.WARNING, logger="vidgen.train.loop")
    export_unet(cfg, Checkpoint.from_directory(last), str(tmp_path / "export"))
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert rejected == [f"checkpoint {last} rejected: {victim}: {size // 2} bytes, expected {size} "
                        "(truncated or rewritten)"]
    assert os.path.exists(tmp_path / "export" / "config.json")

    first, end = MAX_STEPS - EVERY + 1, MAX_STEPS + 2  # resumes after the previous checkpoint
    points = kill_points(SEEDS[1], RERUN_KILLS, first, end)
    marker = tmp_path / "killed"
    monkeypatch.setenv(fault_hooks.env_name("TRAIN"), kill_spec(points, marker))
    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": end})})
    rerun = fit(more, clips())
    steps = [r["step"] for r in rerun.metrics]
    assert fault_hooks.fired(str(marker)) == set(range(RERUN_KILLS)), f"kills {points} were not all injected"
    assert steps == list(range(first, end + 1)), "did not resume from the previous checkpoint"
    assert verify_manifest(rerun.checkpoint_dir) == []
    faults.record("newest checkpoint truncated on disk (half an optimizer shard), export + rerun", injected=1,
                  survived=True, lost=lost_steps(steps, first, end),
                  detail=f"both used step {first - 1}; rerun ended at {end}")
    faults.record(f"rank:step kills {points} in the rerun (seed {SEEDS[1]})", injected=RERUN_KILLS, survived=True,
                  lost=lost_steps(steps, first, end), detail=f"steps {first}..{end} once each")
