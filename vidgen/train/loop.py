"""The per-worker training function that Ray Train runs on every rank.

setup: recipe, DeepSpeed engine (ZeRO and precision from the config), resume from Ray's latest checkpoint.
train: micro-batches from this rank's shard of the Ray Dataset -> loss -> backward -> step.
save:  every rank writes its DeepSpeed shard and a manifest of it (sizes, sha256; vidgen/train/manifest.py),
       then all report it together as one Ray checkpoint. A resume checks the manifests first and falls back
       to the newest older checkpoint of the run that checks out (`valid_checkpoint`).

Metrics go to the driver's `MetricsSink`; they become final only once Ray has registered a checkpoint
covering their step, so a resumed run never logs a step twice (steps after the last checkpoint are redone).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vidgen import faults
from vidgen.config import ModelConfig, Section, TrainConfig
from vidgen.data.buckets import bucket_batches
from vidgen.data.position import DataPosition, rank_rows
from vidgen.errors import ConfigError, JobError
from vidgen.models import registry
from vidgen.ray_env import apply_worker_env
from vidgen.train.manifest import _PART, verify_manifest, write_manifest
from vidgen.train.validation import validation_videos

log = logging.getLogger(__name__)

DUMP_ENV = "VIDGEN_DUMP_STATE"  # "<file>": test hook, rank 0 saves the final UNet state dict there
CLIP_LOG_ENV = "VIDGEN_CLIP_LOG"  # "<dir>": test hook, every rank records the clips it trains on (ClipLog)


LEAF_KEYS = ("names", "name_suffixes", "classes")  # how DeepSpeed's zero_optimization.leaf_module picks modules


def leaf_module_spec(zero: dict) -> dict[str, set[str]]:
    """The zero_optimization.leaf_module section of a DeepSpeed config as {key: strings}, each key of `LEAF_KEYS` a
    string or a list of strings as DeepSpeed takes them; anything else is refused, naming the field."""
    spec = zero.get("leaf_module") or {}
    if not isinstance(spec, dict) or set(spec) - set(LEAF_KEYS):
        raise ConfigError(f"zero_optimization.leaf_module: expected an object with {', '.join(LEAF_KEYS)}, "
                          f"got {json.dumps(spec)[:200]}")
    out = {}
    for k in LEAF_KEYS:
        v = spec.get(k) or []
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"zero_optimization.leaf_module.{k}: expected a string or a list of strings, "
                              f"got {json.dumps(v)[:200]}")
        out[k] = set(v)
    return out


def user_config(data, path: str) -> dict:
    """`data`, a train.deepspeed_config JSON read from `path`, once checked: an object, and its leaf_module section
    as `leaf_module_spec` takes it."""
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config={path}: expected a JSON object")
    if isinstance(data.get("zero_optimization"), dict):
        try:
            leaf_module_spec(data["zero_optimization"])
        except ConfigError as e:
            raise ConfigError(f"train.deepspeed_config={path}: {e}") from None
    return data


def deepspeed_config(train: dict, world_size: int, on_cpu: bool, user: dict | None = None) -> dict:
    zero: dict = {"stage": train["zero_stage"]}
    if on_cpu:
        # The contiguous gradient buffer keeps a GPU's allocator from fragmenting; in host memory it is only a
        # per-tensor copy in every backward hook (ZeRO-2 at 64x64x4: 30 ms of a 195 ms step). Offloading the
        # optimizer turns it back on (DeepSpeed needs it there).
        zero["contiguous_gradients"] = False
        if train["zero_stage"] == 3:
            zero["stage3_max_reuse_distance"] = 0  # avoids a 13 s one-off prefetch scan per fit on CPU
    if train["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if train["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    ga = train["gradient_accumulation"]
    cfg = {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": ga,
        "train_batch_size": train["batch_size"] * ga * world_size,
        "gradient_clipping": train["max_grad_norm"],
        "zero_optimization": zero,
        "bf16": {"enabled": train["precision"] == "bf16"},
        "fp16": {"enabled": train["precision"] == "fp16"},
        "zero_allow_untested_optimizer": True,  # a client optimizer (see `_optimizer`)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, user or {})


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(schedule: str, warmup: int, max_steps: int):
    """Multiplier of the base lr at optimizer step s: linear warm-up, then constant / cosine / linear decay."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, max_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


