"""`vidgen plan`: parameters, FLOPs and peak GPU (or CPU-worker) memory of a training config at full size.

Shapes: B batch per GPU, F frames, C channels, H/W pixels, h/w latents.

Nothing is allocated and no weight is read. The recipe of the config builds its models with its family's meta-device
builder (the family's planner hooks, `vidgen.models.base.Planner`: config.json files under a local model.path,
else the family's `full_size_configs`), so the trainable set is the recipe's own (train.trainable, the LoRA that
`inject_lora` adds, Hotshot's temporal layers). Then one training micro-step runs on meta tensors at the
config's B, F, H, W and dtypes, with the frozen encoders (VAE + CLIP image, or VAE + the SDXL text encoders)
under no_grad:

- FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over that step (matmuls, convolutions,
  attention; the fused attention backward counts its own score recompute, as torch's formula does), without its
  module tracking (`FlopCounter`: the tracker's hooks would keep what checkpointing frees). The recompute that
  activation checkpointing adds is counted apart (a counter wraps each segment's recompute) and left out of the
  model FLOPs that MFU is quoted in.
- Activations are measured, not modelled: `_LiveBytes` sees every tensor the step creates and holds a weakref on
  its storage, so its running total is what a caching allocator would hold (no fragmentation), and its maximum
  is the step's transient peak, with checkpointing as configured. Attention runs as the fused kernel GPUs use
  (`_scaled_dot_product_efficient_attention`: saves q, k, v, out and the log-sum-exp, never the L x L matrix).
- Model states are DeepSpeed's layout per ZeRO stage (see `model_states`), for train.num_workers GPUs.

The result is one dict (`--json` prints it), with a data-feed section (CPU cores per GPU) beside `gpus`, whose
`step_time_s` is the rate the data must keep up with, and for a CPU config (train.use_gpu=false) a `host`
section: the peak resident memory of each worker process (`host_plan`).

peak = weights + encoders + optimizer + fp32 grads + EMA + buckets + CUDA overhead
       + max(encoder pass peak, UNet forward/backward peak incl. 16-bit grads as autograd makes them)
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from vidgen.config import VidgenConfig, load_config
from vidgen.errors import ConfigError
from vidgen.feed import feed_plan, format_feed
from vidgen.models import registry

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
    GPU("H200-141GB", 143771 * 2**20, 989.0, 494.0),
)
CUDA_OVERHEAD = int(1.5 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers (typical, not measured)
REDUCE_BUCKET = int(5e8)  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)
PREFETCH_BUCKET = int(5e7)  # DeepSpeed stage3_prefetch_bucket_size default (elements)
MAX_LIVE_PARAMETERS = int(1e9)  # DeepSpeed stage3_max_live_parameters default (elements)
PERSISTENCE_THRESHOLD = int(1e5)  # DeepSpeed stage3_param_persistence_threshold default (elements)
# DeepSpeed's zero_optimization sizes the plan uses, by DeepSpeedZeroConfig field name (its JSON keys are these or,
# for the stage3_* ones, the field name with that prefix)
ZERO_DEFAULTS = {"reduce_bucket_size": REDUCE_BUCKET, "prefetch_bucket_size": PREFETCH_BUCKET,
                 "max_live_parameters": MAX_LIVE_PARAMETERS, "param_persistence_threshold": PERSISTENCE_THRESHOLD,
                 "model_persistence_threshold": sys.maxsize}
METHOD = ("activations: storage bytes alive during one meta-device step (weakref per storage), fused attention; "
          "model states: DeepSpeed ZeRO layout (ZeRO-3: partition + gathered window); FLOPs: FlopCounterMode, "
          "checkpoint recompute excluded")


# -- meta-device models ---------------------------------------------------------------------------


def meta_recipe(cfg: VidgenConfig):
    """The config's recipe with its models on the meta device (trainable flags set by the recipe itself), and its
    family's planner hooks."""
    registry.check(cfg.model, cfg.train.recipe)
    family = registry.spec(cfg.model)
    if family.planner is None:
        raise ConfigError(f"model.family={cfg.model.family}: its family defines no planner hooks (FamilySpec.planner)")
    builder = family.planner.meta_builder(cfg.model)
    recipe = registry.build_recipe(cfg.model, cfg.train, cfg.run.seed, build=builder)
    recipe.plan_as_built = {n: p.dtype for n, p in recipe.unet.named_parameters()}  # see _cast_like_training
    return recipe, family.planner, builder.source


# -- measuring a meta step -------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Bytes of storages created inside the mode and still alive; `peak` is the maximum seen.

    Storages of tensors made before entering (weights, inputs) are ignored. A storage counts once however many
    views share it, and stops counting when it is freed (PyTorch keeps a storage's Python object alive exactly
    as long as the storage, so a weakref finalizer fires at the real free, also for tensors autograd saved).
    Storages marked as gradients are summed apart too, so the peak splits into activations and gradients
    (`grad_peak`: the most gradient bytes alive at once). With
    `device`, only tensors on that device type count (a generation plan: not the host tensors the samplers draw
    noise into before moving it)."""

    def __init__(self, ignore: set[int], device: str | None = None):
        super().__init__()
        self.ignore, self.live, self.grads, self.device = ignore, {}, set(), device
        self.now = self.peak = self.grad_now = self.grad_at_peak = self.grad_peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and self.device in (None, t.device.type):
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
            self.grad_peak = max(self.grad_peak, self.grad_now)

    def _free(self, key: int) -> None:
        n = self.live.pop(key, 0)
        self.now -= n
        if key in self.grads:
            self.grads.discard(key)
            self.grad_now -= n


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the memory-efficient CUDA kernel: its autograd saves q, k, v, out and the log-sum-exp. (torch's
    argument names: diffusers' attention dispatch, which Wan uses, passes them by name.)"""
    q, k, v = query, key, value
    out, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, q.requires_grad or k.requires_grad or v.requires_grad, dropout_p, is_causal, scale=scale)
    return out


