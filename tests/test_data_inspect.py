"""vidgen data inspect: counts, histograms and the bad list from listings and headers only."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import numpy as np
from PIL import Image

from vidgen.data import format_report, inspect_source, make_moving_shapes, pack, write_video


def _png(path: Path, size=(32, 24)) -> None:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())


def test_inspect_counts_histograms_and_bad_list(tmp_path: Path):
    root = tmp_path / "data"
    make_moving_shapes(str(root), num_videos=3, num_frames=12, height=24, width=32, seed=0)
    short = root / "short"
    short.mkdir()
    for i in range(3):
        _png(short / f"{i}.png")
    (short / "prompt.txt").write_text("short clip")
    mixed = root / "mixed"
    mixed.mkdir()
    for i in range(12):
        _png(mixed / f"{i}.png", size=(40, 24) if i == 7 else (32, 24))
    (mixed / "prompt.txt").write_text("mixed")
    junk = root / "junk"
    junk.mkdir()
    for i in range(12):
        _png(junk / f"{i}.png")
    (junk / "5.png").write_bytes(b"definitely not a png")
    (junk / "prompt.txt").write_text("junk")
    noprompt = root / "noprompt"
    noprompt.mkdir()
    for i in range(12):
        _png(noprompt / f"{i}.png")

    d = inspect_source(str(root), "auto", num_frames=6, fps=4, source_fps=8)
    assert (d["layout"], d["samples"], d["usable"], d["frames"], d["videos"]) == ("hotshot", 7, 3, 75, 0)
    assert d["frame_counts"] == {"8-15": 3}
    assert d["sizes"] == {"32x24": 3} and d["fps"] == {"8": 3}
    assert {Path(b["uri"]).name: b["reason"] for b in d["bad"]} == {
        "short": "too few frames", "mixed": "mixed frame sizes", "junk": "corrupt image",
        "noprompt": "missing prompt"}
    details = {Path(b["uri"]).name: b["detail"] for b in d["bad"]}
    assert "3 frames, a clip needs 11" in details["short"]
    assert "7.png is 40x24" in details["mixed"] and "5.png: cannot decode image" in details["junk"]
    assert d["reasons"] == {"too few frames": 1, "mixed frame sizes": 1, "corrupt image": 1,
                            "missing prompt": 1}
    assert d["seconds"] < 10

    # Without a clip length nothing is too short; one header per folder misses the mixed sizes.
    quick = inspect_source(str(root), "hotshot", all_headers=False)
    assert {Path(b["uri"]).name for b in quick["bad"]} == {"noprompt"}
    assert quick["frame_counts"] == {"2-3": 1, "8-15": 5}

    text = format_report(d)
    assert "samples 7: 3 usable, 4 bad; 75 frames in folders" in text
    assert "32x24  3" in text and "too few frames (1)" in text and "7.png is 40x24" in text


def test_inspect_videos_and_shards(tmp_path: Path):
    videos = tmp_path / "videos"
    write_video(str(videos / "a.mp4"), np.zeros((20, 32, 48, 3), np.uint8), fps=16)
    write_video(str(videos / "b.mp4"), np.zeros((40, 32, 48, 3), np.uint8), fps=16)
    (videos / "broken.mp4").write_bytes(b"\x00" * 100)
    d = inspect_source(str(videos))
    assert (d["layout"], d["videos"], d["usable"]) == ("videos", 3, 2)
    assert d["frame_counts"] == {"16-31": 1, "32-63": 1}
    assert d["sizes"] == {"48x32": 2} and d["fps"] == {"16": 2}
    assert [(Path(b["uri"]).name, b["reason"]) for b in d["bad"]] == [("broken.mp4", "unreadable video")]

    shapes = tmp_path / "shapes"
    make_moving_shapes(str(shapes), num_videos=3, num_frames=10, height=24, width=32, seed=0)
    pack(str(shapes), "hotshot", str(tmp_path / "packed"), num_frames=8, height=16, width=24, train=False)
    d = inspect_source(str(tmp_path / "packed"), num_frames=8)
    assert (d["layout"], d["samples"], d["usable"], d["bad"]) == ("shards", 3, 3, [])
    assert d["sizes"] == {"24x16": 3} and d["frame_counts"] == {"8-15": 3} and d["fps"] == {"8": 3}


def test_a_large_local_tree_read_by_forked_processes_gives_the_same_report(tmp_path: Path, monkeypatch):
    """Past inspect.FORK_FROM samples a local tree's headers are read by one forked process per core, in spans of
    256 x workers samples: the report equals the one process's, bad samples and histograms included."""
    from vidgen.data import inspect as inspect_mod

    root = tmp_path / "many"
    good, odd = tmp_path / "good.png", tmp_path / "odd.png"
    _png(good)
    _png(odd, size=(40, 24))
    for k in range(600):
        folder = root / f"s{k}"
        folder.mkdir(parents=True)
        n = 3 if k % 97 == 0 else 8  # some too short
        for i in range(n):
            (folder / f"{i}.png").hardlink_to(odd if k % 50 == 7 else good)
        if k % 101 != 3:  # some without a prompt
            (folder / "prompt.txt").write_text(f"clip {k}")
    (root / "s5" / "2.png").unlink()
    (root / "s5" / "2.png").write_bytes(b"not a png")

    monkeypatch.setattr(inspect_mod, "FORK_FROM", 10**9)
    one = inspect_source(str(root), "hotshot", num_frames=6, workers=1)
    monkeypatch.setattr(inspect_mod, "FORK_FROM", 100)
    # A SIGTERM handler that returns, which the forked readers inherit (one was in place in a CI run after the Ray
    # tests, and the pool's terminate then waited forever on a reader blocked on its task queue).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        forked = inspect_source(str(root), "hotshot", num_frames=6, workers=1)  # 3 spans of 256
    finally:
        signal.signal(signal.SIGTERM, previous)
    one.pop("seconds"), forked.pop("seconds")
    assert forked == one
    assert one["samples"] == 600 and one["reasons"] == {"too few frames": 7, "missing prompt": 6, "corrupt image": 1}
    assert one["sizes"] == {"32x24": 575, "40x24": 11}  # s407 is odd-sized but has no prompt
