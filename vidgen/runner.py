"""Jobs as the CLI and `jobs/*.py` run them: Ray start-up, then one stage under one MLflow run.

Each `*_job` takes a validated config and an open `Tracker`, runs its stage on Ray, logs what it
produced, and returns a summary dict. `vidgen demo` chains them inside a single run.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from vidgen import storage
from vidgen.config import VidgenConfig
from vidgen.errors import JobError, StorageError
from vidgen.models import registry
from vidgen.ray_env import require_shared
from vidgen.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)


def tracker_for(cfg: VidgenConfig, run_name: str | None = None, job: str | None = None) -> Tracker:
    """The job's MLflow run; a training run's reruns (resuming its checkpoints) continue the run its first start
    made, named in a file beside the checkpoints."""
    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.run.workdir)
    local = storage.local_path(cfg.run.workdir)
    if local:
        try:
            Path(local).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"run.workdir={cfg.run.workdir}: cannot create the folder ({e.strerror})") from None
    run_file = None
    if job == "train":
        from vidgen.train.launch import mlflow_run_file  # lazy: loads Ray, PyArrow

        run_file = mlflow_run_file(cfg)
    return Tracker(uri, cfg.tracking.experiment, run_name or cfg.run.name, enabled=cfg.tracking.enabled,
                   run_file=run_file)


def check_outputs_shared(cfg: VidgenConfig, job: str) -> None:
    """Before anything starts: where `job`'s remote processes write must be storage every node shares."""
    from vidgen.generate.outputs import job_root  # lazy: job modules load PIL, Ray, PyArrow
    from vidgen.train.latents import cache_uri
    from vidgen.train.launch import storage_root

    w = {"run.workdir": cfg.run.workdir}
    if job == "train":  # checkpoints (every rank), validation videos (rank 0), data skip records (data tasks)
        w |= {"train.storage_path": storage_root(cfg)} if cfg.train.storage_path else {}
        needs_gpu = cfg.train.use_gpu
    elif job == "generate":  # videos and their records (actors)
        w = {"generate.output": job_root(cfg)} if cfg.generate.output else w
        needs_gpu = cfg.generate.use_gpu
    elif job == "eval":  # skip records (data tasks)
        needs_gpu = bool(cfg.eval.use_gpu)
    elif job == "latents":  # cache shards and their done markers (actors)
        w = {"latents.output": cache_uri(cfg)} if cfg.latents.output else w
        needs_gpu = bool(cfg.latents.gpus_per_actor)
    else:
        raise ValueError(job)
    require_shared(cfg, w, needs_gpu)


def prepare_train(cfg: VidgenConfig):
    """Every check `vidgen train` makes before it opens its MLflow run or starts a worker, each refusal one line:
    settings, output locations, weights paths, and data.source listed and sampled (or the latent cache opened).
    Returns what `train_job` reads: a ClipStream of data.source, or a CacheStream of data.latents."""
    from vidgen.data.pipeline import read_config_clips  # lazy: loads PIL, Ray, PyArrow
    from vidgen.train.launch import check
    from vidgen.train.preflight import check_data, check_outputs_writable, check_weights

    check(cfg)
    check_outputs_shared(cfg, "train")
    check_outputs_writable(cfg)
    check_weights(cfg)
    d = cfg.data
    if d.latents:
        from vidgen.train import latents  # lazy: loads PIL

        return latents.CacheStream(cfg, latents.open_cache(cfg))  # refuses a cache of another config, in one line
    if not d.source:
        raise JobError("data.source: required for training (a dataset root path or URI, or data.latents)")
    stream = read_config_clips(cfg, train=True,
                               report_dir=storage.join(cfg.run.workdir, "data-report", cfg.run.name))
    log.info("training on %d samples from %s", stream.num_samples, d.source)
    check_data(cfg, stream)  # data provably over data.max_bad_fraction is refused
    return stream


def train_job(cfg: VidgenConfig, tracker: Tracker, progress=None, data=None) -> dict:
    """Ingest -> Ray Train + DeepSpeed fit -> exported UNet. Loss series logged as it arrives. `data`: what
    `prepare_train(cfg)` returned (the CLI calls it before opening `tracker`'s run); None: prepared here."""
    data = prepare_train(cfg) if data is None else data
    if cfg.data.latents:
        return _train_from_cache(cfg, tracker, progress, data)
    images = validation_images(cfg, data.samples) if cfg.train.validation_every else None
    result = _fit(cfg, tracker, progress, data, images)
    return _train_summary(cfg, tracker, result, data.check())


def _fit(cfg: VidgenConfig, tracker: Tracker, progress, dataset, images):
    from vidgen.train.launch import fit  # lazy: loads Ray, PyArrow, PIL

    def on_metrics(rows: list[dict]) -> None:
        for r in rows:  # timestamped when the worker ended the step, not when the driver drained the row
            tracker.log_metrics({f"train/{k}": float(v) for k, v in r.items() if k not in ("step", "time")},
                                step=r["step"], timestamp=r.get("time"))
            if progress:
                progress(r)

    def on_artifacts(step: int, paths: list[str]) -> None:
        for path in paths:
            tracker.log_video(path, artifact_path=f"validation/step{step:08d}")

    return fit(cfg, dataset, on_metrics=on_metrics, validation_images=images, on_artifacts=on_artifacts)


