"""`vidgen data inspect`: what a dataset holds and which samples would be skipped, in seconds.

Only listings and headers are read: image sizes come from `PIL.Image.open` (which parses the header
and decodes nothing), videos from `probe_video` (container header), packed shards from their
metadata columns (never the frames), prompts from their small files. So the counts, histograms and
bad-sample list come without decoding a frame; what only a decode can find (a JPEG truncated
after its header) is left to the ingest's own skip report.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from vidgen import storage
from vidgen.data.clips import clip_span, frame_stride
from vidgen.data.layouts import list_samples
from vidgen.data.listing import DEFAULT_PROMPT_TEMPLATE, Sample, SampleTable
from vidgen.data.video import probe_video
from vidgen.data.worker import BadSample, resolve_prompt
from vidgen.errors import DataError, StorageError

_COUNT_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def inspect_source(
    source: str,
    layout: str = "auto",
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    source_fps: float = 8.0,
    camera: int = 0,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    all_headers: bool = True,
    workers: int = 8,
) -> dict[str, Any]:
    """Counts, histograms and the bad-sample list of the dataset at `source`.

    Maps 1:1 to `vidgen data inspect SOURCE --layout L [--num-frames N] [--fps F] [--source-fps F]
    [--camera K] [--prompt-template T] [--first-header-only]` (all_headers=False reads one header per
    frame folder instead of every frame's: faster on object storage, but blind to mixed sizes).
    num_frames/fps: when given, samples too short for one clip are listed as bad, as the ingest
    would skip them. Returns {source, layout, samples, usable, frames, videos, frame_counts,
    sizes, fps, reasons, bad: [{uri, reason, detail}], seconds}; histograms map a
    label ("16-31", "1280x720", "10") to a number of samples.
    """
    start = time.monotonic()
    samples = list_samples(source, layout, camera=camera, prompt_template=prompt_template)
    resolved = samples[0].meta.get("layout", layout)  # list_samples never returns an empty table
    infos = _shard_infos(samples) if resolved == "shards" else _header_infos(samples, source_fps, all_headers, workers)
    # summed as they come: a million samples never become a million dicts
    bad, frames, videos, usable = [], 0, 0, 0
    frame_counts: Counter = Counter()
    sizes: Counter = Counter()
    rates: Counter = Counter()
    for i, info in enumerate(infos):
        if info.get("bad") is None and num_frames is not None:
            stride = frame_stride(info["fps"], fps)
            if info["frames"] < clip_span(num_frames, stride):
                info["bad"] = ("too few frames", f"{samples.uri(i)}: {info['frames']} frames, a clip needs "
                               f"{clip_span(num_frames, stride)} (num_frames={num_frames}, stride={stride})")
        frames += info.get("frames", 0) if info.get("kind") == "frames" else 0
        videos += info.get("kind") == "video"
        if info.get("bad") is not None:
            bad.append({"uri": samples.uri(i), "reason": info["bad"][0], "detail": info["bad"][1]})
            continue
        usable += 1
        frame_counts[info["frames"]] += 1
        sizes[f"{info['width']}x{info['height']}"] += 1
        rates[f"{info['fps']:g}"] += 1
    return {
        "source": source,
        "layout": resolved,
        "samples": len(samples),
        "usable": usable,
        "frames": frames,
        "videos": videos,
        "frame_counts": _count_histogram(frame_counts.elements()),
        "sizes": dict(sizes.most_common()),
        "fps": dict(rates.most_common()),
        "reasons": dict(Counter(b["reason"] for b in bad).most_common()),
        "bad": sorted(bad, key=lambda b: b["uri"]),
        "seconds": round(time.monotonic() - start, 3),
    }


# Local trees of this many samples or more are read by one process per core: opening a small file and parsing a
# JPEG header is ~80 us of mostly Python, so threads alone keep one core busy (a million Hotshot folders: ~100 s).
FORK_FROM = 20_000
_FORKED: SampleTable | None = None  # the table, inherited by forked readers


def _header_infos(samples: SampleTable, source_fps: float, all_headers: bool, workers: int) -> Iterator[dict]:
    """`_sample_info` of every sample, in order, read by `workers` threads (header reads are I/O), a bounded
    number of samples at a time; on a local tree of FORK_FROM samples or more, in one forked process per core."""
    global _FORKED

    chunk = 256 * max(1, workers)
    spans = [(lo, min(len(samples), lo + chunk), source_fps, all_headers, workers)
             for lo in range(0, len(samples), chunk)]
    procs = min(os.cpu_count() or 1, len(spans))
    local = storage.local_path(samples.uri(0)) is not None  # object storage clients do not survive a fork
    if procs < 2 or len(samples) < FORK_FROM or not local or "fork" not in multiprocessing.get_all_start_methods():
        _FORKED = samples
        try:
            for span in spans:
                yield from _span_infos(span)
        finally:
            _FORKED = None
        return
    _FORKED = samples  # set before the fork: each reader sees the table without pickling it
    try:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            for infos in pool.imap(_span_infos, spans):
                yield from infos
    finally:
        _FORKED = None


def _span_infos(span: tuple) -> list[dict]:
    lo, hi, source_fps, all_headers, workers = span
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda s: _sample_info(s, source_fps, all_headers), _FORKED[lo:hi]))


def _sample_info(sample: Sample, source_fps: float, all_headers: bool) -> dict:
    """{kind, frames, fps, height, width} of one sample, or {kind, bad: (reason, detail)}."""
    kind = "frames" if sample.frame_uris is not None else "video"
    try:
        resolve_prompt(sample)
        if sample.frame_uris is None:
            try:
                n, rate, h, w = probe_video(storage.read_bytes(sample.uri) if storage.is_remote(sample.uri)
                                            else sample.uri)
            except (DataError, StorageError) as e:
                raise BadSample("unreadable video", str(e)) from e
            return {"kind": kind, "frames": n, "fps": rate, "height": h, "width": w}
        uris = sample.frame_uris
        sizes = [(u, _header_size(u)) for u in (uris if all_headers else uris[:1])]
        if len({s for _, s in sizes}) > 1:
            (u0, (w0, h0)), (u1, (w1, h1)) = sizes[0], next(x for x in sizes if x[1] != sizes[0][1])
            raise BadSample("mixed frame sizes", f"{u1} is {w1}x{h1}, {u0} is {w0}x{h0}")
        w, h = sizes[0][1] if sizes else (0, 0)
        return {"kind": kind, "frames": len(uris), "fps": float(sample.meta.get("fps") or source_fps),
                "height": h, "width": w}
    except BadSample as e:
        return {"kind": kind, "frames": len(sample.frame_uris or []), "bad": (e.reason, e.detail)}


def _header_size(uri: str) -> tuple[int, int]:
    """(width, height) from the header: a local file is opened in place (PIL reads its first bytes)."""
    try:
        path = storage.local_path(uri)
        if path is not None:
            with Image.open(path) as img:
                return img.size
        with storage.open(uri) as f, Image.open(f) as img:
            return img.size
    except StorageError as e:
        raise BadSample("unreadable object", str(e)) from e
    except Exception as e:  # PIL.UnidentifiedImageError, OSError, SyntaxError...
        raise BadSample("corrupt image", f"{uri}: cannot decode image: {e}") from e


def _shard_infos(samples: SampleTable) -> list[dict]:
    """Per packed clip, from each shard's metadata columns (one read per shard, no frames)."""
    import pyarrow.parquet as pq  # lazy: heavy; inspection of other layouts never loads pyarrow

    columns = ["num_frames", "fps", "height", "width", "format"]
    tables: dict[str, Any] = {}
    infos = []
    for sample in samples:
        shard = sample.meta["shard"]
        if shard not in tables:
            try:
                with storage.open(shard) as f:
                    tables[shard] = pq.read_table(f, columns=columns).to_pylist()
            except Exception as e:
                tables[shard] = ("corrupt shard", f"{shard}: {e}"[:500])
        table = tables[shard]
        if isinstance(table, tuple):
            infos.append({"kind": "frames", "frames": 0, "bad": table})
            continue
        r = table[sample.meta["row"]]
        infos.append({"kind": "video" if r["format"] == "mp4" else "frames", "frames": r["num_frames"],
                      "fps": r["fps"], "height": r["height"], "width": r["width"]})
    return infos


def _count_histogram(counts) -> dict[str, int]:
    """Frame counts in power-of-two bins: {"8-15": n, "16-31": m, ...}, in bin order."""
    hist: Counter = Counter()
    for n in counts:
        lo = max((e for e in _COUNT_EDGES if e <= n), default=0)
        hi = next((e for e in _COUNT_EDGES if e > n), None)
        hist[(lo, hi)] += 1
    return {(f"{lo}-{hi - 1}" if hi else f"{lo}+") if hi != lo + 1 else str(lo): n
            for (lo, hi), n in sorted(hist.items(), key=lambda kv: kv[0][0])}


def format_report(d: dict[str, Any], max_bad: int = 20) -> str:
    """The inspect_source dict as text for a terminal."""
    lines = [
        f"source  {d['source']}  (layout {d['layout']}; listed and read headers in {d['seconds']:.1f} s)",
        f"samples {d['samples']}: {d['usable']} usable, {len(d['bad'])} bad"
        + (f"; {d['frames']} frames in folders" if d["frames"] else "")
        + (f"; {d['videos']} videos" if d["videos"] else ""),
    ]
    for title, key in (("frames per sample", "frame_counts"), ("frame size (WxH)", "sizes"), ("fps", "fps")):
        hist = d[key]
        if hist:
            width = max(len(k) for k in hist)
            lines.append(f"{title}:")
            lines += [f"  {k:>{width}}  {n}" for k, n in hist.items()]
    if d["bad"]:
        lines.append("bad samples by reason: " + ", ".join(f"{r} ({n})" for r, n in d["reasons"].items()))
        lines += [f"  {b['reason']}: {b['detail']}" for b in d["bad"][:max_bad]]
        if len(d["bad"]) > max_bad:
            lines.append(f"  ... and {len(d['bad']) - max_bad} more")
    return "\n".join(lines)
