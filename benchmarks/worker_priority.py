"""What the priority of a Ray worker does to a training step when every core is busy.

Ray starts its worker processes at niceness 15; vidgen starts the processes a job waits on at 0 (train workers,
the export, the actors of generation, evaluation and the latent cache: vidgen.ray_env.FOREGROUND_ENV). This runs
train_overhead.py's plain tiny-SVD step (1 thread) in a 1-CPU Ray task at each niceness, quiet and then beside N
busy processes of its own (default: one per core), and prints one JSON line per figure (median step s over the
timed steps, and the task's wall time with its start):

    python benchmarks/worker_priority.py [--busy N] [--steps 10] [--size 64] [--frames 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = str(Path(__file__).resolve().parent)


def steps(here: str, cfg, clip: np.ndarray, n: int) -> tuple[int, list[float]]:
    sys.path.insert(0, here)
    from train_overhead import plain

    return os.nice(0), plain(cfg, clip, n, 2, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy processes (default: one per core)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per figure (default 10)")
    ap.add_argument("--size", type=int, default=64, help="frame height and width (default 64)")
    ap.add_argument("--frames", type=int, default=4, help="frames per clip (default 4)")
    args = ap.parse_args()

    import ray

    sys.path.insert(0, HERE)
    from train_overhead import _competitors

    from vidgen.config import load_config
    from vidgen.ray_env import FOREGROUND_ENV, set_driver_env

    set_driver_env()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = load_config(None, [f"model.num_frames={args.frames}", f"data.height={args.size}",
                             f"data.width={args.size}"])
    clip = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    task = ray.remote(num_cpus=1)(steps)
    for busy in (0, args.busy):
        procs = _competitors(busy)
        try:
            for env in ({}, FOREGROUND_ENV):  # Ray's default, then FOREGROUND_ENV
                t0 = time.perf_counter()
                nice, times = ray.get(task.options(runtime_env={"env_vars": env}).remote(HERE, cfg, clip, args.steps))
                print(json.dumps({"benchmark": "worker_priority", "size": f"{args.size}x{args.size}x{args.frames}",
                                  "busy": busy, "niceness": nice, "step_s": round(statistics.median(times), 4),
                                  "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
        finally:
            for p in procs:
                p.terminate()


if __name__ == "__main__":
    main()
