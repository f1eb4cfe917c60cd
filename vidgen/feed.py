"""How many CPU cores must feed each GPU: the data half of `vidgen plan`.

A step consumes batch x accumulation x frames decoded frames per GPU (from clips), or the same number of
cached clips (from a latent cache, `vidgen prepare latents`). Data loading overlaps the step (Ray Data
prefetches), so the GPU waits only when the producers are slower than the step: with cores c decoding r frames/s
each, the wait fraction is max(0, 1 - c r T / n) for n frames per step of T seconds. The cores that keep it under
2% are n (1 - 0.02) / (r T).

Rates: `decode_fps` frames/s per core (what benchmarks/ingest.py measures), or a probe that decodes a few clips
of data.source through vidgen's own decode path (decode, stride, resize, crop) and divides by process CPU time;
the cache read rate is probed by writing and reading one shard of the cache's row size on local disk.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np

from vidgen.config import VidgenConfig
from vidgen.errors import ConfigError, VidgenError
from vidgen.models import registry

MAX_WAIT = 0.02


def cache_bytes_per_clip(cfg: VidgenConfig, **widths) -> int:
    """Tensor bytes of one clip in a latent cache (vidgen.train.latents' layout) at the largest clip size (with
    buckets, an upper bound), by the family's planner; encoder widths of the real models unless given in `widths`
    (e.g. clip_embed for SVD, text for Hotshot-XL)."""
    f, (h, w) = cfg.model.num_frames, cfg.data.largest_size()
    return registry.spec(cfg.model).planner.cache_bytes_per_clip(f, h, w, **widths)


def probe_decode(cfg: VidgenConfig, clips: int = 4) -> tuple[float, str]:
    """(frames/s per core, what was decoded) of vidgen's decode path on the first `clips` samples of data.source,
    read exactly as training reads them (data.buckets, stride, prompts), bad samples skipped."""
    from vidgen.data.pipeline import read_config_clips  # lazy: loads PIL, fsspec

    d = cfg.data
    if not d.source:
        raise ConfigError("plan --probe: needs data.source (the clips to decode), or give --decode-fps-per-core")
    with tempfile.TemporaryDirectory(prefix="vidgen-probe-") as skipped:
        stream = read_config_clips(cfg, train=True, max_bad_fraction=1.0, report_dir=skipped)
        stream.samples = stream.samples[:clips]
        cpu, frames, sizes = time.process_time(), 0, set()
        for row in stream.iter_local():
            t, h, w = row["frames"].shape[:3]
            frames, sizes = frames + t, sizes | {f"{h}x{w}"}
        cpu = time.process_time() - cpu
    if not frames:
        raise ConfigError(f"data.source={d.source}: no decodable clip among the first {clips} samples")
    return frames / max(cpu, 1e-6), f"probe of {d.source} at {', '.join(sorted(sizes))} (HxW)"


def probe_cache_read(bytes_per_clip: int, clips: int = 8) -> float:
    """Bytes/s per core of reading and decoding cache rows (parquet binary columns -> numpy) from local disk."""
    import pyarrow as pa  # lazy: heavy; vidgen.feed loads no heavy library
    import pyarrow.parquet as pq

    blob = np.random.default_rng(0).standard_normal(bytes_per_clip // 4, dtype=np.float32).tobytes()
    table = pa.table({"latent_params": [blob] * clips, "latent_params_shape": [[len(blob) // 4]] * clips})
    with tempfile.TemporaryDirectory(prefix="vidgen-feed-") as tmp:
        path = os.path.join(tmp, "part.parquet")
        pq.write_table(table, path)
        cpu = time.process_time()
        for row in pq.read_table(path).to_pylist():
            np.frombuffer(row["latent_params"], dtype=np.float32).reshape(row["latent_params_shape"]).sum()
        cpu = time.process_time() - cpu
    return bytes_per_clip * clips / max(cpu, 1e-6)


def count_clips(cfg: VidgenConfig) -> int:
    from vidgen.data.layouts import list_samples  # lazy: loads PIL, fsspec

    d = cfg.data
    return len(list_samples(d.source, d.layout, camera=d.camera, prompt_template=d.prompt_template)) \
        * d.clips_per_video


def feed_plan(cfg: VidgenConfig, step_times: dict[str, float], decode_fps: float | None = None,
              probe: bool = False, dataset_clips: int | None = None) -> dict:
    """Cores per GPU for clips and for a latent cache, per GPU model, plus the cache's size."""
    t = cfg.train
    clips_per_step = t.batch_size * t.gradient_accumulation
    frames_per_step = clips_per_step * cfg.model.num_frames
    per_clip = cache_bytes_per_clip(cfg)
    if decode_fps is None and probe:
        decode_fps, decode_source = probe_decode(cfg)
    else:
        decode_source = "--decode-fps-per-core" if decode_fps else None
    if decode_fps is not None and not decode_fps > 0:
        raise ConfigError(f"--decode-fps-per-core={decode_fps}: expected frames per second > 0")
    read_bps = probe_cache_read(per_clip)
    if dataset_clips is None and cfg.data.source:
        try:
            dataset_clips = count_clips(cfg)
        except VidgenError:  # a source this machine cannot list: the size needs --dataset-clips then
            dataset_clips = None

    def cores(work: float, rate: float, step_s: float) -> float:
        return math.ceil(10 * work * (1 - MAX_WAIT) / (rate * max(step_s, 1e-9))) / 10

    rows = []
    for gpu, step_s in step_times.items():
        row = {"gpu": gpu, "step_time_s": round(step_s, 4),
               "cache_cores_per_gpu": cores(clips_per_step * per_clip, read_bps, step_s)}
        if decode_fps:
            row["clip_cores_per_gpu"] = cores(frames_per_step, decode_fps, step_s)
        rows.append(row)
    return {"frames_per_step_per_gpu": frames_per_step, "decode_fps_per_core": decode_fps,
            "decode_rate_source": decode_source, "cache_read_bytes_per_s_per_core": round(read_bps),
            "cache_bytes_per_clip": per_clip, "dataset_clips": dataset_clips,
            "cache_bytes": per_clip * dataset_clips if dataset_clips else None, "max_data_wait": MAX_WAIT,
            "per_gpu": rows}


def format_feed(p: dict) -> list[str]:
    gib = 1024**3
    lines = ["", f"feeding the GPUs (data-wait under {p['max_data_wait']:.0%}; "
                 f"{p['frames_per_step_per_gpu']} frames per step per GPU)"]
    if p["decode_fps_per_core"]:
        lines.append(f"  decode rate {p['decode_fps_per_core']:.1f} frames/s per core ({p['decode_rate_source']})")
    else:
        lines.append("  decode rate: not given (--decode-fps-per-core F, or --probe to measure data.source)")
    lines.append(f"  latent cache: {p['cache_bytes_per_clip'] / 2**20:.2f} MiB per clip, read at "
                 f"{p['cache_read_bytes_per_s_per_core'] / 2**20:.0f} MiB/s per core (probed)")
    if p["cache_bytes"]:
        lines.append(f"  cache of {p['dataset_clips']:,} clips: {p['cache_bytes'] / gib:.2f} GiB on storage")
    lines.append("  GPU        CPU cores per GPU: from clips   from the cache")
    for r in p["per_gpu"]:
        clips = f"{r['clip_cores_per_gpu']:8.1f}" if "clip_cores_per_gpu" in r else "       -"
        lines.append(f"  {r['gpu']:<10} {clips:>25} {r['cache_cores_per_gpu']:16.1f}")
    return lines
