"""vidgen's FIFO+ options held against the YCmove fork's own code (github YCmove/FIFO-Diffusion_public @ b6226b0).

Shapes: B batch (1), Q queue slots, F window frames, C latent channels, h/w latent size.

Each reference below restates, in a few lines written for this test, what the fork's code does; vidgen's
implementation must give the same numbers. Where vidgen departs on purpose, the reference takes the fork's
choice as a parameter and the test shows that the departure is the only difference:
- Q-cache (`lvdm/modules/attention.py:171-175`, `lvdm/modules/networks/openaimodel3d.py:632-702`): the query of
  each output block's temporal self-attention is mixed with the query its `out2in` table names; vt is 1.0 there
  (a full replacement), a parameter in vidgen.
- Queue and seeding (`scripts/evaluation/funcs.py`: `prepare_latents` 15-53, `fifo_ddim_sampling` 189-322):
  the fork seeds once, before the first iteration, from queue slot 0 (base frame 0 still at the first noise
  level, decoded as it is); vidgen seeds from the first emitted (clean) frame, and only when asked (the fork's
  test at funcs.py:246 is always true).
"""

from __future__ import annotations

import pytest
import torch

from vidgen.diffusion.fifo import FifoPlan, fifo_iterate, init_queue
from vidgen.diffusion.noise import randn

# ------------------------------------------------------------------------------------------------ Q-cache

# openaimodel3d.py:632: output block -> input block whose temporal q it reuses (VideoCrafter: 4 levels of
# 2 input layers, attention on the first 3 levels).
FORK_OUT2IN = {0: None, 1: None, 2: None, 3: 8, 4: 7, 5: 7, 6: 5, 7: 4, 8: 4, 9: 2, 10: 1, 11: 1}


def _fork_shaped_unet():
    """A tiny SVD UNet laid out as the fork's VideoCrafter UNet: 4 levels x 2 layers, attention on 3."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
        cross_attention_dim=16, num_attention_heads=2, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, num_frames=4).eval()


def _fork_blocks(blocks, extra: int) -> list:
    """The fork's flat block list (openaimodel3d.py `__init__`) as the temporal attn1 of each block or None:
    input blocks are conv_in, then per level its layers and a downsample (not after the last level);
    output blocks are, per level from the deepest, its layers + 1 (`extra`)."""
    out = [] if extra else [None]
    for level, block in enumerate(blocks):
        attns = getattr(block, "attentions", None)
        for i in range(len(block.resnets)):
            out.append(attns[i].temporal_transformer_blocks[0].attn1 if attns else None)
        if not extra and level < len(blocks) - 1:
            out.append(None)
    return out


def _fork_qcache_forward(unet, args, vt: float) -> torch.Tensor:
    """One forward with the fork's rule: q_out <- (1 - vt) * q_out + vt * q_in[out2in[out]], via hooks on the
    stock attention's to_q (mixing after the head split, as the fork does, is the same linear map)."""
    from vidgen.models.svd.pipeline import unet_forward_per_frame

    inputs, outputs = _fork_blocks(unet.down_blocks, 0), _fork_blocks(unet.up_blocks, 1)
    assert len(inputs) == len(outputs) == len(FORK_OUT2IN)  # the UNet has the fork's layout
    cache: dict[int, torch.Tensor] = {}
    hooks = []
    for idx, attn in enumerate(inputs):
        if attn is not None:
            hooks.append(attn.to_q.register_forward_hook(lambda m, i, q, idx=idx: cache.__setitem__(idx, q)))
    for o, src in FORK_OUT2IN.items():
        if src is not None:
            hooks.append(outputs[o].to_q.register_forward_hook(
                lambda m, i, q, src=src: (1 - vt) * q + vt * cache[src]))
    try:
        with torch.no_grad():
            return unet_forward_per_frame(unet, *args)
    finally:
        for h in hooks:
            h.remove()


def test_qcache_matches_the_forks_query_mix():
    from vidgen.models.svd.pipeline import unet_forward_per_frame
    from vidgen.models.svd.qcache import install_qcache

    unet = _fork_shaped_unet()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 4, 4, generator=g), torch.tensor([[0.1, 0.4, 0.7, 1.0]]),  # FIFO: a t per frame
            torch.randn(1, 1, 16, generator=g), torch.tensor([[6.0, 127.0, 0.02]]))
    weights = (1.0, 0.5)  # the fork's hard-coded full replacement, and a weighted mix
    fork = {vt: _fork_qcache_forward(unet, args, vt) for vt in weights}  # on the stock processors
    for vt in weights:
        assert install_qcache(unet, vt) == 9  # every output layer of the 3 attention levels
        with torch.no_grad():
            ours = unet_forward_per_frame(unet, *args)
        torch.testing.assert_close(ours, fork[vt], rtol=1e-5, atol=1e-5)
    assert (fork[1.0] - fork[0.5]).abs().max() > 1e-3  # the mix, and its weight, change the output


