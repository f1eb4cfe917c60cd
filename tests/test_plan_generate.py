"""`vidgen plan` of generation configs: UNet evaluations as the samplers make them, memory against a measured run,
the job `--job auto` picks, and every shipped config planned.

The call counts are checked against the family denoisers' own counters (`denoiser.calls`) over the generation
actor's sampling (`VideoGenerator.sample`) with tiny models on the CPU; the memory reference is a real tiny
generation on the CPU under `torch.profiler` (as tests/test_plan.py measures a training step).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from profiling import allocated_peak

from vidgen import cli
from vidgen.config import load_config
from vidgen.errors import ConfigError
from vidgen.generate.job import VideoGenerator
from vidgen.models import registry
from vidgen.plan import CUDA_OVERHEAD
from vidgen.plan_generate import choose_job, format_job, plan_generation, plan_job

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
# the job `--job auto` plans for each shipped config (a new config must say which it is)
JOBS = {"demo.yaml": "train", "generate_demo.yaml": "generate", "generate_opv2v_hotshot_controlnet.yaml": "generate",
        "generate_opv2v_svd.yaml": "generate", "generate_vbench_hotshot.yaml": "generate",
        "hotshot_temporal.yaml": "train", "nightly_eval.yaml": "generate", "svd_full.yaml": "train",
        "svd_lora_1024x576x25.yaml": "train", "wan_lora_t2v_1.3b.yaml": "train"}
PLANNED_IN_TEST_PLAN = {"svd_full.yaml", "svd_lora_1024x576x25.yaml", "hotshot_temporal.yaml"}  # 15-25 s each
SVD_UNET_PARAMS = 1_524_623_082  # stabilityai/stable-video-diffusion-img2vid-xt's UNet
TINY = ("model.flavor=tiny", "model.num_frames=4", "generate.height=32", "generate.width=32",
        "generate.num_inference_steps=3", "generate.fifo.cache=false")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on the CPU run fastest on one thread (and on a busy machine, many times faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(*overrides: str):
    return load_config(None, [*TINY, *overrides])


@functools.cache
def tiny_plan(*overrides: str) -> dict:
    return plan_generation(tiny_cfg(*overrides))


def real_calls(cfg) -> int:
    """UNet calls the generation actor's denoiser makes for one video."""
    g = cfg.generate
    actor = VideoGenerator(cfg.model.model_dump(), g.model_dump(), root="unused")
    row = {"id": "a", "image": "", "prompt": "a car", "sample_prompt": "a car", "seed": 0}
    cond = actor.pipe.condition(row, g, lambda uri: torch.zeros(1, 3, g.height, g.width), torch.Generator())
    shape = actor.pipe.latent_shape(g, cfg.model.num_frames)
    latents = actor.sample(row, cond, shape, torch.Generator().manual_seed(0))
    assert latents.shape[1] == g.num_frames
    return actor.denoiser.calls


@pytest.mark.parametrize("overrides", [
    ("generate.sampler=base", "generate.num_frames=4"),
    ("generate.sampler=fifo", "generate.num_frames=7", "generate.fifo.partitions=2"),
    ("generate.sampler=fifo", "generate.num_frames=6", "generate.fifo.partitions=3", "generate.fifo.lookahead=false",
     "generate.fifo.uniform_latents=true"),
    ("generate.sampler=autoregressive", "generate.num_frames=9", "generate.autoregressive.overlap=1"),
    ("model.family=hotshot", "generate.sampler=fifo", "generate.num_frames=5", "generate.fifo.partitions=1"),
])
def test_unet_evaluations_are_the_calls_the_samplers_make(overrides):
    cfg = tiny_cfg(*overrides)
    ev = tiny_plan(*overrides)["evaluations"]
    assert ev["unet_calls"] == real_calls(cfg) == sum(ev["by_stage"].values())
    g, f = cfg.generate, cfg.model.num_frames
    if g.sampler == "fifo":  # by hand: the base video's nf steps, then (N + nf - F) iterations of the windows
        nf = f * g.fifo.partitions
        windows = 2 * g.fifo.partitions if g.fifo.lookahead else g.fifo.partitions
        assert ev["by_stage"] == {"base video": nf, "queue": (g.num_frames + nf - f) * windows}


@pytest.mark.parametrize("overrides", [(), ("model.family=hotshot", "generate.controlnet=tiny")])
def test_weights_are_those_of_the_pipeline_an_actor_builds(overrides):
    cfg = tiny_cfg(*overrides)
    pipe = registry.spec(cfg.model).build_pipeline(cfg.model, cfg.generate)
    real = registry.spec(cfg.model).planner.parts(pipe.model)
    if getattr(pipe.denoiser, "controlnet", None) is not None:
        real["controlnet"] = pipe.denoiser.controlnet
    planned = tiny_plan(*overrides)["memory"]["weights"]
    assert planned == {k: sum(t.nbytes for t in (*m.parameters(), *m.buffers())) for k, m in real.items()}


def test_guidance_doubles_the_denoiser_call():
    one, cfg_ = tiny_plan("generate.max_guidance_scale=1.0"), tiny_plan("generate.max_guidance_scale=3.0")
    assert cfg_["flops"]["per_denoiser_call"] == 2 * one["flops"]["per_denoiser_call"] > 0
    assert cfg_["memory"]["denoiser_call_peak_bytes"] > 1.5 * one["memory"]["denoiser_call_peak_bytes"]
    assert cfg_["flops"]["decode"] == one["flops"]["decode"]


