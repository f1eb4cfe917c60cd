"""One-GPU check of vidgen at full size: memory against `vidgen plan`, step time, FLOPs and MFU, in one run.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--steps 3] [--budget-s 390] [--only NAME ...]
    python benchmarks/gpu_check.py --flavor tiny --device cpu      # the same code on tiny models, in seconds

For a borrowed H100/H200 machine that may lack Ray, DeepSpeed, MLflow, PyAV and pyarrow: it needs torch, diffusers,
transformers, peft, safetensors, pydantic, numpy and vidgen only, and the summary lists any of those five that
got imported anyway. Full-size models are random-init (seeded), built straight on the device from vidgen's
built-in configs: no weights are read, no second copy is held. Checks, one JSON line each:

  svd_lora, svd_lora_xt   SVD-XT, recipe svd_lora, one optimizer step at 14x320x512 and at 25x576x1024
  svd_full_temporal       SVD-XT, recipe svd_full with train.trainable=temporal, at 14x320x512
  hotshot_temporal        Hotshot-XL, recipe hotshot_temporal, at 8x512x512 (needs hotshot.full_size_configs)
  fifo_svd                FIFO iterations at 25x576x1024 (window 25, 1 partition, no lookahead, CFG)
  i3d_features            Inception-I3D features of 32 clips of 16x224x224 (fp32, as FVD runs it)

Training steps are plain torch, no DeepSpeed: bf16, SDPA, activation checkpointing, the recipe's own `loss`, AdamW
over the recipe's trainable parameters, laid out as DeepSpeed ZeRO-0 on one GPU lays them out (bf16 UNet with fp32
master copies, fp32 gradients and Adam states of the trainable ones; svd_lora: bf16 base, fp32 adapters, no
masters). `vidgen plan` is asked for exactly that: train.num_workers=1 train.zero_stage=0, same recipe, shape,
precision and checkpointing (`plan_overrides` in each record). `planned_bytes` is its peak with its 1.5 GiB CUDA
allowance (compare `device_used_bytes`, what nvidia-smi would show), `planned_tensor_bytes` the same without it
(compare `peak_cuda_bytes`, torch.cuda.max_memory_allocated). ZeRO-2 on one GPU would add a reduce bucket and
free each 16-bit gradient into it; that is not what runs here. `flops` is the plan's count (model FLOPs,
checkpoint recompute excluded) where the plan covers the check, else torch's FlopCounterMode (the counter the
plan uses) over the first, untimed run, recompute excluded the same way; `step_s` is the median of --steps runs
after it; `mfu` is against the GPU's dense bf16 peak (H100/H200 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

FORBIDDEN = ("ray", "deepspeed", "mlflow")  # never on the borrowed machine
UNNEEDED = ("av", "pyarrow")  # vidgen.data / vidgen.feed pull these in; the GPU machine may lack them too
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))  # dense tensor-core peaks
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CHECKS = ("svd_lora", "svd_lora_xt", "svd_full_temporal", "hotshot_temporal", "fifo_svd", "i3d_features")


@dataclass(frozen=True)
class Shapes:  # (frames, height, width) in pixels; latents are /8
    lora: tuple[int, int, int]
    lora_xt: tuple[int, int, int]
    temporal: tuple[int, int, int]
    hotshot: tuple[int, int, int]
    fifo: tuple[int, int, int]
    i3d: tuple[int, int, int, int]  # clips, frames, height, width
    i3d_batch: int


FULL = Shapes((14, 320, 512), (25, 576, 1024), (14, 320, 512), (8, 512, 512), (25, 576, 1024), (32, 16, 224, 224), 16)
TINY = Shapes((2, 32, 32), (3, 32, 64), (2, 32, 32), (2, 32, 32), (2, 32, 32), (2, 8, 32, 32), 1)


def imported(names) -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in set(names))


def clean(x):
    """JSON-safe: non-finite floats become strings (json.dumps would write the invalid NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    return x


class Run:
    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.full = args.flavor == "full"
        self.shapes = FULL if self.full else TINY
        self.precision = args.precision or ("bf16" if self.cuda else "fp32")
        self.gpu = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.peak_tflops = next((p for k, p in PEAK_BF16_TFLOPS if k in self.gpu), None)
        self.started = time.perf_counter()
        self.records: list[dict] = []

    # -- measuring ------------------------------------------------------------------------------

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def timed(self, fn, counting=contextlib.nullcontext) -> tuple[float, list[float], object]:
        """(FLOPs of the first call, seconds of each of --steps calls after it, last result). The first call's
        counter is vidgen.plan's: FlopCounterMode's module hooks would hold every checkpointed block's recompute to
        the end of the backward, and the peak memory read after it with them."""
        from vidgen.plan import FlopCounter

        with counting() as recompute, FlopCounter() as fc:
            out = fn()
            self.sync()
        flops = fc.get_total_flops() - sum(recompute or ())
        times = []
        for _ in range(self.args.steps):
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return flops, times, out

    def memory(self) -> dict:
        if not self.cuda:
            return {"peak_cuda_bytes": None}
        free, total = torch.cuda.mem_get_info(self.device)
        return {"peak_cuda_bytes": torch.cuda.max_memory_allocated(self.device),
                "peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                "device_used_bytes": total - free}

    def rates(self, rec: dict, flops: float, times: list[float]) -> dict:
        step = statistics.median(times)
        tflops = flops / step / 1e12 if flops and step > 0 else None
        mfu = tflops / self.peak_tflops if tflops and self.peak_tflops else None
        return {**rec, "flops": flops, "step_s": step, "steps_s": times, "tflops": tflops, "mfu": mfu}

    # -- configs and models ---------------------------------------------------------------------

    def config(self, recipe: str, frames: int, height: int, width: int, *extra: str):
        from vidgen.config import load_config

        model = ["model.flavor=pretrained", "model.path=(built-in full-size configs)"] if self.full else [
            "model.flavor=tiny"]
        overrides = [f"train.recipe={recipe}", *model, f"model.num_frames={frames}",
                     f"data.height={height}", f"data.width={width}", "train.batch_size=1", "train.num_workers=1",
                     "train.zero_stage=0", f"train.precision={self.precision}", "train.activation_checkpointing=true",
                     "model.attention=sdpa", *extra]
        return load_config(None, overrides), overrides

    def plan(self, cfg) -> dict:
        """vidgen.plan for `cfg`, without its data-feed half (pyarrow) or vidgen.data (PyAV): the check has no data
        source, and without buckets the largest clip is data.height x data.width."""
        from vidgen import plan
        from vidgen.config import DataConfig

        if cfg.data.buckets:
            raise ValueError("gpu_check plans without data.buckets")
        t = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(mock.patch.object(DataConfig, "largest_size", lambda d: (d.height, d.width)))
                stack.enter_context(mock.patch("vidgen.feed.feed_plan", lambda *a, **k: {}))
                if hasattr(plan, "feed_plan"):  # should plan.py ever import it at module level
                    stack.enter_context(mock.patch.object(plan, "feed_plan", lambda *a, **k: {}))
                p = plan.plan(cfg)
        except Exception as e:  # a recipe the plan does not cover (hotshot today): no prediction, not a failure
            return {"planned_bytes": None, "plan_error": f"{type(e).__name__}: {e}"[:300]}
        mem = p["memory"]
        return {"planned_bytes": mem["peak_bytes"], "planned_tensor_bytes": mem["tensor_bytes"],
                "planned_phase": mem["peak_phase"], "planned_breakdown": mem["per_gpu_bytes"],
                "plan_flops": p["flops"]["per_step_per_gpu"], "plan_model_source": p["model_source"],
                "plan_s": round(time.perf_counter() - t, 2)}

    def svd_builder(self):
        """A stand-in for `svd.build`: SVD-XT from `svd.full_size_configs(25)`, random init on the device."""
        from diffusers import EulerDiscreteScheduler

        from vidgen.models.svd import model as svd

        def build(flavor: str, *, seed: int = 0, attention: str = "sdpa", **_):
            torch.manual_seed(seed)
            with torch.device(self.device):
                model = svd.from_configs(svd.full_size_configs(25))
            model.to(self.device)  # a few parameters are made with torch.Tensor(), which ignores the default device
            model.feature_extractor = SimpleNamespace(image_mean=CLIP_MEAN, image_std=CLIP_STD)
            model.scheduler = EulerDiscreteScheduler(**svd.SVD_SCHEDULER)
            for m in (model.unet, model.vae, model.image_encoder):
                m.eval()
            return model.set_attention(attention)

        return build

    def hotshot_builder(self):
        """A stand-in for `hotshot.build`: Hotshot-XL from `hotshot.full_size_configs()` (SDXL base + vidgen's temporal
        layers), random init on the device; its tokenizers are vidgen's offline byte-level ones (77 tokens)."""
        from diffusers import DDPMScheduler

        from vidgen.models.hotshot import model as hotshot

        def build(flavor: str, *, seed: int = 0, attention: str = "sdpa", prediction_type: str | None = None,
                  max_frames: int | None = None, spatial_norm: str = "clip", **_):
            torch.manual_seed(seed)
            with torch.device(self.device):
                model = hotshot.from_configs(hotshot.full_size_configs(), max_frames=max_frames or
                                             hotshot.HOTSHOT_MAX_FRAMES, spatial_norm=spatial_norm,
                                             prediction_type=prediction_type or "epsilon")
            model.to(self.device)
            model.scheduler = DDPMScheduler.from_config(model.scheduler.config)  # its tables on the CPU, as loaded
            return model.set_attention(attention)

        return build

    def meta_build(self, recipe: str, *extra: str) -> dict:
        """Parameter counts of the full-size recipe as the GPU run builds it (config, patched builder, recipe),
        on the meta device: what a tiny run can check of the full-size path."""
        meta = Run(SimpleNamespace(**{**vars(self.args), "device": "meta", "flavor": "full", "precision": "bf16"}))
        r = meta.recipe(meta.config(recipe, *FULL.lora, *extra)[0])
        m, text = r.model, getattr(r.model, "text", None)
        texts = [*text.text_encoder.parameters(), *text.text_encoder_2.parameters()] if text else None
        parts = {"unet": m.unet, "vae": m.vae, "image_encoder": getattr(m, "image_encoder", None),
                 "text_encoders": texts}
        return {**{k: _count(v) for k, v in parts.items() if v is not None},
                "trainable": _count(r.trainable_parameters())}

    def recipe(self, cfg):
        from vidgen.models.registry import build_recipe
        from vidgen.models.svd import model as svd

        if not self.full:
            return build_recipe(cfg.model, cfg.train, cfg.run.seed)
        if cfg.model.family == "hotshot":
            from vidgen.models.hotshot import model as hotshot

            patch = mock.patch.object(hotshot, "build", self.hotshot_builder())
        else:
            patch = mock.patch.object(svd, "build", self.svd_builder())
        with patch:
            return build_recipe(cfg.model, cfg.train, cfg.run.seed)

    # -- one training setup ----------------------------------------------------------------------

    def trainer(self, cfg):
        """(recipe, step function): the recipe on the device with DeepSpeed ZeRO-0's layout, plain AdamW."""
        recipe = self.recipe(cfg).to(self.device)
        unet, t = recipe.unet, cfg.train
        unet.to(self.device)
        params = recipe.trainable_parameters()
        overrides = getattr(recipe, "deepspeed_overrides", dict)()
        mixed = t.precision != "fp32" and overrides.get(t.precision, {}).get("enabled", True)
        masters = [p.detach().float().clone() for p in params] if mixed else params
        if mixed:  # DeepSpeed's bf16 mode: the whole UNet in bf16, fp32 masters of the trainable parameters
            unet.to(torch.bfloat16)
        opt = torch.optim.AdamW(masters, lr=t.lr, weight_decay=t.weight_decay)
        gen = torch.Generator().manual_seed(cfg.run.seed)

        def unet_fn(*args, **kwargs):  # as vidgen.train.loop calls the engine
            return unet(*args, return_dict=False, **kwargs)[0]

        def step(batch) -> float:
            opt.zero_grad(set_to_none=False)  # fp32 gradients persist, as DeepSpeed's buffers do
            loss, _ = recipe.loss(batch, unet_fn, gen)
            loss.backward()
            if mixed:
                for p, m in zip(params, masters):
                    if m.grad is None:
                        m.grad = p.grad.float()
                    else:
                        m.grad.copy_(p.grad)
                    p.grad = None
            torch.nn.utils.clip_grad_norm_(masters, t.max_grad_norm)
            opt.step()
            if mixed:
                with torch.no_grad():
                    for p, m in zip(params, masters):
                        p.copy_(m)
            return loss.item()

        return recipe, step

    def train_check(self, name: str, cfg, overrides: list[str], trained=None) -> tuple[dict, object]:
        """One check of a training step; `trained` reuses a (recipe, step) of the same recipe."""
        f, h, w = cfg.model.num_frames, cfg.data.height, cfg.data.width
        rec = {"check": name, "recipe": cfg.train.recipe, "shape": {"batch": 1, "frames": f, "height": h, "width": w},
               "plan_overrides": overrides, **self.plan(cfg)}
        t = time.perf_counter()
        recipe, step = trained or self.trainer(cfg)
        rec["build_s"] = round(time.perf_counter() - t, 2)
        rec["trainable_params"] = sum(p.numel() for p in recipe.trainable_parameters())
        gen = torch.Generator().manual_seed(1)
        batch = {"frames": torch.randint(0, 256, (1, f, h, w, 3), dtype=torch.uint8, generator=gen).to(self.device),
                 "fps": torch.tensor([7.0], device=self.device)}
        if cfg.model.family == "hotshot":
            batch["prompt"] = ["a front camera driving video, a car turns left"]
        unet = recipe.unet
        recomputed: list[float] = []

        @contextlib.contextmanager
        def counting():  # checkpoint recompute counted apart, as vidgen.plan does, and left out of `flops`
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=_counting_checkpoint(recomputed))
            try:
                yield recomputed
            finally:
                unet.enable_gradient_checkpointing()  # the default one, as vidgen.train.loop uses

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        counted, times, loss = self.timed(lambda: step(batch), counting)
        rec.update(self.memory())
        rec = self.rates(rec, rec.get("plan_flops") or counted, times)
        rec.update(flops_source="vidgen.plan" if rec.get("plan_flops") else "FlopCounterMode, first step",
                   flops_counted=counted, checkpoint_recompute_flops=sum(recomputed), loss=loss)
        rec["ok"] = math.isfinite(loss)
        return rec, (recipe, step)

    # -- the checks --------------------------------------------------------------------------------

    def svd_lora(self):
        s = self.shapes
        cfg, ov = self.config("svd_lora", *s.lora)
        rec, trained = self.train_check("svd_lora", cfg, ov)
        yield rec if self.full else {**rec, "full_size_meta_params": self.meta_build("svd_lora")}
        cfg, ov = self.config("svd_lora", *s.lora_xt)
        yield self.train_check("svd_lora_xt", cfg, ov, trained)[0]

    def svd_full_temporal(self):
        cfg, ov = self.config("svd_full", *self.shapes.temporal, "train.trainable=temporal")
        yield self.train_check("svd_full_temporal", cfg, ov)[0]

    def hotshot_temporal(self):
        from vidgen.models.hotshot import model as hotshot

        if not hasattr(hotshot, "full_size_configs"):
            yield {"check": "hotshot_temporal", "ok": None,
                   "skipped": "skipped: no full-size hotshot configs (vidgen.models.hotshot.model.full_size_configs)"}
            return
        extra = {} if self.full else {"full_size_meta_params": self.meta_build("hotshot_temporal",
                                                                               "model.family=hotshot")}
        cfg, ov = self.config("hotshot_temporal", *self.shapes.hotshot, "model.family=hotshot")
        rec = self.train_check("hotshot_temporal", cfg, ov)[0]
        yield {**rec, **extra}

    def fifo_svd(self):
        from vidgen.diffusion.fifo import FifoPlan
        from vidgen.diffusion.samplers import fifo_sample, sampling_sigmas
        from vidgen.models.svd import model as svd
        from vidgen.models.svd.pipeline import SVDDenoiser

        f, h, w = self.shapes.fifo
        t = time.perf_counter()
        model = self.svd_builder()("pretrained", seed=0) if self.full else svd.build("tiny", num_frames=f)
        model.to(self.device)
        if self.cuda:
            model.unet.to(torch.bfloat16)
        build_s = round(time.perf_counter() - t, 2)
        plan = FifoPlan(window=f, partitions=1, lookahead=False)  # window 25 is odd: lookahead needs an even one
        den = SVDDenoiser(model, 1.0, 3.0)  # classifier-free guidance: a batch of 2 per call
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = torch.Generator().manual_seed(0)
        image = (torch.rand(1, 3, h, w, generator=gen) * 2 - 1).to(self.device)
        cond = den.condition(image, 7, 127, 0.02, gen)
        lat = (1, f, 4, h // model.vae_scale_factor, w // model.vae_scale_factor)
        base = torch.randn(lat, generator=gen).to(self.device)
        sigmas = sampling_sigmas(model.scheduler, plan.steps)
        calls_per_iteration = len(plan.windows())
        with FlopCounterMode(display=False) as fc:  # one denoiser call at the queue's levels, also the warm-up
            den(base, sigmas[1:f + 1].flip(0).view(1, -1).to(self.device), cond)
            self.sync()
        marks = []

        def progress():
            self.sync()
            marks.append(time.perf_counter())

        marks.append(time.perf_counter())
        out = fifo_sample(den, cond, model.scheduler, lat, 1 + self.args.steps, plan, generator=gen,
                          progress=progress, base=base)
        times = [b - a for a, b in zip(marks[1:], marks[2:])]  # the first iteration sets the queue up: untimed
        rec = {"check": "fifo_svd", "shape": {"batch": 1, "frames": f, "height": h, "width": w},
               "fifo": {"window": f, "partitions": 1, "lookahead": False, "guidance": [1.0, 3.0],
                        "denoiser_calls_per_iteration": calls_per_iteration}, "build_s": build_s,
               "planned_bytes": None, **self.memory()}
        rec = self.rates(rec, fc.get_total_flops() * calls_per_iteration, times)
        rec.update(flops_source="FlopCounterMode, one denoiser call x calls per iteration", step_unit="iteration",
                   ok=bool(torch.isfinite(out).all()) and len(times) == self.args.steps)
        del model, den, cond, out
        yield rec

    def i3d_features(self):
        import dataclasses

        from vidgen.models.i3d import I3D, TINY, I3DConfig, init_weights

        n, f, h, w = self.shapes.i3d
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = I3D(I3DConfig() if self.full else dataclasses.replace(TINY))
            init_weights(model)
        model.to(self.device).eval()
        frames = torch.randint(0, 256, (n, f, h, w, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)).to(self.device)
        bs = self.shapes.i3d_batch

        @torch.inference_mode()
        def features():  # vidgen.eval.features' squash preprocessing at the native size: scale to [-1, 1]
            return torch.cat([model(frames[i:i + bs].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0).float()
                              for i in range(0, n, bs)])

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        flops, times, out = self.timed(features)
        rec = {"check": "i3d_features", "shape": {"clips": n, "frames": f, "height": h, "width": w, "batch": bs},
               "width": model.config.width, "dtype": "float32", "planned_bytes": None, **self.memory()}
        rec = self.rates(rec, flops, times)
        rec.update(flops_source="FlopCounterMode, first run", step_unit="all clips",
                   ok=tuple(out.shape) == (n, model.feature_dim) and bool(torch.isfinite(out).all()))
        yield rec

    # -- driver ------------------------------------------------------------------------------------

    def run(self) -> dict:
        groups = {"svd_lora": ("svd_lora", "svd_lora_xt"), "svd_full_temporal": ("svd_full_temporal",),
                  "hotshot_temporal": ("hotshot_temporal",), "fifo_svd": ("fifo_svd",),
                  "i3d_features": ("i3d_features",)}
        only = set(self.args.only or CHECKS)
        for group, names in groups.items():
            if not only & set(names):
                continue
            if time.perf_counter() - self.started > self.args.budget_s:
                for name in names:
                    self.emit({"check": name, "ok": None, "skipped": f"skipped: past --budget-s={self.args.budget_s}"})
                continue
            t = time.perf_counter()
            done: set[str] = set()
            start = {"allocated_at_start_bytes": torch.cuda.memory_allocated(self.device)} if self.cuda else {}
            try:
                for rec in getattr(self, group)():
                    done.add(rec["check"])
                    self.emit({**rec, **start, "wall_s": round(time.perf_counter() - t, 2)})
            except Exception as e:  # one failed check (an OOM, a missing config) must not cost the others
                for name in names:
                    if name not in done:
                        self.emit({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:1000],
                                   "wall_s": round(time.perf_counter() - t, 2), **self.memory()})
            self.free()
        import diffusers
        import peft
        import transformers

        status = {r["check"]: ("skipped" if r.get("skipped") else "ok" if r["ok"] else "failed") for r in self.records}
        return {"summary": True, "flavor": self.args.flavor, "device": str(self.device), "gpu": self.gpu,
                "peak_bf16_tflops": self.peak_tflops, "checks": status,
                "all_ok": all(v != "failed" for v in status.values()) and bool(status),
                "wall_s": round(time.perf_counter() - self.started, 2),
                "forbidden_imports": imported(FORBIDDEN), "unneeded_imports": imported(UNNEEDED),
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "transformers": transformers.__version__, "peft": peft.__version__,
                             "cuda": torch.version.cuda},
                "plan_basis": "vidgen plan with train.num_workers=1 train.zero_stage=0 (see each plan_overrides); "
                              "measured: plain torch AdamW in ZeRO-0's layout, no DeepSpeed buckets or engine"}

    def emit(self, rec: dict) -> None:
        rec = clean(rec)
        self.records.append(rec)
        print(json.dumps(rec), flush=True)


