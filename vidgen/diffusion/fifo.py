"""FIFO-Diffusion diagonal denoising (Kim et al. 2024) over any per-frame-sigma denoiser, in EDM/Euler form.

Shapes: B batch (1 per queue), Q queue slots, F window frames, C latent channels, h/w latent size.

The queue holds nf = F * n latent frames at rising noise levels: slot i (0 = head) sits at level
L[i + 1], where L[0] = 0 < L[1] < ... < L[nf] = sigma_max are the nf-step sampling sigmas in ascending
order. One iteration denoises every slot by one level, window by window (each window is one denoiser call
with a sigma per frame); then the head, now at L[0] = 0, is clean: it leaves the queue and fresh noise
at sigma_max enters at the tail. With lookahead denoising (LD) windows overlap by half and only each
window's second half is written back, and F/2 context slots stand before the head, as in the original.

Queue initialisation follows the original: a base video of F frames x0 is sampled normally, then slot i
holds base frame max(0, i - (nf - F)) noised to its level, so the first nf - F outputs are warm-up frames
and are dropped. Iterations per video: N + nf - F for N output frames.

Consistency options of the FIFO+ fork (generation.md 2.3-2.6), each changing one thing only:
`uniform` spreads the base frames evenly over the queue (slot i holds frame i // n); `reseed` replaces the
conditioning once, with what it returns for the first emitted frame (every later call sees the new one).
The queue, its windows and `uniform` match the fork's code (tests/test_fifo_fork_parity.py), with deterministic
steps (the fork's DDIM defaults to eta = 1). The fork seeds instead before the first iteration, from queue slot 0
as initialised (base frame 0 still at the first noise level; `scripts/evaluation/funcs.py:247`), and in every
mode (its test at funcs.py:246 is always true); here the seed is the first frame the video shows, clean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vidgen.diffusion.noise import randn

Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class FifoPlan:
    window: int  # F: the model's frame window
    partitions: int  # n
    lookahead: bool = True

    def __post_init__(self):
        if self.window < 2 or (self.lookahead and self.window % 2):
            raise ValueError(f"fifo window={self.window}: expected an even number >= 2 with lookahead")
        if self.partitions < 1:
            raise ValueError(f"fifo partitions={self.partitions}: expected >= 1")

    @property
    def steps(self) -> int:  # nf: levels a frame passes through
        return self.window * self.partitions

    @property
    def offset(self) -> int:  # context slots before the head (LD only)
        return self.window // 2 if self.lookahead else 0

    @property
    def queue_length(self) -> int:
        return self.steps + self.offset

    def windows(self) -> list[tuple[int, int, int]]:
        """(start, end, write_from) per denoiser call, in the order they run (tail first, as the original)."""
        f = self.window
        if self.lookahead:
            out = [(r * f // 2, r * f // 2 + f, r * f // 2 + f // 2) for r in range(2 * self.partitions)]
        else:
            out = [(r * f, r * f + f, r * f) for r in range(self.partitions)]
        return out[::-1]

    def iterations(self, num_frames: int) -> int:
        return num_frames + self.steps - self.window


def slot_levels(plan: FifoPlan) -> torch.Tensor:
    """Index into the ascending level table L for each queue slot: context slots 1, slot i -> i + 1."""
    real = torch.arange(1, plan.steps + 1)
    return torch.cat([torch.ones(plan.offset, dtype=torch.long), real])


def slot_frames(plan: FifoPlan, uniform: bool = False) -> list[int]:
    """Base frame each queue slot starts from: the original's, or FIFO+'s uniform spread (i // n)."""
    f, nf = plan.window, plan.steps
    real = [i // plan.partitions for i in range(nf)] if uniform else [max(0, i - (nf - f)) for i in range(nf)]
    return [0] * plan.offset + real


def init_queue(base_x0_bfchw: torch.Tensor, levels: torch.Tensor, plan: FifoPlan,
               generator: torch.Generator | None = None, uniform: bool = False) -> torch.Tensor:
    """[B, Q, C, h, w]: base frames noised to each slot's level (original FIFO `prepare_latents`)."""
    x0 = base_x0_bfchw[:, torch.tensor(slot_frames(plan, uniform), device=base_x0_bfchw.device)]
    sigma = levels[slot_levels(plan)].to(x0)
    return x0 + sigma.view(1, -1, 1, 1, 1) * randn(x0.shape, generator, x0.device, x0.dtype)


def fifo_iterate(denoise: Denoiser, cond: object, queue: torch.Tensor, levels: torch.Tensor, plan: FifoPlan,
                 num_frames: int, generator: torch.Generator | None = None,
                 reseed: Callable[[torch.Tensor, object], object] | None = None,
                 window_cond: Callable[[object, list[int]], object] | None = None) -> Iterator[torch.Tensor]:
    """Yields clean head latents [B, C, h, w], one per iteration, warm-up frames already dropped.

    `window_cond(cond, frames) -> cond`, if given, conditions each denoiser call on the output frames its slots
    will become (per-frame conditions such as ControlNet maps ride the queue with their latents): slot j at
    iteration `it` is output frame it - (nf - F) + j - offset (negative: warm-up frames and context slots).

    `reseed(head, cond) -> cond`, if given, is called once with the first emitted frame; its result
    conditions every later denoiser call (the fork's seeding from the first generated frame, made an
    explicit option instead of its always-true `or 't2v_seed_ar'` test).
    """
    slot_lvl = slot_levels(plan)
    sigma_now = levels[slot_lvl].to(queue)  # [Q]
    sigma_next = levels[(slot_lvl - 1).clamp(min=0)].to(queue)
    sigma_next[: plan.offset] = sigma_now[: plan.offset]  # context slots are never written
    b = queue.shape[0]
    warmup = plan.steps - plan.window
    for it in range(plan.iterations(num_frames)):
        for start, end, write_from in plan.windows():
            x = queue[:, start:end]
            s = sigma_now[start:end].expand(b, -1)
            here = cond if window_cond is None else window_cond(
                cond, [it - warmup + j - plan.offset for j in range(start, end)])
            x0 = denoise(x, s, here)
            d = (x - x0) / s.view(b, -1, 1, 1, 1)  # Euler step in sigma, per frame
            x_next = x + d * (sigma_next[start:end] - sigma_now[start:end]).view(1, -1, 1, 1, 1)
            k = write_from - start
            queue[:, write_from:end] = x_next[:, k:]
        head = queue[:, plan.offset].clone()
        if it >= warmup:
            if reseed is not None and it == warmup:
                cond = reseed(head, cond)
            yield head
        tail = randn(head.shape, generator, queue.device, queue.dtype) * levels[-1].to(queue)
        queue = torch.cat([queue[:, 1:], tail.unsqueeze(1)], dim=1)
