"""Dataset layouts on generated trees: OPV2V, Seer's sthv2 / Bridge / Epic-Kitchens; prepare_opv2v."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidgen import storage
from vidgen.data import detect_layout, list_samples, prepare_opv2v, read_clips, read_clips_local, write_video
from vidgen.data.opv2v_prepare import contiguous_runs, cut_clips
from vidgen.errors import ConfigError, DataError

SCENARIO = "2021_08_16_22_26_54"
# OPV2V timestamps step by 2; names of every width, so lexical order ("000098" < "00096") is wrong.
TIMESTAMPS = [96, 98, 100, 102, 104, 106, 108, 110, 112, 114, 116, 118]
NAMES = {96: "00096", 98: "000098", 100: "100", 102: "0102"}


def _png(path: Path, value: int, size=(20, 16)) -> None:
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


def _opv2v_tree(root: Path, timestamps=TIMESTAMPS, cavs=("641", "650"), split="train") -> Path:
    """Camera k of timestamp t is a flat frame of red = t + 50 * k, so order and camera show in pixels."""
    for cav in cavs:
        folder = root / split / SCENARIO / cav
        folder.mkdir(parents=True)
        for t in timestamps:
            stem = NAMES.get(t, f"{t:06d}")
            for k in range(4):
                _png(folder / f"{stem}_camera{k}.png", (t + 50 * k) % 256)
            (folder / f"{stem}.yaml").write_text("lidar_pose: [0, 0, 0]\n")
            (folder / f"{stem}.pcd").write_bytes(b"not a point cloud")
    (root / split / SCENARIO / "data_protocol.yaml").write_text("additional: {}\n")
    return root


def test_opv2v_layout_orders_timestamps_numerically_and_selects_the_camera(tmp_path: Path):
    root = _opv2v_tree(tmp_path / "opv2v")
    assert detect_layout(str(root)) == "opv2v"
    samples = list_samples(str(root))
    assert [s.meta["name"] for s in samples] == [f"train/{SCENARIO}/641", f"train/{SCENARIO}/650"]
    first = samples[0]
    assert first.meta["timestamps"] == TIMESTAMPS
    assert [Path(u).name for u in first.frame_uris[:4]] == [
        "00096_camera0.png", "000098_camera0.png", "100_camera0.png", "0102_camera0.png"]
    assert all(u.endswith("_camera0.png") for u in first.frame_uris)  # yaml, pcd, other cameras ignored
    assert (first.meta["split"], first.meta["scenario"], first.meta["cav"]) == ("train", SCENARIO, "641")
    assert first.prompt == f"a front camera driving video, {SCENARIO}"

    back = list_samples(str(root), "opv2v", camera=3, prompt_template="{split}: {cav} in {scenario}")
    assert all(u.endswith("_camera3.png") for u in back[0].frame_uris)
    assert back[1].prompt == f"train: 650 in {SCENARIO}"

    # Camera 2, 10 Hz -> 5 fps: stride 2, frames 96, 100, 104, ... ; pixel = t + 100.
    rows = list(read_clips_local(str(root), num_frames=4, height=16, width=16, fps=5, camera=2, train=False,
                                 clips_per_video=1))
    assert len(rows) == 2 and rows[0]["fps"] == 5.0 and rows[0]["stride"] == 2
    np.testing.assert_array_equal(rows[0]["frames"][:, 8, 8, 0], [t + 100 for t in (96, 100, 104, 108)])
    # Hotshot's 8 fps from 10 Hz: stride round(10 / 8) = 1, every frame, 10 fps effective.
    rows = list(read_clips_local(str(root), "opv2v", num_frames=3, height=16, width=16, fps=8, train=False))
    assert rows[0]["stride"] == 1 and rows[0]["fps"] == 10.0
    np.testing.assert_array_equal(rows[0]["frames"][:, 8, 8, 0], [96, 98, 100])


def test_opv2v_prompt_map_split_root_and_missing_camera(tmp_path: Path):
    root = _opv2v_tree(tmp_path / "opv2v", cavs=("641",))
    (root / "prompts.json").write_text(json.dumps({SCENARIO: "a rainy intersection"}))
    assert list_samples(str(root))[0].prompt == "a rainy intersection"
    (root / "prompts.json").write_text(json.dumps({f"train/{SCENARIO}": "split-specific"}))
    assert list_samples(str(root))[0].prompt == "split-specific"

    # The root may be one split folder; its samples then have split "".
    only = list_samples(str(root / "train"), "opv2v", prompt_template="{split}|{scenario}|{cav}")
    assert only[0].meta["split"] == "" and only[0].prompt == f"|{SCENARIO}|641"

    # A CAV without the chosen camera is a sample that the ingest skips: it holds no frames of that camera.
    (root / "train" / SCENARIO / "-1").mkdir()
    _png(root / "train" / SCENARIO / "-1" / "000096_camera1.png", 1)
    stream = read_clips(str(root), "opv2v", num_frames=2, height=16, width=16, train=False,
                        report_dir=str(tmp_path / "r"))
    assert len(list(stream.iter_local())) == 1
    assert [(Path(b["uri"]).name, b["reason"]) for b in stream.report()["bad"]] == [("-1", "no frames")]

    (root / "prompts.json").write_text("{oops")
    with pytest.raises(DataError, match=r"prompts.json: not a UTF-8 JSON file"):
        list_samples(str(root))
    with pytest.raises(ConfigError, match=r"data.prompt_template: unknown field\(s\) \{town\}"):
        list_samples(str(root), "opv2v", prompt_template="{town}")
    with pytest.raises(ConfigError, match=r"data.camera"):
        list_samples(str(root), "opv2v", camera=-1)


def test_prepare_opv2v_cuts_2_to_5_second_clips_and_resumes(tmp_path: Path):
    # 10 Hz: cav 641 has 70 frames (7 s: two clips of 35), cav 650 a gap after 30 frames
    # (a 3 s clip, then 15 frames = 1.5 s: too short), cav 660 only 12 frames (1.2 s: none).
    long = list(range(0, 140, 2))
    gappy = list(range(0, 60, 2)) + list(range(200, 230, 2))
    root = tmp_path / "opv2v"
    _opv2v_tree(root, long, cavs=("641",))
    _opv2v_tree(root, gappy, cavs=("650",), split="validate")
    _opv2v_tree(root, long[:12], cavs=("660",), split="test")
    out = tmp_path / "clips"
    summary = prepare_opv2v(str(root), str(out))
    assert (summary["clips"], summary["written"], summary["existing"], summary["too_short"]) == (3, 3, 0, 2)
    clips = sorted(p.parent for p in out.rglob("prompt.txt"))
    assert [c.relative_to(out).as_posix() for c in clips] == [
        f"train/{SCENARIO}_cav641_camera0_000000", f"train/{SCENARIO}_cav641_camera0_000070",
        f"validate/{SCENARIO}_cav650_camera0_000000"]
    lengths = [len(list(c.glob("*.jpg"))) for c in clips]
    assert lengths == [35, 35, 30] and all(2 <= n / 10 <= 5 for n in lengths)
    assert (clips[0] / "prompt.txt").read_text() == f"a front camera driving video, {SCENARIO}\n"
    # Frames 0.jpg .. n-1.jpg in timestamp order (red = t, JPEG within a few levels).
    reds = [np.asarray(Image.open(clips[1] / f"{i}.jpg"))[8, 8, 0] for i in range(3)]
    assert np.allclose(reds, [70, 72, 74], atol=3)
    assert detect_layout(str(out)) == "hotshot"

    before = {c: (c / "0.jpg").stat().st_mtime_ns for c in clips}
    again = prepare_opv2v(str(root), str(out))
    assert (again["written"], again["existing"]) == (0, 3)
    assert {c: (c / "0.jpg").stat().st_mtime_ns for c in clips} == before

    # fps=4: stride round(10 / 4) = 2, 5 fps out; 2-4 s = 10-20 frames. cav 641: 35 frames -> 17 + 18;
    # cav 650: 15 frames (3 s), then 8 (1.6 s, too short).
    assert prepare_opv2v(str(root), str(tmp_path / "s2"), fps=4, min_seconds=2, max_seconds=4)["fps"] == 5.0
    lengths = sorted(len(list(p.parent.glob("*.jpg"))) for p in (tmp_path / "s2").rglob("prompt.txt"))
    assert lengths == [15, 17, 18]


def test_contiguous_runs_and_cut_clips():
    assert contiguous_runs([0, 2, 4, 6, 20, 22, 24]) == [(0, 4), (4, 7)]
    assert contiguous_runs([1, 2]) == [(0, 2)] and contiguous_runs([]) == []
    assert cut_clips(52, 20, 50) == [(0, 26), (26, 52)]
    assert cut_clips(50, 20, 50) == [(0, 50)]
    assert cut_clips(19, 20, 50) == []
    assert cut_clips(101, 20, 50) == [(0, 34), (34, 67), (67, 101)]


# ---- Seer's trees ----------------------------------------------------------------------------------


def _frames(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        _png(folder / name, 10 * i)


def test_sthv2_rawframes_with_annotations(tmp_path: Path):
    root = tmp_path / "sthv2"
    for vid in ("1", "2", "3", "4"):
        _frames(root / "rawframes" / vid, [f"img_{i:05d}.jpg" for i in range(1, 13)])
    (root / "annotations").mkdir()
    (root / "annotations" / "train.json").write_text(json.dumps([
        {"id": "1", "label": "putting a pen on a table", "template": "Putting [something] on [something]"},
        {"id": "2", "template": "Pushing [something] from left to right"},
        {"id": "99", "label": "no frames for this one"},
    ]))
    (root / "annotations" / "test.json").write_text(json.dumps([{"id": "4"}]))  # unlabelled test split
    (root / "annotations" / "labels.json").write_text(json.dumps({"Pushing [something]": "0"}))
    assert detect_layout(str(root)) == "sthv2"
    samples = list_samples(str(root))
    assert [(s.meta["id"], s.prompt) for s in samples] == [
        ("1", "putting a pen on a table"), ("2", "Pushing something from left to right"), ("3", None)]
    assert [Path(u).name for u in samples[0].frame_uris[:3]] == [
        "img_00001.jpg", "img_00002.jpg", "img_00003.jpg"]

    stream = read_clips(str(root), num_frames=4, height=16, width=16, fps=4, source_fps=12, train=False,
                        report_dir=str(tmp_path / "r"))
    rows = list(stream.iter_local())
    assert [r["prompt"] for r in rows] == ["putting a pen on a table", "Pushing something from left to right"]
    assert rows[0]["stride"] == 3 and rows[0]["fps"] == 4.0
    assert stream.report()["bad"] == [{"uri": str(root / "rawframes" / "3"), "reason": "missing prompt",
                                       "detail": f"{root / 'rawframes' / '3'}: id '3' has no label in "
                                                 "annotations/*.json"}]

    # Without rawframes/, the videos/ folder is read (Something-Something's webm as distributed).
    vids = tmp_path / "sthv2_videos"
    write_video(str(vids / "videos" / "5.mp4"), np.zeros((8, 16, 16, 3), np.uint8), fps=12)
    (vids / "annotations").mkdir()
    (vids / "annotations" / "train.json").write_text(json.dumps([{"id": "5", "label": "spinning"}]))
    assert detect_layout(str(vids)) == "sthv2"
    assert [(s.uri.endswith("5.mp4"), s.frame_uris, s.prompt) for s in list_samples(str(vids))] == [
        (True, None, "spinning")]

    (root / "annotations" / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"annotations/broken.json: not a UTF-8 JSON file"):
        list_samples(str(root), "sthv2")


def test_bridge_and_epic_kitchens_trees(tmp_path: Path):
    bridge = tmp_path / "bridge"
    names = [f"img_{i:05d}.jpg" for i in range(1, 6)]
    _frames(bridge / "rawframes" / "close_brown1fbox_flap" / "0", names)
    _frames(bridge / "rawframes" / "put-pot_in_sink_distractors" / "3", names)
    assert detect_layout(str(bridge)) == "sthv2"
    assert [(s.meta["dataset"], s.meta["name"], s.prompt) for s in list_samples(str(bridge))] == [
        ("bridge", "rawframes/close_brown1fbox_flap/0", "close brown1fbox flap"),
        ("bridge", "rawframes/put-pot_in_sink_distractors/3", "put pot in sink")]

    epic = tmp_path / "epic"
    _frames(epic / "P01" / "rgb_frames" / "P01_01", [f"frame_{i:010d}.jpg" for i in range(1, 31)])
    _frames(epic / "P02" / "rgb_frames" / "P02_07", [f"frame_{i:010d}.jpg" for i in range(1, 11)])
    assert detect_layout(str(epic)) == "sthv2"
    assert [(s.meta["dataset"], s.prompt, len(s.frame_uris)) for s in list_samples(str(epic))] == [
        ("epic-kitchens", None, 30), ("epic-kitchens", None, 10)]  # no narrations: whole videos
    (epic / "EPIC_100_train.csv").write_text(
        "narration_id,participant_id,video_id,narration,start_frame,stop_frame\n"
        "P01_01_0,P01,P01_01,open door,3,12\n"
        "P01_01_1,P01,P01_01,take cup,20,30\n"
        "P09_01_0,P09,P09_01,not downloaded,1,5\n")
    samples = list_samples(str(epic), "sthv2")
    assert [(s.uri.rpartition("#")[2], s.prompt, Path(s.frame_uris[0]).name, len(s.frame_uris))
            for s in samples] == [("P01_01_0", "open door", "frame_0000000003.jpg", 10),
                                  ("P01_01_1", "take cup", "frame_0000000020.jpg", 11)]
    rows = list(read_clips_local(str(epic), num_frames=3, height=16, width=16, train=False,
                                 report_dir=str(tmp_path / "r")))
    # Frame i (1-based) is red 10 * (i - 1), saved as JPEG: the "take cup" clip starts at frame 20.
    assert [r["prompt"] for r in rows] == ["open door", "take cup"]
    np.testing.assert_allclose(rows[1]["frames"][:, 8, 8, 0], [190, 200, 210], atol=3)  # JPEG


def test_opv2v_and_sthv2_trees_on_object_storage(request, tmp_path: Path):
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.bucket()
    local_opv2v = _opv2v_tree(tmp_path / "opv2v", TIMESTAMPS[:6], cavs=("641",))
    sthv2 = tmp_path / "sthv2"
    _frames(sthv2 / "rawframes" / "7", [f"img_{i:05d}.jpg" for i in range(1, 7)])
    (sthv2 / "annotations").mkdir()
    (sthv2 / "annotations" / "validation.json").write_text(json.dumps([{"id": "7", "label": "waving"}]))
    for local, name in ((local_opv2v, "opv2v"), (sthv2, "sthv2")):
        storage.upload_dir(str(local), storage.join(bucket, name))
        args = {"num_frames": 3, "height": 16, "width": 16, "train": False, "report_dir": str(tmp_path / "r")}
        remote = list(read_clips_local(storage.join(bucket, name), **args))
        here = list(read_clips_local(str(local), **args))
        assert detect_layout(storage.join(bucket, name)) == name and len(remote) == len(here) == 1
        assert remote[0]["clip_id"] == f"{bucket}/{name}/" + here[0]["clip_id"][len(str(local)) + 1:]
        assert remote[0]["prompt"] == here[0]["prompt"]
        np.testing.assert_array_equal(remote[0]["frames"], here[0]["frames"])
