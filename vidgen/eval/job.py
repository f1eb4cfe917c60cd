"""FVD / KVD of generated against real clips: clips read by Ray Data, I3D features in an actor pool,
statistics reduced on the driver.

Both sets are cut into clips of `eval.num_frames` frames the same way (deterministic starts, centre
crops), because FVD is only comparable between sets sampled alike (generation.md 3.5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from vidgen.config import VidgenConfig
from vidgen.data.pipeline import read_clips
from vidgen.errors import DataError
from vidgen.eval.fvd import fvd, kvd

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    fvd: float
    kvd: float
    num_real: int
    num_generated: int
    params: dict  # what the numbers depend on; logged to MLflow beside them


def clip_features(source: str, layout: str, cfg: VidgenConfig, limit: int | None = None) -> np.ndarray:
    import ray

    from vidgen.eval.features import I3DFeatures

    e, d = cfg.eval, cfg.data
    stream = read_clips(source, layout, num_frames=e.num_frames, height=d.height, width=d.width,
                        fps=None, source_fps=d.source_fps, train=False, seed=cfg.run.seed,
                        default_prompt="-", max_bad_fraction=d.max_bad_fraction)
    ds = stream.dataset.select_columns(["frames", "clip_id"])
    if limit:
        ds = ds.limit(limit)
    feats = ds.map_batches(
        I3DFeatures,
        fn_constructor_kwargs=dict(flavor=e.i3d_flavor, path=e.i3d_path, resolution=e.resolution,
                                   seed=cfg.run.seed, batch_size=e.batch_size),
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=e.batch_size,
        num_cpus=1,
    ).take_all()
    stream.check()
    if len(feats) < 2:
        raise DataError(f"{source}: {len(feats)} clip(s) of {e.num_frames} frames; FVD needs at least 2 "
                        f"(videos shorter than eval.num_frames are skipped)")
    feats.sort(key=lambda r: r["clip_id"])  # order-independent result, reproducible arrays
    return np.stack([r["features"] for r in feats]).astype(np.float64)


def run_eval(cfg: VidgenConfig, real: str, generated: str, real_layout: str | None = None) -> EvalResult:
    real_feats = clip_features(real, real_layout or cfg.data.layout, cfg, limit=cfg.eval.max_real)
    gen_feats = clip_features(generated, "videos", cfg)
    params = {"eval.impl": "i3d-400-logits/unbiased-cov/scipy-sqrtm", "eval.resize": "squash-bilinear",
              "eval.i3d_flavor": cfg.eval.i3d_flavor, "eval.resolution": cfg.eval.resolution,
              "eval.clip_frames": cfg.eval.num_frames}
    return EvalResult(fvd=fvd(real_feats, gen_feats), kvd=kvd(real_feats, gen_feats),
                      num_real=len(real_feats), num_generated=len(gen_feats), params=params)
