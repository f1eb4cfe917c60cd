"""Weighted query cache in temporal self-attention (the FIFO+ fork's `TTqcache_attn1`, generation.md 2.5).

Shapes: N = B * h * w tokens' batch (temporal attention attends over frames), F frames, D channels.

Within one UNet call, each down block's temporal self-attention records its query [N, F, D]; the temporal
self-attention of the mirrored up block (same resolution, so same N and D) then attends with
q = (1 - w) * q_own + w * q_down. Keys, values, spatial attention and cross-attention are untouched.

Up layer j of a level reuses down layer max(L - 1 - j, 0) of that level (L down layers), the fork's
`out2in` pattern (output blocks 3, 4, 5 -> input blocks 8, 7, 7).

Held against the fork's code (YCmove/FIFO-Diffusion_public b6226b0; tests/test_fifo_fork_parity.py runs its
rule on a UNet of VideoCrafter's layout and matches this one). Where vidgen departs:
- w is a parameter; the fork hard-codes vt = 1.0, a full replacement (`lvdm/modules/networks/openaimodel3d.py:692`,
  mixed at `lvdm/modules/attention.py:175`). w = 0 is the stock forward.
- only the temporal self-attention (`TTqcache_attn1`); the fork's spatial (`STqcache`) and cross-attention
  (`attn2`) variants are not offered. The fork mixes after the head split, a linear map, so the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Store:
    def __init__(self):
        self.q: dict[tuple[int, int], torch.Tensor] = {}


class QCacheProcessor:
    """Attention processor for a temporal attn1: records (down) or mixes in (up) the query."""

    def __init__(self, store: _Store, key: tuple[int, int], role: str, weight: float):
        self.store, self.key, self.role, self.weight = store, key, role, weight

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        # SVD's temporal attn1 is plain self-attention on [N, F, D]: no norms, mask or residual inside.
        residual = hidden_states
        q = attn.to_q(hidden_states)
        if self.role == "record":
            self.store.q[self.key] = q
        elif self.weight > 0 and self.key in self.store.q:
            q = (1 - self.weight) * q + self.weight * self.store.q[self.key]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k, v = attn.to_k(context), attn.to_v(context)
        n, f, _ = q.shape
        heads = attn.heads
        q, k, v = (x.view(n, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(n, f, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _temporal_attn1(block) -> list:
    return [a.temporal_transformer_blocks[0].attn1 for a in getattr(block, "attentions", [])
            if hasattr(a, "temporal_transformer_blocks")]


def install_qcache(unet, weight: float) -> int:
    """Swap the processors of mirrored temporal attn1 pairs in `unet`; returns the number of up layers mixed."""
    store = _Store()
    downs, ups = unet.down_blocks, unet.up_blocks
    mixed = 0
    for level, down in enumerate(downs):
        d_attn, u_attn = _temporal_attn1(down), _temporal_attn1(ups[len(downs) - 1 - level])
        if not d_attn or not u_attn:
            continue
        for j, a in enumerate(d_attn):
            a.set_processor(QCacheProcessor(store, (level, j), "record", weight))
        for j, a in enumerate(u_attn):
            src = max(len(d_attn) - 1 - j, 0)
            a.set_processor(QCacheProcessor(store, (level, src), "mix", weight))
            mixed += 1
    return mixed
