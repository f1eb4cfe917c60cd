"""Listing at scale: the columnar SampleTable, the grouped listing (os.scandir; object storage in parallel) and the
Ray side that ships the table once. The million-sample figures are benchmarks/listing.py's; these are the small,
exact checks behind them."""

from __future__ import annotations

import json
import os
import tracemalloc
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from vidgen import storage
from vidgen.data import layouts, list_samples, make_moving_shapes, read_clips, write_video
from vidgen.data.decode import is_image_name, natural_key
from vidgen.data.listing import Sample, SampleTable
from vidgen.data.pipeline import _rows_or_record

# ---- the per-sample path the table replaced (as committed before it), for the frame-folder layouts --------------


def old_frame_samples(root: str, layout: str) -> list[Sample]:
    """What list_samples gave before the SampleTable: walk_files, a URI per file, a Sample per folder."""
    files = storage.walk_files(root)
    frame_dirs: dict[str, list[str]] = defaultdict(list)
    for uri in files:
        parent, _, base = uri.rpartition("/")
        if is_image_name(base):
            frame_dirs[parent].append(uri)
    listing = layouts.scan(root)
    sidecar = {} if layout == "hotshot" else layouts.read_sidecar(listing)
    file_set = set(files)
    samples = []
    for folder, frames in frame_dirs.items():
        name = listing.rel(folder) or folder.rstrip("/").rpartition("/")[2]
        prompt_uri = f"{folder}/prompt.txt"
        samples.append(Sample(uri=folder, frame_uris=sorted(frames, key=lambda u: natural_key(u.rpartition("/")[2])),
                              prompt=layouts._lookup(sidecar, name),
                              prompt_uri=prompt_uri if prompt_uri in file_set else None,
                              meta={"layout": layout, "name": name, "prompt_required": layout == "hotshot"}))
    return sorted(samples, key=lambda s: natural_key(s.meta["name"]))


def _tree(root: Path) -> Path:
    """Frame folders at several depths with the names that trip listings: natural order (2 < 10, 1 vs 01), mixed
    formats, hidden and temporary names, a folder without prompt.txt, a symlinked folder (not followed)."""
    make_moving_shapes(str(root), num_videos=3, num_frames=4, height=16, width=16, fmt="jpg")
    for rel, names in {"deep/a b/c10": ["10.png", "2.png", "1.png", "01.png", "x.JPG", "notes.md"],
                       "deep/a b/c9": ["frame_2.jpg", "frame_10.jpg", ".DS_Store.jpg"],
                       "späť/v1": ["0.png", "1.png"]}.items():
        (root / rel).mkdir(parents=True)
        for name in names:
            (root / rel / name).write_bytes(b"x")
    (root / "deep/a b/c10/prompt.txt").write_text("ten")
    (root / "sample_001" / ".vidgen-tmp-x.jpg").write_bytes(b"partial")
    (root / ".vidgen-tmp-dir").mkdir()
    (root / ".vidgen-tmp-dir" / "0.jpg").write_bytes(b"partial")
    os.symlink(root / "sample_000", root / "linked")
    return root


@pytest.mark.parametrize("layout", ["hotshot", "frames"])
def test_frame_layouts_give_exactly_the_samples_of_the_per_sample_path(tmp_path: Path, layout: str):
    root = _tree(tmp_path / "d")
    (root / "prompts.csv").write_text("name,prompt\nsample_002,from the sidecar\nc9,by folder name\n")
    want = old_frame_samples(str(root), layout)
    table = list_samples(str(root), layout)
    assert isinstance(table, SampleTable) and len(table) == len(want) == 6
    assert list(table) == want
    assert [s.meta["name"] for s in want][:3] == ["deep/a b/c9", "deep/a b/c10", "sample_000"]
    assert [Path(u).name for u in table[1].frame_uris] == ["01.png", "1.png", "2.png", "10.png", "x.JPG"]
    if layout == "frames":
        assert (table[0].prompt, table[4].prompt) == ("by folder name", "from the sidecar")
    # slicing, take, negative indices, iteration: the same Samples
    assert list(table[2:5]) == want[2:5] and list(table.take([5, 0, -1])) == [want[5], want[0], want[-1]]
    assert table[-1] == want[-1] and list(table[::2]) == want[::2]
    with pytest.raises(IndexError):
        table[6]
    # a root that is itself one frame folder: its name is the folder's own
    single = list_samples(str(root / "sample_000"), layout)
    assert list(single) == old_frame_samples(str(root / "sample_000"), layout)
    assert single[0].meta["name"] == "sample_000"


