"""Latent cache benchmark (tiny models, CPU, one process): what training from the cache saves.

    python benchmarks/precompute.py [--family svd|hotshot] [--clips 8] [--frames 8] [--size 64] [--repeats 5]

Measured side by side in one run, on the same batch and generator:
  - step from clips: recipe.loss(frames) + backward (the frozen encoders run inside the step)
  - step from the cache: recipe.loss(cached encodings) + backward
  - the encoders alone: recipe.encode(frames), i.e. the share of a step the cache removes
  - cache write: decoding, encoding and writing --clips clips as one shard vs the encoders' forward over them
Goals (issue 11): cache step >= 1.5x faster; cache write <= 1.2x the encoders' own forward time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from vidgen.config import load_config
from vidgen.data.pipeline import read_clips, read_clips_local
from vidgen.data.synth import make_moving_shapes
from vidgen.models.registry import build_recipe
from vidgen.train import latents

FAMILY = {"svd": ["train.recipe=svd_full"], "hotshot": ["model.family=hotshot", "train.recipe=hotshot_temporal"]}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILY), default="svd")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = tempfile.mkdtemp(prefix="vidgen-precompute-")
    make_moving_shapes(f"{tmp}/clips", a.clips, a.frames, a.size, a.size)
    cfg = load_config(None, [f"run.workdir={tmp}", f"data.source={tmp}/clips", f"data.height={a.size}",
                             f"data.width={a.size}", f"model.num_frames={a.frames}", f"latents.batch_size={a.batch}",
                             f"latents.shard_size={a.clips}", *FAMILY[a.family]])
    recipe = build_recipe(cfg.model, cfg.train, 0)
    unet = recipe.unet
    unet_fn = lambda *x, **k: unet(*x, return_dict=False, **k)[0]  # noqa: E731
    d = cfg.data
    clips = list(read_clips_local(d.source, num_frames=a.frames, height=d.height, width=d.width, train=False))
    group = clips[:a.batch]
    batch = {"frames": torch.from_numpy(np.stack([c["frames"] for c in group])),
             "fps": torch.tensor([c["fps"] for c in group]), "prompt": [c["prompt"] for c in group]}
    cached = {**batch, **recipe.encode(batch)}
    cached.pop("frames")

    def step(b):
        unet.zero_grad(set_to_none=True)
        loss, _ = recipe.loss(b, unet_fn, torch.Generator().manual_seed(0))
        loss.backward()

    t_clips = timed(lambda: step(batch), a.repeats)
    t_cache = timed(lambda: step(cached), a.repeats)
    t_enc = timed(lambda: recipe.encode(batch), a.repeats)

    def encode_all():
        for i in range(0, len(clips), a.batch):
            part = clips[i:i + a.batch]
            recipe.encode({"frames": torch.from_numpy(np.stack([c["frames"] for c in part])),
                           "prompt": [c["prompt"] for c in part]})

    t_forward = timed(encode_all, 1)
    stream = read_clips(d.source, num_frames=a.frames, height=d.height, width=d.width, train=False)
    t0 = time.perf_counter()  # decode + encode + write one shard of every clip (the model is already built)
    latents.encode_shard(recipe, f"{tmp}/cache", 0, stream.samples, stream.spec, a.batch)
    t_write = time.perf_counter() - t0

    print(f"family {a.family}, batch {a.batch} x {a.frames} frames of {a.size}x{a.size}, {a.clips} clips, "
          f"median of {a.repeats}")
    print(f"step from clips  {t_clips * 1e3:8.1f} ms   (encoders alone {t_enc * 1e3:.1f} ms = "
          f"{t_enc / t_clips:.0%} of the step)")
    print(f"step from cache  {t_cache * 1e3:8.1f} ms   speed-up {t_clips / t_cache:.2f}x (goal >= 1.5x)")
    print(f"cache write      {t_write:8.2f} s    encoders' forward over the same clips {t_forward:.2f} s: "
          f"{t_write / t_forward:.2f}x (goal <= 1.2x; the write includes decoding the clips)")


if __name__ == "__main__":
    main()
