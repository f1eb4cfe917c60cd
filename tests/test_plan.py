"""`vidgen plan`: exact parameter counts, counted FLOPs, memory estimate against a measured CPU step, full size.

The memory reference is measured, not modelled: `measured_step_peak` runs a real training step of the tiny
recipe on CPU under `torch.profiler` with `profile_memory=True`. The profiler hooks the CPU allocator itself:
every allocation and free made while profiling is an event carrying the allocator's running total of bytes
alive that were allocated during the profile. Its maximum is the step's transient peak; adding the bytes that
were alive before (weights, buffers, AdamW states, summed from the tensors) gives the peak tensor memory of the
step, the quantity `plan` estimates as `tensor_bytes` (everything but the CUDA context).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vidgen import cli, plan
from vidgen.config import load_config
from vidgen.errors import ConfigError
from vidgen.models import lora, svd
from vidgen.train.recipes import build_recipe

SVD_UNET_PARAMS = 1_524_623_082  # stabilityai/stable-video-diffusion-img2vid(-xt) UNet (~1.5B)


def tiny_cfg(*overrides: str):
    return load_config(None, ["model.flavor=tiny", "model.num_frames=8", "data.height=64", "data.width=64",
                              "train.batch_size=2", "train.precision=fp32", "train.zero_stage=0",
                              "train.num_workers=1", *overrides])


@functools.cache
def tiny_plan(*overrides: str) -> dict:
    return plan.plan(tiny_cfg(*overrides))


def counts(module: torch.nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in module.parameters()),
            sum(p.numel() for p in module.parameters() if p.requires_grad))


@pytest.mark.parametrize("overrides", [(), ("train.trainable=temporal",),
                                       ("train.recipe=svd_lora", "train.lora.rank=4")])
def test_parameter_counts_equal_the_instantiated_model(overrides):
    cfg = tiny_cfg(*overrides)
    p = tiny_plan(*overrides)
    real = build_recipe(cfg.train.recipe, cfg.model, cfg.train, cfg.run.seed)
    for name, module in (("unet", real.unet), ("vae", real.model.vae), ("image_encoder", real.model.image_encoder)):
        assert (p["parameters"][name]["total"], p["parameters"][name]["trainable"]) == counts(module), name
    assert p["parameters"]["trainable"] == sum(q.numel() for q in real.trainable_parameters())
    assert 0 < p["parameters"]["trainable"] < p["parameters"]["unet"]["total"] or not overrides
    if cfg.train.recipe == "svd_lora":
        base = svd.tiny(num_frames=8).unet
        assert p["parameters"]["trainable"] == lora.lora_parameter_count(base, cfg.train.lora)


def measured_step_peak(cfg) -> int:
    """Peak tensor bytes of the second plain-PyTorch training step of the tiny recipe on CPU (see the module doc)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    t = cfg.train
    recipe = build_recipe(t.recipe, cfg.model, t, 0)
    if t.activation_checkpointing:
        recipe.unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(recipe.trainable_parameters(), lr=1e-5)
    b, f, h, w = t.batch_size, cfg.model.num_frames, cfg.data.height, cfg.data.width
    batch = {"frames": torch.randint(0, 255, (b, f, h, w, 3), dtype=torch.uint8), "fps": torch.full((b,), 7)}

    def step(seed: int) -> None:
        loss, _ = recipe.loss(batch, lambda *a: recipe.unet(*a, return_dict=False)[0],
                              torch.Generator().manual_seed(seed))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # the first step creates the AdamW states; the plan models the steady state
    modules = (recipe.unet, recipe.model.vae, recipe.model.image_encoder)
    before = sum(x.nbytes for m in modules for x in (*m.parameters(), *m.buffers()))
    before += sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(1)
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            peak = max(peak, e.extra_fields.total_allocated)
        stack.extend(e.children)
    assert peak > 0, "the profiler saw no allocation"
    return before + peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_within_25_percent_of_a_measured_cpu_step(checkpointing):
    overrides = ("train.activation_checkpointing=true",) if checkpointing else ()
    cfg, p = tiny_cfg(*overrides), tiny_plan(*overrides)
    mem = p["memory"]
    estimate, measured = mem["tensor_bytes"], measured_step_peak(cfg)
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured, mem["per_gpu_bytes"])
    # the case is one where activations matter, so the check is of the measured part, not of the weights
    assert mem["per_gpu_bytes"]["activations"] > 0.5 * estimate
    assert mem["peak_bytes"] == estimate + plan.CUDA_OVERHEAD


def test_checkpointing_cuts_activations_and_recompute_is_counted_apart():
    off, on = tiny_plan(), tiny_plan("train.activation_checkpointing=true")
    assert on["memory"]["per_gpu_bytes"]["activations"] < 0.8 * off["memory"]["per_gpu_bytes"]["activations"]
    for k in ("encoders_forward", "unet_forward", "unet_backward"):  # model FLOPs do not change
        assert on["flops"][k] == off["flops"][k]
    assert off["flops"]["checkpoint_recompute_per_micro_step"] == 0
    assert on["flops"]["checkpoint_recompute_per_micro_step"] > 0


