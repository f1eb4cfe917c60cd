"""SVD LoRA: parameter count, frozen base, ZeRO-2/3 on the real stack, checkpoints, resume, export round trip."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.errors import ConfigError, ModelError
from vidgen.models import lora
from vidgen.models.svd import model as svd
from vidgen.train import loop

LORA_CFG = load_config(None, []).train.lora  # rank 4, alpha = rank, to_q/to_k/to_v/to_out.0
# KEY_BLIND: SVD's cross-attention (attn2) attends to one CLIP token; a softmax over one key is 1 whatever the
# query and key, so to_q and to_k of attn2 do not affect the output: their LoRA gradients are 0 (or rounding).
KEY_BLIND = (".attn2.to_q.", ".attn2.to_k.")


def config(tmp_path, *overrides: str):
    return load_config(None, [f"run.workdir={tmp_path}", f"run.name=t-{uuid.uuid4().hex[:8]}",
                              "model.num_frames=4", "train.num_workers=2", "train.lr=1e-3",
                              "train.recipe=svd_lora", *overrides])


def unet_inputs(seed: int = 0):
    """One fixed UNet call: sample [B, F, 8, h, w], sigma-derived timestep, CLIP embedding, time ids."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, 8, generator=g), torch.tensor([0.3]), torch.randn(1, 1, 32, generator=g),
            torch.tensor([[6.0, 127.0, 0.02]]))


@torch.no_grad()
def out(unet, inputs) -> torch.Tensor:
    return unet.eval()(*inputs).sample


# ---- pure parts -------------------------------------------------------------------------------