# ------------------------------------------------------------------------------------- queue and seeding


def _fork_fifo(denoise, cond, video, levels, f, n, lookahead, unilatent, new_len, noise, seed_at, reseed):
    """The fork's `fifo_ddim_sampling` in sigma form with eta = 0 (the fork defaults to eta = 1, stochastic).

    `video` [B, F, C, h, w] is the base video; `levels` ascending sigmas (levels[0] = 0); `noise` yields the
    initial noise [B, Q, C, h, w] then one tail [B, C, h, w] per iteration. `seed_at`: "initial" (the fork:
    slot 0 before the loop), "first_output" (vidgen) or None. Returns the kept frames (the last new_len).
    """
    nf = f * n
    dummy = f // 2 if lookahead else 0
    frames = [0] * dummy  # prepare_latents: LD dummies are frame 0 at ddim index 0
    frames += [i // (nf // f) if unilatent else max(0, i - (nf - f)) for i in range(nf)]
    index = [0] * dummy + list(range(nf))  # ddim index of each slot: sigma levels[k + 1], stepping to levels[k]
    sigma = levels[torch.tensor(index) + 1]
    latents = video[:, frames] + sigma.view(1, -1, 1, 1, 1) * next(noise)
    if seed_at == "initial":
        cond = reseed(latents[:, 0], cond)
    out = []
    for i in range(new_len + nf - f):
        for rank in reversed(range(2 * n if lookahead else n)):
            start = rank * (f // 2) if lookahead else rank * f
            mid, end = start + f // 2, start + f
            x, s_from = latents[:, start:end], sigma[start:end]
            s_to = levels[torch.tensor(index[start:end])]
            x0 = denoise(x, s_from.expand(1, -1), cond)
            step = x0 + (s_to / s_from).view(1, -1, 1, 1, 1) * (x - x0)  # DDIM, eta = 0: x0 + s_to * eps
            if lookahead:
                latents[:, mid:end] = step[:, -(f // 2):]
            else:
                latents[:, start:end] = step
        head = latents[:, dummy].clone()
        out.append(head)
        if seed_at == "first_output" and i == nf - f:
            cond = reseed(head, cond)
        latents = torch.cat([latents[:, 1:], levels[-1] * next(noise).unsqueeze(1)], dim=1)  # shift_latents
    return out[-new_len:]


def _denoise(x, sigma, cond):
    """A fixed nonlinear x0 predictor: depends on the frame, its sigma and the condition."""
    return torch.tanh(0.3 * x + cond) * (1 + 0.1 * sigma.view(*sigma.shape, 1, 1, 1))


def _reseed(frame, cond):
    return cond + frame.mean()


@pytest.mark.parametrize("lookahead,unilatent", [(True, True), (False, False)], ids=["LD-unilatent", "noLD"])
def test_queue_and_seeding_match_the_fork(lookahead, unilatent):
    f, n, new_len = 4, 2, 5
    plan = FifoPlan(f, n, lookahead)
    levels = torch.cat([torch.zeros(1), torch.linspace(0.2, 8.0, plan.steps)]).double()
    video = torch.randn(1, f, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def ours(seed: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        queue = init_queue(video, levels, plan, generator=g, uniform=unilatent)
        return torch.stack(list(fifo_iterate(_denoise, torch.tensor(0.2, dtype=torch.float64), queue, levels, plan,
                                             new_len, generator=g, reseed=_reseed if seed else None)), 1)

    def fork(seed_at) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        noise = iter([randn((1, plan.queue_length, 2, 2, 2), g, dtype=torch.float64)]
                     + [randn((1, 2, 2, 2), g, dtype=torch.float64) for _ in range(plan.iterations(new_len))])
        return torch.stack(_fork_fifo(_denoise, torch.tensor(0.2, dtype=torch.float64), video, levels, f, n,
                                      lookahead, unilatent, new_len, noise, seed_at, _reseed), 1)

    torch.testing.assert_close(ours(False), fork(None), rtol=1e-12, atol=1e-12)
    seeded = ours(True)
    torch.testing.assert_close(seeded, fork("first_output"), rtol=1e-12, atol=1e-12)
    # the one departure: the fork seeds from the initial queue's slot 0, before any denoising
    assert (seeded - fork("initial")).abs().max() > 1e-3
    assert (seeded - ours(False))[:, 1:].abs().max() > 1e-3  # and seeding changes the later frames
