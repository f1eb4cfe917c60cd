"""Batch generation: (prompt, sample) rows fanned out over a Ray Data actor pool, one pipeline per actor.

The driver reads the prompt source (vidgen.data.prompts), expands samples and seeds, names every video
(vidgen.generate.outputs), drops rows whose video exists, and streams the rest through `map_batches` into
`VideoGenerator` actors. Each actor writes its video atomically plus a record (its manifest row); the driver
counts failures as rows come back, stops with a JobError once they pass generate.max_failed_fraction, and
rewrites manifest.jsonl at the end, also when the job fails. A rerun therefore does exactly the missing work.

Fault injection for tests: VIDGEN_FAULT_GENERATE (vidgen/faults.py) kills an actor in the middle of a video's write.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from vidgen import faults, storage
from vidgen.config import GenerateConfig, ModelConfig, VidgenConfig
from vidgen.data.clips import resize_cover_crop
from vidgen.data.decode import decode_image
from vidgen.data.prompts import expand_samples, load_rows, read_jsonl
from vidgen.data.video import write_video
from vidgen.diffusion.fifo import FifoPlan
from vidgen.diffusion.samplers import autoregressive_sample, base_sample, fifo_sample
from vidgen.errors import ConfigError, DataError, JobError, raised_remotely, ray_failure
from vidgen.generate.outputs import (
    checkpoint_of,
    clean_stale_temps,
    job_root,
    naming_of,
    output_dir,
    output_name,
    read_record,
    record_uri,
    sampler_params,
    to_uint8,
    write_extras,
    write_manifest,
)
from vidgen.generate.pipelines import build_pipeline, check_family, image_conditioned, latent_frames
from vidgen.ray_env import FOREGROUND_ENV

log = logging.getLogger(__name__)

__all__ = ["VideoGenerator", "load_prompts", "output_dir", "output_name", "prepare_rows", "run_generation",
           "summarize"]
COLUMNS = ("id", "name", "image", "prompt", "sample_prompt", "sample", "seed", "frames", "control")


def load_prompts(uri: str) -> list[dict]:
    """Rows of a JSONL prompt file (the original vidgen format); see vidgen.data.prompts.read_jsonl."""
    if not uri:
        raise ConfigError("generate.prompts: required (a JSONL file with one {\"image\": ...} row per video)")
    rows = read_jsonl(uri)
    if not rows:
        raise DataError(f"{uri}: no prompt rows")
    return rows


def prepare_rows(cfg: VidgenConfig, rows: list[dict] | None = None) -> list[dict]:
    """Prompt rows (given, or read from generate.prompts) -> one row per video with seed and file name."""
    g = cfg.generate
    check_family(cfg.model, g)
    if rows is None:
        rows = load_rows(g.prompts, g.prompt_format, g.augmented_prompts, g.dimensions, g.images)
    else:  # callers (demo, nightly eval) pass {image, prompt, seed?, id?}
        rows = [{"id": str(r.get("id") or f"row{i}"), "prompt": r.get("prompt", ""),
                 "sample_prompt": r.get("sample_prompt", r.get("prompt", "")), "image": r.get("image", ""),
                 "seed": r.get("seed"), "vbench": bool(r.get("vbench"))} for i, r in enumerate(rows)]
    missing = [r for r in rows if not r["image"]] if image_conditioned(cfg.model) else []
    if missing:
        raise ConfigError(f"generate.images: SVD is image-conditioned, and {len(missing)} prompts have no image "
                          f"(first: {missing[0]['prompt'][:60]!r}); set generate.images or use an i2v source")
    if g.controlnet:
        field = "frames" if g.control.source == "clip" else "control"
        bare = [r for r in rows if not r.get(field)]
        if bare:
            where = ("an OPV2V scene folder as generate.prompts" if field == "frames"
                     else "a \"control\" path on each JSONL row")
            raise ConfigError(f"generate.control.source={g.control.source}: {len(bare)} of {len(rows)} prompts have no "
                              f"control clip (first: {bare[0]['id']!r}); needs {where}")
    videos = expand_samples(rows, g.samples_per_prompt, g.seed, g.seeds)
    naming = naming_of(g, rows)
    for v in videos:
        v.setdefault("frames", ""), v.setdefault("control", "")  # control clips: OPV2V scenes, JSONL "control"
        v["name"] = output_name(v, g, cfg.model, naming)
    unique = {v["name"]: v for v in reversed(videos)}  # same name = same video: keep the first
    return [v for v in videos if unique.get(v["name"]) is v]


class VideoGenerator:
    """Ray Data UDF: builds the pipeline once per actor, then generates one video per row."""

    def __init__(self, model_cfg: dict, gen_cfg: dict, root: str, device: str = "cpu", fault: str | None = None):
        self.model_cfg, self.gen = ModelConfig(**model_cfg), GenerateConfig(**gen_cfg)
        self.root, self.device, self.fault = root, torch.device(device), fault
        self.videos_dir = storage.join(root, "videos")
        m, g = self.model_cfg, self.gen
        self.pipe = build_pipeline(m, g)
        self.model, self.denoiser = self.pipe.model, self.pipe.denoiser
        self.model.to(self.device)
        self.params = json.dumps(sampler_params(g, m.num_frames), sort_keys=True)
        self.checkpoint = checkpoint_of(m, g)
        self.done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {}
        for i in range(len(batch["name"])):
            row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
            path = storage.join(self.videos_dir, row["name"])
            t0, status, error = time.perf_counter(), "generated", ""
            try:
                if storage.exists(path):
                    status = "skipped"
                else:
                    self.generate(row, path)
                    self.done += 1
            except Exception as e:  # recorded per row: one bad image must not stop the job
                status, error = "failed", f"{type(e).__name__}: {e}"
                log.warning("%s: generation failed: %s", row["name"], error)
            result = {**{k: row[k] for k in COLUMNS}, "path": path, "status": status, "error": error,
                      "seconds": time.perf_counter() - t0, "num_frames": self.gen.num_frames, "fps": self.gen.fps,
                      "sampler": self.gen.sampler, "params": self.params, "checkpoint": self.checkpoint}
            if status != "skipped":
                record = {**result, "params": json.loads(self.params)}
                storage.write_json(record_uri(self.root, row["name"]), record, indent=None)
            for k, v in result.items():
                out.setdefault(k, []).append(v)
        return out

    # -- one video ---------------------------------------------------------------------------------------------

    def _image(self, uri: str):
        g = self.gen
        image = decode_image(storage.read_bytes(uri), uri)
        image = resize_cover_crop(image[None], g.height, g.width, None)[0]
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(self.device)

    def generate(self, row: dict, path: str) -> None:
        g, window = self.gen, self.model_cfg.num_frames
        seed = int(row["seed"])
        gen = torch.Generator().manual_seed(seed)  # a CPU generator on purpose: the same video on every GPU type
        cond = self.pipe.condition(row, g, self._image, gen)
        shape = self.pipe.latent_shape(g, window)
        latents = self.sample(row, cond, shape, gen)
        with torch.no_grad():
            video = to_uint8(self.model.decode_video(latents, chunk=window)[0])
        stem = row["name"].removesuffix(".mp4")
        with storage.atomic_local(path, ".mp4") as tmp:
            write_video(tmp, video, fps=g.fps)
            faults.maybe_exit("GENERATE", self.fault, self.done)  # test hook (vidgen/faults.py)
        write_extras(self.root, stem, video, g.fps, g.extra_outputs)

    def sample(self, row: dict, cond, shape: tuple[int, ...], gen):
        g, window = self.gen, self.model_cfg.num_frames
        sched = self.pipe.scheduler
        if g.sampler == "fifo":
            plan = FifoPlan(latent_frames(self.model_cfg, window), g.fifo.partitions, g.fifo.lookahead)
            base = self.base_video(row, cond, shape, plan, gen)
            queue_gen = torch.Generator().manual_seed(int(row["seed"]) + 0x9E3779B9)  # independent of the cache
            c = g.consistency
            reseed = (lambda head, cd: self.denoiser.recondition(head, cd, c.seed_frame_weight)) \
                if c.seed_frame else None
            return fifo_sample(self.denoiser, cond, sched, shape, latent_frames(self.model_cfg, g.num_frames), plan,
                               queue_gen, base=base,
                               uniform=g.fifo.uniform_latents, reseed=reseed, window_cond=self.pipe.frames)
        if g.sampler == "autoregressive":
            a = g.autoregressive
            if a.overlap >= window:
                raise ConfigError(f"generate.autoregressive.overlap={a.overlap}: must be < model.num_frames={window}")
            return autoregressive_sample(self.denoiser, cond, sched, shape, g.num_frames,
                                         a.num_inference_steps or g.num_inference_steps,
                                         lambda last, cd: self.denoiser.recondition(last, cd), a.overlap, gen)
        if g.num_frames != window:
            raise ConfigError(f"generate.num_frames={g.num_frames}: the base sampler makes exactly "
                              f"model.num_frames={window} frames; use generate.sampler=fifo for longer")
        return base_sample(self.denoiser, cond, sched, shape, g.num_inference_steps, gen)

    def base_video(self, row: dict, cond, shape: tuple[int, ...], plan, gen):
        """FIFO's base video, cached by model, prompt, image, seed, f, n and every setting it depends on.

        (The original keyed it by prompt[:100] and steps only, so samples with other seeds shared one.)
        EDM Euler here is deterministic, so there is no eta to key on.
        """
        g = self.gen
        key_src = {"model": self.model_cfg.model_dump(exclude={"cache_dir"}), "checkpoint": self.checkpoint,
                   "image": row["image"], "prompt": row["sample_prompt"], "seed": int(row["seed"]),
                   "f": plan.window, "n": plan.partitions, "shape": list(shape), "eta": 0.0,
                   "cond": [g.fps, g.motion_bucket_id, g.noise_aug_strength, g.min_guidance_scale,
                            g.max_guidance_scale],
                   "qcache": [g.consistency.qcache, g.consistency.qcache_weight],
                   "control": [g.controlnet, g.control.model_dump(), row.get("frames"), row.get("control")]
                   if g.controlnet else None}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
        uri = storage.join(self.root, "cache", "base", f"{key}.pt")
        if g.fifo.cache and storage.exists(uri):
            try:  # tensors only (weights_only): a cache file is data, never code
                return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location=self.device, weights_only=True)
            except Exception as e:  # truncated or foreign: sample it again and overwrite it
                log.warning("%s: unreadable FIFO base cache (%s); sampling it again", uri,
                            (str(e).splitlines() or [type(e).__name__])[0])
        base = base_sample(self.denoiser, self.pipe.frames(cond, list(range(plan.window))), self.pipe.scheduler, shape,
                           plan.steps, generator=gen)
        if g.fifo.cache:
            buf = io.BytesIO()
            torch.save(base.cpu(), buf)
            storage.write_bytes(uri, buf.getvalue())
        return base


def run_generation(cfg: VidgenConfig, rows: list[dict] | None = None) -> list[dict]:
    """Generate every (prompt, sample) video; returns one manifest row per video (generated/skipped/failed)."""
    import ray  # lazy: importing job does not load ray

    g, root, videos_dir = cfg.generate, job_root(cfg), output_dir(cfg)
    videos = prepare_rows(cfg, rows)
    storage.makedirs(videos_dir)
    clean_stale_temps(videos_dir)
    # Finished videos are skipped here, on the driver, with one listing: a rerun starts no actor just to skip.
    # an object store has no empty folders: a first run's output folder does not exist yet
    existing = {u.rsplit("/", 1)[-1] for u in storage.listdir(videos_dir)} if storage.isdir(videos_dir) else set()
    todo = [v for v in videos if v["name"] not in existing]
    results: dict[str, dict] = {}
    for v in videos:
        if v["name"] in existing:
            rec = read_record(root, v["name"]) or {k: v[k] for k in ("id", "name", "image", "prompt", "seed")}
            results[v["name"]] = {**rec, "path": storage.join(videos_dir, v["name"]), "status": "skipped",
                                  "error": ""}
    failed, limit = 0, g.max_failed_fraction * len(videos)
    try:
        if todo:
            items = [{k: (v.get(k) if v.get(k) is not None else "") for k in COLUMNS} for v in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            remote_args = {}  # Ray Data's default: restart dead actors and retry their batches forever
            if g.actor_restarts != -1:
                remote_args = {"max_restarts": g.actor_restarts, "max_task_retries": -1 if g.actor_restarts else 0}
            stream = ds.map_batches(
                VideoGenerator,
                fn_constructor_kwargs=dict(model_cfg=cfg.model.model_dump(), gen_cfg=g.model_dump(), root=root,
                                           device="cuda" if g.use_gpu else "cpu",
                                           fault=faults.from_env("GENERATE")),
                compute=ray.data.ActorPoolStrategy(min_size=g.min_actors or g.num_actors, max_size=g.num_actors),
                batch_size=1, num_gpus=g.gpus_per_actor if g.use_gpu else 0, num_cpus=1,
                runtime_env={"env_vars": FOREGROUND_ENV}, **remote_args,  # the job waits on these actors
            )
            for r in stream.iter_rows():
                r = {k: (val.item() if hasattr(val, "item") else val) for k, val in dict(r).items()}
                r["params"] = json.loads(r["params"]) if isinstance(r.get("params"), str) else r.get("params")
                results[r["name"]] = r
                if r["status"] == "failed":
                    failed += 1
                    log.error("video %s failed: %s", r["name"], r["error"])
                    if failed > limit:
                        raise JobError(f"generation: {failed} of {len(videos)} videos failed, more than "
                                       f"generate.max_failed_fraction={g.max_failed_fraction:g}; latest: "
                                       f"{r['name']}: {r['error']}")
    except JobError:
        raise
    except Exception as e:  # a dead actor without restarts, a Ray error: the manifest still gets written
        if (original := raised_remotely(e)) is not None:  # e.g. an actor's model failed to load: its own line
            raise original from None
        started, why = ray_failure(e)  # an actor that failed to start fails the same way on a rerun
        raise JobError(f"generation stopped after {len(results)} of {len(videos)} videos: {why[:300]}"
                       + ("; rerun to do the rest" if started else "")) from e
    finally:
        write_manifest(root, _manifest_rows(root, videos, results))
    return [results[v["name"]] for v in videos]


def _manifest_rows(root: str, videos: list[dict], results: dict[str, dict]) -> list[dict]:
    rows = []
    for v in videos:
        r = results.get(v["name"]) or read_record(root, v["name"])
        if r is None:
            r = {**{k: v.get(k, "") for k in COLUMNS}, "status": "missing", "error": "not generated (job stopped)"}
        rows.append(r)
    return rows


def summarize(results: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts
