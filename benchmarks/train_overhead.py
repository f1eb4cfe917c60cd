"""Step time of vidgen's trainer (Ray Train + DeepSpeed ZeRO-2, 1 worker) against a plain PyTorch loop.

Same tiny SVD, same batch, same threads, measured side by side in one run; the first steps of each are
warm-up and not timed. Prints one JSON line per figure:

    python benchmarks/train_overhead.py [--steps 20] [--warmup 3] [--frames 4] [--size 64]

Goal: overhead (vidgen / plain - 1) at most 10%, and data-wait at most 2% of step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid

import numpy as np


def plain(cfg, clip: np.ndarray, steps: int, warmup: int, threads: int) -> list[float]:
    import torch

    from vidgen.train.recipes import build_recipe

    torch.set_num_threads(threads)
    recipe = build_recipe("svd_full", cfg.model, cfg.train, 0)
    unet, params = recipe.unet, recipe.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(0)
    batch = {"frames": torch.from_numpy(clip[None]), "fps": torch.tensor([7.0])}
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = recipe.loss(batch, lambda x, t, e, i: unet(x, t, e, i).sample, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    ap.add_argument("--frames", type=int, default=4, help="frames per clip = model window (default 4)")
    ap.add_argument("--size", type=int, default=64, help="clip height and width (default 64)")
    args = ap.parse_args()

    import ray

    from vidgen.config import load_config
    from vidgen.ray_env import set_driver_env
    from vidgen.train.launch import fit

    set_driver_env()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="vidgen-bench-")
    total = args.warmup + args.steps
    cfg = load_config(None, [f"run.workdir={work}", f"run.name=bench-{uuid.uuid4().hex[:6]}",
                             f"model.num_frames={args.frames}", f"data.height={args.size}",
                             f"data.width={args.size}", "train.num_workers=1", "train.zero_stage=2",
                             f"train.max_steps={total}", f"train.checkpoint_every={total}"])
    clip = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    ds = ray.data.from_items([{"frames": clip, "fps": 7.0} for _ in range(total + 4)])
    threads = os.cpu_count() or 1  # what the loop gives a single worker

    plain_times = plain(cfg, clip, args.steps, args.warmup, threads)
    rows = fit(cfg, ds).metrics
    timed = [r for r in rows if r["step"] > args.warmup]
    ray_times = [r["step_time_s"] for r in timed]
    wait = statistics.mean(r["data_wait_frac"] for r in timed)

    p, v = statistics.median(plain_times), statistics.median(ray_times)
    for name, value in (("plain_step_s", p), ("vidgen_step_s", v), ("overhead_ratio", v / p),
                        ("data_wait_frac", wait)):
        print(json.dumps({"benchmark": "train_overhead", "figure": name, "value": round(value, 4),
                          "steps": args.steps, "frames": args.frames, "size": args.size}))


if __name__ == "__main__":
    main()
