"""The per-worker training function that Ray Train runs on every rank.

setup: recipe, DeepSpeed engine (ZeRO from the config), resume from Ray's latest checkpoint.
train: batches from this rank's shard of the Ray Dataset -> loss -> backward -> step.
save:  every rank writes its DeepSpeed shard, then all report it together as one Ray checkpoint.

Metrics go to a `MetricsSink` actor owned by the driver, which logs them (workers never talk to MLflow).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time

import torch

log = logging.getLogger(__name__)


def deepspeed_config(train: dict, world_size: int, on_cpu: bool) -> dict:
    zero: dict = {"stage": train["zero_stage"]}
    if train["zero_stage"] == 3 and on_cpu:
        zero["stage3_max_reuse_distance"] = 0  # avoids a 13 s one-off prefetch scan per fit on CPU
    return {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": 1,
        "train_batch_size": train["batch_size"] * world_size,
        "gradient_clipping": train["max_grad_norm"],
        "zero_optimization": zero,
        "bf16": {"enabled": train["precision"] == "bf16"},
        "fp16": {"enabled": train["precision"] == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _skip_cpu_shm_build() -> None:
    # DeepSpeed compiles a CPU shared-memory comm op (~47 s) that Ray's gloo group never uses.
    mod = importlib.import_module("deepspeed.comm.torch")
    if hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


def train_func(config: dict) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from vidgen.config import ModelConfig, TrainConfig
    from vidgen.train.recipes import build_recipe

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_cfg, model_cfg = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    seed = config["seed"]
    on_cpu = not train_cfg.use_gpu
    device = torch.device("cpu") if on_cpu else torch.device("cuda", ctx.get_local_rank())
    if on_cpu:
        _skip_cpu_shm_build()
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, world)))
    else:
        torch.cuda.set_device(device)

    # -- setup --------------------------------------------------------------------------------
    recipe = build_recipe(train_cfg.recipe, model_cfg, train_cfg, seed).to(device)
    params = recipe.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)  # client optimizer: no fused-Adam build
    warmup = train_cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    engine, _, _, _ = deepspeed.initialize(
        model=recipe.unet, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config["train"], world, on_cpu),
    )

    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=None)
        step = int(client["step"])
        log.info("rank %d resumed at step %d", rank, step)

    def unet_fn(sample, timestep, ehs, ids):
        return engine(sample, timestep, encoder_hidden_states=ehs, added_time_ids=ids, return_dict=False)[0]

    sink = config.get("metrics_sink")
    shard = ray.train.get_dataset_shard("train")
    generator = torch.Generator().manual_seed(seed * 100_003 + rank * 1009 + step)  # distinct per rank

    # -- train --------------------------------------------------------------------------------
    t_last = time.perf_counter()
    epoch = 0
    while step < train_cfg.max_steps:
        seen = 0
        for batch in shard.iter_batches(batch_size=train_cfg.batch_size, batch_format="numpy", drop_last=True):
            seen += 1
            tensors = {"frames": torch.from_numpy(batch["frames"]), "fps": torch.from_numpy(batch["fps"])}
            loss, extra = recipe.loss(tensors, unet_fn, generator)
            engine.backward(loss)
            engine.step()
            step += 1
            mean_loss = loss.detach().clone()
            torch.distributed.all_reduce(mean_loss)
            mean_loss = mean_loss.item() / world
            if rank == 0 and sink is not None:
                now = time.perf_counter()
                sink.put.remote([{"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                                  "step_time_s": now - t_last, "epoch": epoch, **extra}])
                t_last = now
            done = step >= train_cfg.max_steps
            if done or step % train_cfg.checkpoint_every == 0:
                if train_cfg.zero_stage < 3:
                    check_ranks_agree(params, step)
                _save(engine, step, mean_loss, Checkpoint, ray.train)
            if done:
                break
        if seen == 0:
            raise RuntimeError(f"rank {rank}: the training dataset shard yielded no batch of {train_cfg.batch_size}")
        epoch += 1


def check_ranks_agree(params: list[torch.nn.Parameter], step: int) -> None:
    """Every rank must hold the same weights (ZeRO 0-2 replicate them). Training that never averages
    gradients (SVD Xtend's unwrapped-DDP bug) lets ranks drift apart silently; here it fails loudly."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().view(1)
    gathered = [torch.zeros_like(checksum) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, checksum)
    values = torch.cat(gathered)
    if not torch.allclose(values, values[0].expand_as(values), rtol=1e-9, atol=1e-9):
        raise RuntimeError(f"step {step}: ranks hold different weights ({values.tolist()}): "
                           "gradients are not being averaged across workers")


def _save(engine, step: int, loss: float, Checkpoint, train_mod) -> None:
    with tempfile.TemporaryDirectory(prefix="vidgen-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step{step:08d}", client_state={"step": step})
        train_mod.report({"step": step, "loss": loss}, checkpoint=Checkpoint.from_directory(tmp))