def test_from_samples_round_trips_the_dataset_layouts(tmp_path: Path):
    """Videos (prompt files beside them), and Samples of any shape (per-sample meta, frames outside the sample's
    folder, None everywhere) come back exactly."""
    root = tmp_path / "v"
    for i, name in enumerate(["b/clip10.mp4", "b/clip2.mp4", "a.mp4"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(str(root / name), np.full((2, 16, 16, 3), 20 * i, np.uint8), fps=4)
    (root / "b/clip2.txt").write_text("two")
    table = list_samples(str(root))
    assert [s.meta["name"] for s in table] == ["a.mp4", "b/clip2.mp4", "b/clip10.mp4"]
    assert table[1].prompt_uri == str(root / "b/clip2.txt") and table[0].frame_uris is None
    odd = [Sample("s3://b/x#3", ["s3://b/x/1.jpg", "s3://b/y/2.jpg"], "p", None, {"layout": "sthv2", "name": "x",
                                                                                 "timestamps": [1, 2]}),
           Sample("s3://b/z", [], None, "s3://b/z.txt", {"layout": "sthv2", "name": "z", "prompt_required": True}),
           Sample("s3://b/w", None, "p", None, {})]
    again = SampleTable.from_samples(odd)
    assert list(again) == odd and list(again.take([2, 0])) == [odd[2], odd[0]]
    assert again[0].meta is not again[0].meta  # each Sample its own (mutable) meta
    assert list(SampleTable.from_samples(list(table))) == list(table)


def _linked_tree(root: Path, folders: int) -> None:
    """Hotshot folders of 8 hard-linked frames + prompt.txt (contents never read by a listing)."""
    sources = root.parent / "src"
    sources.mkdir()
    pool = [sources / f"{k}.jpg" for k in range(4)]  # ext4: 65,000 links a file
    for p in [*pool, sources / "prompt.txt"]:
        p.write_bytes(b"x")
    root.mkdir()
    for i in range(folders):
        folder = root / f"scene_{i:06d}"
        folder.mkdir()
        for f in range(8):
            os.link(pool[(i + f) % 4], folder / f"{f}.jpg")
        os.link(sources / "prompt.txt", folder / "prompt.txt")


def test_listing_holds_a_few_hundred_bytes_a_sample(tmp_path: Path):
    """20k folders: list_samples' peak Python allocation (tracemalloc counts numpy's too) stays under 500 bytes a
    sample; the per-sample path holds several KB a sample (a URI per frame, a Sample per folder)."""
    n = 20_000
    root = tmp_path / "big"
    _linked_tree(root, n)

    def peak(fn) -> float:
        tracemalloc.start()
        try:
            result = fn()
            return tracemalloc.get_traced_memory()[1] / n, result
        finally:
            tracemalloc.stop()

    new, table = peak(lambda: list_samples(str(root)))
    old, samples = peak(lambda: old_frame_samples(str(root), "hotshot"))
    assert len(table) == n and table[n - 1] == samples[n - 1] and table[12345] == samples[12345]
    assert new < 500, f"{new:.0f} bytes a sample"
    assert old > 4 * new, (old, new)


def test_object_storage_is_listed_in_parallel_and_gives_the_local_samples(request, tmp_path: Path, monkeypatch):
    s3 = request.getfixturevalue("s3_server")
    local = _tree(tmp_path / "d")
    os.unlink(local / "linked")  # symlinks have no object-store counterpart
    remote = storage.join(s3.bucket(), "data")
    storage.upload_dir(str(local), remote)
    storage.write_bytes(storage.join(remote, "deep/"), b"")  # a folder marker object, as some tools write

    calls = []
    fs, _ = storage.filesystem(remote)
    find = fs.find
    monkeypatch.setattr(fs, "find", lambda path, **kw: calls.append(path) or find(path, **kw))
    tree = storage.walk_tree(remote, threads=3)
    assert sorted(c.rsplit("/", 1)[1] for c in calls) == ["deep", "sample_000", "sample_001", "sample_002",
                                                          "späť"]  # one recursive LIST per top-level prefix
    assert tree.uris() == storage.walk_files(remote)
    assert storage.walk_tree(storage.join(remote, "sample_000", "0.jpg")).uris() == [
        storage.join(remote, "sample_000", "0.jpg")]

    def strip(samples, root):
        return [json.loads(json.dumps(s.__dict__).replace(json.dumps(root)[1:-1], "ROOT")) for s in samples]

    for layout in ("hotshot", "frames"):
        assert strip(list_samples(remote, layout), remote) == strip(list_samples(str(local), layout), str(local))


@pytest.mark.ray
def test_share_dataset_makes_one_item_per_task_and_the_same_rows(ray_session, tmp_path: Path, monkeypatch):
    import ray
    import ray.data

    root = str(tmp_path / "d")
    make_moving_shapes(root, num_videos=10, num_frames=6, height=16, width=16)
    stream = read_clips(root, num_frames=4, height=16, width=16, clips_per_video=2, seed=3,
                        report_dir=str(tmp_path / "r"), samples_per_task=4)
    items = []
    from_items = ray.data.from_items
    monkeypatch.setattr(ray.data, "from_items", lambda xs, **kw: items.append(list(xs)) or from_items(xs, **kw))
    samples = np.array([7, 2, 9, 0, 5, 1, 3], np.int64)
    wanted = np.ones((7, 2), bool)
    wanted[1, 0] = wanted[4, 1] = False
    rows = stream.share_dataset(1, samples, wanted).take_all()
    assert items == [[{"lo": 0, "hi": 4}, {"lo": 4, "hi": 7}]]  # chunks of samples_per_task, no sample in them
    epoch1 = stream.for_epoch(1)
    want = [(r["clip_id"], int(i) * 2 + k, j)
            for j, i in enumerate(samples) for k, r in enumerate(_rows_or_record(epoch1.samples[int(i)], epoch1.spec,
                                                                                   epoch1.report_dir, "t"))
            if wanted[j, k]]
    assert [(r["clip_id"], r["_slot"], r["_order"]) for r in rows] == want and len(want) == 12
    assert all(r["_made"] == 2 for r in rows)
    # the whole-stream dataset: one item per chunk as well, rows in sample order
    items.clear()
    assert [r["clip_id"] for r in stream.dataset.take_all()] == [r["clip_id"] for r in stream.iter_local()]
    assert items == [[{"lo": 0, "hi": 4}, {"lo": 4, "hi": 8}, {"lo": 8, "hi": 10}]]
    # the stream as training's workers get it (ray.put): the same table ref, so the table is put once
    ref = stream._shipped["ref"]
    assert ray.get(ray.put(stream))._shipped["ref"] == ref
    assert ray.get(ray.put(stream.for_epoch(2)))._shipped["ref"] == ref
