"""`vidgen plan`: parameters, FLOPs and peak GPU memory of a training config at full size, before renting GPUs.

Shapes: B batch per GPU, F frames, C channels, H/W pixels, h/w latents (H/8, W/8).

Nothing is allocated and no weight is read. The recipe of the config builds its models with `svd.build` swapped
for a meta-device builder (config.json files under a local model.path, else `svd.full_size_configs`), so the
trainable set is the recipe's own (train.trainable, or the LoRA that `inject_lora` adds). Then one training
micro-step runs on meta tensors at the config's B, F, H, W and dtypes, with the frozen encoders under no_grad:

- FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over that step (matmuls, convolutions,
  attention; the fused attention backward counts its own score recompute, as torch's formula does). The
  recompute that activation checkpointing adds is counted apart (a counter wraps each segment's recompute) and
  left out of the model FLOPs that MFU is quoted in.
- Activations are measured, not modelled: `_LiveBytes` sees every tensor the step creates and holds a weakref on
  its storage, so its running total is what a caching allocator would hold (no fragmentation), and its maximum
  is the step's transient peak, with checkpointing as configured. Attention runs as the fused kernel GPUs use
  (`_scaled_dot_product_efficient_attention`: saves q, k, v, out and the log-sum-exp, never the L x L matrix).
- Model states are DeepSpeed's layout per ZeRO stage (see `model_states`), for train.num_workers GPUs.

The result is one dict (`--json` prints it); a data-feed section (decode rate, CPU cores per GPU, issue 11) can
be added beside `gpus`, whose `step_time_s` is the rate the data must keep up with.

peak = weights + encoders + optimizer + fp32 grads + EMA + buckets + CUDA overhead
       + max(encoder pass peak, UNet forward/backward peak incl. 16-bit grads as autograd makes them)
"""

from __future__ import annotations

import contextlib
import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vidgen.config import VidgenConfig
from vidgen.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what nvidia-smi reports as total
    bf16_tflops: float  # dense tensor-core peak, bf16/fp16
    tf32_tflops: float  # dense tensor-core peak, tf32 (fp32 training)


GPUS = (
    GPU("A100-40GB", 40960 * 2**20, 312.0, 156.0),
    GPU("A100-80GB", 81920 * 2**20, 312.0, 156.0),
    GPU("H100-80GB", 81559 * 2**20, 989.0, 494.0),
)
CUDA_OVERHEAD = int(1.5 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers (typical, not measured)
REDUCE_BUCKET = int(5e8)  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)
PREFETCH_BUCKET = int(5e7)  # DeepSpeed stage3_prefetch_bucket_size default (elements)
METHOD = ("activations: storage bytes alive during one meta-device step (weakref per storage), fused attention; "
          "model states: DeepSpeed ZeRO layout; FLOPs: FlopCounterMode, checkpoint recompute excluded")


# -- meta-device models ---------------------------------------------------------------------------


def _read_configs(path: str | None) -> tuple[dict[str, dict] | None, str]:
    """Config dicts from a local diffusers SVD directory, or None (remote URIs are not read: no network)."""
    if not path or ("://" in path and not path.startswith("file://")):
        return None, "remote model.path not read"
    root = Path(path.removeprefix("file://")).expanduser()
    found = {}
    for part in ("unet", "vae", "image_encoder"):
        f = root / part / "config.json"
        if f.is_file():
            try:
                found[part] = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{f}: not a readable JSON config ({e})") from None
    return (found, f"config.json files under {root}") if found else (None, f"no config.json under {root}")


def meta_builder(num_frames: int):
    """A stand-in for `svd.build` that returns the model on the meta device, weights never read."""
    from vidgen.models import svd

    def build(flavor: str, *, path: str | None = None, seed: int = 0, num_frames: int = num_frames, **_):
        if flavor == "tiny":  # tiny is small: build it for real (its scheduler needs real tensors), then drop data
            model = svd.tiny(seed=seed, num_frames=num_frames)
            for m in (model.unet, model.vae, model.image_encoder):
                m.to("meta")
            build.source = "tiny flavor"
            return model
        configs = svd.full_size_configs(num_frames)
        read, build.source = _read_configs(path)
        for part, cfg in (read or {}).items():
            configs[part] = {k: v for k, v in cfg.items() if not k.startswith("_")}
        if read is None:
            build.source = f"built-in SVD{'-XT' if num_frames == 25 else ''} full-size configs ({build.source})"
        with torch.device("meta"):
            model = svd.from_configs(configs)
        for m in (model.unet, model.vae, model.image_encoder):
            m.to("meta")  # a few parameters (AlphaBlender.mix_factor) use torch.Tensor(), which ignores the device
        return model

    build.source = ""
    return build