def _storage_keys(*modules: torch.nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers())}


def _hooked_modules(module: torch.nn.Module, leaves: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules of `module` that ZeRO-3 hooks: all but those inside a leaf module (`zero3_leaves`)."""
    inside = {id(m) for leaf in leaves for m in leaf.modules() if m is not leaf}
    return [m for m in module.modules() if id(m) not in inside]


class _CallOrder:
    """Records, for one forward of `module`, the order in which its submodules return and which of them were
    called with a positional tensor that requires grad, to tell which checkpointed blocks ZeRO-3 keeps gathered.

    In the backward, the first thing a checkpointed block's gradient reaches is the last submodule to return in
    its forward; DeepSpeed's pre-backward hook of that submodule fetches it, and the block's recompute then runs
    while it is the newest active backward module, so every frozen parameter the recompute gathers is credited to
    it (`update_recompute_parameters`) and stays gathered until its post-backward hook fires. That hook counts the
    gradients of the submodule's positional tensor inputs only (`_post_backward_module_hook`): called with keyword
    tensors alone, it never fires, and the parameters stay gathered to the end of the backward. SVD's resnets end
    in `time_mixer(x_spatial=..., x_temporal=..., image_only_indicator=...)`: measured on a real 2-rank step,
    DeepSpeed's post-backward hook ran for no AlphaBlender and 94% of the resnets' parameters were gathered at
    once.

    DeepSpeed hooks a ZeRO-3 leaf module (`zero3_leaves`) and none of the modules inside it: those are not
    recorded either, and a checkpointed block that is a leaf is its own last submodule."""

    def __init__(self, module: torch.nn.Module, leaves: list[torch.nn.Module] = ()):
        self.modules = _hooked_modules(module, leaves)
        self.finished, self.positional, self.hooks = [], {}, []

    def __enter__(self):
        for m in self.modules:
            self.hooks += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def _pre(self, module, args):
        self.positional.setdefault(id(module), any(isinstance(a, torch.Tensor) and a.requires_grad
                                                   for a in tree_leaves(args)))

    def _post(self, module, args, out):
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
            self.finished.append(id(module))

    def last_inside(self, block: torch.nn.Module) -> int | None:
        """The submodule of `block` (or `block`) whose output was the last with grad before `block` returned."""
        if id(block) not in self.finished:
            return None
        i, inner = self.finished.index(id(block)), {id(m) for m in block.modules()}
        return self.finished[i - 1] if i and self.finished[i - 1] in inner else id(block)

    def post_backward_never_fires(self, module_id: int | None) -> bool:
        return module_id is not None and not self.positional.get(module_id, True)


class _NoModules:
    """FlopCounterMode's module tracker, reduced to the one "Global" total the plan reads."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class FlopCounter(FlopCounterMode):
    """FlopCounterMode without its per-module breakdown. Its module tracker hooks the gradient of every module's
    inputs and outputs, and those hooks keep the autograd graph of each checkpointed segment's recompute (and the
    tensors it saved) alive until the mode exits: counted that way, a checkpointed backward holds every segment's
    recomputed activations at once (Wan2.1-14B LoRA at 81x480x832: 475 GiB of activations instead of 29), which no
    training step does. The totals are the same."""

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModules()


def run_step(recipe, planner, batch: int, frames: int, height: int, width: int, *, checkpointing: bool,
             keep_grads: bool, leaves: list[torch.nn.Module] = ()) -> dict:
    """One micro-step on meta tensors: encoders (no_grad), UNet forward, loss, backward.

    Returns FLOPs per phase and the transient peak bytes of the encoder pass and of the UNet pass (with the
    gradients alive at that peak), and the checkpointed modules whose recomputed frozen parameters ZeRO-3 keeps
    gathered to the end of the backward (`recompute_kept`, see `_CallOrder`; `leaves`: ZeRO-3's leaf modules,
    `zero3_leaves`). With `keep_grads`
    the 16-bit gradients stay as autograd accumulates them (ZeRO 0/1); without, each is freed once produced
    (ZeRO 2/3 move it into the reduce bucket), except those of a leaf that trains: DeepSpeed reduces them all in
    the leaf's full backward hook, so they are freed there."""
    m, unet = recipe.model, recipe.unet
    encoders = [v for k, v in planner.parts(m).items() if k != "unet"]
    recomputed = []  # FLOPs of each checkpointed segment's recompute (counted apart: not model FLOPs)

    class CountRecompute:
        def __enter__(self):
            self.fc = FlopCounter()
            self.fc.__enter__()

        def __exit__(self, *exc):
            self.fc.__exit__(*exc)
            recomputed.append(self.fc.get_total_flops())

    checkpointed = {}  # the modules checkpointing recomputes in backward (ZeRO-3 gathers their parameters again)

    def checkpoint(module, *args):  # diffusers' default checkpointing, plus a counter around the recompute
        if isinstance(module, torch.nn.Module):
            checkpointed[id(module)] = module
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), CountRecompute()))

    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    else:
        unet.disable_gradient_checkpointing()
    live = _LiveBytes(_storage_keys(unet, *encoders))

    in_leaf = {id(p) for leaf in leaves for p in leaf.parameters()}

    def on_grad(p: torch.Tensor) -> None:
        if keep_grads or id(p) in in_leaf:
            live.mark_grad(p.grad)
        else:
            p.grad = None

    def reduce_leaf(module, grad_input, grad_output):
        for p in module.parameters():
            p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in unet.parameters() if p.requires_grad]
    if not keep_grads:
        hooks += [leaf.register_full_backward_hook(reduce_leaf) for leaf in leaves
                  if any(p.requires_grad for p in leaf.parameters())]
    res = {}
    try:
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa):
            with live, torch.no_grad(), FlopCounter() as enc:
                encoded = planner.encode(m, batch, frames, height, width)
            res["encoder_peak"] = live.peak
            res["latent"] = _latent_shape(encoded["latents"], batch)
            live.peak = live.now
            calls = _CallOrder(unet, leaves)  # the forward only: checkpointing's recompute runs modules again
            with live, FlopCounter() as fwd, calls:
                loss = planner.unet_loss(unet, encoded, batch, frames)
                del encoded
            with live, FlopCounter() as bwd:
                loss.backward()
            res["unet_peak"], res["grads_at_peak"], res["grads_peak"] = live.peak, live.grad_at_peak, live.grad_peak
    finally:
        for h in hooks:
            h.remove()
        unet.zero_grad(set_to_none=True)
    res["zero3_leaves"] = list(leaves)
    res["recompute_kept"] = [b for b in checkpointed.values() if calls.post_backward_never_fires(calls.last_inside(b))]
    res["encoder_flops"] = enc.get_total_flops()
    res["recompute_flops"] = sum(recomputed)
    res["unet_forward_flops"] = fwd.get_total_flops()
    res["unet_backward_flops"] = bwd.get_total_flops() - res["recompute_flops"]  # the outer counter saw them too
    return res