def config_hash(model: dict, train: dict, sections: tuple[str, ...]) -> str:
    """What a checkpoint's weights depend on; bookkeeping (step counts, validation) may change on resume.
    `sections`: the train.* sub-sections the recipe reads (`Recipe.TRAIN_SECTIONS`); the others are left out."""
    owned = {n for n, f in TrainConfig.model_fields.items() if isinstance(f.annotation, type)
             and issubclass(f.annotation, Section)}
    keep = {k: v for k, v in train.items() if k not in RESUMABLE_KEYS and (k not in owned or k in sections)}
    if "lora" in keep:  # what is exported besides the LoRA does not change the weights
        keep["lora"] = {k: v for k, v in keep["lora"].items() if k != "export_merged"}
    blob = json.dumps({"model": {k: v for k, v in model.items() if k != "cache_dir"}, "train": keep},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


RESUMABLE_KEYS = {"max_steps", "checkpoint_every", "keep_checkpoints", "max_failures", "storage_path",
                  "validation_every", "validation_images", "validation_count", "validation_steps",
                  "num_workers", "resources_per_worker", "accelerator_type"}


def reserved_cpus() -> int:
    """Intra-op threads of a CPU worker: the CPUs Ray reserved for it (train.resources_per_worker; 1 by default),
    never the node's core count. The data tasks, Ray's own processes and other workers run on the other cores;
    a worker with more threads than its cores shares them, and its OpenMP threads spin at every barrier waiting
    for a descheduled sibling. benchmarks/train_overhead.py, 2 cores, one busy competing process: a step took 21x
    its quiet time with 2 threads, 1.2x with 1 (the plain loop: 4.6x and 1.1x)."""
    import ray  # lazy: importing loop does not load ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank's noise generator when (re)starting at `step`: distinct per rank, reproducible."""
    return seed * 100_003 + rank * 1009 + step


def _skip_cpu_shm_build() -> None:
    # DeepSpeed compiles a CPU shared-memory comm op (~47 s) that Ray's gloo group never uses.
    mod = importlib.import_module("deepspeed.comm.torch")
    if hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


STALE_BUILD_LOCK_S = 600  # DeepSpeed's CPU Adam compiles in ~1 minute; a lock this old lost its builder


def import_deepspeed():
    """`import deepspeed` for a worker process, without the MLflow that DeepSpeed's autotuner imports for itself
    (1.6-1.9 s of CPU per process, measured on a 2-core machine): workers never run the autotuner, and their
    metrics reach MLflow through the driver. `mlflow` is marked absent while DeepSpeed loads and importable again
    afterwards. Call it after `apply_worker_env`: DeepSpeed picks its accelerator when it is imported."""
    hide = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed  # lazy: after DS_ACCELERATOR is set
    finally:
        if hide and sys.modules.get("mlflow", ...) is None:
            del sys.modules["mlflow"]
    return deepspeed


def clear_stale_build_lock(name: str, now: float | None = None) -> bool:
    """Remove `<TORCH_EXTENSIONS_DIR>/<name>/lock` when it is older than STALE_BUILD_LOCK_S. torch's extension
    builder holds that file while it compiles and every other process waits for it to go, forever: a worker killed
    mid-build (a lost node, a cancelled job) would hang every later run on that machine. True when removed."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        return False
    lock = Path(root, name, "lock")
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_BUILD_LOCK_S:
        return False
    log.warning("%s: left by a build that died %.0f s ago; removing it so this build can run", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _optimizer(params, t):
    """A client optimizer, so DeepSpeed compiles no fused Adam. Under ZeRO-Offload the optimizer steps on the CPU
    copy of the weights: DeepSpeed's CPU Adam (vectorised, multi-threaded; refused otherwise by DeepSpeed),
    compiled once per machine into TORCH_EXTENSIONS_DIR (the cluster image builds it in advance)."""
    if t.adam_8bit:
        import bitsandbytes as bnb  # lazy: optional, GPU only (checked on the driver)

        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: after DS_ACCELERATOR is set

        clear_stale_build_lock("cpu_adam")
        return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)


def _maybe_dump_state(engine, zero_stage: int, rank: int) -> None:
    """Test hook: rank 0 writes the whole trained UNet (frozen tensors too) as the workers hold it."""
    path = os.environ.get(DUMP_ENV)
    if not path:
        return
    import deepspeed  # lazy: after DS_ACCELERATOR is set

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else None
    with gather or contextlib.nullcontext():
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in engine.module.state_dict().items()}, path)  # no copy on CPU


class ClipLog:
    """Test hook, VIDGEN_CLIP_LOG="<dir>" (on a filesystem every worker sees): each attempt of each rank writes
    `<dir>/<time ns>-<rank>-<start step>.jsonl`, a line {"step": s, "clips": [ids], "buckets": [...]} per batch it
    trains, s being the optimizer step the micro-batch belongs to. What a run trained on is every attempt's
    lines up to the step its next attempt started from."""

    def __init__(self, rank: int, start_step: int):
        where = os.environ.get(CLIP_LOG_ENV)
        self.path = Path(where, f"{time.time_ns()}-{rank}-{start_step}.jsonl") if where else None

    def add(self, step: int, clip_ids: list[str], buckets: list[str]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "clips": clip_ids, "buckets": buckets}) + "\n")


def train_func(config: dict) -> None:
    import ray.train  # lazy: importing loop does not load ray
    from ray.train import Checkpoint

    t, model_cfg = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    apply_worker_env(t.use_gpu)  # before DeepSpeed picks its accelerator: this worker's, not the driver's
    deepspeed = import_deepspeed()

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed, sink = config["seed"], config.get("metrics_sink")
    fault = faults.from_env("TRAIN")
    on_cpu = not t.use_gpu
    device = torch.device("cpu") if on_cpu else torch.device("cuda", ctx.get_local_rank())
    if on_cpu:
        _skip_cpu_shm_build()
        torch.set_num_threads(reserved_cpus())
    else:
        torch.cuda.set_device(device)

    # -- setup --------------------------------------------------------------------------------
    t_setup = time.perf_counter()
    timings: dict[str, float] = {}  # figures of this attempt, sent with the next metrics row
    my_hash = config_hash(config["model"], config["train"], registry.recipe_class(model_cfg, t.recipe).TRAIN_SECTIONS)
    step, batches_seen, client = 0, 0, {}
    with contextlib.ExitStack() as stack:
        ckpt = ray.train.get_checkpoint() or config.get("resume_from")  # this fit's newest, else the one on disk
        # DeepSpeed unpickles its files (weights_only=False): the manifest check first is what keeps a truncated or
        # altered file from being loaded.
        ckpt_dir = stack.enter_context(valid_checkpoint(ckpt)) if ckpt else None
        written_by = checkpoint_world(ckpt_dir) if ckpt_dir else world
        recipe = registry.build_recipe(model_cfg, t, seed).to(device)
        if t.activation_checkpointing:
            recipe.unet.enable_gradient_checkpointing()
        params = recipe.trainable_parameters()
        optimizer = _optimizer(params, t)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, t.max_steps))
        ds_config = deepspeed_config(config["train"], world, on_cpu, deep_merge(
            recipe.deepspeed_overrides(), config.get("deepspeed_user") or {}))
        if written_by != world:  # ZeRO's partitions of another world size: through DeepSpeed's universal format
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        engine, _, _, _ = deepspeed.initialize(model=recipe.unet, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        trainable_only = recipe.checkpoint_trainable_only  # LoRA, temporal layers: the frozen base is not saved
        names = [n for n, p in recipe.unet.named_parameters() if p.requires_grad]
        ema = {n: p.detach().float().clone() for n, p in zip(names, params, strict=True)} \
            if t.ema and rank == 0 else None
        timings["setup_s"] = time.perf_counter() - t_setup  # models built, DeepSpeed engine ready
        if ckpt_dir:
            t_load = time.perf_counter()
            load_dir = ckpt_dir
            if written_by != world:
                log.info("rank %d: the checkpoint was written by %d workers, this run has %d: converting it to "
                         "DeepSpeed's universal checkpoint", rank, written_by, world)
                load_dir = stack.enter_context(universal_checkpoint(ckpt_dir))
            _, client = engine.load_checkpoint(load_dir, tag=None, load_module_strict=not trainable_only)
            if ema is not None and Path(ckpt_dir, "ema.pt").exists():
                ema = load_ema(Path(ckpt_dir, "ema.pt"), device)
            if client.get("config_hash") not in (None, my_hash):
                raise RuntimeError(f"the checkpoint of run {ctx.get_experiment_name()!r} was written with another "
                                   "model/training config; start a new run.name to train with this one")
            step = int(client["step"])
            seen = client.get("batches_seen") or []
            batches_seen = int(seen[rank]) if len(seen) == world else 0
            _check_same_step(step, device)
            timings["checkpoint_load_s"] = time.perf_counter() - t_load
            log.info("rank %d resumed at step %d", rank, step)
    if sink is not None and rank == 0:
        sink.start_attempt.remote(step)  # forget uncommitted metrics of a failed attempt

    def unet_fn(*args, **kwargs):  # the recipe passes its model's own forward arguments
        return engine(*args, return_dict=False, **kwargs)[0]

    generator = torch.Generator().manual_seed(rank_seed(seed, rank, step))
    samples_per_step = t.batch_size * t.gradient_accumulation * world
    position = None
    skipped: Counter = Counter()  # samples this rank found bad, per epoch (rank_rows)
    if config.get("clips") is not None:  # data.source or a latent cache: each rank reads its own share, exactly
        stream = ray.get(config["clips"])
        position = resumed_position(client, stream, bool(ckpt))
        batches = clip_batches(stream, position, rank, world, t.batch_size, config["columns"], device, skipped)
    else:  # any other Ray Dataset: Ray Train's split, the position counted in batches
        batches = shard_batches(ray.train.get_dataset_shard("train"), t.batch_size, device, rank, skip=batches_seen)
    clip_log = ClipLog(rank, step)
    first_epoch, skip_limit = (position.floor if position else 0), config.get("skip_limit")

    # -- train --------------------------------------------------------------------------------
    t_step, wait, losses = time.perf_counter(), 0.0, []
    while step < t.max_steps:
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        consumed = batch.pop("_consumed", None)
        loss, extra = recipe.loss(batch, unet_fn, generator)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        batches_seen += 1
        if consumed is not None:
            position.mark(*consumed[:2])
            clip_log.add(step + 1, *consumed[2:])
        losses.append(loss.detach())
        if not boundary:
            continue
        step += 1
        mean_loss, found = step_totals(losses, skipped[first_epoch] if skip_limit is not None else 0, device)
        losses = []
        if skip_limit is not None and found > skip_limit:
            # More samples of one epoch were bad than data.max_bad_fraction allows of them all: nothing read later
            # brings the fraction back under it. Every rank sees the same sum and returns here, at the same step;
            # a return (not an error, which Ray Train would retry) and the driver raises (launch.check_skipped).
            if rank == 0 and sink is not None:
                ray.get(sink.stop_for_data.remote(step, found))
            return
        faults.maybe_exit("TRAIN", fault, rank, step)  # test hook (vidgen/faults.py)
        if ema is not None:
            _ema_update(ema, names, params, t.ema_decay)
        now, wall = time.perf_counter(), time.time()
        dt = now - t_step
        if rank == 0 and sink is not None:
            norm = engine.get_global_grad_norm()
            # "time": when the step ended (Unix s, rank 0's clock): the tracker's timestamp of the row
            sink.put.remote([{"step": step, "time": wall, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                              "grad_norm": float(norm) if norm is not None else float("nan"),
                              "step_time_s": dt, "samples_per_s": samples_per_step / dt,
                              "data_wait_frac": min(1.0, wait / dt), **extra, **timings}])
        timings = {}
        t_step, wait = now, 0.0
        if t.validation_every and step % t.validation_every == 0 and config.get("validation"):
            _validate(recipe, registry.spec(model_cfg), engine, t, config, rank, step, sink)
        if step >= t.max_steps or step % t.checkpoint_every == 0:
            if t.zero_stage < 3:
                check_ranks_agree(params, step, device)
            t_save = time.perf_counter()
            client = {"step": step, "config_hash": my_hash,
                      "batches_seen": data_positions(batches_seen, rank, world, device)}
            if position is not None:
                merge_position(position, device)
                client["data_position"] = position.state()
            _save(engine, client, ema, rank, world, Checkpoint, ray.train, trainable_only)
            timings["checkpoint_save_s"] = time.perf_counter() - t_save
            t_step = time.perf_counter()  # the next step's time is its own, without the checkpoint
    _maybe_dump_state(engine, t.zero_stage, rank)


def resumed_position(client: dict, stream, resumed: bool):
    """The data position a checkpoint stored, or the start of epoch 0."""
    k = stream.clips_per_sample
    state = client.get("data_position")
    if state is not None:
        return DataPosition.from_state(state, stream.num_samples, k)
    if resumed:  # a checkpoint from before exact positions: its clips are not known, so the data starts over
        log.warning("the checkpoint records no data position: reading the data from the start of epoch 0")
    return DataPosition(stream.num_samples, k)


def clip_batches(stream, position, rank: int, world: int, batch_size: int, columns: list[str],
                 device: torch.device, skipped: Counter | None = None) -> Iterator[dict]:
    """Micro-batches of this rank's share of the clips (vidgen.data.position.rank_rows), each of one bucket (one frame
    size; vidgen.data.buckets), as tensors on the device; `_consumed` holds (epochs, slots, clip ids) to mark
    in `position` once the batch is trained."""
    collate = _collate(device)
    for batch in bucket_batches(rank_rows(stream, position, rank, world, skipped), batch_size):
        out = collate({c: np.asarray(batch[c]) for c in columns if c in batch})
        out["_consumed"] = (batch["_epoch"], batch["_slot"], list(batch["clip_id"]), list(batch["bucket"]))
        yield out


def shard_batches(shard, batch_size: int, device: torch.device, rank: int, skip: int) -> Iterator[dict]:
    """Micro-batches of a Ray Train dataset shard, epoch after epoch; the first `skip` (trained before a
    resume) are passed over."""
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, collate_fn=_collate(device)):
            n += 1
            if skip:
                skip -= 1
                continue
            yield batch
        if n == 0:
            raise RuntimeError(f"rank {rank}: the training dataset shard yielded no batch of {batch_size} clips")


def _collate(device: torch.device):
    """Numeric columns become tensors on the device; text columns (prompts) stay lists of str."""

    def collate(batch: dict) -> dict:
        return {k: [str(x) for x in v] if v.dtype.kind in "OUS" else torch.as_tensor(v, device=device)
                for k, v in batch.items()}

    return collate


def load_ema(path, device: torch.device) -> dict[str, torch.Tensor]:
    """The EMA copy of a checkpoint on this worker's device (it is updated in place from the live weights)."""
    return torch.load(path, map_location=device, weights_only=True)


