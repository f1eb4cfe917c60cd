"""Wan recipes on the real stack: one optimizer step on 2 CPU Ray workers under DeepSpeed equals the same step in
plain PyTorch (both ranks' micro-batches in one process), wan_lora under ZeRO-2 (with a validation video) and wan_full
under ZeRO-3."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.train import loop
from vidgen.train.launch import fit

CLIP = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)


def plain_step(cfg) -> tuple[float, dict]:
    from vidgen.models.registry import build_recipe

    recipe = build_recipe(cfg.model, cfg.train, cfg.run.seed)
    unet, params = recipe.unet, recipe.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, eps=1e-8)
    gens = [torch.Generator().manual_seed(loop.rank_seed(cfg.run.seed, r, 0)) for r in range(2)]
    batch = {"frames": torch.from_numpy(CLIP[None]), "fps": torch.tensor([8.0]), "prompt": ["a red car"]}

    def unet_fn(*args, **kwargs):
        return unet(*args, return_dict=False, **kwargs)[0]

    mean = torch.stack([recipe.loss(batch, unet_fn, g)[0] for g in gens]).mean()
    mean.backward()  # = DeepSpeed's all-reduce average of the ranks' gradients
    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    opt.step()
    return mean.item(), {n.replace(".default.", "."): p.detach().clone()
                         for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.ray
@pytest.mark.parametrize("recipe, stage", [("wan_lora", 2), ("wan_full", 3)])
def test_one_wan_step_under_zero_equals_a_plain_pytorch_step(ray_session, tmp_path, recipe, stage):
    import ray

    from vidgen.models import registry

    overrides = [f"run.workdir={tmp_path}", f"run.name=wan-{uuid.uuid4().hex[:8]}", "model.family=wan",
                 "model.flavor=tiny", "model.num_frames=5", f"train.recipe={recipe}", f"train.zero_stage={stage}",
                 "train.num_workers=2", "train.lr=1e-3", "train.max_steps=1", "train.checkpoint_every=1",
                 "train.lora.rank=2", "data.height=32", "data.width=32"]
    ds = ray.data.from_items([{"frames": CLIP, "fps": 8.0, "prompt": "a red car"} for _ in range(4)])
    videos: list[str] = []
    validation = ["train.validation_every=1", "train.validation_steps=2"] if stage == 2 else []
    cfg = load_config(None, [*overrides, *validation])
    result = fit(cfg, ds, validation_images=["a red car"], on_artifacts=lambda step, paths: videos.extend(paths))
    loss, plain = plain_step(cfg)
    assert [r["loss"] for r in result.metrics] == pytest.approx([loss], rel=1e-4)
    if validation:  # rank 0 sampled the prompt with the weights being trained: 5 frames from 2 latent frames
        from vidgen.data.video import read_video

        assert len(videos) == 1 and read_video(videos[0])[0].shape == (5, 32, 32, 3)

    base = registry.build_recipe(cfg.model, cfg.train, cfg.run.seed)  # the weights before the step
    w0 = {n.replace(".default.", "."): p.detach() for n, p in base.unet.named_parameters() if p.requires_grad}
    if recipe == "wan_lora":  # PEFT keys <module>.lora_A.weight
        trained = _read_peft(result.export_dir)
    else:
        from diffusers import WanTransformer3DModel

        trained = dict(WanTransformer3DModel.from_pretrained(result.export_dir).named_parameters())
    d_ds = torch.cat([(trained[k].detach() - w0[k]).flatten() for k in w0])
    d_plain = torch.cat([(plain[k] - w0[k]).flatten() for k in w0])
    rel = ((d_ds - d_plain).norm() / d_plain.norm()).item()
    assert d_plain.norm() > 0 and rel < 0.02, f"ZeRO-{stage} update differs from the plain step's by {rel:.2%}"


def _read_peft(export_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from vidgen.models import lora

    state = load_file(f"{export_dir}/{lora.PEFT_WEIGHTS}")
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}


@pytest.mark.ray
def test_a_killed_wan_worker_resumes_from_its_checkpoint_losing_no_step(ray_session, tmp_path):
    """The fault suite's kill, on Wan: rank 1 dies right after step 2 (before that step's checkpoint); the restart
    resumes from step 1's checkpoint and trains step 2 once more, each step reaching the metrics once."""
    import os

    import ray

    from vidgen import faults

    marker = tmp_path / "killed"
    cfg = load_config(None, [f"run.workdir={tmp_path}", f"run.name=wank-{uuid.uuid4().hex[:8]}", "model.family=wan",
                             "model.flavor=tiny", "model.num_frames=5", "train.recipe=wan_lora",
                             "train.zero_stage=2", "train.num_workers=2", "train.max_steps=2",
                             "train.checkpoint_every=1", "train.max_failures=2", "train.lora.rank=2",
                             "data.height=32", "data.width=32"])
    ds = ray.data.from_items([{"frames": CLIP, "fps": 8.0, "prompt": "a red car"} for _ in range(8)])
    os.environ[faults.env_name("TRAIN")] = f"1:2@{marker}"
    try:
        result = fit(cfg, ds)
    finally:
        del os.environ[faults.env_name("TRAIN")]
    assert faults.fired(str(marker)) == {0}, "the kill was not injected"
    assert [r["step"] for r in result.metrics] == [1, 2] and all(np.isfinite(r["loss"]) for r in result.metrics)
    state = torch.load(f"{result.checkpoint_dir}/step00000002/mp_rank_00_model_states.pt", weights_only=True)
    assert state["step"] == 2 and state["batches_seen"] == [2, 2], "a step trained twice or data counted twice"
    assert _read_peft(result.export_dir), "no LoRA exported after the restart"
