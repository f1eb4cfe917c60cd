"""Training core: parity with a plain PyTorch step, resume, validation, EMA, schedules (killed workers:
tests/faults/test_train_faults.py)."""

from __future__ import annotations

import json
import math
import os
import uuid

import numpy as np
import pytest
import torch

from vidgen import plan
from vidgen.config import load_config
from vidgen.errors import ConfigError
from vidgen.train import launch, loop
from vidgen.train.launch import check, fit, user_deepspeed_config


def constant_clips(n: int = 8, frames: int = 4, size: int = 64):
    import ray

    clip = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    return ray.data.from_items([{"frames": clip, "fps": 7.0} for _ in range(n)]), clip


def config(tmp_path, *overrides: str):
    return load_config(None, [f"run.workdir={tmp_path}", f"run.name=t-{uuid.uuid4().hex[:8]}",
                              "model.num_frames=4", "train.num_workers=2", "train.lr=1e-3", *overrides])


# ---- pure parts -------------------------------------------------------------------------------


def test_deepspeed_config_from_vidgen_config():
    t = load_config(None, ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                           "train.gradient_accumulation=4", "train.batch_size=2", "train.precision=bf16",
                           "train.max_grad_norm=0.5"]).train.model_dump()
    ds = loop.deepspeed_config(t, world_size=8, on_cpu=False, user={"zero_optimization": {"reduce_bucket_size": 7}})
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 7
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert "stage3_max_reuse_distance" not in ds["zero_optimization"]  # the CPU-only tweaks
    assert "contiguous_gradients" not in ds["zero_optimization"]  # DeepSpeed's default (on) on a GPU
    on_cpu = loop.deepspeed_config(t, world_size=2, on_cpu=True)["zero_optimization"]
    assert on_cpu["contiguous_gradients"] is False and on_cpu["stage3_max_reuse_distance"] == 0


@pytest.mark.parametrize("overrides, units", [
    (["train.recipe=svd_full"], 18),  # every parameter trains: each resnet and transformer block is a unit
    (["train.recipe=svd_full", "train.trainable=temporal"], 0),
    (["train.recipe=svd_lora"], 0),
])
def test_zero3_leaf_blocks_only_when_the_whole_unet_trains(overrides, units):
    """The blocks a recipe makes ZeRO-3 leaves (`zero3_units`): the outermost of the family's block classes, and
    none when part of the UNet is frozen (DeepSpeed's leaf gradient hook would lose a frozen-fed block's
    gradients)."""
    from vidgen.models.registry import build_recipe
    from vidgen.models.svd.recipes import ZERO3_UNITS

    cfg = load_config(None, ["model.num_frames=4", *overrides])
    recipe = build_recipe(cfg.model, cfg.train, 0)
    names = recipe.deepspeed_overrides().get("zero_optimization", {}).get("leaf_module", {}).get("names", [])
    modules = dict(recipe.unet.named_modules())
    assert sum(type(m).__name__ in ZERO3_UNITS for m in modules.values()) == 18  # the tiny UNet's blocks
    assert len(names) == units and all(type(modules[n]).__name__ in ZERO3_UNITS for n in names)


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 1.0 - 1 / 8, 1.0 - 2 / 8]),
    ("cosine", [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in (0, 1, 2)]),
])
def test_lr_schedules(schedule, expected):
    f = loop.lr_lambda(schedule, warmup=2, max_steps=10)
    assert [f(s) for s in range(5)] == pytest.approx(expected)
    assert f(10) == pytest.approx(1.0 if schedule == "constant" else 0.0)


def test_config_hash_ignores_bookkeeping_only():
    a = load_config(None, []).to_dict()
    b = load_config(None, ["train.max_steps=999", "train.checkpoint_every=3", "train.num_workers=8"]).to_dict()
    c = load_config(None, ["train.lr=0.5"]).to_dict()
    sections = ("edm",)  # svd_full's
    assert loop.config_hash(a["model"], a["train"], sections) == loop.config_hash(b["model"], b["train"], sections)
    assert loop.config_hash(a["model"], a["train"], sections) != loop.config_hash(c["model"], c["train"], sections)


def test_config_hash_keeps_only_the_sections_the_recipe_reads():
    a = load_config(None, []).to_dict()
    other = load_config(None, ["train.ddpm.noise_offset=0.1", "train.lora.rank=8"]).to_dict()
    own = load_config(None, ["train.edm.p_mean=0.5"]).to_dict()
    lora = load_config(None, ["train.lora.export_merged=true"]).to_dict()
    h = loop.config_hash
    assert h(a["model"], a["train"], ("edm",)) == h(other["model"], other["train"], ("edm",))
    assert h(a["model"], a["train"], ("edm",)) != h(own["model"], own["train"], ("edm",))
    assert h(a["model"], a["train"], ("edm", "lora")) != h(other["model"], other["train"], ("edm", "lora"))
    assert h(a["model"], a["train"], ("edm", "lora")) == h(lora["model"], lora["train"], ("edm", "lora"))


