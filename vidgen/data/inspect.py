"""`vidgen data inspect`: what a dataset holds and which samples would be skipped, in seconds.

Only listings and headers are read: image sizes come from `PIL.Image.open` (which parses the header
and decodes nothing), videos from `probe_video` (container header), packed shards from their
metadata columns (never the frames), prompts from their small files. So the counts, histograms and
bad-sample list come without decoding a frame. What only a decode can find (a JPEG truncated after
its header) takes `decode=True` (`--decode`): every frame of every sample decoded as training
decodes it (`worker.decode_every_frame`), in Ray tasks when Ray is up, else in threads here.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from vidgen import storage
from vidgen.data.clips import clip_span, frame_stride
from vidgen.data.decode import image_error
from vidgen.data.layouts import list_samples
from vidgen.data.listing import DEFAULT_PROMPT_TEMPLATE, Sample, SampleTable
from vidgen.data.video import probe_video
from vidgen.data.worker import BadSample, check_has_frames, decode_every_frame, resolve_prompt
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
    decode: bool = False,
) -> dict[str, Any]:
    """Counts, histograms and the bad-sample list of the dataset at `source`.

    Maps 1:1 to `vidgen data inspect SOURCE --layout L [--num-frames N] [--fps F] [--source-fps F]
    [--camera K] [--prompt-template T] [--first-header-only] [--decode]` (all_headers=False reads one header
    per frame folder instead of every frame's: faster on object storage, but blind to mixed sizes; decode=True
    also decodes every frame, in Ray tasks when Ray is initialised, and lists what fails as bad).
    num_frames/fps: when given, samples too short for one clip are listed as bad, as the ingest
    would skip them. Returns {source, layout, samples, usable, frames, videos, frame_counts,
    sizes, fps, reasons, bad: [{uri, reason, detail}], seconds}; histograms map a
    label ("16-31", "1280x720", "10") to a number of samples.
    """
    start = time.monotonic()
    samples = list_samples(source, layout, camera=camera, prompt_template=prompt_template)
    resolved = samples[0].meta.get("layout", layout)  # list_samples never returns an empty table
    failed = decode_failures(samples, workers) if decode else {}
    infos = shard_infos(samples) if resolved == "shards" else header_infos(samples, source_fps, all_headers, workers)
    # summed as they come: a million samples never become a million dicts
    bad, frames, videos, usable = [], 0, 0, 0
    frame_counts: Counter = Counter()
    sizes: Counter = Counter()
    rates: Counter = Counter()
    for i, info in enumerate(infos):
        if info.get("bad") is None and i in failed:
            info["bad"] = failed[i]
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
        "decoded": decode,
        "seconds": round(time.monotonic() - start, 3),
    }


def decode_failures(samples: SampleTable, workers: int = 8) -> dict[int, tuple[str, str]]:
    """{sample index: (reason, detail)} of the samples whose frames do not all decode; one Ray task per span of
    samples when Ray is initialised (a bounded number in flight), else `workers` threads in this process."""
    span = 16
    spans = [(lo, samples[lo:lo + span]) for lo in range(0, len(samples), span)]
    failed: dict[int, tuple[str, str]] = {}
    if _ray_up():
        import ray  # lazy: heavy; only inspect --decode on a running Ray

        task = ray.remote(num_cpus=1)(_decode_span)  # decoding is CPU work: one core a task
        limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: list = []
        for lo, table in spans:
            if len(pending) >= limit:
                done, pending = ray.wait(pending, num_returns=1)
                failed.update(ray.get(done[0]))
            pending.append(task.remote(lo, table))
        for result in ray.get(pending):
            failed.update(result)
        return failed
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL and PyAV decode without holding the GIL
        for result in pool.map(lambda s: _decode_span(*s), spans):
            failed.update(result)
    return failed


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _decode_span(lo: int, table: SampleTable) -> dict[int, tuple[str, str]]:
    failed = {}
    for i, sample in enumerate(table, lo):
        try:
            decode_every_frame(sample)
        except BadSample as e:
            failed[i] = (e.reason, e.detail)
        except Exception as e:  # an unforeseen input: listed like the ingest lists it, never fatal
            failed[i] = (f"unexpected {type(e).__name__}", f"{sample.uri}: {e}"[:500])
    return failed


# Local trees of this many samples or more are read by one process per core: opening a small file and parsing a
# JPEG header is ~80 us of mostly Python, so threads alone keep one core busy (a million Hotshot folders: ~100 s).
FORK_FROM = 20_000
_FORKED: SampleTable | None = None  # the table, inherited by forked readers


def header_infos(samples: SampleTable, source_fps: float, all_headers: bool, workers: int) -> Iterator[dict]:
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
        with multiprocessing.get_context("fork").Pool(procs, initializer=_reader_start) as pool:
            for infos in pool.imap(_span_infos, spans):
                yield from infos
    finally:
        _FORKED = None


def _reader_start() -> None:
    """A forked reader dies of SIGTERM, as the pool's exit expects (it terminates readers still waiting for a task).
    A handler inherited from the parent that returns would leave such a reader waiting, and the pool's exit with it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _span_infos(span: tuple) -> list[dict]:
    lo, hi, source_fps, all_headers, workers = span
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda s: _sample_info(s, source_fps, all_headers), _FORKED[lo:hi]))


def _sample_info(sample: Sample, source_fps: float, all_headers: bool) -> dict:
    """{kind, frames, fps, height, width} of one sample, or {kind, bad: (reason, detail)}."""
    kind = "frames" if sample.frame_uris is not None else "video"
    try:
        check_has_frames(sample)
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
        raise BadSample("corrupt image", str(image_error(uri, e))) from e


def shard_infos(samples: SampleTable) -> list[dict]:
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
        f"source  {d['source']}  (layout {d['layout']}; listed, read headers"
        f"{' and decoded every frame' if d.get('decoded') else ''} in {d['seconds']:.1f} s)",
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
