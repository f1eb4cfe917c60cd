"""vidgen.data without Ray: frame order, RGB decoding, clip sampling, resize/crop, video files, layouts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidgen.data import (
    clip_starts,
    decode_image,
    detect_layout,
    frame_stride,
    list_samples,
    make_moving_shapes,
    natural_key,
    probe_video,
    read_video,
    resize_cover_crop,
    sample_rng,
    write_video,
)
from vidgen.data.clips import cover_crop_box
from vidgen.errors import DataError


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# ---- frame order ----------------------------------------------------------------------------------


def test_natural_key_orders_digit_runs_as_numbers():
    names = ["frame_10.png", "frame_2.png", "frame_1.png", "frame_100.png", "frame_0.png"]
    assert sorted(names, key=natural_key) == [
        "frame_0.png", "frame_1.png", "frame_2.png", "frame_10.png", "frame_100.png"]
    assert sorted(["10.jpg", "9.jpg", "1.jpg"], key=natural_key) == ["1.jpg", "9.jpg", "10.jpg"]
    # Seer/Epic layouts: zero-padded names keep their order; text before digits still sorts as text.
    assert sorted(["img_00010.jpg", "img_00002.jpg"], key=natural_key) == ["img_00002.jpg", "img_00010.jpg"]
    assert sorted(["b_1.png", "a_2.png"], key=natural_key) == ["a_2.png", "b_1.png"]


# ---- decoding to RGB ------------------------------------------------------------------------------


def test_decode_rgb_and_greyscale():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 120, 250
    out = decode_image(_encode(Image.fromarray(rgb), "PNG"), "rgb.png")
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, rgb)

    grey = Image.fromarray(np.full((4, 6), 77, np.uint8), mode="L")
    np.testing.assert_array_equal(decode_image(_encode(grey, "PNG"), "grey.png"), np.full((4, 6, 3), 77))

    bilevel = Image.new("1", (3, 2), color=1)
    np.testing.assert_array_equal(decode_image(_encode(bilevel, "PNG"), "bw.png"), np.full((2, 3, 3), 255))


def test_decode_alpha_is_composited_on_black():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = 255  # opaque row: exact colour
    rgba[1, 0, 3] = 0  # transparent: black
    rgba[1, 1, 3] = 128  # half: half the colour
    out = decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), "a.png")
    np.testing.assert_array_equal(out[0], np.tile([200, 100, 50], (3, 1)))
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[1, 1], [100, 50, 25])

    la = Image.fromarray(np.stack([np.full((2, 2), 200, np.uint8), np.full((2, 2), 0, np.uint8)], -1), "LA")
    np.testing.assert_array_equal(decode_image(_encode(la, "PNG"), "la.png"), np.zeros((2, 2, 3)))


def test_decode_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = decode_image(_encode(pal, "PNG"), "p.png")
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])

    gif_like = _encode(pal, "PNG", transparency=0)  # index 0 (red) is transparent -> black
    out = decode_image(gif_like, "t.png")
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])


def test_decode_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I")
    out = decode_image(_encode(img, "PNG"), "depth16.png")
    # Pillow's convert("L") would clip everything above 255 to white.
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_decode_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no black, full magenta + yellow = red
    out = decode_image(_encode(cmyk, "JPEG", quality=95), "cmyk.jpg")
    assert out.shape == (16, 16, 3)
    r, g, b = out[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_jpeg_draft_decodes_at_reduced_scale_only_when_it_can():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8))
    jpeg, png = _encode(big, "JPEG"), _encode(big, "PNG")
    assert decode_image(jpeg, "a.jpg").shape == (256, 320, 3)
    # Target 64x64 (w, h): 1/4 scale keeps both sides >= target, 1/8 would not.
    assert decode_image(jpeg, "a.jpg", draft_size=(64, 64)).shape == (64, 80, 3)
    assert decode_image(jpeg, "a.jpg", draft_size=(200, 100)).shape == (256, 320, 3)  # not <= half
    assert decode_image(png, "a.png", draft_size=(64, 64)).shape == (256, 320, 3)  # PNG has no draft


def test_corrupt_images_raise_data_error_naming_the_file():
    jpeg = _encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    with pytest.raises(DataError, match=r"scene_7/3\.jpg: cannot decode image: (?i:.*truncated)"):
        decode_image(jpeg[: len(jpeg) // 2], "scene_7/3.jpg")
    with pytest.raises(DataError, match=r"junk\.png: cannot decode image"):
        decode_image(b"not an image at all", "junk.png")


# ---- clip sampling --------------------------------------------------------------------------------


def test_frame_stride():
    assert frame_stride(30, 8) == 4  # 7.5 fps effective
    assert frame_stride(24, 8) == 3
    assert frame_stride(10, 8) == 1  # OPV2V 10 Hz to Hotshot's 8 fps: every frame
    assert frame_stride(8, 16) == 1  # never below 1: we do not invent frames
    assert frame_stride(8, None) == 1
    with pytest.raises(ValueError):
        frame_stride(0, 8)


def test_clip_starts_eval_is_evenly_spread_and_train_is_random_within_bounds():
    assert clip_starts(20, 8, 2, 1, None) == [0]
    assert clip_starts(20, 8, 2, 3, None) == [0, 2, 5]  # last start = 20 - 15 = 5
    assert clip_starts(15, 8, 2, 1, None) == [0]  # exactly one window
    assert clip_starts(14, 8, 2, 4, None) == []  # too short
    assert clip_starts(10, 8, 1, 5, None) == [0, 1, 2]  # only 3 distinct windows

    draws = [clip_starts(100, 8, 3, 4, np.random.default_rng(s)) for s in range(50)]
    for starts in draws:
        assert len(starts) == 4 and len(set(starts)) == 4 and starts == sorted(starts)
        assert 0 <= starts[0] and starts[-1] <= 100 - 22
    assert len({tuple(s) for s in draws}) > 40
    assert clip_starts(100, 8, 3, 4, np.random.default_rng(7)) == draws[7]


def test_sample_rng_depends_on_every_input_only():
    def draw(*args):
        return sample_rng(*args).integers(0, 1 << 30, 4).tolist()

    assert draw(0, 0, 0, "s3://b/v1") == draw(0, 0, 0, "s3://b/v1")
    others = [draw(1, 0, 0, "s3://b/v1"), draw(0, 1, 0, "s3://b/v1"), draw(0, 0, 1, "s3://b/v1"),
              draw(0, 0, 0, "s3://b/v2")]
    assert all(o != draw(0, 0, 0, "s3://b/v1") for o in others)


def test_cover_crop_geometry_on_a_ramp():
    # Wide 40x80 frames whose value is 3 * column: scale 0.8 -> 32x64, centre crop keeps columns 16..47
    # of the scaled image, i.e. source columns 20..60.
    ramp = np.tile((np.arange(80) * 3).astype(np.uint8), (2, 40, 1))[..., None].repeat(3, -1)
    assert cover_crop_box(40, 80, 32, 32, None) == (32, 64, 0, 16)
    out = resize_cover_crop(ramp, 32, 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    # Output pixel j samples source x = (16 + j + 0.5) / 0.8 - 0.5; bicubic reproduces a ramp.
    expected = 3 * ((16 + np.arange(32) + 0.5) / 0.8 - 0.5)
    assert np.abs(out[0, 16, :, 0].astype(float) - expected)[2:-2].max() <= 1.0
    assert (out[1] == out[0]).all()  # one box for every frame

    tall = np.zeros((1, 100, 50, 3), np.uint8)
    assert cover_crop_box(100, 50, 32, 32, None) == (64, 32, 16, 0)
    assert resize_cover_crop(tall, 32, 32).shape == (1, 32, 32, 3)

    # Random crops move the window (same scale), only along the free axis.
    boxes = {cover_crop_box(40, 80, 32, 32, np.random.default_rng(s)) for s in range(20)}
    assert {b[:3] for b in boxes} == {(32, 64, 0)} and len(boxes) > 5
    assert max(b[3] for b in boxes) <= 32

    # Already the right width: a plain crop, exact pixels.
    exact = np.random.default_rng(0).integers(0, 255, (3, 40, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_cover_crop(exact, 32, 32), exact[:, 4:36])


# ---- video files ----------------------------------------------------------------------------------


def _numbered_frames(t: int, h: int, w: int) -> np.ndarray:
    """Frame i is flat grey 6*i, so a decoded frame tells its index despite lossy coding."""
    return np.stack([np.full((h, w, 3), 6 * i, np.uint8) for i in range(t)])


@pytest.mark.parametrize("codec", ["default", "mpeg4"])
def test_video_round_trip_with_seek_and_stride(tmp_path: Path, monkeypatch, codec: str):
    if codec == "mpeg4":  # the fallback for PyAV builds without libx264
        monkeypatch.setattr("vidgen.data.video._encoder", lambda: "mpeg4")
    uri = str(tmp_path / "out" / "clip.mp4")
    write_video(uri, _numbered_frames(40, 33, 47), fps=10)  # odd sizes are padded to even
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["clip.mp4"]  # no temp file left behind
    assert probe_video(uri) == (40, 10.0, 34, 48)

    frames, fps = read_video(uri, start=25, count=5, stride=2)
    assert frames.shape == (5, 34, 48, 3) and frames.dtype == np.uint8 and fps == 5.0
    np.testing.assert_allclose(frames[:, 10, 10, 0], 6 * np.arange(25, 34, 2), atol=3)

    tail, _ = read_video(uri, start=36, count=10)  # the video ends first: fewer frames
    np.testing.assert_allclose(tail[:, 0, 0, 1], 6 * np.arange(36, 40), atol=3)

    all_frames, fps = read_video(Path(uri).read_bytes())  # bytes work too
    assert all_frames.shape[0] == 40 and fps == 10.0


@pytest.mark.parametrize("codec", ["default", "mpeg4"])
def test_the_same_frames_always_encode_to_the_same_file(tmp_path: Path, monkeypatch, codec: str):
    # Moving blocks under noise, 14 frames of 96x96: x264's default rate control (MB-tree) gave about 24
    # different files in 30 encodes of such a clip. Generated videos and FVD inputs must be reproducible.
    if codec == "mpeg4":
        monkeypatch.setattr("vidgen.data.video._encoder", lambda: "mpeg4")
    rng = np.random.default_rng(3)
    blocks = np.kron(rng.integers(0, 255, (12, 12, 3)).astype(np.float32), np.ones((8, 8, 1)))
    frames = np.stack([np.clip(np.roll(blocks, t, axis=1) + rng.normal(0, 25, blocks.shape), 0, 255)
                       for t in range(14)]).astype(np.uint8)
    files = {write_video(str(tmp_path / f"{i}.mp4"), frames, fps=7) for i in range(25)}
    assert len({Path(f).read_bytes() for f in files}) == 1


def test_video_seek_lands_on_the_right_frame_between_keyframes(tmp_path: Path):
    # A keyframe every 8 frames (and B-frames): a seek lands on the keyframe before `start` and must
    # decode forward to it; starts on, just after and just before keyframes.
    uri = str(tmp_path / "long.mp4")
    write_video(uri, _numbered_frames(42, 16, 16), fps=24, keyframe_interval=8)
    for start in (0, 1, 7, 8, 9, 17, 40, 41):
        frames, _ = read_video(uri, start=start, count=1)
        assert abs(int(frames[0, 8, 8, 0]) - 6 * start) <= 3, start


def test_corrupt_video_raises_data_error_naming_it(tmp_path: Path):
    good = tmp_path / "good.mp4"
    write_video(str(good), _numbered_frames(8, 16, 16), fps=8)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="bad.mp4: cannot read video"):
        read_video(str(bad))
    with pytest.raises(DataError, match="cannot read video"):
        probe_video(b"\x00" * 64)
    with pytest.raises(DataError, match="uint8"):
        write_video(str(tmp_path / "x.mp4"), np.zeros((2, 8, 8, 3), np.float32), fps=8)


# ---- layouts and the synthetic dataset -------------------------------------------------------------


def test_moving_shapes_is_deterministic_hotshot_layout(tmp_path: Path):
    a = make_moving_shapes(str(tmp_path / "a"), 3, 12, 24, 32, seed=5)
    b = make_moving_shapes(str(tmp_path / "b"), 3, 12, 24, 32, seed=5)
    c = make_moving_shapes(str(tmp_path / "c"), 3, 12, 24, 32, seed=6)
    first = Path(a[0])
    assert sorted(p.name for p in first.iterdir()) == sorted([f"{i}.png" for i in range(12)] + ["prompt.txt"])
    prompt = (first / "prompt.txt").read_text().strip()
    assert prompt.startswith("a ") and " moving " in prompt and prompt.endswith(" background")
    for x, y in zip(a, b, strict=True):
        assert (Path(x) / "11.png").read_bytes() == (Path(y) / "11.png").read_bytes()
    assert [(Path(x) / "prompt.txt").read_text() for x in a] != [(Path(x) / "prompt.txt").read_text() for x in c]
    frames = np.stack([decode_image((first / f"{i}.png").read_bytes(), "f") for i in range(12)])
    assert frames.shape == (12, 24, 32, 3)
    assert (frames[0] != frames[-1]).any()  # the shape moved
    assert detect_layout(str(tmp_path / "a")) == "hotshot"


def _frame_folder(folder: Path, names: list[str], size=(8, 8)) -> None:
    folder.mkdir(parents=True)
    for name in names:
        Image.new("RGB", size).save(folder / name)


def test_layouts_discover_samples_in_natural_order_with_prompts(tmp_path: Path):
    root = tmp_path / "frames"
    _frame_folder(root / "video_10", ["img_2.jpg", "img_10.jpg", "img_1.jpg", ".hidden.jpg"])
    _frame_folder(root / "video_2", ["0.png", "1.png"])
    _frame_folder(root / "nested" / "task" / "0", ["a.png"])
    (root / "prompts.csv").write_text("name,prompt\nvideo_10,ten\n0,zero\n")
    assert detect_layout(str(root)) == "frames"
    samples = list_samples(str(root))
    assert [s.meta["name"] for s in samples] == ["nested/task/0", "video_2", "video_10"]
    assert [Path(u).name for u in samples[2].frame_uris] == ["img_1.jpg", "img_2.jpg", "img_10.jpg"]
    assert [s.prompt for s in samples] == ["zero", None, "ten"]  # by path, then by folder name

    (root / "prompts.jsonl").write_text(json.dumps({"video": "video_2", "caption": "two"}) + "\n")
    assert [s.prompt for s in list_samples(str(root), "frames")] == [None, "two", None]  # jsonl wins

    vids = tmp_path / "videos"
    (vids / "a").mkdir(parents=True)
    write_video(str(vids / "a" / "x.mp4"), _numbered_frames(4, 16, 16), fps=8)
    write_video(str(vids / "y.mp4"), _numbered_frames(4, 16, 16), fps=8)
    (vids / "a" / "x.txt").write_text("ex")
    assert detect_layout(str(vids)) == "videos"
    samples = list_samples(str(vids))
    assert [(s.meta["name"], s.frame_uris, s.prompt_uri is not None) for s in samples] == [
        ("a/x.mp4", None, True), ("y.mp4", None, False)]


def test_layout_errors_name_the_root_and_what_was_expected(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        list_samples(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*expected one of: hotshot"):
        list_samples(str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("hi")
    with pytest.raises(DataError, match=r"docs: no frame folders or video files found"):
        list_samples(str(tmp_path / "docs"))
    _frame_folder(tmp_path / "ok" / "v", ["0.png"])
    with pytest.raises(DataError, match=r"ok: unknown layout 'webdataset'; expected auto or one of hotshot"):
        list_samples(str(tmp_path / "ok"), "webdataset")
    with pytest.raises(DataError, match=r"ok: layout 'videos' found no samples; expected video files"):
        list_samples(str(tmp_path / "ok"), "videos")
    (tmp_path / "ok" / "prompts.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:1: not valid JSON"):
        list_samples(str(tmp_path / "ok"), "frames")
