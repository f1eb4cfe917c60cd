"""Batch generation: prompt rows fanned out over a Ray Data actor pool, one pipeline per actor.

A prompt file is JSONL, one row per video: {"image": URI of the conditioning frame, "prompt": text
(recorded; SVD is image-conditioned), "seed": int, "id": name}. Every output is named by a hash of
everything that determines it (image, prompt, seed, sampler settings, weights), written atomically,
and skipped when it already exists, so a rerun after a crash only does the missing work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

import numpy as np

from vidgen import storage
from vidgen.config import GenerateConfig, ModelConfig, VidgenConfig
from vidgen.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def load_prompts(uri: str) -> list[dict]:
    """Rows of a JSONL prompt file; each needs `image`. Defaults: seed = line number, id from the image."""
    if not uri:
        raise ConfigError("generate.prompts: required (a JSONL file with one {\"image\": ...} row per video)")
    rows = []
    for n, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            raise DataError(f"{uri}:{n}: expected an object with an \"image\" URI, got {line.strip()[:80]}")
        row.setdefault("prompt", "")
        row.setdefault("seed", n - 1)
        row.setdefault("id", re.sub(r"[^A-Za-z0-9_.-]+", "_", row["image"].rsplit("/", 1)[-1].rsplit(".", 1)[0]))
        rows.append(row)
    if not rows:
        raise DataError(f"{uri}: no prompt rows")
    return rows


def output_name(row: dict, gen: GenerateConfig, model: ModelConfig) -> str:
    """`<id>-<hash>.mp4`: the hash covers every input that changes the pixels."""
    ignored = {"prompts", "output", "num_actors", "use_gpu"}
    ignored |= {"num_inference_steps"} if gen.sampler == "fifo" else {"fifo"}  # settings the sampler ignores
    key = json.dumps({"image": row["image"], "prompt": row["prompt"], "seed": row["seed"],
                      "gen": gen.model_dump(exclude=ignored),
                      "model": model.model_dump(exclude={"cache_dir"})}, sort_keys=True)
    return f"{row['id']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.mp4"


def output_dir(cfg: VidgenConfig) -> str:
    return cfg.generate.output or storage.join(cfg.run.workdir, "generated")


class VideoGenerator:
    """Ray Data UDF: builds the model once per actor, then generates one video per row."""

    def __init__(self, model_cfg: dict, gen_cfg: dict, out_dir: str, device: str = "cpu"):
        import torch

        from vidgen.generate.denoisers import SVDDenoiser
        from vidgen.models import svd

        self.model_cfg, self.gen = ModelConfig(**model_cfg), GenerateConfig(**gen_cfg)
        self.out_dir, self.device = out_dir, torch.device(device)
        m = self.model_cfg
        self.model = svd.build(m.flavor, path=m.path, cache_dir=m.cache_dir, num_frames=m.num_frames,
                               unet_path=self.gen.unet).to(self.device)
        self.denoiser = SVDDenoiser(self.model, self.gen.min_guidance_scale, self.gen.max_guidance_scale)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("id", "path", "status", "seconds", "num_frames", "seed", "error")}
        for i in range(len(batch["image"])):
            row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
            path = storage.join(self.out_dir, output_name(row, self.gen, self.model_cfg))
            t0, status, error = time.perf_counter(), "generated", ""
            try:
                if storage.exists(path):
                    status = "skipped"
                else:
                    self.generate(row, path)
            except Exception as e:  # recorded per row: one bad image must not stop the batch
                status, error = "failed", f"{type(e).__name__}: {e}"
                log.warning("%s: generation failed: %s", row["image"], error)
            for k, v in (("id", row["id"]), ("path", path), ("status", status), ("error", error),
                         ("seconds", time.perf_counter() - t0), ("num_frames", self.gen.num_frames),
                         ("seed", int(row["seed"]))):
                out[k].append(v)
        return out

    def generate(self, row: dict, path: str) -> None:
        import torch

        from vidgen.data.clips import resize_cover_crop
        from vidgen.data.decode import decode_image
        from vidgen.data.video import write_video
        from vidgen.generate.fifo import FifoPlan
        from vidgen.generate.samplers import base_sample, fifo_sample

        g = self.gen
        image = decode_image(storage.read_bytes(row["image"]), row["image"])
        image = resize_cover_crop(image[None], g.height, g.width, None)[0]
        image_bchw = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(self.device)
        gen = torch.Generator().manual_seed(int(row["seed"]))
        cond = self.denoiser.condition(image_bchw, g.fps, g.motion_bucket_id, g.noise_aug_strength, gen)
        window = self.model_cfg.num_frames
        s = self.model.vae_scale_factor
        shape = (1, window, 4, g.height // s, g.width // s)
        if g.sampler == "fifo":
            plan = FifoPlan(window, g.fifo.partitions, g.fifo.lookahead)
            latents = fifo_sample(self.denoiser, cond, self.model.scheduler, shape, g.num_frames, plan, gen)
        else:
            if g.num_frames != window:
                raise ConfigError(f"generate.num_frames={g.num_frames}: the base sampler makes exactly "
                                  f"model.num_frames={window} frames; use generate.sampler=fifo for longer")
            latents = base_sample(self.denoiser, cond, self.model.scheduler, shape, g.num_inference_steps, gen)
        with torch.no_grad():
            frames = self.model.decode_video(latents, chunk=window)[0]  # [N, 3, H, W] in [-1, 1]
        video = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        write_video(path, video, fps=g.fps)


def run_generation(cfg: VidgenConfig, rows: list[dict] | None = None) -> list[dict]:
    """Generate every prompt row; returns one result row per video (status generated/skipped/failed)."""
    import ray

    rows = rows if rows is not None else load_prompts(cfg.generate.prompts)
    out_dir = output_dir(cfg)
    storage.makedirs(out_dir)
    g = cfg.generate
    items = [{"image": r["image"], "prompt": r["prompt"], "seed": int(r["seed"]), "id": str(r["id"])} for r in rows]
    # Finished videos are skipped here, on the driver, so a rerun starts no actor just to skip.
    done = [r for r in items if storage.exists(storage.join(out_dir, output_name(r, g, cfg.model)))]
    todo = [r for r in items if r not in done]
    skipped = [{"id": r["id"], "path": storage.join(out_dir, output_name(r, g, cfg.model)), "status": "skipped",
                "seconds": 0.0, "num_frames": g.num_frames, "seed": r["seed"], "error": ""} for r in done]
    if not todo:
        return sorted(skipped, key=lambda r: r["id"])
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    results = ds.map_batches(
        VideoGenerator,
        fn_constructor_kwargs=dict(model_cfg=cfg.model.model_dump(), gen_cfg=g.model_dump(), out_dir=out_dir,
                                   device="cuda" if g.use_gpu else "cpu"),
        compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        batch_size=1,
        num_gpus=1 if g.use_gpu else 0,
        num_cpus=1,
    ).take_all() + skipped
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed:
        log.error("video %s failed: %s", r["id"], r["error"])
    return sorted(results, key=lambda r: r["id"])


def summarize(results: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts
