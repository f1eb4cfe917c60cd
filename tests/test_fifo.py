"""FIFO-Diffusion queue (generation.md 1.3-1.6) over fake denoisers: coverage, levels, exactness, cost.

Shapes: B batch (1), Q queue slots, F window frames, C latent channels, h/w latent size.
The fakes are plain functions obeying the denoiser interface denoise(x[B, F, C, h, w], sigma[B, F], cond).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from vidgen.diffusion.fifo import FifoPlan, fifo_iterate, init_queue, slot_levels
from vidgen.diffusion.samplers import fifo_sample, sampling_sigmas
from vidgen.models.svd.model import SVD_SCHEDULER

PLANS = [FifoPlan(4, 2, lookahead=True), FifoPlan(4, 2, lookahead=False)]
ids = ["LD", "noLD"]


def _levels(plan: FifoPlan) -> torch.Tensor:
    """A made-up ascending table L[0] = 0 < L[1] < ... < L[nf], levels a factor 2 apart, float64."""
    return torch.cat([torch.zeros(1), 2.0 ** torch.arange(plan.steps)]).double()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recorder:
    """Zero-x0 oracle that records every call (x, sigma) for later inspection."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma, cond):
        assert sigma.shape == x.shape[:2]
        self.calls.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x)


# ---------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("window,partitions", [(2, 1), (4, 1), (4, 2), (6, 3), (8, 4)])
@pytest.mark.parametrize("lookahead", [True, False])
def test_windows_write_every_real_slot_exactly_once(window, partitions, lookahead):
    plan = FifoPlan(window, partitions, lookahead)
    wins = plan.windows()
    assert len(wins) == (2 * partitions if lookahead else partitions)
    written = []
    for start, end, write_from in wins:
        assert end - start == window  # every call sees a full model window
        assert 0 <= start <= write_from < end <= plan.queue_length
        written += range(write_from, end)
    assert sorted(written) == list(range(plan.offset, plan.queue_length))  # each real slot once
    assert [w[0] for w in wins] == sorted((w[0] for w in wins), reverse=True)  # tail first


def test_plan_sizes():
    ld, plain = PLANS
    assert (ld.steps, ld.offset, ld.queue_length) == (8, 2, 10)
    assert (plain.steps, plain.offset, plain.queue_length) == (8, 0, 8)
    assert ld.windows() == [(6, 10, 8), (4, 8, 6), (2, 6, 4), (0, 4, 2)]
    assert plain.windows() == [(4, 8, 4), (0, 4, 0)]
    big = FifoPlan(16, 4)  # the original's defaults: 100 frames take 148 iterations, queue of 72
    assert big.iterations(100) == 148 and big.queue_length == 72
    for plan in PLANS:
        for n in (1, 5, 17):
            assert plan.iterations(n) == n + plan.steps - plan.window
    assert slot_levels(ld).tolist() == [1, 1, 1, 2, 3, 4, 5, 6, 7, 8]
    assert slot_levels(plain).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="window=3"):
        FifoPlan(3, 2, lookahead=True)
    with pytest.raises(ValueError, match="window=1"):
        FifoPlan(1, 2, lookahead=False)
    with pytest.raises(ValueError, match="partitions=0"):
        FifoPlan(4, 0)
    assert FifoPlan(3, 2, lookahead=False).windows() == [(3, 6, 3), (0, 3, 0)]


# ---------------------------------------------------------------------------------------------- queue


