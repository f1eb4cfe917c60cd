"""Step time of vidgen's trainer (Ray Train + DeepSpeed ZeRO, 1 worker) against a plain PyTorch loop, and against
the same DeepSpeed engine driven by a bare loop (which splits the overhead into DeepSpeed's own and vidgen's).

Same tiny SVD, same batch, same threads (a Ray Train worker's default: the 1 CPU it reserves; --threads N sets
train.resources_per_worker={CPU: N} and gives the plain loop N threads), measured side by side in one run at
each size, for ZeRO-2 and ZeRO-3; the first steps of each are warm-up and not timed. vidgen's trainer reads
its clips as `vidgen train` does (--data source, the default): a data.source of frame folders written for the run,
each worker reading its own share of the epoch through Ray Data (decoded by data tasks, the order and position
kept by the worker); --data dataset gives it the clip as an in-memory Ray Dataset instead, split by Ray Train.
With --contend, N busy processes of the benchmark's own (default 1) run beside the loops (as data tasks and other
processes share a node's cores with the trainer), paused and resumed in alternate windows of --window seconds
while each loop runs twice as many steps: each loop's quiet and contended steps are then steps of the same
process, interleaved, and a drift of the machine over the run falls on both alike (steps across a switch, or
within 0.25 s after one, are not counted; vidgen's steps are placed by the end time its metrics carry).
Prints one JSON line per figure:

    python benchmarks/train_overhead.py [--sizes 64x4,128x8,256x8] [--stages 2,3] [--steps N] [--warmup 3]
                                        [--threads 1] [--contend [N]] [--window S] [--data source|dataset]

Figures per size and stage: plain, deepspeed (vidgen's engine, config and optimizer in a bare loop, in its own
process) and vidgen step (median s), overhead_ratio (vidgen / plain), deepspeed_ratio (deepspeed / plain),
vidgen_over_deepspeed (vidgen / deepspeed: what Ray Train, the data path, metrics and checkpoint bookkeeping add),
overhead_ms (vidgen - plain), data_wait_frac, plain_drift (the plain loop timed again after the others, over
its first time: how much the machine itself moved during the measurement); with --contend, these from the quiet
windows, the contended step times and each loop's slowdown (contended over quiet step), and the steps counted in
each state; then per stage the fixed part of the
overhead in ms (the intercept of overhead_ms against the plain step time, least squares over the sizes), and
DeepSpeed's fixed part alike.
Goal: overhead at most 5% at 128x128x8 and 256x256x8, at most 10% at 64x64x4, data-wait at most 2% of step
time; under --contend, vidgen's step slows by no more than the plain loop's.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import statistics
import tempfile
import threading
import time
import uuid

import numpy as np

STEADY_S = 15  # seconds of timed plain steps per loop (at least), so small sizes are timed over a long pass


def plain(cfg, clip: np.ndarray, steps: int, warmup: int, threads: int) -> list[float]:
    import torch

    from vidgen.models.registry import build_recipe

    torch.set_num_threads(threads)
    recipe = build_recipe(cfg.model, cfg.train, 0)
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
        times.append((time.time(), time.perf_counter() - t0))
    return times[warmup:]


def deepspeed_loop(cfg, clip: np.ndarray, steps: int, warmup: int, threads: int, out) -> None:
    """vidgen's DeepSpeed engine (same config, client optimizer and recipe) in a bare loop: no Ray, no data path,
    no metrics. Runs in a fresh process (DeepSpeed initialises torch.distributed, world size 1)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    from vidgen.ray_env import apply_worker_env

    apply_worker_env(False)
    import deepspeed
    import torch

    from vidgen.models.registry import build_recipe
    from vidgen.train import loop

    loop._skip_cpu_shm_build()
    torch.set_num_threads(threads)
    deepspeed.init_distributed("gloo")
    recipe = build_recipe(cfg.model, cfg.train, 0)
    optimizer = loop._optimizer(recipe.trainable_parameters(), cfg.train)
    ds_config = loop.deepspeed_config(cfg.train.model_dump(), 1, True, getattr(recipe, "deepspeed_overrides", dict)())
    engine, _, _, _ = deepspeed.initialize(model=recipe.unet, optimizer=optimizer, config=ds_config)
    gen = torch.Generator().manual_seed(0)
    batch = {"frames": torch.from_numpy(clip[None]), "fps": torch.tensor([7.0])}
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = recipe.loss(batch, lambda *a, **k: engine(*a, return_dict=False, **k)[0], gen)
        engine.backward(loss)
        engine.step()
        times.append((time.time(), time.perf_counter() - t0))
    out.put(times[warmup:])