def test_bucketed_configs_plan_at_their_largest_bucket_not_at_height_and_width():
    bucketed = tiny_plan("data.buckets=64x32,96x64,32x64")  # WxH; the largest is 64 high, 96 wide
    sized = tiny_plan("data.height=64", "data.width=96")
    assert bucketed["shape"] | {"buckets": None} == sized["shape"]
    assert bucketed["shape"]["latent"] == [8, 4, 8, 12]
    assert bucketed["flops"] == sized["flops"] and bucketed["memory"] == sized["memory"]
    assert bucketed["memory"]["per_gpu_bytes"]["activations"] > tiny_plan()["memory"]["per_gpu_bytes"]["activations"]
    assert "64x96 (HxW, the largest of data.buckets=64x32,96x64,32x64)" in plan.format_plan(bucketed)


def test_flops_of_linear_conv_and_fused_attention_match_hand_counts():
    meta = torch.device("meta")
    n, k, m = 6, 32, 48
    lin = torch.nn.Linear(k, m, device=meta)
    x = torch.empty(n, k, device=meta, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        lin(x).sum().backward()
    assert fc.get_total_flops() == 2 * n * k * m * 3  # forward; backward: grad of input and of weight

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, device=meta).requires_grad_(False)
    with FlopCounterMode(display=False) as fc:
        conv(torch.empty(2, 3, 16, 16, device=meta))
    assert fc.get_total_flops() == 2 * (2 * 16 * 16 * 8) * (3 * 3 * 3)

    b, h, lq, lk, d = 2, 4, 64, 32, 16
    q = torch.empty(b, h, lq, d, device=meta, requires_grad=True)
    kv = [torch.empty(b, h, lk, d, device=meta, requires_grad=True) for _ in range(2)]
    with FlopCounterMode(display=False) as fwd:
        out = plan._fused_sdpa(q, *kv)
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    assert fwd.get_total_flops() == 2 * (2 * b * h * lq * lk * d)  # Q K^T and P V
    # the fused kernel's backward: S = Q K^T again, then dV, dP, dQ, dK: five matmuls of the forward's size
    assert bwd.get_total_flops() == 5 * (2 * b * h * lq * lk * d)
    assert q.grad.shape == q.shape


def test_live_bytes_follow_storages_saved_and_freed():
    meta = torch.device("meta")
    x = torch.empty(1000, device=meta, requires_grad=True)  # made outside: not counted
    live = plan._LiveBytes({x.untyped_storage()._cdata})
    with live:
        y = x.exp()  # 4000 B, saved by ExpBackward
        z = y.view(10, 100) * 2  # the view shares y's storage; z is new: 4000 B
        loss = z.sum()
        del y, z  # y stays alive (saved for backward), z is freed
    assert (live.now, live.peak) == (4000 + 4, 8000 + 4)
    with live:
        loss.backward()
        del loss
    assert x.grad is not None and live.now == 4000  # the saved tensor went with the graph; x.grad remains


def test_pretrained_directory_without_weights_plans_from_its_config_json(tmp_path):
    tiny = svd.tiny(num_frames=8)
    tiny.unet.save_config(tmp_path / "unet")
    tiny.vae.save_config(tmp_path / "vae")
    tiny.image_encoder.config.save_pretrained(tmp_path / "image_encoder")
    cfg = tiny_cfg("model.flavor=pretrained", f"model.path={tmp_path}")
    p = plan.plan(cfg)
    assert str(tmp_path) in p["model_source"]
    for name in ("unet", "vae", "image_encoder"):
        assert p["parameters"][name]["total"] == counts(getattr(tiny, name))[0], name


def test_full_size_svd_full_config_plans_in_seconds_from_the_cli():
    out, started = io.StringIO(), time.process_time()
    with contextlib.redirect_stdout(out):
        assert cli.main(["plan", "--config", "jobs/configs/svd_full.yaml", "--json"]) == 0
    cpu_s = time.process_time() - started
    p = json.loads(out.getvalue())
    assert cpu_s < 20, f"plan took {cpu_s:.1f} s of CPU"
    assert p["parameters"]["unet"]["total"] == SVD_UNET_PARAMS == p["parameters"]["trainable"]
    assert p["model_source"].startswith("built-in SVD-XT")
    assert [g["gpu"] for g in p["gpus"]] == ["A100-40GB", "A100-80GB", "H100-80GB"]
    assert not p["gpus"][0]["fits"]  # full fine-tuning at 1024x576x25 never fits 40 GB
    assert p["flops"]["unet_forward"] > 1e13 and p["flops"]["unet_backward"] > p["flops"]["unet_forward"]
    fl = p["flops"]
    assert fl["per_step_per_gpu"] == 2 * (fl["encoders_forward"] + fl["unet_forward"] + fl["unet_backward"])