def meta_recipe(cfg: VidgenConfig):
    """The config's recipe with its models on the meta device (trainable flags set by the recipe itself)."""
    from vidgen.models import svd
    from vidgen.train.recipes import build_recipe

    if cfg.model.family != "svd" or cfg.train.recipe not in ("svd_full", "svd_lora"):
        raise ConfigError(f"train.recipe={cfg.train.recipe}: vidgen plan supports svd_full and svd_lora")
    builder = meta_builder(cfg.model.num_frames)
    with mock.patch.object(svd, "build", builder):
        recipe = build_recipe(cfg.train.recipe, cfg.model, cfg.train, cfg.run.seed)
    return recipe, builder.source


# -- measuring a meta step -------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Bytes of storages created inside the mode and still alive; `peak` is the maximum seen.

    Storages of tensors made before entering (weights, inputs) are ignored. A storage counts once however many
    views share it, and stops counting when it is freed (PyTorch keeps a storage's Python object alive exactly
    as long as the storage, so a weakref finalizer fires at the real free, also for tensors autograd saved).
    Storages marked as gradients are summed apart too, so the peak splits into activations and gradients."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.live, self.grads = ignore, {}, set()
        self.now = self.peak = self.grad_now = self.grad_at_peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live and key not in self.ignore:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    if self.now > self.peak:
                        self.peak, self.grad_at_peak = self.now, self.grad_now
                    weakref.finalize(st, self._free, key)
        return out

    def mark_grad(self, grad: torch.Tensor) -> None:
        key = grad.untyped_storage()._cdata
        if key in self.live and key not in self.grads:
            self.grads.add(key)
            self.grad_now += self.live[key]

    def _free(self, key: int) -> None:
        n = self.live.pop(key, 0)
        self.now -= n
        if key in self.grads:
            self.grads.discard(key)
            self.grad_now -= n


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the memory-efficient CUDA kernel: its autograd saves q, k, v, out and the log-sum-exp."""
    out, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, q.requires_grad or k.requires_grad or v.requires_grad, dropout_p, is_causal, scale=scale)
    return out


def _storage_keys(*modules: torch.nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers())}


def run_step(recipe, batch: int, frames: int, height: int, width: int, *, checkpointing: bool,
             keep_grads: bool) -> dict:
    """One micro-step on meta tensors: encoders (no_grad), UNet forward, loss, backward.

    Returns FLOPs per phase and the transient peak bytes of the encoder pass and of the UNet pass (with the
    gradients alive at that peak). With `keep_grads` the 16-bit gradients stay as autograd accumulates them
    (ZeRO 0/1); without, each is freed once produced (ZeRO 2/3 move it into the reduce bucket)."""
    from torch.utils.flop_counter import FlopCounterMode

    m, unet = recipe.model, recipe.unet
    recomputed = []  # FLOPs of each checkpointed segment's recompute (counted apart: not model FLOPs)

    class CountRecompute:
        def __enter__(self):
            self.fc = FlopCounterMode(display=False)
            self.fc.__enter__()

        def __exit__(self, *exc):
            self.fc.__exit__(*exc)
            recomputed.append(self.fc.get_total_flops())

    def checkpoint(module, *args):  # diffusers' default checkpointing, plus a counter around the recompute
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), CountRecompute()))

    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    else:
        unet.disable_gradient_checkpointing()
    live = _LiveBytes(_storage_keys(unet, m.vae, m.image_encoder))

    def on_grad(p: torch.Tensor) -> None:
        if keep_grads:
            live.mark_grad(p.grad)
        else:
            p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in unet.parameters() if p.requires_grad]
    vae_dtype = next(m.vae.parameters()).dtype
    size = m.image_encoder.config.image_size
    unet_dtype = next(unet.parameters()).dtype
    meta, res = torch.device("meta"), {}
    try:
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa):
            with live, torch.no_grad(), FlopCounterMode(display=False) as enc:
                frames_bf = torch.empty(batch, frames, 3, height, width, device=meta, dtype=vae_dtype)
                latents = m.vae.encode(frames_bf.flatten(0, 1)).latent_dist.sample()  # [B*F, C, h, w]
                cond = m.vae.encode(frames_bf[:, 0]).latent_dist.mode()  # [B, C, h, w]
                pixels = torch.empty(batch, 3, size, size, device=meta, dtype=next(m.image_encoder.parameters()).dtype)
                emb = m.image_encoder(pixels).image_embeds  # [B, D]
                del frames_bf, pixels
            res["encoder_peak"] = live.peak
            live.peak = live.now
            with live, FlopCounterMode(display=False) as fwd:
                latents = latents.unflatten(0, (batch, frames)).float()  # [B, F, C, h, w]
                sample = torch.cat([latents, cond.unsqueeze(1).expand(-1, frames, -1, -1, -1)], 2).to(unet_dtype)
                t = torch.empty(batch, device=meta, dtype=unet_dtype)
                ids = torch.empty(batch, 3, device=meta, dtype=unet_dtype)
                out = unet(sample, t, emb.unsqueeze(1).to(unet_dtype), ids, return_dict=False)[0]
                loss = (out.float() - latents).pow(2).mean()  # the EDM loss's elementwise cost, same shapes
                del out, sample
            with live, FlopCounterMode(display=False) as bwd:
                loss.backward()
            res["unet_peak"], res["grads_at_peak"] = live.peak, live.grad_at_peak
    finally:
        for h in hooks:
            h.remove()
        unet.zero_grad(set_to_none=True)
    res["encoder_flops"] = enc.get_total_flops()
    res["recompute_flops"] = sum(recomputed)
    res["unet_forward_flops"] = fwd.get_total_flops()
    res["unet_backward_flops"] = bwd.get_total_flops() - res["recompute_flops"]  # the outer counter saw them too
    return res


# -- model states per ZeRO stage -------------------------------------------------------------------


def _params(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def model_states(t, n_gpus: int, unet_params: int, unet_bytes: int, trainable: int, largest_layer: int,
                 master: bool, grad_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """(GPU bytes, host bytes) of DeepSpeed's persistent state on one worker (rank 0 when EMA is on).

    ZeRO 0: everything replicated. 1: optimizer states (with fp32 master and fp32 grads) / N, plus the reduce
    bucket. 2: also the 16-bit gradients / N. 3: also the weights / N, plus the gathered working set (prefetch
    bucket + 2 x largest layer). AdamW keeps m and v (fp32, or 1 byte each with 8-bit Adam) and, in DeepSpeed's
    mixed precision, an fp32 master copy and fp32 gradients. Offload moves those to the host. The 16-bit
    gradients of ZeRO 0/1 are not here: the measured step holds them as autograd makes them."""
    stage, n = t.zero_stage, n_gpus
    shard = n if stage >= 1 else 1
    adam = trainable * ((2 if t.adam_8bit else 8) + (4 if master else 0))
    fp32_grads = trainable * 4 if master else 0
    gpu = {"weights": unet_bytes, "gradients": 0, "optimizer": adam // shard, "fp32_grads": fp32_grads // shard,
           "buckets": 0, "ema": trainable * 4 if t.ema else 0}
    host = {"weights": 0, "optimizer": 0, "fp32_grads": 0}
    if stage >= 1:
        gpu["buckets"] = grad_size * min(REDUCE_BUCKET, trainable)
    if stage >= 2:
        gpu["gradients"] = grad_size * trainable // n
    if stage == 3:
        working = int(unet_bytes / unet_params * (PREFETCH_BUCKET + 2 * largest_layer))
        gpu["weights"] = (0 if t.offload_params else unet_bytes // n) + working
        host["weights"] = unet_bytes // n if t.offload_params else 0
    if t.offload_optimizer:
        host["optimizer"], host["fp32_grads"] = gpu["optimizer"], trainable * 4 // n  # grads land there in fp32
        gpu["optimizer"] = gpu["fp32_grads"] = gpu["gradients"] = 0
    return gpu, host


def _cast_like_training(recipe, precision: str) -> bool:
    """Give the meta UNet the dtypes training gives it; True when DeepSpeed keeps fp32 masters (mixed precision).

    DeepSpeed's bf16/fp16 modes cast every UNet parameter to 16 bits and keep fp32 masters of the trainable
    ones. A recipe that turns DeepSpeed's mode off (svd_lora under bf16) casts only the frozen base itself and
    trains fp32 parameters in fp32 mode."""
    if precision == "fp32":
        return False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    overrides = recipe.deepspeed_overrides() if hasattr(recipe, "deepspeed_overrides") else {}
    ds_mixed = overrides.get(precision, {}).get("enabled", True)
    for p in recipe.unet.parameters():
        if ds_mixed or not p.requires_grad:
            p.data = p.data.to(dtype)
    return ds_mixed


def plan(cfg: VidgenConfig, mfu: float = 0.4, **feed_args) -> dict:
    """The plan of `cfg` as a JSON-ready dict (see `format_plan` for the table). `feed_args` go to
    `vidgen.feed.feed_plan` (decode_fps, probe, dataset_clips): the CPU cores that keep the GPUs fed."""
    from vidgen.feed import feed_plan

    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu}: expected a fraction in (0, 1]")
    started = time.perf_counter()
    t, n = cfg.train, cfg.train.num_workers
    b, f = t.batch_size, cfg.model.num_frames
    h, w = cfg.data.largest_size()
    recipe, source = meta_recipe(cfg)
    unet, m = recipe.unet, recipe.model
    master = _cast_like_training(recipe, t.precision)
    trainable = _params(unet, True)
    grad_size = next((p.element_size() for p in unet.parameters() if p.requires_grad), 2)
    parts = {"unet": unet, "vae": m.vae, "image_encoder": m.image_encoder}
    params = {k: {"total": _params(v), "trainable": _params(v, True)} for k, v in parts.items()}

    step = run_step(recipe, b, f, h, w, checkpointing=t.activation_checkpointing, keep_grads=t.zero_stage < 2)
    micro = step["encoder_flops"] + step["unet_forward_flops"] + step["unet_backward_flops"]
    per_step = micro * t.gradient_accumulation

    largest = max((sum(p.numel() for p in mod.parameters(recurse=False)) for mod in unet.modules()), default=0)
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    gpu, host = model_states(t, n, params["unet"]["total"], unet_bytes, trainable, largest, master, grad_size)
    gpu["encoders"] = sum(p.numel() * p.element_size() for mod in (m.vae, m.image_encoder) for p in mod.parameters())
    unet_phase = step["unet_peak"] + gpu["gradients"]
    if step["encoder_peak"] > unet_phase:  # the frozen encoders' pass is the peak
        gpu["activations"], gpu["gradients"], phase = step["encoder_peak"], 0, "encoders (no_grad)"
    else:
        gpu["activations"] = step["unet_peak"] - step["grads_at_peak"]
        gpu["gradients"] += step["grads_at_peak"]
        phase = "UNet forward/backward"
    tensor_bytes = sum(gpu.values())
    gpu["cuda_overhead"] = CUDA_OVERHEAD
    peak = tensor_bytes + CUDA_OVERHEAD

    gpus, step_times = [], {}
    for g in GPUS:
        tflops = g.bf16_tflops if t.precision != "fp32" else g.tf32_tflops
        step_s = step_times[g.name] = per_step / (mfu * tflops * 1e12)
        gpus.append({"gpu": g.name, "memory_gib": round(g.memory_bytes / GIB, 1), "fits": peak <= g.memory_bytes,
                     "headroom_gib": round((g.memory_bytes - peak) / GIB, 2), "peak_tflops": tflops,
                     "step_time_s": round(step_s, 3),
                     "samples_per_s": round(b * t.gradient_accumulation * n / step_s, 3)})
    return {
        "recipe": t.recipe, "model_source": source,
        "shape": {"batch_per_gpu": b, "frames": f, "height": h, "width": w, "latent": [f, 4, h // 8, w // 8],
                  "buckets": cfg.data.buckets, "gradient_accumulation": t.gradient_accumulation, "gpus": n},
        "training": {"zero_stage": t.zero_stage, "precision": t.precision, "fp32_master": master,
                     "activation_checkpointing": t.activation_checkpointing, "offload_optimizer": t.offload_optimizer,
                     "offload_params": t.offload_params, "adam_8bit": t.adam_8bit, "ema": t.ema},
        "parameters": {**params, "total": sum(p["total"] for p in params.values()), "trainable": trainable},
        "flops": {"encoders_forward": step["encoder_flops"], "unet_forward": step["unet_forward_flops"],
                  "unet_backward": step["unet_backward_flops"], "per_micro_step_per_gpu": micro,
                  "per_step_per_gpu": per_step, "per_step_all_gpus": per_step * n,
                  "checkpoint_recompute_per_micro_step": step["recompute_flops"]},
        "memory": {"per_gpu_bytes": gpu, "tensor_bytes": tensor_bytes, "peak_bytes": peak, "peak_phase": phase,
                   "encoder_pass_peak_bytes": step["encoder_peak"], "host_bytes_per_worker": host,
                   "method": METHOD},
        "mfu": mfu, "gpus": gpus,
        "feed": feed_plan(cfg, step_times, **feed_args),
        "elapsed_s": round(time.perf_counter() - started, 2),
    }


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_plan(p: dict) -> str:
    from vidgen.feed import format_feed

    s, tr, fl, mem = p["shape"], p["training"], p["flops"], p["memory"]
    lines = [f"vidgen plan: recipe {p['recipe']}, model from {p['model_source']}",
             f"  shape per GPU: batch {s['batch_per_gpu']} x {s['frames']} frames x {s['height']}x{s['width']} "
             + (f"(HxW, the largest of data.buckets={s['buckets']}) " if s.get("buckets") else "") +
             f"(latents {s['latent']}), grad accumulation {s['gradient_accumulation']}, {s['gpus']} GPUs",
             f"  ZeRO-{tr['zero_stage']}, {tr['precision']}{' + fp32 master' if tr['fp32_master'] else ''}, "
             f"checkpointing {'on' if tr['activation_checkpointing'] else 'off'}, offload optimizer "
             f"{tr['offload_optimizer']}, params {tr['offload_params']}, 8-bit Adam {tr['adam_8bit']}, "
             f"EMA {tr['ema']}", "", "parameters            total      trainable"]
    for k in ("unet", "vae", "image_encoder"):
        lines.append(f"  {k:<14} {p['parameters'][k]['total']:>14,} {p['parameters'][k]['trainable']:>14,}")
    lines.append(f"  {'total':<14} {p['parameters']['total']:>14,} {p['parameters']['trainable']:>14,}")
    lines += ["", "FLOPs (counted, per GPU)",
              f"  encoders forward     {fl['encoders_forward'] / 1e12:10.1f} TFLOP",
              f"  UNet forward         {fl['unet_forward'] / 1e12:10.1f} TFLOP",
              f"  UNet backward        {fl['unet_backward'] / 1e12:10.1f} TFLOP",
              f"  per optimizer step   {fl['per_step_per_gpu'] / 1e12:10.1f} TFLOP "
              f"({fl['per_step_all_gpus'] / 1e15:.2f} PFLOP on all GPUs)"]
    if fl["checkpoint_recompute_per_micro_step"]:
        lines.append(f"  + checkpoint recompute {fl['checkpoint_recompute_per_micro_step'] / 1e12:8.1f} TFLOP "
                     "per micro-step (not in MFU)")
    lines += ["", f"peak memory per GPU (peak during {mem['peak_phase']})"]
    lines += [f"  {k:<20}{_gib(v)}" for k, v in mem["per_gpu_bytes"].items() if v]
    lines.append(f"  {'total':<20}{_gib(mem['peak_bytes'])}")
    host = sum(mem["host_bytes_per_worker"].values())
    if host:
        lines.append(f"  host (offloaded)    {_gib(host)} per worker")
    lines += [f"  method: {mem['method']}", "",
              f"GPU          memory   fits  headroom    step time @ {p['mfu']:.0%} MFU   samples/s"]
    for g in p["gpus"]:
        lines.append(f"  {g['gpu']:<10} {g['memory_gib']:5.0f} GiB  {'yes' if g['fits'] else 'NO ':<4} "
                     f"{g['headroom_gib']:8.2f} GiB  {g['step_time_s']:10.2f} s  {g['samples_per_s']:12.2f}")
    lines += format_feed(p["feed"])
    lines.append(f"(planned in {p['elapsed_s']} s, no weights read)")
    return "\n".join(lines)


def plan_config(path: str | None, overrides: list[str], mfu: float = 0.4, **feed_args) -> dict:
    from vidgen.config import load_config

    return plan(load_config(path, overrides), mfu=mfu, **feed_args)
