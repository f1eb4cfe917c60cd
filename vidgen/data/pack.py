"""`vidgen prepare pack`: read clips once (any layout) and store them as parquet shards.

Why: a training epoch over frame folders on object storage costs one GET per frame; over shards it
costs one ranged GET per clip, with frames already strided, resized and re-encoded small. The
`shards` layout reads the result back, one row per clip (vidgen.data.shards has the format).

Deterministic and resumable: samples are listed and sorted once; shard k holds the clips of samples
[k * m, (k + 1) * m) with m = clips_per_shard // clips_per_video, so shard names never depend on
which shards finished. A shard is complete when `part-NNNNN.done.json` exists (written after the
atomic parquet write); a rerun skips complete shards and redoes the rest. `_pack.json` fingerprints
the inputs and options, so a rerun with different ones fails instead of mixing two packs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from typing import Any

from vidgen import storage
from vidgen.data.listing import Sample
from vidgen.data.pipeline import check_bad_fraction, read_clips
from vidgen.data.shards import FORMATS, MANIFEST, ShardWriter, encode_clip
from vidgen.data.worker import BadSample, ClipSpec, sample_clips
from vidgen.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PACK_INFO = "_pack.json"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def pack(
    source: str,
    layout: str = "auto",
    out: str = "",
    *,
    clips_per_shard: int = 64,
    frame_format: str = "jpeg",
    quality: int = 95,
    parallel: bool = False,
    **read_clips_kwargs: Any,
) -> dict:
    """Pack the clips of `read_clips(source, layout, **read_clips_kwargs)` into shards under `out`.

    Maps 1:1 to `vidgen prepare pack SOURCE --layout L --out URI [--clips-per-shard N]
    [--frame-format jpeg|png|mp4] [--quality Q] [--parallel]` plus the data.* options read_clips
    takes (num_frames, height/width or buckets, fps, source_fps, clips_per_video, camera,
    prompt_template, default_prompt, max_bad_fraction). train defaults to False (evenly spread
    clips, centre crops) so that the pack is reproducible. frame_format: jpeg (small), png
    (lossless: the shards read back bit-identical), mp4 (smallest; H.264 where available).
    parallel: one Ray task per pending shard (needs a running Ray); otherwise in this process.

    Returns the manifest (also written to `<out>/_manifest.json`): shards [{name, clips}], clips,
    samples, written (shards written by this call), existing (complete before it), and the skip
    report {total, skipped, reasons, bad}. Raises DataError, after writing everything, when more
    than max_bad_fraction of the samples was skipped.
    """
    if not out:
        raise ConfigError("prepare pack --out: required (a directory path or URI for the shards)")
    if clips_per_shard < 1:
        raise ConfigError(f"prepare pack clips_per_shard: must be >= 1, got {clips_per_shard}")
    if frame_format not in FORMATS:
        raise ConfigError(f"prepare pack frame_format: expected one of {', '.join(FORMATS)}, "
                          f"got {frame_format!r}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"prepare pack quality: expected 1-100, got {quality}")
    read_clips_kwargs.setdefault("train", False)
    stream = read_clips(source, layout, **read_clips_kwargs)
    spec, samples = stream.spec, stream.samples
    per_shard = max(1, clips_per_shard // spec.clips_per_video)
    groups = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]

    info = {"source": source, "layout": layout, "frame_format": frame_format, "quality": quality,
            "clips_per_shard": clips_per_shard, "spec": dataclasses.asdict(spec),
            "samples": hashlib.sha256("\n".join(s.uri for s in samples).encode("utf-8", "surrogateescape")).hexdigest(),
            "num_samples": len(samples), "num_shards": len(groups)}
    info = json.loads(json.dumps(info))  # as it reads back from _pack.json (tuples become lists)
    _claim(out, info)
    pending = [k for k in range(len(groups)) if not storage.exists(done_uri(out, k))]
    log.info("pack %s -> %s: %d shards, %d to write", source, out, len(groups), len(pending))
    args = [(out, k, groups[k], spec, frame_format, quality) for k in pending]
    if parallel and pending:
        _run_ray(args)
    else:
        for a in args:
            _pack_shard(*a)

    done = [json.loads(storage.read_text(done_uri(out, k))) for k in range(len(groups))]
    bad = sorted((b for d in done for b in d["bad"]), key=lambda b: b["uri"])
    report = {"total": len(samples), "skipped": len(bad),
              "reasons": dict(Counter(b["reason"] for b in bad).most_common()), "bad": bad}
    manifest = {"shards": [{"name": shard_name(k), "clips": d["clips"]} for k, d in enumerate(done)],
                "clips": sum(d["clips"] for d in done), "samples": len(samples), "written": len(pending),
                "existing": len(groups) - len(pending), "report": report, "pack": info}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    check_bad_fraction(report, stream.max_bad_fraction)
    return manifest


def done_uri(out: str, index: int) -> str:
    """The marker that says shard `index` under `out` is complete (pack and the latent cache)."""
    return storage.join(out, shard_name(index).replace(".parquet", ".done.json"))


def _claim(out: str, info: dict) -> None:
    """Write _pack.json, or check that the one there describes the same pack."""
    uri = storage.join(out, PACK_INFO)
    if storage.exists(uri):
        previous = json.loads(storage.read_text(uri))
        changed = _differences(previous, info)
        if changed:
            raise DataError(f"{out}: holds shards of a different pack ({'; '.join(changed)}); "
                            f"pack into a new --out or delete {out}")
        return
    storage.makedirs(out)
    storage.write_json(uri, info)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every field that differs, nested ones dotted ('spec.height: 64 -> 128')."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            what = "the listed samples differ" if key == "samples" else f"{a!r} -> {b!r}"
            out.append(f"{prefix}{key}: {what}")
    return out


def _pack_shard(out: str, index: int, samples: list[Sample], spec: ClipSpec, fmt: str, quality: int) -> int:
    """Write shard `index` (atomically) then its done record; returns its clip count."""
    bad = []
    with storage.atomic_local(storage.join(out, shard_name(index)), ".parquet") as path:
        writer = ShardWriter(path)
        try:
            for sample in samples:
                try:
                    rows = sample_clips(sample, spec)
                except BadSample as e:
                    bad.append({"uri": sample.uri, "reason": e.reason, "detail": e.detail})
                    continue
                except Exception as e:  # an unforeseen input: recorded, never fatal (as in read_clips)
                    log.warning("unexpected error on %s", sample.uri, exc_info=True)
                    bad.append({"uri": sample.uri, "reason": f"unexpected {type(e).__name__}",
                                "detail": f"{sample.uri}: {e}"[:500]})
                    continue
                for row in rows:
                    writer.write(encode_clip(row, fmt, quality))
        finally:
            writer.close()
    storage.write_json(done_uri(out, index), {"clips": writer.count, "bad": bad})
    return writer.count


def _run_ray(args: list[tuple]) -> None:
    import ray  # lazy: heavy; only prepare pack --parallel uses Ray

    if not ray.is_initialized():
        raise ConfigError("prepare pack --parallel: needs a running Ray (ray.init or RAY_ADDRESS)")
    task = ray.remote(num_cpus=1)(_pack_shard)  # decode + resize + encode: one core each
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    in_flight: list = []
    for a in args:
        if len(in_flight) >= limit:  # bounded: a million shards must not become a million queued tasks
            finished, in_flight = ray.wait(in_flight, num_returns=1)
            ray.get(finished)  # re-raises a failed task's error here
        in_flight.append(task.remote(*a))
    ray.get(in_flight)