def test_full_size_lora_config_fits_80_but_not_40_gb(capsys):
    path = "jobs/configs/svd_lora_1024x576x25.yaml"
    assert cli.main(["plan", path, "--json"]) == 0  # `vidgen plan CONFIG`, the spelling, works too
    p = json.loads(capsys.readouterr().out)
    cfg = load_config(path, [])
    with torch.device("meta"):
        base = svd.from_configs(svd.full_size_configs(25)).unet
    assert p["parameters"]["trainable"] == lora.lora_parameter_count(base, cfg.train.lora)
    assert p["parameters"]["unet"]["total"] == SVD_UNET_PARAMS + p["parameters"]["trainable"]
    fits = {g["gpu"]: g["fits"] for g in p["gpus"]}
    assert fits == {"A100-40GB": False, "A100-80GB": True, "H100-80GB": True}, plan.format_plan(p)
    assert "activations" in plan.format_plan(p)


@pytest.mark.parametrize("args", [["train.recipe=hotshot_temporal"], ["--mfu", "0"]])
def test_bad_input_exits_2_with_one_line(args, capsys):
    assert cli.main(["plan", "--config", "jobs/configs/svd_full.yaml", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vidgen: error:") and "\n" not in err


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeeds_own_estimator(offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n_params, n_gpus = 1_000_000_000, 8
    t = load_config(None, ["train.zero_stage=2", "train.precision=bf16", f"train.offload_optimizer={offload}"]).train
    gpu, host = plan.model_states(t, n_gpus, n_params, 2 * n_params, n_params, 0, master=True, grad_size=2)
    _, ds_gpu = estimate_zero2_model_states_mem_needs(n_params, n_gpus, 1, cpu_offload=offload)
    assert sum(gpu.values()) - gpu["buckets"] == ds_gpu  # DeepSpeed leaves its reduce bucket out
    assert gpu["buckets"] == 2 * plan.REDUCE_BUCKET
    assert sum(host.values()) == (16 * n_params // n_gpus if offload else 0)  # m, v, master, fp32 grads


def test_feed_plan_cores_and_cache_size_against_a_real_cache(tmp_path):
    import math

    import numpy as np

    from vidgen import feed
    from vidgen.data import latents
    from vidgen.data.synth import make_moving_shapes

    make_moving_shapes(str(tmp_path / "clips"), 3, 6, 48, 64)
    cfg = tiny_cfg(f"run.workdir={tmp_path}", f"data.source={tmp_path / 'clips'}", "data.height=32",
                   "data.width=32", "model.num_frames=4")
    manifest = latents.prepare_latents(cfg, use_ray=False)
    row = next(latents.read_rows(latents.cache_uri(cfg), manifest))
    stored = sum(v.nbytes for v in row.values() if isinstance(v, np.ndarray))
    assert stored == feed.cache_bytes_per_clip(cfg, clip_embed=row["image_embeds"].shape[-1])

    p = feed.feed_plan(cfg, {"A": 0.5, "B": 0.05}, probe=True)
    assert p["dataset_clips"] == 3 and p["cache_bytes"] == 3 * feed.cache_bytes_per_clip(cfg)
    n, r = p["frames_per_step_per_gpu"], p["decode_fps_per_core"]
    assert n == 2 * 4 and r > 0 and p["decode_rate_source"] == f"probe of {tmp_path / 'clips'} at 32x32 (HxW)"
    for row, step in zip(p["per_gpu"], (0.5, 0.05), strict=True):
        cores = row["clip_cores_per_gpu"]
        assert cores == math.ceil(10 * n * 0.98 / (r * step)) / 10
        assert 1 - cores * r * step / n <= 0.02  # the wait model: the GPU waits at most 2% of the step
    assert p["per_gpu"][1]["clip_cores_per_gpu"] >= p["per_gpu"][0]["clip_cores_per_gpu"]  # faster GPU: more CPUs
    assert "CPU cores per GPU" in "\n".join(feed.format_feed(p))
    with pytest.raises(ConfigError, match="--decode-fps-per-core=-1"):
        feed.feed_plan(cfg, {"A": 0.5}, decode_fps=-1)

    # With data.buckets the probe decodes what training decodes: 64x48 sources go to the nearest bucket.
    bucketed = tiny_cfg(f"run.workdir={tmp_path}", f"data.source={tmp_path / 'clips'}", "data.buckets=32x24,24x32",
                        "model.num_frames=4")
    rate, source = feed.probe_decode(bucketed)
    assert rate > 0 and source == f"probe of {tmp_path / 'clips'} at 24x32 (HxW)"