def test_bad_training_configs_fail_before_any_worker(tmp_path):
    with pytest.raises(ConfigError, match="train.adam_8bit=true: 8-bit AdamW needs train.use_gpu=true"):
        check(config(tmp_path, "train.adam_8bit=true"))
    with pytest.raises(ConfigError, match="train.offload_params: needs train.zero_stage=3"):
        config(tmp_path, "train.offload_params=true")
    with pytest.raises(ConfigError, match="train.ema: not supported with train.zero_stage=3"):
        config(tmp_path, "train.ema=true", "train.zero_stage=3")
    with pytest.raises(ConfigError, match="train.recipe=lora: model.family=svd trains svd_full, svd_lora$"):
        check(config(tmp_path, "train.recipe=lora"))
    with pytest.raises(ConfigError, match=r"train.recipe=hotshot_temporal: .* \(train.recipe=hotshot_temporal trains "
                       r"model.family=hotshot\)"):
        check(config(tmp_path, "train.recipe=hotshot_temporal"))
    with pytest.raises(ConfigError, match=r"model.family=sora: expected one of hotshot, svd, (toy, )?wan$"):
        check(config(tmp_path, "model.family=sora"))
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"train.deepspeed_config=.*ds.json: not JSON \(line 1"):
        user_deepspeed_config(config(tmp_path, f"train.deepspeed_config={bad}"))
    for section, message in (({"leaf_module": 5}, r"zero_optimization.leaf_module: expected an object with names, "
                                                  r"name_suffixes, classes, got 5$"),
                             ({"leaf_module": {"names": [3]}}, r"zero_optimization.leaf_module.names: expected a "
                                                              r"string or a list of strings, got \[3\]$")):
        bad.write_text(json.dumps({"zero_optimization": section}))
        for cfg in (config(tmp_path, f"train.deepspeed_config={bad}"),
                    config(tmp_path, f"train.deepspeed_config={bad}", "train.zero_stage=3")):
            with pytest.raises(ConfigError, match=r"train.deepspeed_config=.*ds.json: " + message):
                user_deepspeed_config(cfg)  # `vidgen train`, before any worker starts
            with pytest.raises(ConfigError, match=r"train.deepspeed_config=.*ds.json: " + message):
                plan.zero_config(plan._zero_optimization(cfg))  # `vidgen plan`


def test_zero3_on_one_worker_without_parameter_offload_is_flagged_before_any_worker(tmp_path, caplog):
    """One worker's ZeRO-3 partition is the whole model: no memory saved over ZeRO-2, a cost every step."""
    launch._WARNED.clear()
    flagged = {}
    for overrides in (("train.zero_stage=3", "train.num_workers=1"), ("train.zero_stage=2", "train.num_workers=1"),
                      ("train.zero_stage=3", "train.num_workers=2"),
                      ("train.zero_stage=3", "train.num_workers=1", "train.offload_params=true")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="vidgen.train.launch"):
            check(config(tmp_path, *overrides))
        flagged[overrides] = any("train.zero_stage=3 on one worker" in r.getMessage() for r in caplog.records)
    assert list(flagged.values()) == [True, False, False, False]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vidgen.train.launch"):
        check(config(tmp_path, "train.zero_stage=3", "train.num_workers=1"))  # `vidgen train` checks again later
    assert not caplog.records  # said once


def test_trainable_patterns(tmp_path):
    from vidgen.models.registry import build_recipe

    cfg = config(tmp_path, "train.trainable=patterns", "train.trainable_patterns=[conv_in, time_embedding]")
    recipe = build_recipe(cfg.model, cfg.train, 0)
    names = {n for n, p in recipe.unet.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("conv_in", "time_embedding")) for n in names)
    with pytest.raises(ConfigError, match="no UNet parameter name contains"):
        build_recipe(cfg.model, cfg.train.model_copy(update={"trainable_patterns": ["nope"]}), 0)


# ---- on the real stack -------------------------------------------------------------------------


