"""`vidgen plan --job generate`: peak memory per generation actor and time per video, before renting GPUs.

Shapes: F window frames (model.num_frames), N output frames (generate.num_frames), C latent channels, h/w latents,
H/W pixels.

Nothing is allocated and no weight is read. The family's planner hook (`vidgen.models.base.Planner.meta_generation`)
builds the pipeline an actor builds, every module on the meta device in the dtype generation loads it in. Then, on
meta tensors at the config's size:

- the condition of one video (the encoders' pass a video starts with);
- one denoiser call on a window [1, F, C, h, w], as the samplers make it: classifier-free guidance doubles the
  batch inside the denoiser, a ControlNet runs inside it, per frame;
- the VAE decode of the N output latents, F frames at a time, as the job decodes them;
- the sampler itself (`vidgen.diffusion.samplers`, called as `VideoGenerator.sample` calls it: FIFO samples its base
  video first, then runs the queue) with a stand-in denoiser that counts its calls, which gives the UNet evaluations
  per video and the latents the sampler holds while a call runs (FIFO's queue, its base video, the frames out).

Memory is measured as the training plan measures it (`vidgen.plan._LiveBytes`, fused attention); FLOPs are counted
by FlopCounterMode.

    peak per actor = weights + CUDA overhead + max(condition pass, condition + sampler latents + one denoiser call,
                                                   condition + output latents + VAE decode)
    time per video = FLOPs of (condition + evaluations x one denoiser call + decode) / (MFU x peak FLOP/s)

`plan_job` picks the job (`--job auto|train|generate`) and plans it; `format_job` prints either plan.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from vidgen.config import GenerateConfig, VidgenConfig, load_config
from vidgen.diffusion.fifo import FifoPlan
from vidgen.diffusion.samplers import autoregressive_sample, base_sample, fifo_sample
from vidgen.errors import ConfigError
from vidgen.models import registry
from vidgen.plan import CUDA_OVERHEAD, GIB, GPUS, _fused_sdpa, _LiveBytes, _storage_keys, format_plan, plan

JOBS = ("auto", "train", "generate")
METHOD = ("weights as generation loads them; condition, one denoiser call and the VAE decode measured on the meta "
          "device (storage bytes alive, fused attention); sampler latents and UNet evaluations from the sampler run "
          "with a counting stand-in denoiser; FLOPs: FlopCounterMode; re-conditioning passes (seed_frame, "
          "autoregressive) and generate.lora's weights not counted")


def choose_job(cfg: VidgenConfig, job: str = "auto") -> tuple[str, str]:
    """(train | generate, why). auto: generation for a config with a generate section and no train section (a
    generation or nightly config), else training."""
    if job not in JOBS:
        raise ConfigError(f"--job={job}: expected one of {', '.join(JOBS)}")
    if job != "auto":
        return job, f"--job {job}"
    given = cfg.model_fields_set  # the sections the file or an override set
    if "generate" in given and "train" not in given:
        return "generate", "--job auto: the config has a generate section and no train section"
    return "train", "--job auto: " + ("the config has a train section" if "train" in given else
                                      "the config has no generate section")


def check_generation(cfg: VidgenConfig) -> None:
    """What the generation driver or its actors refuse about the sampler and ControlNet settings, said for the config
    (without the family's own checks, which may read generate.controlnet from storage)."""
    g, window = cfg.generate, cfg.model.num_frames
    if g.controlnet and not registry.spec(cfg.model).controlnet:
        raise ConfigError(f"generate.controlnet: model.family={cfg.model.family} takes no ControlNet")
    if g.sampler == "fifo" and g.fifo.lookahead and registry.spec(cfg.model).latent_frames(window) % 2:
        raise ConfigError(f"generate.fifo.lookahead=true: needs an even window, model.num_frames={window} is odd; "
                          "set generate.fifo.lookahead=false or an even model.num_frames")
    if g.sampler == "base" and g.num_frames != window:
        raise ConfigError(f"generate.num_frames={g.num_frames}: the base sampler makes exactly model.num_frames="
                          f"{window} frames; use generate.sampler=fifo for longer")
    if g.sampler == "autoregressive":
        if registry.spec(cfg.model).conditioning != "image":
            raise ConfigError(f"generate.sampler=autoregressive: needs an image-conditioned model; model.family="
                              f"{cfg.model.family} generates from text")
        if g.autoregressive.overlap >= window:
            raise ConfigError(f"generate.autoregressive.overlap={g.autoregressive.overlap}: must be < "
                              f"model.num_frames={window}")


# -- the sampler with a counting stand-in denoiser -------------------------------------------------


class _Steps:
    """A scheduler stand-in: the samplers' call counts and latents depend on the length of its sigma table only."""

    config = SimpleNamespace(timestep_spacing="linspace")
    sigmas = None

    def set_timesteps(self, num_steps: int, device="cpu") -> None:
        self.sigmas = torch.linspace(1.0, 0.0, num_steps + 1)


class CountingDenoiser:
    """Counts its calls and the most bytes `live` held when one was made; returns a new fp32 x0 estimate, as the
    family denoisers do."""

    def __init__(self, live: _LiveBytes | None = None, device: str = "meta"):
        self.device, self.live, self.calls, self.held = torch.device(device), live, 0, 0

    def __call__(self, latents_bfchw: torch.Tensor, sigma_bf: torch.Tensor, cond) -> torch.Tensor:
        self.calls += 1
        if self.live is not None:
            self.held = max(self.held, self.live.now)
        return torch.empty_like(latents_bfchw, dtype=torch.float32)


def run_sampler(g: GenerateConfig, shape_bfchw: tuple[int, ...], denoise,
                frames: int | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """The output latents [1, N, C, h, w] and the denoiser calls by stage, with the samplers called as
    `VideoGenerator.sample` calls them (the condition is None and re-conditioning keeps it: neither calls the
    denoiser)."""
    sched, gen, window = _Steps(), torch.Generator().manual_seed(0), shape_bfchw[1]
    if g.sampler == "fifo":
        plan_ = FifoPlan(window, g.fifo.partitions, g.fifo.lookahead)
        base = base_sample(denoise, None, sched, shape_bfchw, plan_.steps, generator=gen)
        first = denoise.calls
        out = fifo_sample(denoise, None, sched, shape_bfchw, frames or g.num_frames, plan_, gen, base=base,
                          uniform=g.fifo.uniform_latents)
        return out, {"base video": first, "queue": denoise.calls - first}
    if g.sampler == "autoregressive":
        a = g.autoregressive
        out = autoregressive_sample(denoise, None, sched, shape_bfchw, g.num_frames,
                                    a.num_inference_steps or g.num_inference_steps, lambda last, cond: cond, a.overlap,
                                    gen)
        return out, {"clips": denoise.calls}
    return base_sample(denoise, None, sched, shape_bfchw, g.num_inference_steps, gen), {"window": denoise.calls}


# -- the plan ----------------------------------------------------------------------------------------


def _measure(fn, ignore: set[int]):
    """fn() on meta tensors: (its result, peak bytes, bytes still alive after, FLOPs)."""
    live = _LiveBytes(ignore, device="meta")
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa), live, \
            torch.no_grad(), FlopCounterMode(display=False) as flops:
        out = fn()
    return out, live.peak, live.now, flops.get_total_flops()


def _nbytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def plan_generation(cfg: VidgenConfig, mfu: float = 0.4) -> dict:
    """The generation plan of `cfg` as a JSON-ready dict (`format_generation` prints it)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu}: expected a fraction in (0, 1]")
    started = time.perf_counter()
    g, window = cfg.generate, cfg.model.num_frames
    check_generation(cfg)
    family = registry.spec(cfg.model)
    if family.planner is None:
        raise ConfigError(f"model.family={cfg.model.family}: its family defines no planner hooks (FamilySpec.planner)")
    mg = family.planner.meta_generation(cfg.model, g)
    pipe, weight_keys = mg.pipeline, _storage_keys(*mg.modules.values())

    cond, cond_peak, cond_bytes, cond_flops = _measure(mg.condition, weight_keys)
    shape = pipe.latent_shape(g, window)  # [1, F, C, h, w]
    latents = torch.empty(shape, device="meta")
    sigma = torch.ones(shape[:2], device="meta")
    frames = list(range(window))  # FIFO picks each window's per-frame condition (control maps) before its call
    _, call_peak, _, call_flops = _measure(lambda: pipe.denoiser(latents, sigma, pipe.frames(cond, frames)),
                                           weight_keys)

    live = _LiveBytes(set(), device="meta")
    counter = CountingDenoiser(live)
    with live, torch.no_grad():
        out, calls = run_sampler(g, shape, counter, family.latent_frames(g.num_frames))
    out_bytes = out.numel() * out.element_size()
    _, decode_peak, _, decode_flops = _measure(lambda: pipe.model.decode_video(out, chunk=window), weight_keys)

    modules = {k: _nbytes(v) for k, v in mg.modules.items()}
    phases = {"condition": cond_peak, "sampling": cond_bytes + counter.held + call_peak,
              "VAE decode": cond_bytes + out_bytes + decode_peak}
    phase = max(phases, key=phases.get)
    peak = sum(modules.values()) + CUDA_OVERHEAD + phases[phase]
    evaluations = sum(calls.values())
    per_video = cond_flops + evaluations * call_flops + decode_flops
    dtype = next(mg.modules["unet"].parameters()).dtype
    share = max(1, int(1 / g.gpus_per_actor))  # actors Ray packs onto one GPU (gpus_per_actor below 1)
    gpus = []
    for gpu in GPUS:
        tflops = gpu.tf32_tflops if dtype == torch.float32 else gpu.bf16_tflops
        seconds = per_video / (mfu * tflops * 1e12)
        gpus.append({"gpu": gpu.name, "memory_gib": round(gpu.memory_bytes / GIB, 1), "actors_per_gpu": share,
                     "fits": share * peak <= gpu.memory_bytes,
                     "headroom_gib": round((gpu.memory_bytes - share * peak) / GIB, 2), "peak_tflops": tflops,
                     "seconds_per_video": float(f"{seconds:.4g}"),
                     "videos_per_hour_per_actor": float(f"{3600 / seconds:.4g}")})
    return {
        "job": "generate", "family": cfg.model.family, "model_source": mg.source, "dtype": str(dtype).split(".")[-1],
        "sampler": {"name": g.sampler, "window": window, "frames": g.num_frames,
                    "steps": _steps(g, family.latent_frames(window)),
                    "fifo": g.fifo.model_dump() if g.sampler == "fifo" else None},
        "shape": {"height": g.height, "width": g.width, "latent": list(shape[1:]),
                  "output_latent": list(out.shape[1:])},
        "evaluations": {"unet_calls": evaluations, "by_stage": calls},
        "flops": {"condition": cond_flops, "per_denoiser_call": call_flops, "decode": decode_flops,
                  "per_video": per_video},
        "memory": {"weights": modules, "phases": phases, "condition_bytes": cond_bytes,
                   "sampler_latents_bytes": counter.held, "denoiser_call_peak_bytes": call_peak,
                   "decode_peak_bytes": decode_peak, "cuda_overhead": CUDA_OVERHEAD, "peak_bytes": peak,
                   "peak_phase": phase, "method": METHOD},
        "actors": {"num_actors": g.num_actors, "use_gpu": g.use_gpu, "gpus_per_actor": g.gpus_per_actor},
        "mfu": mfu, "gpus": gpus, "elapsed_s": round(time.perf_counter() - started, 2),
    }


def _steps(g: GenerateConfig, window: int) -> int:
    """Denoising steps each frame passes through."""
    if g.sampler == "fifo":
        return window * g.fifo.partitions
    if g.sampler == "autoregressive":
        return g.autoregressive.num_inference_steps or g.num_inference_steps
    return g.num_inference_steps


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_generation(p: dict) -> str:
    s, sh, mem, fl = p["sampler"], p["shape"], p["memory"], p["flops"]
    fifo = s["fifo"]
    how = (f"{s['name']}: {s['frames']} frames over a window of {s['window']}, {s['steps']} steps per frame"
           + (f" ({fifo['partitions']} partitions, lookahead {'on' if fifo['lookahead'] else 'off'})" if fifo else ""))
    lines = [f"vidgen plan: generation, model.family={p['family']} from {p['model_source']}, weights in {p['dtype']}",
             f"  sampler {how}", f"  size {sh['height']}x{sh['width']} (HxW), window latents {sh['latent']}, "
             f"video latents {sh['output_latent']}", "",
             f"UNet evaluations per video: {p['evaluations']['unet_calls']} ("
             + ", ".join(f"{k} {v}" for k, v in p["evaluations"]["by_stage"].items()) + ")",
             f"  TFLOP: condition {fl['condition'] / 1e12:.3g}, one denoiser call "
             f"{fl['per_denoiser_call'] / 1e12:.3g}, VAE decode {fl['decode'] / 1e12:.3g}, "
             f"per video {fl['per_video'] / 1e12:.4g}", "",
             f"peak memory per actor (peak during {mem['peak_phase']})"]
    lines += [f"  {k:<20}{_gib(v)}" for k, v in mem["weights"].items()]
    lines += [f"  {mem['peak_phase']:<20}{_gib(mem['phases'][mem['peak_phase']])}",
              f"  {'cuda_overhead':<20}{_gib(mem['cuda_overhead'])}", f"  {'total':<20}{_gib(mem['peak_bytes'])}",
              "  phases: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in mem["phases"].items())
              + f" (sampler latents {mem['sampler_latents_bytes'] / GIB:.3f} GiB)",
              f"  method: {mem['method']}", "",
              f"GPU          memory  actors  fits  headroom    s/video @ {p['mfu']:.0%} MFU  videos/h per actor"]
    for gpu in p["gpus"]:
        lines.append(f"  {gpu['gpu']:<10} {gpu['memory_gib']:5.0f} GiB  {gpu['actors_per_gpu']:5d}  "
                     f"{'yes' if gpu['fits'] else 'NO ':<4} {gpu['headroom_gib']:8.2f} GiB  "
                     f"{gpu['seconds_per_video']:12.4g}  {gpu['videos_per_hour_per_actor']:18.4g}")
    a = p["actors"]
    lines.append(f"  {a['num_actors']} actors" + ("" if a["use_gpu"] else " on CPUs (generate.use_gpu=false)"))
    lines.append(f"(planned in {p['elapsed_s']} s, no weights read)")
    return "\n".join(lines)


def plan_job(path: str | None, overrides: list[str], job: str = "auto", mfu: float = 0.4, **feed_args) -> dict:
    """The plan of the job `job` picks (see `choose_job`), with "job" and "job_reason" set."""
    cfg = load_config(path, overrides)
    which, why = choose_job(cfg, job)
    out = plan_generation(cfg, mfu) if which == "generate" else plan(cfg, mfu=mfu, **feed_args)
    return {**out, "job": which, "job_reason": why}


def format_job(p: dict) -> str:
    text = format_generation(p) if p["job"] == "generate" else format_plan(p)
    return f"planning {'generation' if p['job'] == 'generate' else 'training'} ({p['job_reason']})\n{text}"