def _ema_update(ema: dict, names: list[str], params: list, decay: float) -> None:
    with torch.no_grad():
        for n, p in zip(names, params, strict=True):
            ema[n].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


# Collectives: every tensor is on the compute device. Ray Train picks NCCL when the workers have GPUs, and NCCL
# takes CUDA tensors only; gloo (CPU workers) takes CPU tensors.


def step_totals(losses: list[torch.Tensor], skipped: int, device: torch.device) -> tuple[float, int]:
    """The mean of every rank's micro-batch losses since the last optimizer step, and the sum of the ranks' skipped
    samples: one all-reduce, so one device sync a step."""
    mine = torch.stack([torch.stack(losses).mean().detach().double().to(device),
                        torch.tensor(float(skipped), dtype=torch.float64, device=device)])
    torch.distributed.all_reduce(mine)
    total_loss, total_skipped = mine.tolist()
    return total_loss / torch.distributed.get_world_size(), round(total_skipped)


def check_ranks_agree(params: list[torch.nn.Parameter], step: int, device: torch.device) -> None:
    """Every rank must hold the same weights (ZeRO 0-2 replicate them). Training that never averages
    gradients (SVD Xtend's unwrapped-DDP bug) lets ranks drift apart silently; here it fails loudly."""
    checksum = torch.stack([p.detach().double().sum().to(device) for p in params]).sum().view(1)
    gathered = [torch.zeros_like(checksum) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, checksum)
    values = torch.cat(gathered)
    if not torch.allclose(values, values[0].expand_as(values), rtol=1e-9, atol=1e-9):
        raise RuntimeError(f"step {step}: ranks hold different weights ({values.tolist()}): "
                           "gradients are not being averaged across workers")


