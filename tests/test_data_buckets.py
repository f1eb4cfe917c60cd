"""Aspect-ratio buckets: parsing, nearest choice, resized clips, bucket-homogeneous batches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidgen.data import (
    bucket_batches,
    nearest_bucket,
    parse_buckets,
    read_clips,
    read_clips_local,
    write_video,
)
from vidgen.errors import ConfigError

HOTSHOT = [(768, 320), (672, 384), (608, 416), (512, 512), (416, 608), (384, 672), (320, 768)]  # (h, w)


def test_parse_buckets_presets_and_lists():
    assert parse_buckets("hotshot-512") == HOTSHOT  # tall to wide
    assert parse_buckets("SVD") == [(576, 1024)]
    assert parse_buckets("512x320, 320x512,512x320") == [(512, 320), (320, 512)]  # WxH in, (h, w) out
    assert parse_buckets([(64, 32)]) == [(64, 32)]
    assert parse_buckets(None) is None and parse_buckets("") is None
    with pytest.raises(ConfigError, match=r"data.buckets: '512by320' in '512by320' is not WxH"):
        parse_buckets("512by320")
    with pytest.raises(ConfigError, match=r"data.buckets: 500x320 \(WxH\) must be .* multiples of 8"):
        parse_buckets("500x320")


def test_nearest_bucket_uses_log_aspect_distance():
    assert nearest_bucket(720, 1280, HOTSHOT) == (384, 672)  # 16:9 = 1.78 -> 1.75
    assert nearest_bucket(600, 800, HOTSHOT) == (416, 608)  # OPV2V 4:3 = 1.33 -> 1.46 (1.0 is further)
    assert nearest_bucket(1280, 720, HOTSHOT) == (672, 384)
    assert nearest_bucket(100, 100, HOTSHOT) == (512, 512)
    assert nearest_bucket(100, 1000, HOTSHOT) == (320, 768)  # beyond the widest: the widest
    # 2:1 and 1:2 are equally far from 1:1 in log space, so the tie goes to the first listed.
    assert nearest_bucket(10, 10, [(16, 32), (32, 16)]) == (16, 32)
    assert nearest_bucket(10, 10, [(32, 16), (16, 32)]) == (32, 16)
    # In linear ratio 1.9 would be nearer 2.4 than 1.46 is (0.5 vs 0.44); in log space it is not.
    assert nearest_bucket(100, 190, [(416, 608), (320, 768)]) == (320, 768)


def test_clips_land_in_their_nearest_bucket(tmp_path: Path):
    root = tmp_path / "mixed"
    sizes = {"wide": (90, 160), "tall": (160, 90), "square": (96, 96), "opv2v": (60, 80)}  # (h, w)
    for name, (h, w) in sizes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (w, h), (40 * i, 0, 0)).save(buf, "PNG")
            (folder / f"{i}.png").write_bytes(buf.getvalue())
    write_video(str(root / "clip.mp4"), np.zeros((4, 64, 128, 3), np.uint8), fps=8)
    buckets = "64x32,48x32,32x32,32x48,32x64"  # WxH: 2:1, 3:2, 1:1, 2:3, 1:2
    rows = list(read_clips_local(str(root), "frames", num_frames=4, buckets=buckets, train=False,
                                 report_dir=str(tmp_path / "r")))
    got = {Path(r["source_uri"]).name: (r["bucket"], r["frames"].shape) for r in rows}
    assert got == {"wide": ("32x64", (4, 32, 64, 3)), "tall": ("64x32", (4, 64, 32, 3)),
                   "square": ("32x32", (4, 32, 32, 3)), "opv2v": ("32x48", (4, 32, 48, 3))}
    np.testing.assert_array_equal(rows[0]["frames"][:, 5, 5, 0], [0, 40, 80, 120])
    video = list(read_clips_local(str(root), "videos", num_frames=4, buckets=buckets, train=False,
                                  report_dir=str(tmp_path / "r")))
    assert video[0]["bucket"] == "32x64"
    # Without buckets every row has the one size, named the same way.
    plain = list(read_clips_local(str(root), "frames", num_frames=4, height=24, width=40, train=False,
                                  report_dir=str(tmp_path / "r")))
    assert {r["bucket"] for r in plain} == {"24x40"}
    with pytest.raises(ConfigError, match="data.height and data.width: required unless data.buckets"):
        read_clips_local(str(root), "frames", num_frames=4).__next__()


def _row(i: int, h: int, w: int) -> dict:
    return {"frames": np.full((2, h, w, 3), i, np.uint8), "bucket": f"{h}x{w}", "fps": 8.0, "prompt": f"p{i}",
            "start_frame": i}


def test_bucket_batches_are_homogeneous_and_memory_bounded():
    sizes = [(8, 16), (16, 8), (8, 8)]
    rng = np.random.default_rng(0)
    stream = [_row(i, *sizes[int(rng.integers(3))]) for i in range(100)]
    waiting = []

    def counting():
        for n, row in enumerate(stream, 1):
            waiting.append(n)
            yield row

    batches = []
    for batch in bucket_batches(counting(), batch_size=4):
        batches.append(batch)
        consumed = waiting[-1]
        emitted = 4 * len(batches)
        assert consumed - emitted <= len(sizes) * 3  # at most buckets x (batch_size - 1) rows held back
    for batch in batches:
        assert batch["frames"].shape[0] == 4 and batch["frames"].dtype == np.uint8
        assert len(set(batch["bucket"])) == 1
        h, w = map(int, batch["bucket"][0].split("x"))
        assert batch["frames"].shape[2:4] == (h, w)
        assert batch["fps"].dtype == np.float64 and batch["prompt"][0].startswith("p")
        # Each row's own frames, in stream order within the bucket.
        assert list(batch["frames"][:, 0, 0, 0, 0]) == sorted(batch["start_frame"].tolist())
    counts = {s: sum(1 for r in stream if r["bucket"] == f"{s[0]}x{s[1]}") for s in sizes}
    assert len(batches) == sum(n // 4 for n in counts.values())

    rest = list(bucket_batches(iter(stream), batch_size=4, drop_last=False))
    assert sum(b["frames"].shape[0] for b in rest) == 100
    assert all(len(set(b["bucket"])) == 1 for b in rest)
    with pytest.raises(ValueError):
        next(bucket_batches(iter(stream), batch_size=0))


@pytest.mark.ray
def test_mixed_buckets_stream_through_ray_data_into_homogeneous_batches(ray_session, tmp_path: Path):
    sizes = [(90, 160), (160, 90), (96, 96)] * 3  # (h, w): wide, tall, square
    for n, (h, w) in enumerate(sizes):
        folder = tmp_path / "mixed" / f"v{n}"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (w, h), (30 * i, 0, 0)).save(folder / f"{i}.png")
    stream = read_clips(str(tmp_path / "mixed"), "frames", num_frames=4, buckets="64x32,32x32,32x64",
                        train=False, report_dir=str(tmp_path / "r"))
    batches = list(bucket_batches(stream.dataset.iter_rows(), batch_size=3))
    assert sorted(b["bucket"][0] for b in batches) == ["32x32", "32x64", "64x32"]
    for b in batches:
        h, w = map(int, b["bucket"][0].split("x"))
        assert b["frames"].shape == (3, 4, h, w, 3) and set(b["bucket"]) == {b["bucket"][0]}
