"""Where a generation job's outputs go, how they are named, and the manifest.

Layout under the job folder (generate.output, default <workdir>/generated):

    videos/<name>.mp4       only videos: VBench's `--videos_path` (it takes the suffix from the first file)
    gif/<name>.gif          generate.extra_outputs: [gif]
    frames/<name>/0000.png  generate.extra_outputs: [frames]
    records/<name>.json     one manifest row per finished or failed video, written by its actor
    manifest.jsonl          every row of the job, rewritten by the driver at the end of each run
    cache/base/<key>.pt     FIFO base videos

Every file is written atomically (vidgen.storage), so a killed actor leaves no partial file under its name.
Shapes: T frames, H/W pixels; videos are uint8 [T, H, W, 3].
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil

import numpy as np
from PIL import Image

from vidgen import storage
from vidgen.config import GenerateConfig, ModelConfig, VidgenConfig
from vidgen.data.prompts import safe_stem, vbench_name
from vidgen.data.video import read_video, write_video

# Settings that never change a video's pixels (where it goes, how the work is spread, which rows exist).
_NOT_PIXELS = {"prompts", "prompt_format", "augmented_prompts", "dimensions", "images", "samples_per_prompt",
               "seed", "seeds", "naming", "extra_outputs", "output", "num_actors", "min_actors", "use_gpu",
               "gpus_per_actor", "actor_restarts", "max_failed_fraction"}


def job_root(cfg: VidgenConfig) -> str:
    return cfg.generate.output or storage.join(cfg.run.workdir, "generated")


def output_dir(cfg: VidgenConfig) -> str:
    """The folder holding only the videos (what evaluation reads)."""
    return storage.join(job_root(cfg), "videos")


def pixel_settings(gen: GenerateConfig) -> dict:
    """The generate settings that determine the pixels, minus those the chosen sampler ignores."""
    d = gen.model_dump(exclude=_NOT_PIXELS)
    d["fifo"].pop("cache")
    if gen.sampler != "fifo":
        d.pop("fifo")
        d["consistency"].pop("seed_frame"), d["consistency"].pop("seed_frame_weight")
    else:
        d.pop("num_inference_steps")
        if gen.min_guidance_scale != gen.max_guidance_scale:  # FIFO ramps guidance over output frames; named,
            d["guidance_ramp"] = "output_frame"  # so videos made by a window-position ramp never pass as these
    if gen.sampler != "autoregressive":
        d.pop("autoregressive")
    if not gen.controlnet:  # absent, so names of uncontrolled videos stay what they were
        d.pop("controlnet"), d.pop("control")
    return d


def output_name(row: dict, gen: GenerateConfig, model: ModelConfig, naming: str = "hash") -> str:
    """vbench: `{prompt}-{i}.mp4`. hash: `<id>-<hash>.mp4`, the hash covering every input that changes pixels."""
    if naming == "vbench":
        return vbench_name(row["prompt"], int(row.get("sample", 0)))
    key = json.dumps({"image": row["image"], "prompt": row.get("sample_prompt", row["prompt"]),
                      "seed": int(row["seed"]), "gen": pixel_settings(gen),
                      "model": model.model_dump(exclude={"cache_dir"}),
                      **({"clip": row.get("frames") or row.get("control")} if gen.controlnet else {})}, sort_keys=True)
    # The id comes from the prompt file: safe_stem keeps it one plain file name (no '/', no leading '.').
    return f"{safe_stem(str(row['id']), 120)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.mp4"


def naming_of(gen: GenerateConfig, rows: list[dict]) -> str:
    if gen.naming != "auto":
        return gen.naming
    return "vbench" if rows and all(r.get("vbench") for r in rows) else "hash"


def sampler_params(gen: GenerateConfig, window: int) -> dict:
    """What the manifest records about the sampler (everything pixel-relevant besides the row)."""
    return {"window": window, **pixel_settings(gen)}


def checkpoint_of(model: ModelConfig, gen: GenerateConfig) -> str:
    parts = [model.path or f"{model.flavor}"]
    if gen.unet:
        parts.append(f"unet={gen.unet}")
    if gen.lora:
        parts.append(f"lora={gen.lora}@{gen.lora_scale:g}")
    return " ".join(parts)


def to_uint8(frames_fchw) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] (torch) -> uint8 [F, H, W, 3]."""
    return ((frames_fchw.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def write_extras(root: str, stem: str, video: np.ndarray, fps: float, extras: list[str]) -> None:
    if "gif" in extras:
        buf = io.BytesIO()
        imgs = [Image.fromarray(f) for f in video]
        imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        storage.write_bytes(storage.join(root, "gif", f"{stem}.gif"), buf.getvalue())
    if "frames" in extras:
        folder = storage.join(root, "frames", stem)
        for i, f in enumerate(video):
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="PNG")
            storage.write_bytes(storage.join(folder, f"{i:04d}.png"), buf.getvalue())


def record_uri(root: str, name: str) -> str:
    return storage.join(root, "records", name.removesuffix(".mp4") + ".json")


def read_record(root: str, name: str) -> dict | None:
    uri = record_uri(root, name)
    try:
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
    except (json.JSONDecodeError, OSError):
        return None


def write_manifest(root: str, rows: list[dict]) -> str:
    uri = storage.join(root, "manifest.jsonl")
    storage.write_text(uri, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    return uri


def clean_stale_temps(videos_dir: str) -> int:
    """Remove temp folders a killed writer left in `videos_dir` (local only; hidden from listings anyway)."""
    local = storage.local_path(videos_dir)
    if local is None or not os.path.isdir(local):
        return 0
    stale = [e for e in os.listdir(local) if e.startswith(storage.TMP_PREFIX)]
    for e in stale:
        shutil.rmtree(os.path.join(local, e), ignore_errors=True)
    return len(stale)


def video_grid(paths: list[str], out_uri: str, fps: float, cols: int = 2) -> str | None:
    """Tile the first frames of up to cols*cols videos into one mp4 (the MLflow sample grid)."""
    clips = [read_video(p)[0] for p in paths[: cols * cols]]
    if not clips:
        return None
    t = min(len(c) for c in clips)
    h, w = clips[0].shape[1:3]
    clips = [c[:t] for c in clips if c.shape[1:3] == (h, w)]
    rows = -(-len(clips) // cols)
    grid = np.zeros((t, rows * h, cols * w, 3), np.uint8)
    for k, c in enumerate(clips):
        r, q = divmod(k, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = c
    return write_video(out_uri, grid, fps)