def _count(x) -> int:
    return sum(p.numel() for p in (x.parameters() if isinstance(x, torch.nn.Module) else x))


def _counting_checkpoint(recomputed: list):
    """diffusers' default checkpointing (non-reentrant), with a FLOP counter around each segment's recompute."""

    class Recompute:
        def __enter__(self):
            from vidgen.plan import FlopCounter

            self.fc = FlopCounter()
            self.fc.__enter__()

        def __exit__(self, *exc):
            self.fc.__exit__(*exc)
            recomputed.append(self.fc.get_total_flops())

    def checkpoint(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), Recompute()))

    return checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", choices=("full", "tiny"), default="full", help="full-size models or tiny ones")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--out", default="gpu_check.json", help="JSON file with every record and the summary")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the untimed first one (default 3)")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="checks not started this many seconds in are recorded as skipped (default 390: the "
                    "whole run stays under 8 minutes on an H100/H200)")
    ap.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only (svd_lora and svd_lora_xt "
                    "run together)")
    ap.add_argument("--precision", choices=("bf16", "fp32"),
                    help="training precision (default: bf16 on CUDA, fp32 on the CPU; bf16 on the CPU runs the "
                    "fp32-master path of the GPU run on tiny models)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps: expected >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": f"--device={args.device}: no CUDA device here (use --flavor tiny --device cpu)"}))
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = Run(args)
    summary = run.run()
    print(json.dumps(summary), flush=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"summary": summary, "checks": run.records}, fh, indent=1)
    os.replace(tmp, args.out)
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
