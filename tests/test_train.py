"""The svd_full recipe: trainable sets and the loss, without Ray (fits are in test_train_core.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen.config import load_config


def config(tmp_path, name: str, *overrides: str):
    return load_config(None, [
        f"run.workdir={tmp_path}", f"run.name={name}", "model.num_frames=4", "train.num_workers=2",
        "train.lr=1e-3", "train.keep_checkpoints=2", *overrides,
    ])


def test_fp16_on_cpu_is_refused(tmp_path):
    from vidgen.errors import ConfigError
    from vidgen.train.launch import check

    with pytest.raises(ConfigError, match="train.precision=fp16: DeepSpeed has no fp16 on CPU"):
        check(config(tmp_path, "x", "train.precision=fp16"))


def test_temporal_recipe_trains_only_temporal_blocks():
    from vidgen.models.registry import build_recipe

    cfg = load_config(None, ["model.num_frames=4", "train.trainable=temporal"])
    recipe = build_recipe(cfg.model, cfg.train, seed=0)
    names = [n for n, p in recipe.unet.named_parameters() if p.requires_grad]
    assert names and all("temporal_transformer_block" in n for n in names)
    assert not any(p.requires_grad for p in recipe.model.vae.parameters())
    total = sum(p.numel() for p in recipe.unet.parameters())
    assert 0 < sum(p.numel() for p in recipe.trainable_parameters()) < total


def test_loss_is_deterministic_and_reacts_to_the_data():
    from vidgen.models.registry import build_recipe

    cfg = load_config(None, ["model.num_frames=4"])
    recipe = build_recipe(cfg.model, cfg.train, seed=0)
    unet = recipe.unet

    def unet_fn(x, t, ehs, ids):
        return unet(x, t, encoder_hidden_states=ehs, added_time_ids=ids).sample

    rng = np.random.default_rng(1)
    batch = {"frames": torch.from_numpy(rng.integers(0, 256, (2, 4, 64, 64, 3), dtype=np.uint8)),
             "fps": torch.tensor([7.0, 10.0])}
    l1, _ = recipe.loss(batch, unet_fn, torch.Generator().manual_seed(3))
    l2, _ = recipe.loss(batch, unet_fn, torch.Generator().manual_seed(3))
    assert torch.equal(l1, l2)
    other = dict(batch, frames=torch.flip(batch["frames"], dims=[2]))
    l3, _ = recipe.loss(other, unet_fn, torch.Generator().manual_seed(3))
    assert not torch.equal(l1, l3)
    l1.backward()
    assert all(p.grad is not None for p in recipe.trainable_parameters()[:5])