@pytest.mark.parametrize("plan", PLANS, ids=ids)
def test_init_queue_frames_and_levels(plan):
    f, nf = plan.window, plan.steps
    levels = _levels(plan)
    shape = (1, f, 2, 32, 32)
    base = torch.arange(1, f + 1, dtype=torch.float64).mul(100).view(1, f, 1, 1, 1).expand(shape).contiguous()

    q = init_queue(base, levels, plan, generator=_gen(0))
    q_zero = init_queue(torch.zeros(shape, dtype=torch.float64), levels, plan,
                        generator=_gen(0))
    assert q.shape == (1, plan.queue_length, 2, 32, 32) and q.dtype == torch.float64
    frames = [0] * plan.offset + [max(0, i - (nf - f)) for i in range(nf)]  # context slots hold frame 0
    wanted_level = [1] * plan.offset + [i + 1 for i in range(nf)]
    # same noise, different x0: the difference is exactly the x0 of each slot's base frame
    for slot, frame in enumerate(frames):
        torch.testing.assert_close(q[0, slot] - q_zero[0, slot], base[0, frame], rtol=0, atol=1e-9)
    # pure noise at the slot's level: std of 2048 draws within 8 % of L[level] (levels are 2x apart)
    for slot, lvl in enumerate(wanted_level):
        std = q_zero[0, slot].std().item()
        assert std == pytest.approx(levels[lvl].item(), rel=0.08), (slot, lvl)
        assert abs(q_zero[0, slot].mean().item()) < 0.1 * levels[lvl].item()


@pytest.mark.parametrize("plan", PLANS, ids=ids)
def test_calls_per_iteration_and_sigmas_per_slot(plan):
    levels, n_out = _levels(plan), 3
    rec = Recorder()
    queue = init_queue(torch.zeros(1, plan.window, 1, 2, 2, dtype=torch.float64), levels, plan,
                       generator=_gen(0))
    heads = list(fifo_iterate(rec, None, queue, levels, plan, n_out, generator=_gen(1)))
    assert len(heads) == n_out
    per_iter = 2 * plan.partitions if plan.lookahead else plan.partitions
    assert len(rec.calls) == plan.iterations(n_out) * per_iter
    expected = levels[slot_levels(plan)]  # slot i always sits at L[i + 1]; context slots at L[1]
    for k, (_, sigma) in enumerate(rec.calls):
        start, end, _ = plan.windows()[k % per_iter]
        torch.testing.assert_close(sigma[0], expected[start:end])


@pytest.mark.parametrize("plan", PLANS, ids=ids)
def test_a_frame_moves_one_slot_and_one_level_per_iteration(plan):
    """Track frames by their noise: with a zero-x0 oracle a frame's content is n * sigma, so x / sigma is
    its identity. A frame entering at the tail at L[nf] must be seen at L[nf], L[nf-1], ..., L[1] in
    consecutive iterations, one slot nearer the head each time, and never read half-updated."""
    levels, n_out, nf = _levels(plan), 6, plan.steps
    rec = Recorder()
    queue = init_queue(torch.zeros(1, plan.window, 2, 2, 2, dtype=torch.float64), levels, plan,
                       generator=_gen(0))
    heads = list(fifo_iterate(rec, None, queue, levels, plan, n_out, generator=_gen(1)))
    per_iter = len(plan.windows())
    seen: dict[float, list[tuple[int, int, float]]] = {}  # identity -> [(iteration, slot, sigma)]
    for k, (x, sigma) in enumerate(rec.calls):
        it, (start, _, _) = k // per_iter, plan.windows()[k % per_iter]
        for j in range(x.shape[1]):
            slot, s = start + j, sigma[0, j].item()
            ident = round((x[0, j, 0, 0, 0] / s).item(), 9)
            if slot >= plan.offset:  # context slots are read only and hold already-emitted frames
                seen.setdefault(ident, [])
                if (it, slot, s) not in seen[ident]:
                    seen[ident].append((it, slot, s))
    # every real slot of every iteration is accounted for by some frame
    assert sum(len(v) for v in seen.values()) == plan.iterations(n_out) * nf
    full = [v for v in seen.values() if v[0][1] == plan.queue_length - 1]  # entered at the tail
    assert len(full) >= 2
    for track in full:
        if len(track) < nf:  # still in the queue when sampling stopped
            assert track[-1][0] == plan.iterations(n_out) - 1
        its, slots, sigmas = zip(*track, strict=True)
        assert list(its) == list(range(its[0], its[0] + len(track)))
        assert list(slots) == [plan.queue_length - 1 - k for k in range(len(track))]
        assert list(sigmas) == [levels[nf - k].item() for k in range(len(track))]
    assert any(len(t) == nf for t in full)  # one that went all the way: nf iterations tail to head
    for h in heads:  # leaving the head at level 0: exactly the oracle's x0
        assert h.shape == (1, 2, 2, 2)
        assert h.abs().max().item() < 1e-9


