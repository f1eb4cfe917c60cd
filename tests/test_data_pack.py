"""pack -> parquet shards -> the `shards` layout: round trips, resume, object storage, Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vidgen import storage
from vidgen.data import detect_layout, make_moving_shapes, pack, read_clips, read_clips_local
from vidgen.errors import DataError

# 5 videos x 2 clips of 6 frames at 4 fps from 8 fps folders (stride 2), 32x32.
CLIP = {"num_frames": 6, "height": 32, "width": 32, "fps": 4.0, "source_fps": 8.0, "clips_per_video": 2,
        "train": False}
READ_BACK = {"num_frames": 6, "height": 32, "width": 32, "train": False, "clips_per_video": 1}
PNG = {"clips_per_shard": 4, "frame_format": "png", "max_bad_fraction": 0.5, **CLIP}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_moving_shapes(str(root), num_videos=5, num_frames=12, height=40, width=56, seed=1)
    (root / "sample_004" / "prompt.txt").write_text("")  # one bad sample, reported by pack
    return root


def _meta(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "frames"}


def _assert_round_trip(source_rows: list[dict], shard_rows: list[dict], tolerance: float = 0.0) -> None:
    """Same rows, same metadata; frames equal, or within `tolerance` mean absolute error (lossy codecs)."""
    assert [_meta(r) for r in shard_rows] == [_meta(r) for r in source_rows]
    for a, b in zip(source_rows, shard_rows, strict=True):
        if tolerance == 0:
            np.testing.assert_array_equal(a["frames"], b["frames"])
        else:
            assert np.abs(a["frames"].astype(int) - b["frames"].astype(int)).mean() < tolerance


def test_pack_png_round_trip_is_exact_and_resume_skips_complete_shards(shapes: Path, tmp_path: Path):
    out = tmp_path / "packed"
    manifest = pack(str(shapes), "hotshot", str(out), **PNG)
    # 5 samples, 2 per shard: shards of 4, 4 and 0 clips (sample_004 has an empty prompt).
    assert [(s["name"], s["clips"]) for s in manifest["shards"]] == [
        ("part-00000.parquet", 4), ("part-00001.parquet", 4), ("part-00002.parquet", 0)]
    assert (manifest["clips"], manifest["written"], manifest["existing"]) == (8, 3, 0)
    assert manifest["report"]["reasons"] == {"empty prompt": 1}
    assert json.loads((out / "_manifest.json").read_text())["clips"] == 8
    assert detect_layout(str(out)) == "shards"

    source_rows = list(read_clips_local(str(shapes), "hotshot", report_dir=str(tmp_path / "r1"), **CLIP))
    shard_rows = list(read_clips_local(str(out), report_dir=str(tmp_path / "r2"), **READ_BACK))
    assert len(shard_rows) == 8 and shard_rows[0]["clip_id"] == f"{shapes / 'sample_000'}#0"
    _assert_round_trip(source_rows, shard_rows)

    # Resume: a complete rerun writes nothing; shards whose done record is missing (a killed run)
    # or that were deleted are rewritten, and only they.
    stat = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = pack(str(shapes), "hotshot", str(out), **PNG)
    assert (again["written"], again["existing"]) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stat
    (out / "part-00001.done.json").unlink()
    (out / "part-00000.parquet").unlink()
    (out / "part-00000.done.json").unlink()
    third = pack(str(shapes), "hotshot", str(out), **PNG)
    assert (third["written"], third["existing"]) == (2, 1)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert after["part-00002.parquet"] == stat["part-00002.parquet"]
    assert after["part-00001.parquet"] != stat["part-00001.parquet"]
    repacked = list(read_clips_local(str(out), report_dir=str(tmp_path / "r3"), **READ_BACK))
    _assert_round_trip(source_rows, repacked)

    with pytest.raises(DataError, match=r"holds shards of a different pack \(frame_format: 'png' -> 'jpeg'\); "
                                        r"pack into a new --out"):
        pack(str(shapes), "hotshot", str(out), **{**PNG, "frame_format": "jpeg"})
    with pytest.raises(DataError, match=r"different pack \(spec.height: 32 -> 40; spec.num_frames: 6 -> 4\)"):
        pack(str(shapes), "hotshot", str(out), **{**PNG, "height": 40, "num_frames": 4})
    with pytest.raises(DataError, match=r"1 of 5 samples skipped .* empty prompt \(1\)"):
        pack(str(shapes), "hotshot", str(tmp_path / "strict"), **{**PNG, "max_bad_fraction": 0.05})
    assert (tmp_path / "strict" / "_manifest.json").exists()  # written before failing: nothing is lost


def test_shards_rewindow_resize_and_other_formats(shapes: Path, tmp_path: Path):
    # Lossy formats on 32x32 saturated shapes (JPEG's 4:2:0 chroma shows): small mean errors.
    for fmt, tolerance in (("jpeg", 4.0), ("mp4", 4.0)):
        out = tmp_path / fmt
        pack(str(shapes), "hotshot", str(out), **{**PNG, "frame_format": fmt, "clips_per_shard": 64})
        source_rows = list(read_clips_local(str(shapes), "hotshot", report_dir=str(tmp_path / "r"), **CLIP))
        shard_rows = list(read_clips_local(str(out), report_dir=str(tmp_path / "r"), **READ_BACK))
        _assert_round_trip(source_rows, shard_rows, tolerance)

    # Reading fewer frames at a lower rate from the packed 4 fps clips: stride 2 within the clip,
    # which is stride 4 in the source, and provenance points at the source frames.
    rows = list(read_clips_local(str(tmp_path / "jpeg"), num_frames=3, height=16, width=16, fps=2,
                                 train=False, clips_per_video=2, report_dir=str(tmp_path / "r")))
    assert len(rows) == 16 and rows[0]["frames"].shape == (3, 16, 16, 3)
    assert [(r["start_frame"], r["stride"], r["fps"]) for r in rows[:2]] == [(0, 4, 2.0), (2, 4, 2.0)]
    assert rows[1]["clip_id"] == f"{shapes / 'sample_000'}#2"
    stream = read_clips(str(tmp_path / "jpeg"), num_frames=7, height=16, width=16, train=False,
                        report_dir=str(tmp_path / "short"))
    assert list(stream.iter_local()) == []
    assert set(stream.report()["reasons"]) == {"too few frames"}


def test_shards_on_object_storage(request, shapes: Path, tmp_path: Path):
    s3 = request.getfixturevalue("s3_server")
    out = storage.join(s3.bucket(), "packed")
    manifest = pack(str(shapes), "hotshot", out, **{**PNG, "clips_per_shard": 3})
    assert manifest["clips"] == 8 and len(manifest["shards"]) == 5
    assert storage.exists(storage.join(out, "part-00000.parquet"))
    remote = list(read_clips_local(out, report_dir=str(tmp_path / "r"), **READ_BACK))
    source_rows = list(read_clips_local(str(shapes), "hotshot", report_dir=str(tmp_path / "r"), **CLIP))
    _assert_round_trip(source_rows, remote)
    again = pack(str(shapes), "hotshot", out, **{**PNG, "clips_per_shard": 3})
    assert (again["written"], again["existing"]) == (0, 5)


@pytest.mark.ray
def test_parallel_pack_and_shards_through_ray_data(ray_session, shapes: Path, tmp_path: Path):
    out = tmp_path / "parallel"
    manifest = pack(str(shapes), "hotshot", str(out), parallel=True, **PNG)
    assert (manifest["clips"], manifest["written"]) == (8, 3)
    stream = read_clips(str(out), report_dir=str(tmp_path / "r"), **READ_BACK)
    ray_rows = sorted(stream.dataset.take_all(), key=lambda r: r["clip_id"])
    source_rows = sorted(read_clips_local(str(shapes), "hotshot", report_dir=str(tmp_path / "r"), **CLIP),
                         key=lambda r: r["clip_id"])
    assert [r["clip_id"] for r in ray_rows] == [r["clip_id"] for r in source_rows]
    for a, b in zip(source_rows, ray_rows, strict=True):
        np.testing.assert_array_equal(a["frames"], b["frames"])