def test_trainable_count_equals_the_formula_for_the_targeted_layers():
    unet = svd.tiny(num_frames=4).unet
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0")
    targeted = {n: m for n, m in linears.items() if n.endswith(suffixes)}
    expected = sum(4 * (m.in_features + m.out_features) for m in targeted.values())
    assert expected == 28_160  # measured in shared/reference/cpu-testing.md for this model and config
    base = sum(p.numel() for p in unet.parameters())
    assert lora.lora_parameter_count(unet, LORA_CFG) == expected
    names = lora.inject_lora(unet, LORA_CFG)
    assert sorted(names) == sorted(targeted)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert sum(p.numel() for p in unet.parameters()) == base + expected
    assert all(".lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())


def test_scope_and_patterns_select_layers_and_bad_targets_fail():
    unet = svd.tiny(num_frames=4).unet
    count = {s: lora.lora_parameter_count(unet, LORA_CFG.model_copy(update={"scope": s}))
             for s in ("all", "spatial", "temporal")}
    assert count["spatial"] > 0 and count["temporal"] > 0 and count["spatial"] + count["temporal"] == count["all"]
    temporal = lora.target_names(unet, LORA_CFG.model_copy(update={"scope": "temporal"}))
    assert temporal and all("temporal_transformer_blocks" in n for n in temporal)
    only_q = lora.target_names(unet, LORA_CFG.model_copy(update={"patterns": ["attn1.to_q"]}))
    assert only_q and all(n.endswith("attn1.to_q") for n in only_q)
    with pytest.raises(ConfigError, match="train.lora.target_modules: .*to_out is a ModuleList, expected Linear"):
        lora.target_names(unet, LORA_CFG.model_copy(update={"target_modules": ["to_out"]}))
    with pytest.raises(ConfigError, match="train.lora: no Linear layer matches"):
        lora.target_names(unet, LORA_CFG.model_copy(update={"patterns": ["nowhere"]}))


def test_injection_on_the_meta_device_full_size_svd():
    from accelerate import init_empty_weights
    from diffusers import UNetSpatioTemporalConditionModel

    cfg = LORA_CFG.model_copy(update={"rank": 16})
    with init_empty_weights():
        unet = UNetSpatioTemporalConditionModel()  # SVD's own sizes, no memory
    count = lora.lora_parameter_count(unet, cfg)
    names = lora.inject_lora(unet, cfg)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(names) == 256 and sum(p.numel() for p in trainable) == count == 6_639_616
    assert all(p.is_meta for p in trainable)


def test_bf16_base_keeps_fp32_adapters_and_their_gradients():
    unet = svd.tiny(num_frames=4).unet
    lora.inject_lora(unet, LORA_CFG)
    for p in unet.parameters():  # what SVDLoraRecipe.to does on a GPU with train.precision=bf16
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():  # B = 0 at init: give the adapters an effect so that A gets gradients too
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    x, t, e, ids = unet_inputs()
    unet.train()(x.bfloat16(), t.bfloat16(), e.bfloat16(), ids.bfloat16()).sample.float().square().mean().backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    zero = {n for n, g in grads.items() if not g.abs().sum().item() > 0}
    assert all(any(b in n for b in KEY_BLIND) for n in zero), sorted(zero)[:4]
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def test_load_rejects_what_is_not_a_lora(tmp_path):
    with pytest.raises(ModelError, match="no such LoRA file or directory"):
        lora.load_lora(svd.tiny(num_frames=4).unet, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no adapter_model.safetensors or pytorch_lora_weights.safetensors"):
        lora.load_lora(svd.tiny(num_frames=4).unet, str(tmp_path / "empty"))


# ---- on the real stack -------------------------------------------------------------------------


def constant_clips(n: int = 8):
    import ray

    clip = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    return ray.data.from_items([{"frames": clip, "fps": 7.0} for _ in range(n)])


@pytest.fixture(scope="module")
def lora_runs(ray_session, tmp_path_factory):
    """A LoRA fit through Ray Train + DeepSpeed (1 step, merged export too) with the workers' final UNet state
    dumped by rank 0 (loop.DUMP_ENV); built lazily, once per module per ZeRO stage. The tests use ZeRO-3, the
    stage where the adapters are partitioned too (every fit costs ~40 s on 2 cores; ZeRO-2 full fine-tuning is
    covered in test_train_core.py and the fault suite, with the same checkpoint code)."""
    from vidgen.train.launch import fit

    runs = {}

    def get(stage: int):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"lora-zero{stage}")
            dump = tmp / "final_state.pt"
            cfg = config(tmp, f"train.zero_stage={stage}", "train.max_steps=1",
                         "train.lora.export_merged=true")  # one checkpoint, at the end
            os.environ[loop.DUMP_ENV] = str(dump)
            try:
                result = fit(cfg, constant_clips())
            finally:
                del os.environ[loop.DUMP_ENV]
            kept = tmp / "lora-export"
            shutil.copytree(result.export_dir, kept)  # a resumed run rewrites the export
            ckpt = tmp / "ckpt"
            shutil.copytree(result.checkpoint_dir, ckpt)
            runs[stage] = (cfg, result, torch.load(dump), kept, ckpt)
        return runs[stage]

    return get


def lora_keys(unet) -> set[str]:
    return {n for n, _ in unet.named_parameters() if ".lora_" in n}


@pytest.mark.ray
@pytest.mark.parametrize("stage", [3])
def test_only_lora_tensors_change_and_checkpoints_hold_only_them(lora_runs, stage):
    from vidgen.train.launch import consolidated_state_dict

    cfg, result, final, _, ckpt = lora_runs(stage)
    assert [r["step"] for r in result.metrics] == list(range(1, cfg.train.max_steps + 1))
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in result.metrics)
    base = svd.tiny(num_frames=4).unet.state_dict()
    fresh = svd.tiny(num_frames=4).unet
    lora.inject_lora(fresh, cfg.train.lora)
    expected = lora_keys(fresh)
    assert set(final) == set(fresh.state_dict())
    for k, v in final.items():
        if ".lora_" not in k:  # the wrapped layers' weights live under `.base_layer.` now
            assert torch.equal(v, base[k.replace(".base_layer.", ".")]), f"frozen tensor {k} changed"
    unchanged = {k for k in expected if torch.equal(final[k], fresh.state_dict()[k])}
    assert all(any(b in n for b in KEY_BLIND) for n in unchanged), sorted(unchanged)[:4]
    assert all(final[k].dtype == torch.float32 for k in expected)

    state = consolidated_state_dict(str(ckpt))
    assert set(state) == expected, "the checkpoint holds other tensors than the LoRA ones"
    for k in expected:
        torch.testing.assert_close(state[k], final[k], rtol=0, atol=0)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert size < 2_000_000, f"checkpoint is {size} bytes: the frozen base was saved"


