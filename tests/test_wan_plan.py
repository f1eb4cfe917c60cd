"""`vidgen plan`'s meta-device step on a tiny Wan with LoRA: with activation checkpointing its activations are what a
real step holds (the block inputs, one block's recompute at a time), not every block's recomputed tensors at once.

Shapes: B batch, F pixel frames, L latent frames, C latent channels, H/W pixels, h/w latents, N tokens, D width.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vidgen import plan
from vidgen.config import LoraConfig
from vidgen.models import lora
from vidgen.models.wan import model as wm
from vidgen.models.wan.plan import WanPlanner

B, F, H, W = 1, 5, 64, 64  # 2 latent frames of 8x8: N = 2 * 4 * 4 = 32 tokens after the 1x2x2 patches
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def lora_wan(layers: int, device: str) -> SimpleNamespace:
    """A tiny Wan with `layers` transformer blocks and LoRA on the attention and feed-forward, as wan_lora trains
    it; shaped like a recipe for `plan.run_step`."""
    configs = wm.tiny_configs()
    configs["transformer"] = configs["transformer"] | {"num_layers": layers}
    with torch.device(device):
        m = wm.from_configs(configs, wm.ByteTokenizer(16), 16, seed=0)
    lora.inject_lora(m.transformer, LoraConfig(rank=4, target_modules=TARGETS))
    m.transformer.train()
    return SimpleNamespace(model=m, unet=m.transformer)


def cpu_step_peak(r: SimpleNamespace, checkpointing: bool) -> int:
    """The same micro-step run for real on CPU, no FLOP counter: the peak of the live storages it makes once the
    encodings exist (what `run_step` reports as unet_peak), gradients freed as they come (ZeRO-2)."""
    m, unet, planner = r.model, r.unet, WanPlanner()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    live = plan._LiveBytes(plan._storage_keys(unet, m.vae, m.text_encoder))
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in unet.parameters() if p.requires_grad]
    with live, torch.no_grad():  # planner.encode's passes, on CPU
        latents = m.vae.encode(torch.zeros(B, 3, F, H, W)).latent_dist.mode()
        enc = {"latents": latents, "embeds": m.text_encoder(torch.zeros(B, 16, dtype=torch.long)).last_hidden_state}
    live.peak = live.now
    with live:
        loss = planner.unet_loss(unet, enc, B, F)
        del enc, latents
        loss.backward()
    for h in hooks:
        h.remove()
    return live.peak


@pytest.mark.parametrize("checkpointing", [True, False])
def test_meta_step_activations_equal_a_real_cpu_steps(checkpointing):
    meta = plan.run_step(lora_wan(4, "meta"), WanPlanner(), B, F, H, W, checkpointing=checkpointing,
                         keep_grads=False)
    assert meta["recompute_flops"] > 0 if checkpointing else meta["recompute_flops"] == 0
    # equal but for the GPU kernel's RNG seed and offset (two int64 scalars an attention saves, the CPU one none;
    # N = 32 also fills its log-sum-exp, which it pads to 32 queries)
    attention_rng = 16 * 2 * (1 if checkpointing else 4)  # self- and cross-attention of one block or of all four
    assert meta["unet_peak"] - cpu_step_peak(lora_wan(4, "cpu"), checkpointing) == attention_rng


def test_checkpointed_activations_grow_by_one_block_input_a_block():
    def peak(layers: int, checkpointing: bool) -> int:
        return plan.run_step(lora_wan(layers, "meta"), WanPlanner(), B, F, H, W, checkpointing=checkpointing,
                             keep_grads=False)["unet_peak"]

    block_input = B * 32 * 24 * 4  # [B, N, D] fp32: N tokens, D = 2 heads x 12
    assert peak(6, True) - peak(2, True) == 4 * block_input
    # without checkpointing each block keeps everything its backward needs: many times its input
    assert peak(6, False) - peak(2, False) > 20 * 4 * block_input