def plain_steps(cfg, clip: np.ndarray, steps: int) -> tuple[list[float], dict]:
    """The same training without Ray or DeepSpeed: both ranks' micro-batches in one process."""
    from vidgen.models.registry import build_recipe

    recipe = build_recipe(cfg.model, cfg.train, cfg.run.seed)
    unet = recipe.unet
    params = recipe.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, eps=1e-8)
    gens = [torch.Generator().manual_seed(loop.rank_seed(cfg.run.seed, r, 0)) for r in range(2)]
    batch = {"frames": torch.from_numpy(clip[None]), "fps": torch.tensor([7.0], dtype=torch.float64)}
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        per_rank = [recipe.loss(batch, lambda x, t, e, i: unet(x, t, e, i).sample, g)[0] for g in gens]
        mean = torch.stack(per_rank).mean()
        mean.backward()  # = DeepSpeed's all-reduce average of the ranks' gradients
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        losses.append(mean.item())
    return losses, {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def one_step_runs(ray_session, tmp_path_factory):
    """One optimizer step under ZeRO-2 and under ZeRO-3 (each export copied aside), built lazily. The ZeRO-3 run
    checkpoints activations: every block of the tiny UNet is a ZeRO-3 leaf that trains (`zero3_units`), so its
    gradients reach DeepSpeed through the block's backward hook, recompute and all."""
    import shutil

    runs = {}

    def get(stage: int):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"zero{stage}")
            ds, clip = constant_clips()
            cfg = config(tmp, f"train.zero_stage={stage}", "train.max_steps=1", "train.checkpoint_every=1",
                         f"train.activation_checkpointing={str(stage == 3).lower()}")
            result = fit(cfg, ds)
            kept = str(tmp / "export-step1")
            shutil.copytree(result.export_dir, kept)
            runs[stage] = (cfg, result, clip, kept)
        return runs[stage]

    return get


@pytest.mark.ray
@pytest.mark.parametrize("stage", [2, 3])
def test_one_step_under_zero_equals_a_plain_pytorch_step(one_step_runs, stage):
    from vidgen.models.svd import model as svd

    cfg, result, clip, export = one_step_runs(stage)
    losses, plain = plain_steps(cfg, clip, 1)
    assert [r["loss"] for r in result.metrics] == pytest.approx(losses, rel=1e-4)
    trained = svd.load_unet(export).state_dict()
    w0 = svd.tiny(num_frames=4).unet.state_dict()
    d_ds = torch.cat([(trained[k] - w0[k]).flatten() for k in w0])
    d_plain = torch.cat([(plain[k] - w0[k]).flatten() for k in w0])
    rel = ((d_ds - d_plain).norm() / d_plain.norm()).item()
    assert d_plain.norm() > 0 and rel < 0.02, f"ZeRO-{stage} update differs from the plain step's by {rel:.2%}"


@pytest.mark.ray
def test_changed_config_refuses_to_resume(one_step_runs):
    from vidgen.errors import JobError

    cfg, _, _, _ = one_step_runs(2)
    ds, _ = constant_clips()
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 3, "lr": 0.5,
                                                                           "max_failures": 0})})
    with pytest.raises(JobError, match="written with another model/training config") as e:
        fit(changed, ds)
    assert "training run" not in str(e.value), "refused by the workers, not before they started"