def run_deepspeed_loop(cfg, clip: np.ndarray, args) -> list[float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=deepspeed_loop, args=(cfg, clip, args.steps, args.warmup, args.threads, out))
    proc.start()
    while True:
        try:
            times = out.get(timeout=5)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the DeepSpeed loop's process exited with code {proc.exitcode}") from None
    proc.join()
    return times


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class Contention:
    """`n` busy processes of the benchmark's own, run and paused (SIGCONT, SIGSTOP) in alternate windows of
    `window` seconds while open: every loop meets quiet and contended steps in the same process, interleaved, so
    a drift of the machine or of the process over the loop falls on both alike. `state(end, dt)` of a step that
    ended at `end` (Unix s) after `dt` s: "quiet" or "contended" when it lay wholly inside one window, at least
    `settle` s after its switch, else None (not counted)."""

    def __init__(self, n: int, window: float, settle: float = 0.25):
        self.n, self.window, self.settle = n, window, settle
        self.switches: list[tuple[float, bool]] = []  # (when, busy from then on)
        self._stop = threading.Event()

    def __enter__(self) -> Contention:
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_busy, args=(24 * 3600,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(2.0)  # their interpreter start-up is not part of any window
        self._signal(signal.SIGSTOP, busy=False)
        self.thread = threading.Thread(target=self._alternate, daemon=True)
        self.thread.start()
        return self

    def _signal(self, sig, busy: bool) -> None:
        for p in self.procs:
            os.kill(p.pid, sig)
        self.switches.append((time.time(), busy))

    def _alternate(self) -> None:
        busy = False
        while not self._stop.wait(self.window):
            busy = not busy
            self._signal(signal.SIGCONT if busy else signal.SIGSTOP, busy)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        for p in self.procs:
            p.kill()  # SIGKILL ends a stopped process too
            p.join()

    def state(self, end: float, dt: float) -> str | None:
        start = end - dt - self.settle
        before = [busy for when, busy in self.switches if when <= start]
        if not before or any(start < when <= end for when, _ in self.switches):
            return None
        return "contended" if before[-1] else "quiet"


def in_state(steps: list[tuple], contention: Contention | None, state: str) -> list[tuple]:
    """The steps, (end, dt, ...) each, that ran wholly in `state` (all are quiet without contention)."""
    return [s for s in steps if (contention.state(s[0], s[1]) if contention else "quiet") == state]


def timed_loops(cfg, clip: np.ndarray, args, contention: Contention | None = None) -> dict:
    """(end, dt) of every timed step of the three loops and of the plain loop timed again at the end; vidgen's
    steps also carry their data-wait fraction, (end, dt, wait)."""
    import ray

    from vidgen.data.pipeline import read_config_clips
    from vidgen.train.launch import fit

    cfg = cfg.model_copy(deep=True)
    cfg.run.name = f"bench-{uuid.uuid4().hex[:6]}"  # a fresh run: never a resume of the previous measurement
    if cfg.data.source:  # the user's path: each worker reads its share of data.source (frame folders)
        ds = read_config_clips(cfg, train=True)
    else:
        ds = ray.data.from_items([{"frames": clip, "fps": 7.0} for _ in range(args.warmup + args.steps + 4)])
    out = {"plain": plain(cfg, clip, args.steps, args.warmup, args.threads),
           "deepspeed": run_deepspeed_loop(cfg, clip, args)}
    timed = [r for r in fit(cfg, ds).metrics if r["step"] > args.warmup]
    out["vidgen"] = [(r["time"], r["step_time_s"], r["data_wait_frac"]) for r in timed]
    out["plain_after"] = plain(cfg, clip, args.steps, args.warmup, args.threads)
    return out


def figures(loops: dict, contention: Contention | None, state: str) -> dict:
    """Median step of each loop in `state`, the plain loop over both of its passes, and the counts."""
    steps = {k: in_state(loops[k], contention, state) for k in ("plain", "deepspeed", "vidgen", "plain_after")}
    counts = {k: len(v) for k, v in steps.items()}
    if not all(counts.values()):
        raise SystemExit(f"no {state} step of some loop ({counts}): use a longer --window")
    by = {k: [s[1] for s in v] for k, v in steps.items()}
    return {"plain": statistics.median(by["plain"] + by["plain_after"]),
            "deepspeed": statistics.median(by["deepspeed"]), "vidgen": statistics.median(by["vidgen"]),
            "drift": statistics.median(by["plain_after"]) / statistics.median(by["plain"]),
            "data_wait_frac": statistics.mean(s[2] for s in steps["vidgen"]), "steps": counts}


def measure(size: int, frames: int, stage: int, args) -> dict:
    from vidgen.config import load_config
    from vidgen.data.synth import make_moving_shapes

    cfg = load_config(None, [f"run.workdir={tempfile.mkdtemp(prefix='vidgen-bench-')}", f"model.num_frames={frames}",
                             f"data.height={size}", f"data.width={size}", "train.num_workers=1",
                             f"train.zero_stage={stage}", f"train.resources_per_worker={{CPU: {args.threads}}}"])
    clip = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    window = args.window
    if args.steps is None or (args.contend and not window):  # the plain step's time sets both defaults
        probe = statistics.median(dt for _, dt in plain(cfg, clip, 3, 1, args.threads))
        window = window or max(3.0, 5 * probe)  # several steps inside each window
    if args.steps is None:  # a steady state of at least STEADY_S seconds per loop (per state), at least 20 steps
        n = max(20, math.ceil(STEADY_S / probe))
        args = argparse.Namespace(**{**vars(args), "steps": 2 * n + 10 if args.contend else n})
    cfg.train.max_steps = cfg.train.checkpoint_every = args.warmup + args.steps
    if args.data == "source":  # one epoch covers the run: no epoch restart inside the timed steps
        cfg.data.source = f"{cfg.run.workdir}/clips"
        make_moving_shapes(cfg.data.source, args.warmup + args.steps + 4, frames, size, size)
    if args.contend:
        with Contention(args.contend, window) as contention:
            loops = timed_loops(cfg, clip, args, contention)
    else:
        contention, loops = None, timed_loops(cfg, clip, args)
    q = figures(loops, contention, "quiet")
    p, d, v = q["plain"], q["deepspeed"], q["vidgen"]
    row = {"size": f"{size}x{size}x{frames}", "zero_stage": stage, "threads": args.threads, "steps": args.steps,
           "contend": args.contend, "data": args.data,
           "plain_step_s": round(p, 4), "deepspeed_step_s": round(d, 4), "vidgen_step_s": round(v, 4),
           "overhead_ratio": round(v / p, 3), "deepspeed_ratio": round(d / p, 3),
           "vidgen_over_deepspeed": round(v / d, 3), "overhead_ms": round(1000 * (v - p), 1),
           "deepspeed_overhead_ms": round(1000 * (d - p), 1), "plain_drift": round(q["drift"], 3),
           "data_wait_frac": round(q["data_wait_frac"], 4)}
    if args.contend:  # the contended windows of the same loops: how much each one's step slows
        c = figures(loops, contention, "contended")
        pb, db, vb = c["plain"], c["deepspeed"], c["vidgen"]
        row.update({"window_s": round(window, 1), "quiet_steps": q["steps"], "contended_steps": c["steps"],
                    "contended_plain_step_s": round(pb, 4), "contended_vidgen_step_s": round(vb, 4),
                    "contended_plain_slowdown": round(pb / p, 3), "contended_deepspeed_slowdown": round(db / d, 3),
                    "contended_vidgen_slowdown": round(vb / v, 3), "contended_overhead_ratio": round(vb / pb, 3),
                    "contended_plain_drift": round(c["drift"], 3),
                    "contended_data_wait_frac": round(c["data_wait_frac"], 4)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64x4,128x8,256x8", help="SIZExFRAMES list (default 64x4,128x8,256x8)")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages (default 2,3)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed steps (default: at least 20, and as many as {STEADY_S} s of plain steps)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="CPUs the worker reserves = threads of both loops")
    ap.add_argument("--contend", type=int, nargs="?", const=1, default=0, metavar="N",
                    help="N busy processes (default 1: the other core of two), run and paused in alternate windows "
                         "while each loop runs twice as many steps: how much each loop's step slows, quiet and "
                         "contended steps of the same process")
    ap.add_argument("--window", type=float, default=None,
                    help="seconds of each quiet or contended window (default: 5 plain steps, at least 3 s)")
    ap.add_argument("--data", choices=("source", "dataset"), default="source",
                    help="how vidgen's trainer gets its clips: source (default, as `vidgen train` reads them: frame "
                         "folders of data.source, decoded by Ray Data tasks) or dataset (the clip in memory, a Ray "
                         "Dataset split by Ray Train)")
    args = ap.parse_args()
    if args.window is not None and args.window <= 0:
        ap.error(f"--window {args.window}: seconds must be > 0")

    import ray

    from vidgen.ray_env import set_driver_env

    set_driver_env()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    for stage in (int(s) for s in args.stages.split(",")):
        rows = []
        for spec in args.sizes.split(","):
            size, frames = (int(x) for x in spec.split("x"))
            rows.append(measure(size, frames, stage, args))
            print(json.dumps({"benchmark": "train_overhead", **rows[-1]}), flush=True)
        if len(rows) > 1:  # overhead_ms = fixed + slope * plain_ms
            x = np.array([1000 * r["plain_step_s"] for r in rows])
            slope, fixed = np.polyfit(x, np.array([r["overhead_ms"] for r in rows]), 1)
            ds_slope, ds_fixed = np.polyfit(x, np.array([r["deepspeed_overhead_ms"] for r in rows]), 1)
            print(json.dumps({"benchmark": "train_overhead", "zero_stage": stage,
                              "fixed_overhead_ms": round(float(fixed), 1),
                              "proportional_overhead": round(float(slope), 3),
                              "deepspeed_fixed_overhead_ms": round(float(ds_fixed), 1),
                              "deepspeed_proportional_overhead": round(float(ds_slope), 3)}), flush=True)


if __name__ == "__main__":
    main()