@pytest.mark.ray
def test_rerun_resumes_a_lora_run(lora_runs):
    from vidgen.train.launch import fit

    cfg, _, final, _, _ = lora_runs(3)
    train = cfg.train.model_copy(update={"max_steps": 2, "lora": cfg.train.lora.model_copy(
        update={"export_merged": False})})
    result = fit(cfg.model_copy(update={"train": train}), constant_clips())
    assert [r["step"] for r in result.metrics] == [2], "did not resume from the step-1 LoRA checkpoint"
    exported = lora.read_adapter(result.export_dir)[0]
    step1 = {k.replace(".default.", "."): v for k, v in final.items() if ".lora_" in k}
    assert exported.keys() == step1.keys() and any(not torch.equal(exported[k], step1[k]) for k in step1)


@pytest.mark.ray
def test_export_round_trip_into_a_fresh_pipeline(lora_runs):
    from diffusers import StableVideoDiffusionPipeline

    cfg, result, final, export, _ = lora_runs(3)
    assert {p.name for p in export.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                 "pytorch_lora_weights.safetensors"}
    inputs = unet_inputs()
    trained = svd.tiny(num_frames=4).unet  # the model as the workers held it after training
    lora.inject_lora(trained, cfg.train.lora)
    trained.load_state_dict(final)
    base_out, trained_out = out(svd.tiny(num_frames=4).unet, inputs), out(trained, inputs)

    m = svd.tiny(num_frames=4, seed=cfg.run.seed)
    pipe = StableVideoDiffusionPipeline(vae=m.vae, image_encoder=m.image_encoder, unet=m.unet,
                                        scheduler=m.scheduler, feature_extractor=m.feature_extractor)
    wrapped = lora.load_lora(pipe.unet, str(export))
    assert len(wrapped) == 96
    loaded_out = out(pipe.unet, inputs)
    torch.testing.assert_close(loaded_out, trained_out, rtol=1e-5, atol=1e-6)
    assert (loaded_out - base_out).abs().max() > 1e-4, "the LoRA has no effect"

    lora.set_lora_scale(pipe.unet, 0.0)
    torch.testing.assert_close(out(pipe.unet, inputs), base_out, rtol=1e-5, atol=1e-6)
    lora.set_lora_scale(pipe.unet, 0.5)  # the update is linear in the scale
    torch.testing.assert_close(out(pipe.unet, inputs) - base_out, 0.5 * (trained_out - base_out),
                               rtol=1e-3, atol=1e-5)

    merged = svd.load_unet(result.merged_dir)  # the fit's merged export: a plain diffusers UNet
    assert not lora_keys(merged)
    torch.testing.assert_close(out(merged, inputs), trained_out, rtol=1e-5, atol=1e-5)
    for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):  # either file alone
        unet = svd.tiny(num_frames=4).unet
        lora.load_lora(unet, str(export / name))
        torch.testing.assert_close(out(unet, inputs), trained_out, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_export_files_are_readable_by_peft_and_diffusers(lora_runs):
    import json

    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig

    cfg, _, final, export, _ = lora_runs(3)
    peft_cfg = LoraConfig.from_pretrained(str(export))
    assert peft_cfg.r == 4 and peft_cfg.lora_alpha == 4 and len(peft_cfg.target_modules) == 96
    sd, _, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(export), return_lora_metadata=True)
    expected = {"unet." + k.replace(".default.", ".") for k in final if ".lora_" in k}
    assert set(sd) == expected and meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4
    assert json.loads(Path(export, "adapter_config.json").read_text())["peft_type"] == "LORA"
