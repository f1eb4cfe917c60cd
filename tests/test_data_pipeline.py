"""vidgen.data.pipeline: clip rows from every layout, determinism, skip reports, Ray Data and S3."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidgen import storage
from vidgen.data import check_bad_fraction, make_moving_shapes, read_clips, read_clips_local, write_video
from vidgen.errors import ConfigError, DataError

# The corpus is read as 6-frame clips at 4 fps from 8 fps folders: stride 2, frames 0, 2, ..., 10.
CLIP = {"num_frames": 6, "height": 32, "width": 32, "fps": 4.0, "source_fps": 8.0, "train": False}
BROKEN = {  # folder -> the reason it must be skipped for
    "truncated_jpeg": "corrupt image",
    "too_few": "too few frames",
    "missing_prompt": "missing prompt",
    "empty_prompt": "empty prompt",
    "latin1_prompt": "prompt not UTF-8",
    "mixed_sizes": "mixed frame sizes",
}


def _frame(value: int, size=(32, 32)) -> Image.Image:
    return Image.new("RGB", size, (value, value, 255 - value))


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def _folder(root: Path, name: str, n: int = 12, ext: str = "png", prompt: bytes | None = b"p") -> Path:
    """Frames frame_0 .. frame_{n-1} (unpadded, so lexical order would be wrong); frame i is 20 * i."""
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(n):
        _save(_frame(20 * i), folder / f"frame_{i}.{ext}", "PNG" if ext == "png" else "JPEG")
    if prompt is not None:
        (folder / "prompt.txt").write_bytes(prompt)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two good hotshot folders (PNG, JPEG) and one folder per way a sample can be broken."""
    root = tmp_path_factory.mktemp("corpus")
    _folder(root, "good_png", prompt=b"a good png clip\n")
    _folder(root, "good_jpeg", ext="jpg", prompt="caf\u00e9 au lait".encode())
    bad = _folder(root, "truncated_jpeg", ext="jpg")
    data = (bad / "frame_6.jpg").read_bytes()
    (bad / "frame_6.jpg").write_bytes(data[: len(data) // 2])
    _folder(root, "too_few", n=5)
    _folder(root, "missing_prompt", prompt=None)
    _folder(root, "empty_prompt", prompt=b"  \n")
    _folder(root, "latin1_prompt", prompt=b"caf\xe9")
    mixed = _folder(root, "mixed_sizes")
    _save(_frame(80, size=(40, 32)), mixed / "frame_4.png", "PNG")
    return root


def _by_id(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["clip_id"])


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["clip_id"] for r in _by_id(a)] == [r["clip_id"] for r in _by_id(b)]
    for x, y in zip(_by_id(a), _by_id(b), strict=True):
        np.testing.assert_array_equal(x["frames"], y["frames"])
        assert (x["prompt"], x["fps"], x["source_uri"], x["start_frame"]) == (
            y["prompt"], y["fps"], y["source_uri"], y["start_frame"])


def test_corpus_rows_order_stride_and_exact_skip_report(corpus: Path, tmp_path: Path):
    stream = read_clips(str(corpus), report_dir=str(tmp_path / "report"), **CLIP)
    assert stream.num_samples == 8
    rows = list(stream.iter_local())
    assert [Path(r["source_uri"]).name for r in rows] == ["good_jpeg", "good_png"]
    png, jpeg = rows[1], rows[0]
    assert png["frames"].shape == (6, 32, 32, 3) and png["frames"].dtype == np.uint8
    # Natural order and stride 2: frames 0, 2, ..., 10 hold 0, 40, ..., 200 (PNG: exact).
    np.testing.assert_array_equal(png["frames"][:, 5, 5, 0], [0, 40, 80, 120, 160, 200])
    np.testing.assert_array_equal(png["frames"][:, 5, 5, 2], [255, 215, 175, 135, 95, 55])
    np.testing.assert_allclose(jpeg["frames"][:, 5, 5, 0], [0, 40, 80, 120, 160, 200], atol=4)
    assert png["fps"] == 4.0 and png["start_frame"] == 0
    assert png["clip_id"] == f"{corpus / 'good_png'}#0"
    assert (png["prompt"], jpeg["prompt"]) == ("a good png clip", "caf\u00e9 au lait")

    report = stream.report()
    assert (report["total"], report["skipped"]) == (8, 6)
    assert report["reasons"] == {reason: 1 for reason in BROKEN.values()}
    assert {Path(b["uri"]).name: b["reason"] for b in report["bad"]} == BROKEN
    details = {Path(b["uri"]).name: b["detail"] for b in report["bad"]}
    assert "frame_6.jpg: cannot decode image" in details["truncated_jpeg"]
    assert "5 frames, a clip needs 11" in details["too_few"]
    assert "frame_4.png is 40x32" in details["mixed_sizes"]
    assert len(list((tmp_path / "report").glob("*.json"))) == 6  # one small record per bad sample

    reasons = "|".join(BROKEN.values())
    with pytest.raises(DataError, match=rf"6 of 8 samples skipped \(75.0%\), more than "
                                        rf"data.max_bad_fraction=0.5: ({reasons}) \(1\), ({reasons}) \(1\)"):
        check_bad_fraction(report, 0.5)
    check_bad_fraction(report, 0.8)
    # A new read into the same report dir does not count the first read's records.
    again = read_clips(str(corpus), report_dir=str(tmp_path / "report"), **CLIP)
    assert again.report()["skipped"] == 0


def test_eval_reads_are_identical(corpus: Path, tmp_path: Path):
    first = list(read_clips_local(str(corpus), report_dir=str(tmp_path / "a"), **CLIP))
    second = list(read_clips_local(str(corpus), "hotshot", report_dir=str(tmp_path / "b"), **CLIP))
    _assert_same_rows(first, second)


def test_train_clips_are_random_per_seed_and_epoch_but_reproducible(tmp_path: Path):
    root = str(tmp_path / "shapes")
    make_moving_shapes(root, num_videos=4, num_frames=16, height=40, width=56, seed=0)
    args = {"num_frames": 4, "height": 32, "width": 32, "train": True, "clips_per_video": 2,
            "report_dir": str(tmp_path / "r")}
    stream = read_clips(root, seed=0, **args)
    seed0 = list(stream.iter_local())
    assert len(seed0) == 8 and all(r["fps"] == 8.0 for r in seed0)
    _assert_same_rows(seed0, list(read_clips(root, seed=0, **args).iter_local()))

    seed1 = list(read_clips(root, seed=1, **args).iter_local())
    epoch1 = list(stream.for_epoch(1).iter_local())
    for other in (seed1, epoch1):
        starts_differ = [r["start_frame"] for r in seed0] != [r["start_frame"] for r in other]
        pixels_differ = any(not np.array_equal(a["frames"], b["frames"]) for a, b in zip(seed0, other))
        assert starts_differ and pixels_differ
    assert {r["prompt"] for r in seed0} == {(Path(root) / f"sample_00{i}" / "prompt.txt").read_text().strip()
                                            for i in range(4)}


def test_jpeg_draft_path_matches_png(tmp_path: Path):
    # 128x128 JPEG frames for a 32x32 target: decoded at 1/2 or 1/4 scale, then resized.
    png = make_moving_shapes(str(tmp_path / "png"), 2, 8, 128, 128, seed=3, fmt="png")
    make_moving_shapes(str(tmp_path / "jpg"), 2, 8, 128, 128, seed=3, fmt="jpg")
    assert png[0].endswith("sample_000")
    args = {"num_frames": 8, "height": 32, "width": 32, "train": False, "report_dir": str(tmp_path / "r")}
    a = list(read_clips_local(str(tmp_path / "png"), **args))
    b = list(read_clips_local(str(tmp_path / "jpg"), **args))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x["prompt"] == y["prompt"]
        assert np.abs(x["frames"].astype(int) - y["frames"].astype(int)).mean() < 3


def test_videos_layout_strides_by_the_file_fps(tmp_path: Path):
    root = tmp_path / "videos"
    ramp = np.stack([np.full((24, 40, 3), 5 * i, np.uint8) for i in range(48)])
    write_video(str(root / "cars" / "a.mp4"), ramp, fps=16, keyframe_interval=10)
    (root / "cars" / "a.txt").write_text("a car\n")
    write_video(str(root / "b.mp4"), ramp[:20], fps=16)
    write_video(str(root / "short.mp4"), ramp[:3], fps=16)
    (root / "broken.mp4").write_bytes((root / "b.mp4").read_bytes()[:300])
    stream = read_clips(str(root), num_frames=4, height=16, width=16, fps=8, train=False, clips_per_video=2,
                        default_prompt="a video", report_dir=str(tmp_path / "r"))
    rows = list(stream.iter_local())
    # a.mp4: stride 2, span 7, starts 0 and 41; b.mp4: starts 0 and 13.
    assert [(Path(r["source_uri"]).name, r["start_frame"], r["prompt"]) for r in rows] == [
        ("b.mp4", 0, "a video"), ("b.mp4", 13, "a video"), ("a.mp4", 0, "a car"), ("a.mp4", 41, "a car")]
    assert all(r["fps"] == 8.0 and r["frames"].shape == (4, 16, 16, 3) for r in rows)
    np.testing.assert_allclose(rows[3]["frames"][:, 8, 8, 0], 5 * np.array([41, 43, 45, 47]), atol=3)
    report = stream.report()
    assert {Path(b["uri"]).name: b["reason"] for b in report["bad"]} == {
        "short.mp4": "too few frames", "broken.mp4": "unreadable video"}


def test_bad_arguments_are_config_errors(corpus: Path):
    with pytest.raises(ConfigError, match="model.num_frames: must be >= 1"):
        read_clips(str(corpus), num_frames=0, height=32, width=32)
    with pytest.raises(ConfigError, match="data.fps"):
        read_clips(str(corpus), num_frames=2, height=32, width=32, fps=0)
    with pytest.raises(DataError, match="unknown layout 'tar'"):
        read_clips(str(corpus), "tar", num_frames=2, height=32, width=32)


@pytest.mark.ray
def test_ray_dataset_streams_the_same_rows_and_report(ray_session, corpus: Path, tmp_path: Path):
    stream = read_clips(str(corpus), report_dir=str(tmp_path / "ray"), **CLIP)
    ray_rows = stream.dataset.take_all()
    local_rows = list(read_clips_local(str(corpus), report_dir=str(tmp_path / "local"), **CLIP))
    assert len(ray_rows) == 2
    _assert_same_rows(ray_rows, local_rows)
    report = stream.report()  # written by the Ray tasks
    assert {Path(b["uri"]).name: b["reason"] for b in report["bad"]} == BROKEN


def test_hotshot_layout_on_s3(request, tmp_path: Path):
    try:
        s3 = request.getfixturevalue("s3_server")
    except pytest.FixtureLookupError:
        pytest.skip("needs the s3_server fixture (tests/servers.py), which does not exist yet")
    root = storage.join(s3.bucket(), "shapes")
    assert make_moving_shapes(root, 2, 8, 24, 32, seed=4)[0] == storage.join(root, "sample_000")
    make_moving_shapes(str(tmp_path / "shapes"), 2, 8, 24, 32, seed=4)
    args = {"num_frames": 8, "height": 16, "width": 16, "train": False, "report_dir": str(tmp_path / "r")}
    remote = list(read_clips_local(root, **args))
    local = list(read_clips_local(str(tmp_path / "shapes"), **args))
    assert [r["clip_id"] for r in remote] == [f"{root}/sample_000#0", f"{root}/sample_001#0"]
    for x, y in zip(remote, local, strict=True):
        assert x["prompt"] == y["prompt"]
        np.testing.assert_array_equal(x["frames"], y["frames"])


def test_rows_record_sdxl_micro_conditioning_of_their_resize_and_crop(tmp_path: Path):
    """orig (h, w) of the source and the crop's (top, left) in the scaled image, as SDXL/Hotshot condition on."""
    from vidgen.data.clips import cover_crop_box

    root = str(tmp_path / "shapes")
    make_moving_shapes(root, num_videos=2, num_frames=8, height=40, width=72, seed=0)
    args = {"num_frames": 4, "height": 32, "width": 32, "report_dir": str(tmp_path / "r")}
    centred = list(read_clips_local(root, train=False, **args))
    scaled_h, scaled_w, top, left = cover_crop_box(40, 72, 32, 32, None)  # 32 x 58: a horizontal crop
    assert (scaled_h, left) == (32, 13)
    for r in centred:
        assert (r["orig_height"], r["orig_width"], r["crop_top"], r["crop_left"]) == (40, 72, top, left)
    # Random crops: inside the scaled image, the same for the same seed, and spread over the 27 offsets.
    # (The draw is keyed by the sample's URI, which holds tmp_path, so one seed's two crops may coincide:
    # eight seeds' sixteen crops all on one offset has odds of 27**-15.)
    lefts = []
    for seed in range(8):
        random = list(read_clips_local(root, train=True, seed=seed, **args))
        assert len(random) == 2
        assert all(r["crop_top"] == 0 and 0 <= r["crop_left"] <= scaled_w - 32 for r in random)
        again = list(read_clips_local(root, train=True, seed=seed, **args))
        assert [r["crop_left"] for r in again] == [r["crop_left"] for r in random]
        lefts += [r["crop_left"] for r in random]
    assert len(set(lefts)) > 1


def test_read_tasks_take_their_cpus_and_samples_from_the_config(corpus: Path, tmp_path: Path):
    """data.read_cpus and data.samples_per_task reach every clip read training, the latent cache and eval make
    (read_config_clips); the default reserves a whole core per task (benchmarks/ingest.py)."""
    from vidgen.config import DataConfig, load_config
    from vidgen.data.pipeline import read_config_clips

    assert (DataConfig().read_cpus, DataConfig().samples_per_task) == (1.0, 16)
    cfg = load_config(None, [f"data.source={corpus}", "data.layout=hotshot", "data.read_cpus=0.5",
                             "data.samples_per_task=3", "model.num_frames=4", "data.height=32", "data.width=32"])
    stream = read_config_clips(cfg, train=True, report_dir=str(tmp_path))
    assert (stream.num_cpus, stream.samples_per_task) == (0.5, 3)
    assert (stream.for_epoch(1).num_cpus, stream.for_epoch(1).samples_per_task) == (0.5, 3)
    for bad, field in (("data.read_cpus=0", "data.read_cpus"), ("data.samples_per_task=0", "data.samples_per_task")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, [bad])