@pytest.mark.parametrize("plan", PLANS, ids=ids)
def test_exact_x0_oracle_makes_every_emitted_frame_exact(plan):
    """Euler in sigma with the true x0 is exact, so each emitted head must be the x0 of its frame.

    Frame k sits in real slot i during iteration k - i; the queue starts with frame i =
    base[max(0, i - (nf - F))] in slot i, so after dropping nf - F warm-up frames the video is the base
    video's F frames followed by the new frames, in order."""
    f, nf, n_out = plan.window, plan.steps, 7
    c, h, w = 2, 3, 3
    g = _gen(0)
    base = torch.randn(1, f, c, h, w, generator=g, dtype=torch.float64)
    new = torch.randn(1, n_out + nf, c, h, w, generator=g, dtype=torch.float64)
    truth = [base[:, max(0, k - (nf - f))] if k < nf else new[:, k - nf] for k in range(n_out + 2 * nf)]
    wins = plan.windows()
    calls = 0

    def oracle(x, sigma, cond):
        nonlocal calls
        it, (start, end, _) = calls // len(wins), wins[calls % len(wins)]
        calls += 1
        x0 = [truth[it + max(slot - plan.offset, 0)] for slot in range(start, end)]
        return torch.stack(x0, dim=1)

    levels = _levels(plan)
    queue = init_queue(base, levels, plan, generator=_gen(1))
    heads = list(fifo_iterate(oracle, None, queue, levels, plan, n_out, generator=_gen(2)))
    assert len(heads) == n_out
    for k, head in enumerate(heads):
        frame = nf - f + k
        torch.testing.assert_close(head, truth[frame], rtol=0, atol=1e-9)
    for k in range(f):  # the first F frames are the base video
        torch.testing.assert_close(heads[k], base[:, k], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("plan", [FifoPlan(4, 2, True), FifoPlan(4, 1, False)], ids=["LD-n2", "noLD-n1"])
def test_fifo_sample_shape_cost_and_exactness(plan):
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    target = torch.randn(1, 1, 4, 3, 5, generator=_gen(0))
    calls = []

    def const_oracle(x, sigma, cond):  # every frame's x0 is `target`
        calls.append(tuple(x.shape))
        assert cond == "cond"
        return target.expand_as(x)

    n_out = 6
    shape = (1, plan.window, 4, 3, 5)
    out = fifo_sample(const_oracle, "cond", scheduler, shape, n_out, plan, generator=_gen(1))
    assert out.shape == (1, n_out, 4, 3, 5)
    assert len(calls) == plan.steps + plan.iterations(n_out) * len(plan.windows())  # base video + diagonal
    assert all(c == shape for c in calls)
    # sigma_max = 700 in float32: exact up to rounding of x0 + 700 n
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=2e-4)
    again = fifo_sample(const_oracle, "cond", scheduler, shape, n_out, plan, generator=_gen(1))
    assert torch.equal(out, again)