def _latent_shape(latents: torch.Tensor, batch: int) -> list[int]:
    """One clip's latents as [F, C, h, w]: from per-frame latents [B*F, C, h, w] (image VAEs) or diffusers' video
    layout [B, C, F, h, w] (causal video VAEs, whose F is the latent frames)."""
    if latents.ndim == 5:
        _, c, f, h, w = latents.shape
        return [f, c, h, w]
    return [latents.shape[0] // batch, *latents.shape[1:]]


# -- model states per ZeRO stage -------------------------------------------------------------------


def _params(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _zero_optimization(cfg: VidgenConfig, recipe=None) -> dict:
    """The zero_optimization section the workers give DeepSpeed: vidgen's generated config
    (`loop.deepspeed_config`), the recipe's overrides and a local train.deepspeed_config JSON on top (a remote one
    is not read: no network)."""
    from vidgen.train.loop import deep_merge, deepspeed_config, user_config  # lazy: loads PIL, fsspec

    user = recipe.deepspeed_overrides() if hasattr(recipe, "deepspeed_overrides") else {}
    path = cfg.train.deepspeed_config
    if path and ("://" not in path or path.startswith("file://")):
        f = Path(path.removeprefix("file://")).expanduser()
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"train.deepspeed_config={path}: not a readable JSON file ({e})") from None
        user = deep_merge(user, user_config(data, path))
    ds = deepspeed_config(cfg.train.model_dump(), cfg.train.num_workers, not cfg.train.use_gpu, user)
    return ds.get("zero_optimization") or {}


def zero_config(zero: dict) -> dict[str, int]:
    """The zero_optimization sizes (`ZERO_DEFAULTS` keys) in the section the workers give DeepSpeed
    (`_zero_optimization`), DeepSpeed's defaults for what none of its sources sets."""
    given = {k: zero.get(f"stage3_{k}", zero.get(k, v)) for k, v in ZERO_DEFAULTS.items()}
    return {k: v if isinstance(v, int) else int(float(v)) for k, v in given.items()}  # JSON may say 5e8


def zero3_leaves(unet: torch.nn.Module, zero: dict) -> list[torch.nn.Module]:
    """The modules of `unet` that `zero`'s leaf_module section makes ZeRO-3 leaves: by name, name suffix or class
    (its name or module-qualified name), as DeepSpeed matches them (`apply_zero_leaf_module_config`). DeepSpeed
    fetches a leaf's parameters, its submodules' included, as one unit."""
    from vidgen.train.loop import leaf_module_spec  # lazy: loads PIL, fsspec

    spec = leaf_module_spec(zero)
    names, suffixes, classes = spec["names"], spec["name_suffixes"], spec["classes"]
    return [m for n, m in unet.named_modules()
            if n in names or any(n.endswith(x) for x in suffixes)
            or {type(m).__name__, f"{type(m).__module__}.{type(m).__qualname__}"} & classes]


def largest_unit(unet: torch.nn.Module, leaves: list[torch.nn.Module]) -> int:
    """Elements of the most parameters one ZeRO-3 module fetch gathers: a leaf's, submodules' included, or any
    other module's own."""
    leaf_ids = {id(leaf) for leaf in leaves}
    return max((_params(m) if id(m) in leaf_ids else sum(p.numel() for p in m.parameters(recurse=False))
                for m in _hooked_modules(unet, leaves)), default=0)


def persistent_params(unet: torch.nn.Module, zero: dict[str, int]) -> tuple[int, int]:
    """(elements, bytes) of the UNet parameters ZeRO-3 keeps whole on every rank once gathered: those of at most
    stage3_param_persistence_threshold elements, in module order while their total stays within
    stage3_model_persistence_threshold (`DeepSpeedZeRoOffload.mark_persistent_parameters`)."""
    numel = size = 0
    for p in unet.parameters():
        k = p.numel()
        if k <= zero["param_persistence_threshold"] and numel + k <= zero["model_persistence_threshold"]:
            numel, size = numel + k, size + k * p.element_size()
    return numel, size


def recomputed_frozen(blocks: list[torch.nn.Module], zero: dict[str, int]) -> int:
    """Elements of the non-persistent frozen parameters of the checkpointed `blocks` whose recompute ZeRO-3 keeps
    gathered to the end of the backward (the step's `recompute_kept`, see `_CallOrder`): SVD's resnets."""
    seen = {id(p): p.numel() for b in blocks for p in b.parameters()
            if not p.requires_grad and p.numel() > zero["param_persistence_threshold"]}
    return sum(seen.values())


def zero3_inputs(unet: torch.nn.Module, step: dict, zero: dict[str, int]) -> dict:
    """What `zero3_gathered` needs of the UNet and of the measured step."""
    return {"persistent": persistent_params(unet, zero),
            "recomputed": recomputed_frozen(step.get("recompute_kept", []), zero),
            "largest_unit": largest_unit(unet, step.get("zero3_leaves", []))}


def model_states(t, n_gpus: int, unet_params: int, unet_bytes: int, trainable: int, largest_layer: int,
                 master: bool, grad_size: int, zero: dict[str, int] | None = None, z3: dict | None = None,
                 on_gpu: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """(GPU bytes, host bytes) of DeepSpeed's persistent state on one worker (rank 0 when EMA is on).

    ZeRO 0: everything replicated. 1: optimizer states (with fp32 master and fp32 grads) / N, plus the reduce
    bucket. 2: also the 16-bit gradients / N. 3: also the weights / N, plus the whole parameters it holds gathered
    (`zero3_gathered`). AdamW keeps m and v (fp32, or 1 byte each with 8-bit Adam); with `master`, an fp32 master
    copy and fp32 gradients too: DeepSpeed's 16-bit modes keep them, and its ZeRO optimizer keeps them in fp32 mode
    as well (it clones its partition of the trainable parameters: stage_1_and_2.py, stage3.py). Offload moves
    those to the host. The 16-bit gradients of ZeRO 0/1 are not here: the measured step holds them as autograd
    makes them. `zero`: the zero_optimization sizes (`zero_config`; DeepSpeed's defaults when None); `z3`:
    `zero3_inputs`. ZeRO-3 allocates its reduce bucket whole (reduce_bucket_size elements, stage3.py
    `_setup_for_real_optimizer`): on a GPU that is memory; on a CPU (`on_gpu=False`) only the pages the gradients
    fill are resident, as with ZeRO 1/2."""
    stage, n = t.zero_stage, n_gpus
    z = {**ZERO_DEFAULTS, **(zero or {})}
    shard = n if stage >= 1 else 1
    adam = trainable * ((2 if t.adam_8bit else 8) + (4 if master else 0))
    fp32_grads = trainable * 4 if master else 0
    gpu = {"weights": unet_bytes, "gathered": 0, "gradients": 0, "optimizer": adam // shard,
           "fp32_grads": fp32_grads // shard, "buckets": 0, "ema": trainable * 4 if t.ema else 0}
    host = {"weights": 0, "optimizer": 0, "fp32_grads": 0}
    if stage >= 1:
        gpu["buckets"] = grad_size * min(z["reduce_bucket_size"], trainable)
    if stage >= 2:
        gpu["gradients"] = grad_size * trainable // n
    if stage == 3:
        gpu["gathered"] = zero3_gathered(n, unet_params, unet_bytes, largest_layer, z, z3, on_gpu)
        gpu["weights"] = 0 if t.offload_params else unet_bytes // n
        host["weights"] = unet_bytes // n if t.offload_params else 0
        if on_gpu:
            gpu["buckets"] = grad_size * z["reduce_bucket_size"]
    if t.offload_optimizer:
        host["optimizer"], host["fp32_grads"] = gpu["optimizer"], trainable * 4 // n  # grads land there in fp32
        gpu["optimizer"] = gpu["fp32_grads"] = 0
        if on_gpu:
            gpu["gradients"] = 0
        else:  # measured on CPU: offload holds more than the same stage without it (CPU_OFFLOAD_GRAD_BYTES)
            host["offload_grad_buffers"] = CPU_OFFLOAD_GRAD_BYTES * trainable // n
    return gpu, host


def zero3_gathered(n: int, unet_params: int, unet_bytes: int, largest_layer: int, zero: dict[str, int],
                   z3: dict | None = None, on_gpu: bool = True) -> int:
    """Bytes of whole parameters a ZeRO-3 rank holds at the peak of a training step, beside its partition.

    - forward: once DeepSpeed's coordinator has traced a step (partitioned_param_coordinator.py), it prefetches
      along the trace while fewer than stage3_max_live_parameters elements are gathered or in flight, and its walk
      marks each parameter it passes as needed again (`__most_recent_step_id_param_fetched_for`), in the backward
      too, so what the forward gathers stays gathered: the window fills to max_live_parameters, plus the module
      being fetched (`largest_unit`: a leaf module is fetched whole) and the one parameter that overshoots (the
      largest layer), capped by the non-persistent parameters. With stage3_max_reuse_distance=0 (vidgen on CPU)
      as with its default;
    - backward: the frozen parameters of the checkpointed blocks whose recompute DeepSpeed credits to a module
      whose post-backward hook never fires stay gathered to the end (`recomputed_frozen`, `_CallOrder`);
    - persistent parameters (`persistent_params`) are gathered once and kept whole.
    The window is the larger of the two. On a GPU the prefetch's flat all-gather buffer is in flight on top
    (stage3_prefetch_bucket_size elements: each parameter is copied out of it with torch.cat); on a CPU the
    window costs CPU_GATHER_FACTOR times its bytes. One rank gathers nothing: its partition is the parameter
    (`_no_gather_coalesced`). Measured on real 2-rank CPU steps of the full-size SVD-XT LoRA (elements gathered
    at once, tracked per module fetch): forward 0.93e9 with the default max_live_parameters=1e9, 2.8e8 with 3e8,
    3.4e7 with 0; backward 0.66e9 in all three (its resnets hold 0.70e9)."""
    if n <= 1:
        return 0
    z3 = z3 or {}
    p_numel, p_bytes = z3.get("persistent", (0, 0))
    rest = unet_params - p_numel
    per = (unet_bytes - p_bytes) / max(rest, 1)
    window = zero3_window(unet_params, largest_layer, zero, z3)
    if on_gpu:
        return int(per * min(rest, window + zero["prefetch_bucket_size"])) + p_bytes
    return int(CPU_GATHER_FACTOR * per * window) + p_bytes


def zero3_window(unet_params: int, largest_layer: int, zero: dict[str, int], z3: dict | None = None) -> int:
    """Elements of non-persistent parameters ZeRO-3 holds gathered at once at most (see `zero3_gathered`)."""
    z3 = z3 or {}
    rest = unet_params - z3.get("persistent", (0, 0))[0]
    fetched = z3.get("largest_unit", largest_layer)
    return min(rest, max(zero["max_live_parameters"], z3.get("recomputed", 0)) + fetched + largest_layer)


def _cast_like_training(recipe, precision: str, on_gpu: bool = True) -> bool:
    """Give the meta UNet the dtypes training gives it on GPU (or CPU) workers; True when DeepSpeed runs in a 16-bit
    mode: it then casts every UNet parameter to 16 bits, on GPU and CPU alike, and keeps fp32 masters of the
    trainable ones. A recipe that turns DeepSpeed's mode off (svd_lora under bf16) trains fp32 parameters in fp32
    mode and casts its frozen base itself, on CUDA only (`SVDLoraRecipe.to`): on CPU that base stays as built, fp32
    or, with model.flavor=full, the training dtype it was built in. The frozen encoders stay as built either way."""
    as_built = getattr(recipe, "plan_as_built", {})
    for n, p in recipe.unet.named_parameters():  # back to as built (meta casts cost nothing)
        p.data = p.data.to(as_built.get(n, torch.float32))
    if precision == "fp32":
        return False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    overrides = recipe.deepspeed_overrides() if hasattr(recipe, "deepspeed_overrides") else {}
    ds_mixed = overrides.get(precision, {}).get("enabled", True)
    for p in recipe.unet.parameters():
        if ds_mixed or (on_gpu and not p.requires_grad):
            p.data = p.data.to(dtype)
    return ds_mixed


def _bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _with_step(states: dict[str, int], step: dict) -> tuple[dict[str, int], str]:
    """Persistent states plus the measured step's transient peak: the frozen encoders' pass, or the UNet's forward
    and backward with the 16-bit gradients alive at its peak, whichever is larger."""
    out = dict(states)
    if step["encoder_peak"] > step["unet_peak"] + out["gradients"]:  # the frozen encoders' pass is the peak
        out["gradients"], out["activations"] = 0, step["encoder_peak"]
        return out, "encoders (no_grad)"
    out["activations"] = step["unet_peak"] - step["grads_at_peak"]
    out["gradients"] += step["grads_at_peak"]
    return out, "UNet forward/backward"


# -- host memory of a CPU run ----------------------------------------------------------------------

# Resident memory of a Ray Train CPU worker before any model, measured on this project's CPU machine (torch 2.13
# CPU, diffusers 0.42.1, transformers 5.25, deepspeed 0.19.8, ray 2.60) as VmRSS from /proc/self/status: a fresh
# `python` importing torch, diffusers, transformers, deepspeed and ray (and the model classes diffusers and
# transformers load lazily) holds 655 MB; a worker of a 2-worker CPU TorchTrainer 682 MB after the same imports,
# 740 MB after deepspeed.initialize (ZeRO-2, bf16, gloo) and one step of a 4x4 Linear, 745 MB after a pass over
# its Ray Data shard. The last is what a worker holds besides its tensors.
PROCESS_BYTES = 745 * 10**6
# What a real CPU step holds beyond the live tensor bytes the meta step measures (freed activations glibc keeps,
# more of them when checkpointing recomputes segments in backward; oneDNN and OpenMP scratch; the autograd graph).
# Fitted on the peak RSS of single-process runs of the svd_lora recipe on the full-size SVD (DeepSpeed ZeRO-2,
# world size 1, 1 thread, batch 1, 8-10 steps: the peak settles by step 5), at 64x64x4 (bf16 and fp32 base),
# 96x96x8 and 128x128x8 (bf16 base), each with checkpointing off and on (fp32: off only): the activations
# measured on the meta device x 1.6 (x 2.0 with checkpointing) + 260 MB; the planned peak is then within 0.7%
# of every measured one, and 1.3% under for svd_full in DeepSpeed's bf16 mode (a 52M-parameter trainable subset,
# peak in the optimizer step).
CPU_ACTIVATION_FACTOR = {False: 1.6, True: 2.0}  # by train.activation_checkpointing
CPU_STEP_OVERHEAD = 260 * 10**6
# What ZeRO-3's gathered window (`zero3_gathered`) costs in resident memory on CPU, per byte of whole parameters:
# each parameter is copied (torch.cat) out of the flat buffer its all-gather filled, and glibc keeps the pages of
# the freed flat buffers in its arenas (1-3.7 GB free but resident in them, measured). Fitted on the peak RSS of
# real 2-rank CPU steps of the full-size SVD-XT LoRA (zero_stage=3, bf16 base, checkpointing, 4x64x64, the first
# step after DeepSpeed's trace) with stage3_max_live_parameters 1e9, 3e8 and 0: planned within 5% of each.
CPU_GATHER_FACTOR = 2.0
# What DeepSpeed's CPU-optimizer path (offload_optimizer) holds on a CPU run beyond the same ZeRO stage without
# offload, in bytes per trainable parameter of the worker's share: its 16-bit gradient partition stays
# (stage3 `grad_partitions_flat_buffer`), and a second fp32 gradient buffer is made for DeepSpeedCPUAdam
# (`initialize_optimizer_states`). benchmarks/zero_host_states.py measures the steady state of one rank per
# trainable parameter, bf16: ZeRO-3 17.5 B without offload, 21.5 B with it; ZeRO-2 13.4 (15.5 at the backward's
# peak) and 20.1 B. The full-size SVD-XT temporal blocks (397M trainable, ZeRO-3 + offload, one worker) held
# 23.5 B after their first optimizer step.
CPU_OFFLOAD_GRAD_BYTES = 4
HOST_METHOD = ("peak RSS per worker = fixed process cost (measured, PROCESS_BYTES) + the largest of: the models as "
               "built (whole in every worker), deepspeed.initialize (16-bit cast, flat copy, fp32 partition), "
               "a training step (DeepSpeed ZeRO layout for train.num_workers, offloaded states included, ZeRO-3's "
               "gathered window x CPU_GATHER_FACTOR, frozen encoders, activations measured on the meta device with "
               "CPU dtypes, x CPU_ACTIVATION_FACTOR + CPU_STEP_OVERHEAD as calibrated on real CPU steps), the "
               "optimizer step (AdamW's temporaries)")


def host_plan(t, parts: dict[str, torch.nn.Module], step: dict, master: bool, largest_layer: int,
              built_bytes: int, unet_file_bytes: int = 0, zero: dict[str, int] | None = None) -> dict:
    """Peak resident host memory of one worker process of a CPU run (train.use_gpu=false), from `parts` cast as a
    CPU worker holds them and `step` measured with those dtypes. The peak is the largest of these phases, each on
    top of the process's fixed cost:

    - build: the recipe's models as built (`built_bytes`: fp32 for random init and `from_pretrained` without a
      torch_dtype alike; model.flavor=full builds in the frozen base's training dtype), whole in every worker:
      ZeRO-3 partitions only in deepspeed.initialize (vidgen builds outside zero.Init);
      while pretrained weights load, what the family's loader holds besides the model (`load_overhead_bytes`:
      a pretrained Hotshot UNet's weight file);
    - deepspeed.initialize: the UNet as DeepSpeed casts it, the encoders, and under ZeRO 1/2 the flat copy of the
      trainable parameters it makes before pointing them into it (ZeRO-3: of their partitions, `defragment`), plus
      its fp32 partition. ZeRO-3's partitions are not on top: `Init._partition_param` frees each whole parameter
      as soon as its slice is copied out (measured at full size: the phase's peak is the models as built + 1%);
    - a training step: `model_states` for train.num_workers with the offloaded part (the same memory on a CPU run;
      ZeRO-3: the partition plus the gathered window, `zero3_gathered`, for the sizes in `zero`, at
      CPU_GATHER_FACTOR), the frozen encoders, and the step's transient peak (`_with_step`), scaled by what CPU
      steps were measured to hold beyond live tensors (CPU_ACTIVATION_FACTOR, CPU_STEP_OVERHEAD). No CUDA context;
    - the optimizer step: the same states (ZeRO-3 has released its gathered parameters by then), the gradients
      it steps on, and torch AdamW's temporaries: on CPU it
      runs one tensor at a time and `exp_avg_sq.sqrt() / c` holds two fp32 copies of it (8 bytes a parameter),
      of DeepSpeed's flat fp32 partition (ZeRO >= 1, or its 16-bit mode) or of the largest parameter (ZeRO-0 in
      fp32); DeepSpeedCPUAdam (offload) steps in place.
    On CPU DeepSpeed's bf16 mode casts the UNet as on GPU; a recipe that casts its frozen base itself does so on
    CUDA only (see `_cast_like_training`). The breakdown is the peak phase's, and sums to per_worker_bytes."""
    n, unet = t.num_workers, parts["unet"]
    trainable = _params(unet, True)
    grad_size = next((p.element_size() for p in unet.parameters() if p.requires_grad), 4)
    unet_bytes, encoders = _bytes(unet), _bytes(*(v for k, v in parts.items() if k != "unet"))
    zero = zero or ZERO_DEFAULTS
    z3 = zero3_inputs(unet, step, zero) if t.zero_stage == 3 else None
    states, offloaded = model_states(t, n, _params(unet), unet_bytes, trainable, largest_layer, master, grad_size,
                                     zero, z3, on_gpu=False)
    states = {k: v + offloaded.get(k, 0) for k, v in states.items()} | {
        k: v for k, v in offloaded.items() if k not in states} | {"encoders": encoders}
    in_step, step_phase = _with_step(states, step)
    in_step["activations"] = int(CPU_ACTIVATION_FACTOR[t.activation_checkpointing] * in_step["activations"])
    in_step["cpu_allocator_overhead"] = CPU_STEP_OVERHEAD
    shard = n if t.zero_stage else 1
    if t.offload_optimizer or t.adam_8bit:
        adam_temps = 0
    elif t.zero_stage or master:  # DeepSpeed's optimizer steps on one flat fp32 tensor (its partition)
        adam_temps = 8 * (trainable // shard)
    else:  # plain AdamW, one parameter at a time
        adam_temps = 8 * max((p.numel() for p in unet.parameters() if p.requires_grad), default=0)
    phases = {
        "build (models as built)": {"models": built_bytes},
        "deepspeed.initialize": {"weights": unet_bytes, "encoders": encoders,
                                 "flat_copy": trainable * grad_size // (n if t.zero_stage == 3 else 1)
                                 if t.zero_stage else 0,
                                 "fp32_master": trainable * 4 // shard if master else 0},
        f"training step: {step_phase}": in_step,
        "optimizer step": states | {  # ZeRO 0/1 step on autograd's whole gradients
            "gathered": 0, "gradients": states["gradients"] if t.zero_stage >= 2 else trainable * grad_size,
            "adamw_temporaries": adam_temps},
    }
    if unet_file_bytes:
        phases["loading the UNet (built, then its weight file copied in)"] = {"models": 4 * _params(unet),
                                                                              "weight_file": unet_file_bytes}
    phase, peak = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    breakdown = {"process": PROCESS_BYTES, **peak}
    per_worker = sum(breakdown.values())
    return {"per_worker_bytes": per_worker, "breakdown": breakdown, "peak_phase": phase, "workers": n,
            "total_bytes": per_worker * n,
            "phase_bytes": {k: PROCESS_BYTES + sum(v.values()) for k, v in phases.items()}, "method": HOST_METHOD}


def plan(cfg: VidgenConfig, mfu: float = 0.4, **feed_args) -> dict:
    """The plan of `cfg` as a JSON-ready dict (see `format_plan` for the table). `feed_args` go to
    `vidgen.feed.feed_plan` (decode_fps, probe, dataset_clips): the CPU cores that keep the GPUs fed. With
    train.use_gpu=false it also predicts the host memory of each CPU worker (`host_plan`)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu}: expected a fraction in (0, 1]")
    started = time.perf_counter()
    t, n = cfg.train, cfg.train.num_workers
    b, f = t.batch_size, cfg.model.num_frames
    h, w = cfg.data.largest_size()
    recipe, planner, source = meta_recipe(cfg)
    parts = planner.parts(recipe.model)
    unet, built_bytes = parts["unet"], _bytes(*parts.values())
    master = _cast_like_training(recipe, t.precision) or t.zero_stage >= 1
    trainable = _params(unet, True)
    grad_size = next((p.element_size() for p in unet.parameters() if p.requires_grad), 2)
    params = {k: {"total": _params(v), "trainable": _params(v, True)} for k, v in parts.items()}

    zero_section = _zero_optimization(cfg, recipe)
    zero = zero_config(zero_section)
    leaves = zero3_leaves(unet, zero_section) if t.zero_stage == 3 else []
    step = run_step(recipe, planner, b, f, h, w, checkpointing=t.activation_checkpointing, keep_grads=t.zero_stage < 2,
                    leaves=leaves)
    micro = step["encoder_flops"] + step["unet_forward_flops"] + step["unet_backward_flops"]
    per_step = micro * t.gradient_accumulation

    largest = max((sum(p.numel() for p in mod.parameters(recurse=False)) for mod in unet.modules()), default=0)
    z3 = zero3_inputs(unet, step, zero) if t.zero_stage == 3 else None
    gpu, host = model_states(t, n, params["unet"]["total"], _bytes(unet), trainable, largest, master, grad_size,
                             zero, z3)
    gpu["encoders"] = _bytes(*(v for k, v in parts.items() if k != "unet"))
    gpu, phase = _with_step(gpu, step)
    tensor_bytes = sum(gpu.values())
    gpu["cuda_overhead"] = CUDA_OVERHEAD
    peak = tensor_bytes + CUDA_OVERHEAD

    cpu_run = None
    if not t.use_gpu:
        dtypes = [p.dtype for p in unet.parameters()]
        _cast_like_training(recipe, t.precision, on_gpu=False)
        same = dtypes == [p.dtype for p in unet.parameters()]
        cpu_step = step if same else run_step(recipe, planner, b, f, h, w, checkpointing=t.activation_checkpointing,
                                              keep_grads=t.zero_stage < 2, leaves=leaves)
        load_bytes = planner.load_overhead_bytes(cfg.model, unet)
        cpu_run = host_plan(t, parts, cpu_step, master, largest, built_bytes, load_bytes, zero)

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
        "shape": {"batch_per_gpu": b, "frames": f, "height": h, "width": w, "latent": step["latent"],
                  "buckets": cfg.data.buckets, "gradient_accumulation": t.gradient_accumulation, "gpus": n},
        "training": {"zero_stage": t.zero_stage, "precision": t.precision, "fp32_master": master,
                     "activation_checkpointing": t.activation_checkpointing, "offload_optimizer": t.offload_optimizer,
                     "offload_params": t.offload_params, "adam_8bit": t.adam_8bit, "ema": t.ema,
                     "use_gpu": t.use_gpu, "zero_config": zero},
        "parameters": {**params, "total": sum(p["total"] for p in params.values()), "trainable": trainable},
        "flops": {"encoders_forward": step["encoder_flops"], "unet_forward": step["unet_forward_flops"],
                  "unet_backward": step["unet_backward_flops"], "per_micro_step_per_gpu": micro,
                  "per_step_per_gpu": per_step, "per_step_all_gpus": per_step * n,
                  "checkpoint_recompute_per_micro_step": step["recompute_flops"]},
        "memory": {"per_gpu_bytes": gpu, "tensor_bytes": tensor_bytes, "peak_bytes": peak, "peak_phase": phase,
                   "encoder_pass_peak_bytes": step["encoder_peak"], "host_bytes_per_worker": host,
                   "method": METHOD},
        "mfu": mfu, "gpus": gpus, "host": cpu_run,
        "feed": feed_plan(cfg, step_times, **feed_args),
        "elapsed_s": round(time.perf_counter() - started, 2),
    }


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_plan(p: dict) -> str:
    s, tr, fl, mem = p["shape"], p["training"], p["flops"], p["memory"]
    lines = [f"vidgen plan: recipe {p['recipe']}, model from {p['model_source']}",
             f"  shape per GPU: batch {s['batch_per_gpu']} x {s['frames']} frames x {s['height']}x{s['width']} "
             + (f"(HxW, the largest of data.buckets={s['buckets']}) " if s.get("buckets") else "") +
             f"(latents {s['latent']}), grad accumulation {s['gradient_accumulation']}, {s['gpus']} GPUs",
             f"  ZeRO-{tr['zero_stage']}, {tr['precision']}{' + fp32 master' if tr['fp32_master'] else ''}, "
             f"checkpointing {'on' if tr['activation_checkpointing'] else 'off'}, offload optimizer "
             f"{tr['offload_optimizer']}, params {tr['offload_params']}, 8-bit Adam {tr['adam_8bit']}, "
             f"EMA {tr['ema']}", "", "parameters            total      trainable"]
    for k in (k for k in p["parameters"] if k not in ("total", "trainable")):
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
    if p.get("host"):
        c = p["host"]
        lines += ["", f"host memory per worker process, CPU run (peak during {c['peak_phase']}): "
                  f"{c['workers']} workers, {c['total_bytes'] / GIB:.2f} GiB in all"]
        lines += [f"  {k:<20}{_gib(v)}" for k, v in c["breakdown"].items() if v]
        lines += [f"  {'total':<20}{_gib(c['per_worker_bytes'])}",
                  "  phases: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in c["phase_bytes"].items()),
                  f"  method: {c['method']}"]
    lines += format_feed(p["feed"])
    lines.append(f"(planned in {p['elapsed_s']} s, no weights read)")
    return "\n".join(lines)


def plan_config(path: str | None, overrides: list[str], mfu: float = 0.4, **feed_args) -> dict:
    return plan(load_config(path, overrides), mfu=mfu, **feed_args)