def _train_from_cache(cfg: VidgenConfig, tracker: Tracker, progress, cache) -> dict:
    """Training on a latent cache (`vidgen prepare latents`): no decoding, no frozen-encoder forward."""
    from vidgen.train import latents  # lazy: loads PIL

    manifest = cache.manifest
    t = cfg.train
    log.info("training on %d cached clips from %s", manifest["clips"], cfg.data.latents)
    images = None
    if t.validation_every:  # held-out inputs: the configured ones, else the cache's first clips
        rows = [r for r, _ in zip(latents.read_rows(cfg.data.latents, manifest), range(t.validation_count))]
        if registry.spec(cfg.model).conditioning == "text":
            images = list(t.validation_prompts) or [r["prompt"] or "a video" for r in rows]
        else:
            images = validation_images(cfg, []) if t.validation_images else [r["first_frame"] for r in rows]
    result = _fit(cfg, tracker, progress, cache, images)
    return _train_summary(cfg, tracker, result, manifest["report"])


def _train_summary(cfg: VidgenConfig, tracker: Tracker, result, report: dict) -> dict:
    tracker.log_metrics({"data/skipped": report["skipped"], "data/samples": report["total"]})
    tracker.set_tags({"train.checkpoint": result.checkpoint_dir, "train.export": result.export_dir})
    losses = [r["loss"] for r in result.metrics]
    tracker.log_metrics({"train/export_s": result.export_s})
    return {"export_dir": result.export_dir, "checkpoint_dir": result.checkpoint_dir, "merged_dir": result.merged_dir,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "steps": len(losses), "data_report": report, "timings": _timings(result)}


def _timings(result) -> dict:
    """Median step time, and each attempt's setup, checkpoint save/load times and the export's, in seconds."""
    steps = [r["step_time_s"] for r in result.metrics if "step_time_s" in r]
    out = {"step_s": round(statistics.median(steps), 3) if steps else None, "export_s": round(result.export_s, 2)}
    for key in ("setup_s", "checkpoint_save_s", "checkpoint_load_s"):
        out[key] = [round(r[key], 2) for r in result.metrics if key in r]
    return out


def validation_images(cfg: VidgenConfig, samples) -> list:
    """Held-out first frames, resized and centre-cropped to the training size (uint8 [H, W, 3]); for
    text-to-video families (hotshot) the validation prompts instead."""
    from vidgen.data.clips import resize_cover_crop  # lazy: loads PIL
    from vidgen.data.decode import decode_image

    if registry.spec(cfg.model).conditioning == "text":
        from vidgen.data.worker import resolve_prompt  # lazy: loads PIL

        return list(cfg.train.validation_prompts) or [
            resolve_prompt(s, cfg.data.default_prompt) or "a video" for s in samples[: cfg.train.validation_count]]

    height, width = cfg.data.largest_size()
    uris = list(cfg.train.validation_images)
    if not uris:  # first frames of the first samples (frame layouts; videos give their first frame)
        for s in samples[: cfg.train.validation_count]:
            if s.frame_uris:
                uris.append(s.frame_uris[0])
    images = []
    for uri in uris:
        if uri.lower().endswith((".mp4", ".webm", ".mov", ".mkv", ".gif")):
            from vidgen.data.video import read_video  # lazy: loads PIL

            frame = read_video(uri, 0, 1)[0][0]
        else:
            frame = decode_image(storage.read_bytes(uri), uri)
        images.append(resize_cover_crop(frame[None], height, width, None)[0])
    return images