def test_fifo_sample_uses_the_scheduler_sigmas():
    plan = FifoPlan(4, 1, lookahead=False)
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    seen = []

    def rec(x, sigma, cond):
        seen.append(sigma[0].clone())
        return torch.zeros_like(x)

    fifo_sample(rec, None, scheduler, (1, 4, 1, 2, 2), 2, plan, generator=_gen(0))
    desc = sampling_sigmas(scheduler, plan.steps)  # nf + 1 values ending in 0
    for i in range(plan.steps):  # base video: one sigma for all frames, descending
        torch.testing.assert_close(seen[i], desc[i].expand(4))
    torch.testing.assert_close(seen[plan.steps], desc.flip(0)[1:])  # then the queue: ascending per slot


# ---------------------------------------------------------------------------------------------- FIFO+ options


@pytest.mark.parametrize("plan", [FifoPlan(4, 2, True), FifoPlan(4, 3, False)], ids=["LD-n2", "noLD-n3"])
def test_uniform_latents_change_only_which_base_frame_a_slot_holds(plan):
    levels = _levels(plan)
    base = torch.arange(1, plan.window + 1, dtype=torch.float64).mul(100).view(1, -1, 1, 1, 1).expand(
        1, plan.window, 1, 2, 2).contiguous()
    plain = init_queue(base, levels, plan, generator=_gen(0))
    uni = init_queue(base, levels, plan, generator=_gen(0), uniform=True)
    zero = init_queue(torch.zeros_like(base), levels, plan, generator=_gen(0))
    frames = [0] * plan.offset + [i // plan.partitions for i in range(plan.steps)]  # FIFO+ `unilatent`
    for slot, frame in enumerate(frames):
        torch.testing.assert_close(uni[0, slot] - zero[0, slot], base[0, frame], rtol=0, atol=1e-9)
    assert sorted(set(frames[plan.offset:])) == list(range(plan.window))  # every base frame used, evenly
    # same noise, and the tail (the last F slots) of the original already holds frames 0..F-1 in both only
    # when n = 1; otherwise the queues differ exactly where the frame differs
    differs = [slot for slot in range(plan.queue_length) if not torch.equal(uni[0, slot], plain[0, slot])]
    orig = [0] * plan.offset + [max(0, i - (plan.steps - plan.window)) for i in range(plan.steps)]
    assert differs == [s for s in range(plan.queue_length) if frames[s] != orig[s]]
    # the loop is unchanged: same calls at the same sigmas
    rec_a, rec_b = Recorder(), Recorder()
    list(fifo_iterate(rec_a, None, plain, levels, plan, 3, generator=_gen(1)))
    list(fifo_iterate(rec_b, None, uni, levels, plan, 3, generator=_gen(1)))
    assert len(rec_a.calls) == len(rec_b.calls)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rec_a.calls, rec_b.calls, strict=True))


@pytest.mark.parametrize("plan", PLANS, ids=ids)
def test_seed_frame_reconditions_once_from_the_first_emitted_frame(plan):
    """The fork's seeding: after the first frame leaves the queue every later call sees the new condition;
    nothing before it changes, and without the flag the condition never changes (its always-true bug)."""
    levels, n_out = _levels(plan), 4
    per_iter, warmup = len(plan.windows()), plan.steps - plan.window

    def run(reseed):
        conds = []

        def den(x, sigma, cond):
            conds.append(cond)
            return torch.full_like(x, 0.5)

        queue = init_queue(torch.zeros(1, plan.window, 1, 2, 2, dtype=torch.float64), levels, plan, generator=_gen(0))
        heads = list(fifo_iterate(den, "image", queue, levels, plan, n_out, generator=_gen(1), reseed=reseed))
        return heads, conds

    seen = []

    def reseed(head, cond):
        seen.append(head.clone())
        return ("first-frame", cond)

    heads_off, conds_off = run(None)
    heads_on, conds_on = run(reseed)
    assert set(conds_off) == {"image"}
    assert len(seen) == 1 and torch.equal(seen[0], heads_on[0])  # called once, with the first output frame
    switch = (warmup + 1) * per_iter  # the first call of the iteration after the first frame left
    assert conds_on[:switch] == ["image"] * switch
    assert conds_on[switch:] == [("first-frame", "image")] * (len(conds_on) - switch)
    assert len(conds_on) == len(conds_off) and torch.equal(heads_on[0], heads_off[0])


