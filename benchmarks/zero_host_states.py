"""What DeepSpeed's ZeRO states hold in host memory on a CPU run, per trainable parameter: the figures behind
`vidgen plan`'s CPU_OFFLOAD_GRAD_BYTES.

    python benchmarks/zero_host_states.py [--trainable 100e6] [--frozen 200e6]

One rank (gloo, DeepSpeed's CPU accelerator) trains a stack of 4096x4096 Linear layers in DeepSpeed's bf16 mode: a
frozen part and a trainable part, both built in bf16, like vidgen's full-size recipes. For ZeRO-2 and ZeRO-3, with
and without offload_optimizer (DeepSpeedCPUAdam), each in its own process, it prints one JSON line: the resident
memory after the build, after deepspeed.initialize, at each step's backward and after each optimizer step, and the
bytes per trainable parameter over the built model at the steady state (after step 3) and at the largest
backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GIB = 1024**3
WIDTH = 4096


def one(stage: int, offload: bool, trainable: float, frozen: float) -> dict:
    import psutil
    import torch

    from vidgen.train.loop import _skip_cpu_shm_build

    _skip_cpu_shm_build()
    import deepspeed

    rss = {}

    def mark(tag: str) -> None:
        rss[tag] = psutil.Process().memory_info().rss

    mark("start")
    layers = lambda n: torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(max(1, round(n / WIDTH**2)))])  # noqa: E731
    torch.set_default_dtype(torch.bfloat16)
    base, head = layers(frozen), layers(trainable)
    torch.set_default_dtype(torch.float32)
    base.requires_grad_(False)
    n_trainable = sum(p.numel() for p in head.parameters())
    mark("built")
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_max_reuse_distance"] = 0  # as vidgen runs ZeRO-3 on CPU
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        opt = DeepSpeedCPUAdam(head.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=torch.nn.Sequential(base, head), optimizer=opt, config=cfg)
    mark("initialized")
    for step in (1, 2, 3):
        loss = engine(torch.randn(8, WIDTH, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        mark(f"step{step}_backward")
        engine.step()
        mark(f"step{step}_optimizer")
    per = lambda b: round((b - rss["built"]) / n_trainable, 1)  # noqa: E731
    return {"zero_stage": stage, "offload_optimizer": offload, "trainable": n_trainable,
            "rss_gib": {k: round(v / GIB, 2) for k, v in rss.items()},
            "bytes_per_trainable_steady": per(rss["step3_optimizer"]),
            "bytes_per_trainable_peak": per(max(v for k, v in rss.items() if k.startswith("step")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainable", type=float, default=100e6, help="trainable parameters (default 100e6)")
    ap.add_argument("--frozen", type=float, default=200e6, help="frozen parameters (default 200e6)")
    ap.add_argument("--_one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(one(args._one[0], bool(args._one[1]), args.trainable, args.frozen)), flush=True)
        return
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29533", "DS_ACCELERATOR": "cpu"}
    for stage in (2, 3):
        for offload in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--_one", str(stage), str(offload), "--trainable",
                                  str(args.trainable), "--frozen", str(args.frozen)], env=env, capture_output=True,
                                 text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if lines else json.dumps({"zero_stage": stage, "offload_optimizer": bool(offload),
                                                      "error": out.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