def test_fifo_holds_its_queue_base_video_and_frames_out_during_a_call():
    p = tiny_plan("generate.sampler=fifo", "generate.num_frames=12", "generate.fifo.partitions=2")
    frame, f = 4 * 4 * 4 * 4, 4  # fp32 latents of one 32x32 frame (C=4, h=w=4); the window
    queue = 2 * f + f // 2  # nf slots and F/2 context slots
    # At the last call: the queue, and the first one, which fifo_sample's own variable keeps; the base video; the
    # 11 frames out; the previous window's x0, step and next latents; the last noise drawn for the tail.
    frames = 2 * queue + f + 11 + 3 * f + 1
    held = p["memory"]["sampler_latents_bytes"]
    assert frames * frame <= held < (frames + 1) * frame  # + the per-slot sigmas, a few bytes


def measured_generation_peak(cfg) -> tuple[int, int]:
    """(weights, peak tensor bytes beyond them) of one tiny video on the CPU: condition, sampling, VAE decode."""
    from torch.profiler import ProfilerActivity, profile

    g = cfg.generate
    actor = VideoGenerator(cfg.model.model_dump(), g.model_dump(), root="unused")
    m = actor.model
    weights = sum(x.nbytes for mod in (m.unet, m.vae, m.image_encoder) for x in (*mod.parameters(), *mod.buffers()))
    row = {"id": "a", "image": "", "prompt": "", "sample_prompt": "", "seed": 0}
    image = torch.zeros(1, 3, g.height, g.width)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        cond = actor.pipe.condition(row, g, lambda uri: image, torch.Generator())
        latents = actor.sample(row, cond, actor.pipe.latent_shape(g, cfg.model.num_frames), torch.Generator())
        m.decode_video(latents, chunk=cfg.model.num_frames)
    return weights, allocated_peak(prof)


def test_memory_within_25_percent_of_a_measured_cpu_generation():
    overrides = ("generate.height=64", "generate.width=64", "generate.num_frames=8", "generate.fifo.partitions=1")
    cfg, p = tiny_cfg(*overrides), tiny_plan(*overrides)
    mem = p["memory"]
    weights, measured = measured_generation_peak(cfg)
    assert sum(mem["weights"].values()) == weights
    planned = mem["peak_bytes"] - CUDA_OVERHEAD - weights
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured, mem["phases"])


@pytest.mark.parametrize("overrides, message", [
    (("model.num_frames=5", "generate.fifo.lookahead=true"), "generate.fifo.lookahead=true: needs an even window"),
    (("generate.sampler=base", "generate.num_frames=9"), "generate.num_frames=9: the base sampler makes exactly"),
    (("generate.sampler=autoregressive", "generate.autoregressive.overlap=4"), "generate.autoregressive.overlap=4"),
    (("model.family=hotshot", "generate.sampler=autoregressive"), "needs an image-conditioned model"),
    (("generate.controlnet=tiny",), "generate.controlnet: model.family=svd takes no ControlNet"),
])
def test_what_the_actors_would_refuse_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_generation(tiny_cfg(*overrides))


def test_auto_picks_generation_only_without_a_train_section():
    path = str(CONFIGS / "generate_demo.yaml")
    assert choose_job(load_config(path, [])) == ("generate", "--job auto: the config has a generate section and "
                                                 "no train section")
    assert choose_job(load_config(path, ["train.batch_size=2"]))[0] == "train"  # an override says training
    assert choose_job(load_config(str(CONFIGS / "demo.yaml"), [])) == ("train", "--job auto: the config has a "
                                                                       "train section")
    assert choose_job(load_config(None, []))[0] == "train"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_plans(name):
    assert name in JOBS, f"{name}: add it to JOBS with the job --job auto plans for it"
    if name in PLANNED_IN_TEST_PLAN:  # tests/test_plan.py plans these whole; here only the job auto picks
        assert choose_job(load_config(str(CONFIGS / name), []))[0] == JOBS[name]
        return
    p = plan_job(str(CONFIGS / name), [])
    assert p["job"] == JOBS[name]
    text = format_job(p)
    assert text.startswith(f"planning {'generation' if p['job'] == 'generate' else 'training'} (--job auto")
    if p["job"] == "generate":
        cfg = load_config(str(CONFIGS / name), [])
        assert p["sampler"]["frames"] == cfg.generate.num_frames
        assert p["shape"]["output_latent"] == [cfg.generate.num_frames, 4, cfg.generate.height // 8,
                                               cfg.generate.width // 8]
        assert p["memory"]["peak_bytes"] > sum(p["memory"]["weights"].values()) + CUDA_OVERHEAD
        assert p["evaluations"]["unet_calls"] > 0 and all(g["seconds_per_video"] > 0 for g in p["gpus"])
    if name == "nightly_eval.yaml":  # SVD-XT at 1024x576x25, 25 steps: fits 80 GB, not 40 (the VAE decodes 25 frames)
        assert p["memory"]["weights"]["unet"] == 4 * SVD_UNET_PARAMS
        assert p["evaluations"]["by_stage"] == {"window": 25}
        assert {g["gpu"]: g["fits"] for g in p["gpus"]} == {"A100-40GB": False, "A100-80GB": True, "H100-80GB": True,
                                                            "H200-141GB": True}


def test_the_cli_says_which_job_it_planned(capsys):
    assert cli.main(["plan", "--config", str(CONFIGS / "generate_demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("planning generation (--job auto: the config has a generate section and no train section)")
    assert "UNet evaluations per video: 72 (base video 8, queue 64)" in out  # window 4 x 2 partitions, 12 frames
    assert cli.main(["plan", "--config", str(CONFIGS / "generate_demo.yaml"), "model.num_frames=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vidgen: error: generate.fifo.lookahead=true: needs an even window") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--config", str(CONFIGS / "generate_demo.yaml"), "--job", "nope"])
    assert e.value.code == 2