class _Unet(torch.nn.Module):
    """Stands in for the SVD UNet where only the guidance arithmetic matters (see the test below)."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_svd_fifo_guidance_ramps_over_output_frames_not_window_positions(monkeypatch):
    """Each output frame k gets min + (max - min) * min(k, F - 1) / (F - 1) at every step, whichever window
    position it holds; with lookahead, a ramp over positions would give frame 0 only the upper half."""
    from types import SimpleNamespace

    from vidgen.diffusion.objectives import edm_scalings
    from vidgen.models.svd import pipeline as svd_pipeline

    # UNet output 0 for the unconditional half and 1 for the conditional one: the guided output is the scale
    monkeypatch.setattr(svd_pipeline, "unet_forward_per_frame", lambda unet, x, t, ehs, ids: torch.cat(
        [torch.zeros_like(x[: len(x) // 2, :, :4]), torch.ones_like(x[len(x) // 2:, :, :4])]))
    plan, n_out, lo, hi = FifoPlan(4, 2, lookahead=True), 6, 1.0, 2.5
    den = svd_pipeline.SVDDenoiser(SimpleNamespace(unet=_Unet()), lo, hi)
    pipe = svd_pipeline.SVDPipeline(den.model, den, None)
    cond = svd_pipeline.SVDCondition(torch.zeros(1, 1, 8), torch.zeros(1, 4, 2, 2), torch.zeros(1, 3))
    got: dict[int, set[float]] = {}

    def spy(x, sigma, c):
        x0 = den(x, sigma, c)
        sc = edm_scalings(sigma)
        scale = (x0 - sc.c_skip.view(*sigma.shape, 1, 1, 1) * x) / sc.c_out.view(*sigma.shape, 1, 1, 1)
        for j, k in enumerate(c.frames):
            got.setdefault(k, set()).update(round(v, 4) for v in scale[0, j].flatten().tolist())
        return x0

    levels = _levels(plan).float()
    queue = init_queue(torch.zeros(1, plan.window, 4, 2, 2), levels, plan, generator=_gen(0))
    heads = list(fifo_iterate(spy, cond, queue, levels, plan, n_out, generator=_gen(1), window_cond=pipe.frames))
    assert len(heads) == n_out
    want = {k: {round(lo + (hi - lo) * min(k, 3) / 3, 4)} for k in range(n_out)}
    assert {k: got[k] for k in range(n_out)} == want  # 1.0, 1.5, 2.0, 2.5, 2.5, 2.5
    assert all(v == {lo} for k, v in got.items() if k < 0)  # warm-up frames and context slots
    # one window without frame indices (base sampler, autoregressive clips): the pipeline's linspace
    x, sigma = torch.zeros(1, 4, 4, 2, 2), torch.ones(1, 4)
    scale = den(x, sigma, cond) / edm_scalings(sigma).c_out.view(1, 4, 1, 1, 1)
    torch.testing.assert_close(scale[0, :, 0, 0, 0], torch.linspace(lo, hi, 4))


def _tiny_unet_inputs(seed=0):
    from vidgen.models.svd.model import tiny

    model = tiny(num_frames=4)
    g = _gen(seed)
    sample = torch.randn(1, 4, 8, 8, 8, generator=g)
    t = torch.tensor([[0.1, 0.4, 0.7, 1.0]])
    ehs = torch.randn(1, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    return model, (sample, t, ehs, ids)


def test_qcache_mixes_only_up_block_temporal_queries():
    from vidgen.models.svd.pipeline import unet_forward_per_frame
    from vidgen.models.svd.qcache import install_qcache

    model, args = _tiny_unet_inputs()
    unet = model.unet
    acts: dict[str, torch.Tensor] = {}
    names = ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")
    for name in names:
        unet.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: acts.__setitem__(name, (o[0] if isinstance(o, tuple) else o).clone()))

    def forward():
        with torch.no_grad():
            out = unet_forward_per_frame(unet, *args)
        return out, dict(acts)

    stock, stock_acts = forward()
    assert install_qcache(unet, 0.0) == 3  # tiny UNet: one attention level, three up layers
    zero, zero_acts = forward()
    torch.testing.assert_close(zero, stock, rtol=1e-5, atol=1e-5)  # w = 0 is the stock forward
    install_qcache(unet, 0.7)
    mixed, mixed_acts = forward()
    for name in ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0"):  # before the mixed layers
        torch.testing.assert_close(mixed_acts[name], stock_acts[name], rtol=1e-5, atol=1e-5)
    assert (mixed_acts["up_blocks.1"] - stock_acts["up_blocks.1"]).abs().max() > 1e-3
    assert (mixed - stock).abs().max() > 1e-3


def test_svd_recondition_weight_mixes_image_condition_only():
    from vidgen.models.svd.pipeline import SVDDenoiser

    model, _ = _tiny_unet_inputs()
    den = SVDDenoiser(model, 1.0, 1.0)
    image = torch.rand(1, 3, 64, 64, generator=_gen(1)) * 2 - 1
    cond = den.condition(image, 7, 127, 0.02, _gen(2))
    latent = torch.randn(1, 4, 8, 8, generator=_gen(3))
    same = den.recondition(latent, cond, 0.0)
    full = den.recondition(latent, cond, 1.0)
    half = den.recondition(latent, cond, 0.5)
    torch.testing.assert_close(same.image_embeds, cond.image_embeds)
    torch.testing.assert_close(same.image_latent, cond.image_latent)
    assert not torch.allclose(full.image_embeds, cond.image_embeds)
    torch.testing.assert_close(half.image_latent, (cond.image_latent + full.image_latent) / 2)
    assert torch.equal(full.added_time_ids, cond.added_time_ids)


# ---------------------------------------------------------------------------------------------- autoregressive


@pytest.mark.parametrize("overlap,num_frames", [(0, 10), (1, 10), (2, 9)])
def test_autoregressive_clips_condition_on_the_last_frame_and_blend_overlaps(overlap, num_frames):
    from vidgen.diffusion.samplers import autoregressive_clips, autoregressive_sample

    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    f = 4

    def den(x, sigma, cond):  # exact oracle: clip k's frame j is cond + j (cond is a number)
        return (cond + torch.arange(f, dtype=x.dtype)).view(1, f, 1, 1, 1).expand_as(x)

    conds = []

    def recondition(last, cond):
        conds.append(cond)
        return last.mean().item() * 10

    out = autoregressive_sample(den, 1.0, scheduler, (1, f, 1, 2, 2), num_frames, 3, recondition, overlap,
                                generator=_gen(0))
    assert out.shape == (1, num_frames, 1, 2, 2)
    clips = autoregressive_clips(f, num_frames, overlap)
    assert len(conds) == clips - 1
    # rebuild the expected video from the oracle
    video = [1.0 + j for j in range(f)]
    c = 1.0
    for _ in range(clips - 1):
        c = video[-1] * 10
        clip = [c + j for j in range(f)]
        for k in range(overlap):
            w = (k + 1) / (overlap + 1)
            video[len(video) - overlap + k] = (1 - w) * video[len(video) - overlap + k] + w * clip[k]
        video += clip[overlap:]
    torch.testing.assert_close(out[0, :, 0, 0, 0], torch.tensor(video[:num_frames]), rtol=1e-4, atol=2e-2)
    with pytest.raises(ValueError, match="overlap=4"):
        autoregressive_sample(den, 1.0, scheduler, (1, f, 1, 2, 2), 8, 2, recondition, overlap=4)