def data_positions(batches_seen: int, rank: int, world: int, device: torch.device) -> list[int]:
    """Every rank's data position (micro-batches consumed), in every rank."""
    seen = torch.tensor([batches_seen if r == rank else 0 for r in range(world)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(seen)
    return seen.tolist()


def merge_position(position, device: torch.device) -> None:
    """Every rank's consumed slots, in every rank (all ranks call it together, before a checkpoint)."""
    top = max(position.open_epochs(), default=position.floor)
    span = torch.tensor([-position.floor, top], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(span, op=torch.distributed.ReduceOp.MAX)
    for epoch in range(-int(span[0]), int(span[1]) + 1):
        bits = torch.from_numpy(position.done(epoch).view(np.uint8).copy()).to(device)
        torch.distributed.all_reduce(bits, op=torch.distributed.ReduceOp.MAX)
        position.set_done(epoch, bits.cpu().numpy().astype(bool))
    position.advance()


def _save(engine, client: dict, ema, rank: int, world: int, Checkpoint, train_mod, trainable_only: bool) -> None:
    step, my_hash = client["step"], client["config_hash"]
    with tempfile.TemporaryDirectory(prefix="vidgen-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step{step:08d}", client_state=client,
                               exclude_frozen_parameters=trainable_only)
        if ema is not None:
            torch.save(ema, Path(tmp, "ema.pt"))
        # Last: the manifest vouches for the files; the driver reads the hash to refuse a changed config early.
        write_manifest(tmp, part=rank, parts=world, meta={"step": step, "config_hash": my_hash})
        train_mod.report({"step": step}, checkpoint=Checkpoint.from_directory(tmp))
    # The driver's CommitOnCheckpoint callback marks the step committed once Ray has registered it.


@contextlib.contextmanager
def valid_checkpoint(ckpt) -> Iterator[str]:
    """A local directory of `ckpt` (a ray.train.Checkpoint) if its manifests check out, else of the newest
    older checkpoint of the same run that does. Ray keeps `train.keep_checkpoints` of them side by side as
    `<storage_path>/<run.name>/checkpoint_<timestamp>`, so names sort oldest first. Each rejected one gets a
    one-line warning naming its first bad file; none valid is a JobError (starting over silently would
    repeat steps already logged)."""
    rejected: list[str] = []
    for cand in [ckpt, *_older_checkpoints(ckpt)]:
        with cand.as_directory() as d:
            problems = verify_manifest(d)
            if not problems:
                if rejected:
                    log.warning("using the previous checkpoint %s", cand.path)
                yield d
                return
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        log.warning("checkpoint %s rejected: %s%s", cand.path, problems[0], more)
        rejected.append(f"{cand.path}: {problems[0]}")
    raise JobError(f"no valid checkpoint to resume from: {rejected[0]}" + (
        f"; {len(rejected) - 1} older ones rejected too" if len(rejected) > 1 else "")
        + "; delete the run's storage directory or use a new run.name to start over")


def _older_checkpoints(ckpt) -> list:
    import pyarrow.fs  # lazy: importing loop does not load pyarrow or ray
    from ray.train import Checkpoint

    fs, path = ckpt.filesystem, ckpt.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:  # not a run's storage layout (a checkpoint copied elsewhere): nothing to fall back to
        return []
    older = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [Checkpoint(f"{parent}/{n}", filesystem=fs) for n in older]


def checkpoint_world(directory: str) -> int:
    """How many workers wrote a checkpoint: the parts of its manifest (vidgen/train/manifest.py)."""
    parts = {int(m.group(2)) for name in os.listdir(directory) if (m := _PART.match(name))}
    return max(parts, default=1)


@contextlib.contextmanager
def universal_checkpoint(directory: str) -> Iterator[str]:
    """`directory` (a DeepSpeed checkpoint of another world size) in DeepSpeed's universal format, in a temporary
    directory of this worker: ZeRO's optimizer partitions merged per parameter, to be loaded by any world size.
    Converted by DeepSpeed's own ds_to_universal (vidgen stores no universal_checkpoint_info, which only matters
    for tensor/pipeline parallelism; --inject_missing_state supplies the empty one)."""
    tag = Path(directory, "latest").read_text().strip()
    with tempfile.TemporaryDirectory(prefix="vidgen-universal-") as out:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
               "--input_folder", str(Path(directory, tag)), "--output_folder", str(Path(out, tag)),
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise JobError(f"checkpoint {directory}: converting it for another number of workers failed: {tail[0]}; "
                           "resume with the train.num_workers it was written with")
        Path(out, "latest_universal").write_text(tag)
        yield out


def _check_same_step(step: int, device: torch.device) -> None:
    """Ranks that read different copies of storage could fall back differently: refuse to train on mixed state."""
    both = torch.tensor([step, -step], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise RuntimeError(f"ranks resumed from different checkpoints (steps {-int(both[1])} to {int(both[0])})")


def _validate(recipe, family, engine, t, config: dict, rank: int, step: int, sink) -> None:
    """Videos from held-out inputs with the current weights; rank 0 writes, the driver logs."""
    gather = contextlib.nullcontext()
    if t.zero_stage == 3:
        import deepspeed  # lazy: after DS_ACCELERATOR is set

        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    with gather:
        if rank == 0:
            recipe.unet.eval()
            paths = validation_videos(family, recipe.model, config["validation"], step, t.validation_steps)
            recipe.unet.train()
            if sink is not None:
                sink.put_artifacts.remote(step, paths)