@pytest.mark.ray
def test_validation_ema_accumulation_and_schedule(ray_session, tmp_path):
    from vidgen.data.video import read_video
    from vidgen.models.svd import model as svd

    ds, clip = constant_clips()
    cfg = config(tmp_path, "train.zero_stage=2", "train.max_steps=4", "train.checkpoint_every=2",
                 "train.gradient_accumulation=2", "train.lr_schedule=cosine", "train.warmup_steps=1",
                 "train.ema=true", "train.ema_decay=0.5", "train.validation_every=2", "train.validation_steps=2",
                 "train.activation_checkpointing=true")
    videos: dict[int, list[str]] = {}
    result = fit(cfg, ds, validation_images=[clip[0]], on_artifacts=lambda s, p: videos.setdefault(s, p))
    rows = result.metrics
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    f = loop.lr_lambda("cosine", 1, 4)
    # the lr a step used is the scheduler's value after that step (DeepSpeed steps the scheduler)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f(s) for s in range(1, 5)])
    for r in rows:
        assert r["grad_norm"] > 0 and r["samples_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
    # each row's time is when its step ended: the gap to the step before is that step's time, and after a step
    # that validated and saved (every 2nd) also their time, which step_time_s leaves out
    gaps = {b["step"]: (b["time"] - a["time"], b["step_time_s"]) for a, b in zip(rows, rows[1:])}
    assert [gaps[s][0] for s in (2, 4)] == pytest.approx([gaps[s][1] for s in (2, 4)], abs=0.01), gaps
    assert gaps[3][0] > gaps[3][1] + 0.01, gaps
    assert sorted(videos) == [2, 4]
    frames, _ = read_video(videos[4][0])
    assert frames.shape == (4, 64, 64, 3)
    raw, ema = svd.load_unet(result.export_dir), svd.load_unet(result.export_dir + "_ema")
    diff = max((a - b).abs().max().item() for a, b in zip(raw.parameters(), ema.parameters()))
    assert diff > 0, "EMA weights equal the raw weights"


@pytest.mark.ray
def test_exported_unet_generates_in_the_diffusers_pipeline(one_step_runs):
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    from vidgen.models.svd import model as svd

    _, _, clip, export = one_step_runs(2)
    m = svd.tiny(num_frames=4, cfg=svd.TinySVDConfig(clip_image_size=224, clip_patch_size=32))
    pipe = StableVideoDiffusionPipeline(vae=m.vae, image_encoder=m.image_encoder, unet=svd.load_unet(export),
                                        scheduler=m.scheduler, feature_extractor=m.feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(Image.fromarray(clip[0]), height=64, width=64, num_frames=4, num_inference_steps=2,
                  output_type="np").frames[0]
    assert frames.shape == (4, 64, 64, 3) and np.isfinite(frames).all()


def test_fault_env_is_forwarded_to_workers(monkeypatch):
    from vidgen.train.launch import worker_runtime_env

    assert os.environ.get("VIDGEN_FAULT_TRAIN") is None
    monkeypatch.setenv("VIDGEN_FAULT_TRAIN", "0:1@/shared/marker")
    assert worker_runtime_env(False)["VIDGEN_FAULT_TRAIN"] == "0:1@/shared/marker"


def test_missing_data_fails_before_any_worker(tmp_path):
    from vidgen.errors import DataError, JobError
    from vidgen.runner import train_job
    from vidgen.tracking import Tracker

    tracker = Tracker("sqlite:///unused.db", "x", "x", enabled=False)
    with pytest.raises(JobError, match="data.source: required"):
        train_job(config(tmp_path), tracker)
    with pytest.raises(DataError, match="nowhere"):
        train_job(config(tmp_path, f"data.source={tmp_path / 'nowhere'}"), tracker)


def test_validation_inputs_take_the_largest_bucket_when_data_is_bucketed(tmp_path):
    """With data.buckets, height x width are unused: validation samples at the largest bucket."""
    from vidgen.data.layouts import list_samples
    from vidgen.data.synth import make_moving_shapes
    from vidgen.runner import validation_images

    make_moving_shapes(str(tmp_path / "clips"), 2, 4, 40, 72)
    samples = list_samples(str(tmp_path / "clips"), "auto")
    svd = config(tmp_path, "data.buckets=32x24,48x40,24x32")  # WxH: the largest is 40 high, 48 wide
    assert svd.data.largest_size() == (40, 48)
    images = validation_images(svd, samples)
    assert [im.shape for im in images] == [(40, 48, 3)] * 2
    assert [im.shape for im in validation_images(config(tmp_path), samples)] == [(64, 64, 3)] * 2  # no buckets
    assert config(tmp_path, "data.buckets=hotshot-512").data.largest_size() == (512, 512)


def test_a_build_lock_left_by_a_dead_builder_is_removed_a_live_one_kept(tmp_path, monkeypatch, caplog):
    """torch waits forever on an extension's build lock: one left by a killed worker must not hang later runs."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    built_at = lock.stat().st_mtime
    assert not loop.clear_stale_build_lock("cpu_adam", now=built_at + 60) and lock.exists()  # a build in progress
    with caplog.at_level("WARNING"):
        assert loop.clear_stale_build_lock("cpu_adam", now=built_at + loop.STALE_BUILD_LOCK_S + 1)
    assert not lock.exists() and "left by a build that died" in caplog.text
    assert not loop.clear_stale_build_lock("cpu_adam")  # nothing left to remove


def test_a_worker_loads_deepspeed_without_mlflow_and_mlflow_stays_importable():
    """DeepSpeed's autotuner imports MLflow for itself, seconds of a worker's start-up that nothing uses."""
    import subprocess
    import sys

    code = ("import sys; from vidgen.train.loop import import_deepspeed; ds = import_deepspeed(); "
            "from deepspeed.autotuning import autotuner; "
            "print(ds.__name__, 'mlflow' in sys.modules, autotuner.has_mlflow); "
            "import mlflow; print(mlflow.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["deepspeed", "False", "False", "mlflow"], p.stdout
