"""Exact data position (vidgen/data/position.py): each epoch's clip order from (seed, epoch) alone, shares per rank,
checkpointed consumption, and resumes that train every clip exactly as an uninterrupted run does.

The Ray Train tests are real 2-worker Ray Train + DeepSpeed ZeRO-2 fits of the tiny SVD UNet; each attempt costs
~35 s on 2 cores, so the test of each resume kind is one killed fit against one uninterrupted fit.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidgen.data.pipeline import read_clips
from vidgen.data.position import DataPosition, epoch_order, rank_rows
from vidgen.errors import DataError

# ---- pure ---------------------------------------------------------------------------------------------------


def test_epoch_order_is_a_seeded_permutation_of_seed_and_epoch_alone():
    a = epoch_order(50, seed=3, epoch=1)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(50, seed=4, epoch=1))


def test_shares_partition_the_epoch_in_order_for_any_number_of_ranks():
    pos = DataPosition(10, 2)
    order = epoch_order(10, 0, 0)
    for world in (1, 2, 3):
        shares = [pos.share(0, r, world, seed=0) for r in range(world)]
        assert sorted(np.concatenate([s for s, _ in shares]).tolist()) == list(range(10))
        assert all(np.array_equal(s, order[r::world]) for r, (s, _) in enumerate(shares))
        assert all(w.all() for _, w in shares)
    pos.mark([0, 0], [order[0] * 2, order[0] * 2 + 1])  # both clips of the first sample
    pos.mark([0], [order[1] * 2 + 1])  # the second clip of the second sample
    samples, wanted = pos.share(0, 0, 1, seed=0)
    assert np.array_equal(samples, order[1:]) and wanted[0].tolist() == [True, False] and wanted[1:].all()


def test_position_round_trips_advances_and_refuses_other_data():
    pos = DataPosition(7, 3)
    pos.mark([0] * 21, range(21))  # epoch 0 complete
    pos.mark([1, 2], [4, 20])
    state = pos.state()
    assert state["floor"] == 1 and sorted(state["done"]) == [1, 2]
    again = DataPosition.from_state(json.loads(json.dumps({**state, "done": {}})) | {"done": state["done"]}, 7, 3)
    assert again.floor == 1 and again.done(0).all()
    assert np.flatnonzero(again.done(1)).tolist() == [4] and np.flatnonzero(again.done(2)).tolist() == [20]
    again.mark_samples(1, [2], first_clip=1)  # sample 2 makes one clip: slots 7, 8 are empty
    assert np.flatnonzero(again.done(1)).tolist() == [4, 7, 8]
    with pytest.raises(DataError, match="covers 7 samples x 3 clips, but data.source now lists 8 samples x 3 clips"):
        DataPosition.from_state(state, 8, 3)


# ---- one Ray Data share per rank -------------------------------------------------------------------------------


def _frames(folder: Path, n: int, size: tuple[int, int], value: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, ((value * 37 + i * 11) % 256, value % 256, 90)).save(folder / f"{i:03d}.png")


def make_tree(root: Path, samples: int, *, frames: int = 8, bad: tuple[int, ...] = (), short: tuple[int, ...] = (),
              wide_every: int = 0) -> str:
    """Frame folders v00..: 64x64 (or 128x64 wide every `wide_every`-th), `frames` frames (4 where `short`); the
    `bad` ones have corrupt frames only."""
    for i in range(samples):
        size = (128, 64) if wide_every and i % wide_every == 0 else (64, 64)
        _frames(root / f"v{i:02d}", 4 if i in short else frames, size, i)
        for frame in (root / f"v{i:02d}").iterdir() if i in bad else ():
            frame.write_bytes(b"not a png")
    return str(root)


@pytest.mark.ray
def test_rank_shares_cover_the_epoch_once_and_a_resume_with_other_ranks_reads_the_rest(ray_session, tmp_path):
    root = make_tree(tmp_path / "d", 9, bad=(4,), short=(6,))  # v04 makes no clip, v06 one of two
    stream = read_clips(root, "frames", num_frames=4, height=32, width=32, clips_per_video=2, seed=5,
                        report_dir=str(tmp_path / "r"))
    epoch = Counter(r["clip_id"] for r in stream.iter_local())
    assert len(epoch) == 15 and set(epoch.values()) == {1}  # 7 samples x 2 clips + v06's one

    pos = [DataPosition(9, 2) for _ in range(2)]
    ranks = [rank_rows(stream, pos[r], r, 2) for r in range(2)]
    first = [[next(ranks[r]) for _ in range(3)] for r in range(2)]  # 3 clips each, "trained"
    for r in range(2):
        pos[r].mark([row["_epoch"] for row in first[r]], [row["_slot"] for row in first[r]])
    merged = DataPosition(9, 2)
    for e in (0,):
        merged.set_done(e, pos[0].done(e) | pos[1].done(e))
    resumed = DataPosition.from_state(merged.state(), 9, 2)
    rest = []
    for row in rank_rows(stream, resumed, 0, 1):  # one rank now, to the end of epoch 0
        if row["_epoch"] > 0:
            break
        rest.append(row)
    trained = Counter(row["clip_id"] for part in (*first, rest) for row in part)
    assert trained == epoch
    assert stream.report()["skipped"] == 1


@pytest.mark.ray
def test_a_rank_whose_samples_are_all_bad_says_so(ray_session, tmp_path):
    root = make_tree(tmp_path / "d", 2, bad=(0, 1))
    stream = read_clips(root, "frames", num_frames=4, height=32, width=32, report_dir=str(tmp_path / "r"))
    with pytest.raises(DataError, match=r"rank 0 of 1: no usable clip among its 2 samples of epochs 0 and 1 of /"):
        next(rank_rows(stream, DataPosition(2, 1), 0, 1))


# ---- through Ray Train ---------------------------------------------------------------------------------------


def _config(tmp_path: Path, source: str, name: str, *overrides: str):
    from vidgen.config import load_config

    return load_config(None, [f"run.workdir={tmp_path}", f"run.name={name}", "model.num_frames=4",
                              f"data.source={source}", "data.layout=frames", "data.clips_per_video=2",
                              "train.num_workers=2", "train.zero_stage=2", "train.lr=1e-3", "train.checkpoint_every=2",
                              "train.keep_checkpoints=2", "run.seed=7", *overrides])


def trained_clips(log_dir: Path) -> tuple[Counter, list[list]]:
    """(clip id -> times trained, every micro-batch's buckets) from the VIDGEN_CLIP_LOG files of a run: an
    attempt's lines count up to the step the next attempt started from."""
    files = sorted(log_dir.glob("*.jsonl"), key=lambda p: int(p.name.split("-")[0]))
    attempts: list[dict] = []  # [{start, ranks: {rank: lines}}] in time order
    for f in files:
        _, rank, start = f.stem.split("-")
        if not attempts or attempts[-1]["start"] != int(start) or int(rank) in attempts[-1]["ranks"]:
            attempts.append({"start": int(start), "ranks": {}})
        attempts[-1]["ranks"][int(rank)] = [json.loads(line) for line in f.read_text().splitlines()]
    clips, buckets = Counter(), []
    for i, attempt in enumerate(attempts):
        until = attempts[i + 1]["start"] if i + 1 < len(attempts) else float("inf")
        for lines in attempt["ranks"].values():
            for line in lines:
                if line["step"] <= until:
                    clips.update(line["clips"])
                    buckets.append(line["buckets"])
    return clips, buckets


def _fit(cfg, log_dir: Path, monkeypatch, kill: str | None = None):
    from vidgen.data.pipeline import read_config_clips
    from vidgen.train import loop
    from vidgen.train.launch import fit

    log_dir.mkdir()
    monkeypatch.setenv(loop.CLIP_LOG_ENV, str(log_dir))
    if kill:
        monkeypatch.setenv("VIDGEN_FAULT_TRAIN", kill)  # vidgen/faults.py
    else:
        monkeypatch.delenv("VIDGEN_FAULT_TRAIN", raising=False)
    stream = read_config_clips(cfg, train=True, report_dir=str(log_dir.parent / f"report-{log_dir.name}"))
    return fit(cfg, stream), stream


@pytest.mark.ray
def test_bucketed_batches_of_four_resume_exactly_after_a_kill(ray_session, tmp_path, monkeypatch):
    """Two buckets, train.batch_size=4, 2 workers, 4 steps (32 clips of a 24-clip epoch, so into epoch 1);
    rank 1 killed after step 3 resumes from step 2 and trains exactly the clips of the uninterrupted run."""
    root = make_tree(tmp_path / "d", 12, wide_every=2)  # 6 wide (128x64), 6 square
    common = ("data.buckets=64x64,64x32", "train.batch_size=4", "train.max_steps=4")
    full, _ = _fit(_config(tmp_path, root, "full", *common), tmp_path / "full", monkeypatch)
    killed, stream = _fit(_config(tmp_path, root, "killed", *common, "train.max_failures=1"), tmp_path / "killed",
                          monkeypatch, kill=f"1:3@{tmp_path / 'marker'}")
    assert [r["step"] for r in full.metrics] == [r["step"] for r in killed.metrics] == [1, 2, 3, 4]
    assert (tmp_path / "marker").read_text().split()[0] == "0", "the kill did not happen"
    want, batches = trained_clips(tmp_path / "full")
    got, killed_batches = trained_clips(tmp_path / "killed")
    assert sum(want.values()) == 32 and max(want.values()) == 2  # some clips of epoch 0 again in epoch 1
    assert got == want
    assert all(len(b) == 4 and len(set(b)) == 1 for b in batches + killed_batches)  # one bucket per batch
    assert {b[0] for b in batches} == {"64x64", "32x64"}
    assert stream.report()["skipped"] == 0


@pytest.mark.ray
def test_a_resume_with_fewer_workers_trains_the_rest_of_the_epoch_exactly_once(ray_session, tmp_path, monkeypatch):
    """2 workers (4 clips a step of a 24-clip epoch) killed after step 3, the run resumed from its last registered
    checkpoint with one worker: it trains the epoch's other clips first, and over both the epoch is trained exactly
    once."""
    from vidgen.errors import JobError
    from vidgen.train import checkpoints, loop
    from vidgen.train.launch import consolidated_state_dict

    root = make_tree(tmp_path / "d", 12)
    opts = ("train.batch_size=2", "train.checkpoint_every=1", "train.max_steps=12")
    with pytest.raises((JobError, RuntimeError)):
        _fit(_config(tmp_path, root, "shrink", *opts, "train.max_failures=0"), tmp_path / "two", monkeypatch,
             kill=f"1:3@{tmp_path / 'marker'}")
    newest = checkpoints.newest_complete(checkpoints.scan(str(tmp_path / "train" / "shrink")))
    resumed_at = newest.step  # the newest complete checkpoint on disk (Ray's registry may lag it)
    assert resumed_at >= 1

    # The ZeRO-2 shards of 2 workers, loaded by 1 (DeepSpeed's universal checkpoint): the weights as written.
    written = consolidated_state_dict(newest.uri)
    monkeypatch.setenv(loop.DUMP_ENV, str(tmp_path / "loaded.pt"))
    _fit(_config(tmp_path, root, "shrink", *opts, "train.num_workers=1", f"train.max_steps={resumed_at}"),
         tmp_path / "load-only", monkeypatch)
    monkeypatch.delenv(loop.DUMP_ENV)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert written.keys() == loaded.keys() and all(torch.equal(written[k], loaded[k]) for k in written)

    # Just the epoch's other 24 - 4 * resumed_at clips (2 a step), with one checkpoint at the end.
    rest_steps = (24 - 4 * resumed_at) // 2
    result, stream = _fit(_config(tmp_path, root, "shrink", *opts, "train.num_workers=1",
                                  f"train.max_steps={resumed_at + rest_steps}", "train.checkpoint_every=1000"),
                          tmp_path / "one", monkeypatch)
    assert [r["step"] for r in result.metrics] == list(range(resumed_at + 1, resumed_at + rest_steps + 1))
    before = [json.loads(x) for f in (tmp_path / "two").glob("*.jsonl") for x in f.read_text().splitlines()]
    first = Counter(c for line in before if line["step"] <= resumed_at for c in line["clips"])
    (after,) = [[json.loads(x) for x in f.read_text().splitlines()] for f in (tmp_path / "one").glob("*.jsonl")]
    rest = Counter([c for line in after for c in line["clips"]][: 24 - 4 * resumed_at])
    epoch = Counter(r["clip_id"] for r in stream.iter_local())
    assert sum(first.values()) == 4 * resumed_at and set(epoch.values()) == {1} and len(epoch) == 24
    assert first + rest == epoch


def test_clip_log_reader_keeps_each_attempt_up_to_the_next_start(tmp_path):
    def write(t, rank, start, lines):
        (tmp_path / f"{t}-{rank}-{start}.jsonl").write_text(
            "".join(json.dumps({"step": s, "clips": c, "buckets": ["b"] * len(c)}) + "\n" for s, c in lines))

    write(1, 0, 0, [(1, ["a"]), (2, ["b"]), (3, ["c"])])
    write(2, 1, 0, [(1, ["d"]), (2, ["e"]), (3, ["f"])])
    write(3, 0, 2, [(3, ["c"]), (4, ["g"])])
    write(4, 1, 2, [(3, ["f"])])
    clips, _ = trained_clips(tmp_path)
    assert clips == Counter({k: 1 for k in "abcdefg"})