def generate_job(cfg: VidgenConfig, tracker: Tracker, rows: list[dict] | None = None,
                 log_videos: int = 4) -> dict:
    """Batch generation; logs counts, videos/hour, frames/s, the manifest and a grid of sample videos."""
    from vidgen.diffusion.fifo import FifoPlan  # lazy: loads torch, PIL
    from vidgen.generate.job import output_dir, run_generation, summarize
    from vidgen.generate.outputs import job_root, video_grid

    g, window = cfg.generate, cfg.model.num_frames
    params = {"generate.window": window}
    if g.sampler == "fifo":
        latent = registry.spec(cfg.model).latent_frames  # the queue holds latent frames
        plan = FifoPlan(latent(window), g.fifo.partitions, g.fifo.lookahead)
        cfg_mult = 2 if max(g.min_guidance_scale, g.max_guidance_scale) > 1 else 1
        params |= {"generate.fifo.steps": plan.steps, "generate.fifo.iterations": plan.iterations(latent(g.num_frames)),
                   "generate.fifo.unet_calls_per_frame": len(plan.windows()) * cfg_mult}
    check_outputs_shared(cfg, "generate")
    tracker.log_params(params)
    t0 = time.perf_counter()
    try:
        results = run_generation(cfg, rows)
    finally:
        root = job_root(cfg)
        manifest = storage.join(root, "manifest.jsonl")
        if storage.exists(manifest):
            tracker.log_artifact(manifest, "generate")
    seconds = time.perf_counter() - t0
    counts = summarize(results)
    made = [r for r in results if r["status"] == "generated"]
    frames = sum(int(r["num_frames"]) for r in made)
    tracker.log_metrics({**{f"generate/{k}": v for k, v in counts.items()},
                         "generate/videos_per_hour": len(made) / seconds * 3600 if made else 0.0,
                         "generate/frames_per_s": frames / seconds if made else 0.0,
                         "generate/seconds": seconds})
    done = [r for r in results if r["status"] != "failed"]
    for r in done[:log_videos]:
        tracker.log_video(r["path"])
    if done:  # the grid goes to MLflow only: a file beside the videos would count as one in evaluation
        with tempfile.TemporaryDirectory(prefix="vidgen-grid-") as tmp:
            grid = video_grid([r["path"] for r in done[:4]], os.path.join(tmp, "grid.mp4"), g.fps)
            if grid:
                tracker.log_video(grid, artifact_path="grid")
    return {"output_dir": output_dir(cfg), "videos": [r["path"] for r in done], "counts": counts,
            "manifest": storage.join(job_root(cfg), "manifest.jsonl")}


def prepare_eval(cfg: VidgenConfig, real: str | None = None, generated: str | None = None,
                 real_layout: str | None = None, generated_layout: str | None = None):
    """Every check `vidgen eval` makes before it opens its MLflow run or starts a feature actor: output locations,
    and both sets listed and sampled (`vidgen.eval.job.prepare_inputs`). Returns what `eval_job` reads."""
    from vidgen.eval.job import prepare_inputs  # lazy: loads SciPy, PIL, torch
    from vidgen.generate.job import output_dir

    real = real or cfg.eval.real or cfg.data.source
    generated = generated or cfg.eval.generated or output_dir(cfg)
    if not real:
        raise JobError("eval.real: required (real clips to compare against; defaults to data.source)")
    check_outputs_shared(cfg, "eval")
    return prepare_inputs(cfg, real, generated, real_layout, generated_layout)


def eval_job(cfg: VidgenConfig, tracker: Tracker, real: str | None = None, generated: str | None = None,
             real_layout: str | None = None, generated_layout: str | None = None, inputs=None) -> dict:
    """FVD / KVD (overall and per window) and model-free metrics, logged to the open run.

    Logs the eval params (`fvd.*`), metrics `fvd`, `kvd`, `fvd/<window>`, `kvd/<window>`, the bootstrap
    intervals `fvd/lo`, `fvd/hi`, `kvd/lo`, `kvd/hi` (and per window `fvd/<window>/lo` ...),
    `eval/n_real`, `eval/n_fake`, `eval/<metric>_mean|_median`, and the per-video metrics as the
    artifact `eval/per_video.json`. Returns `EvalResult.to_dict()` plus the first version's
    `num_real` / `num_generated`. `inputs`: what `prepare_eval` returned (the CLI calls it before opening
    `tracker`'s run); None: prepared here from the other arguments.
    """
    from vidgen.eval.job import evaluate  # lazy: loads SciPy, PIL, torch

    inputs = inputs or prepare_eval(cfg, real, generated, real_layout, generated_layout)
    res = evaluate(cfg, inputs)
    tracker.log_params(res.params)
    metrics = {"fvd": res.fvd, "kvd": res.kvd, "eval/n_real": res.n_real, "eval/n_fake": res.n_fake}
    bounds = ("fvd_lo", "fvd_hi", "kvd_lo", "kvd_hi")  # the bootstrap intervals, when computed
    metrics |= {f"{k[:3]}/{k[4:]}": getattr(res, k) for k in bounds if not math.isnan(getattr(res, k))}
    for name, w in res.windows.items():
        metrics |= {f"fvd/{name}": w["fvd"], f"kvd/{name}": w["kvd"]}
        metrics |= {f"{k[:3]}/{name}/{k[4:]}": w[k] for k in bounds if not math.isnan(w.get(k, math.nan))}
    metrics |= {f"eval/{k}": v for k, v in res.metrics.items()}
    tracker.log_metrics(metrics)
    if res.warnings:
        tracker.set_tags({"eval.warnings": " | ".join(res.warnings)[:5000]})
    per_video = storage.join(cfg.run.workdir, "eval", cfg.run.name, "per_video.json")
    storage.write_json(per_video, {"videos": res.per_video, "summary": res.metrics})
    tracker.log_artifact(per_video, artifact_path="eval")
    out = res.to_dict() | {"num_real": res.n_real, "num_generated": res.n_fake}
    return _nan_to_none(out)  # printed as JSON by `vidgen eval --json`: NaN is not JSON


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
