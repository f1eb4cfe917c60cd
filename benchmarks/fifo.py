"""FIFO-Diffusion's cost on the tiny SVD: UNet evaluations per output frame and wall time per frame.

Counts every UNet evaluation (a forward on a batch of 2 under classifier-free guidance counts 2, as the
original's two sequential `apply_model` calls do) and compares with the algorithm's count per diagonal
iteration: 2n windows with lookahead, n without, times 2 with CFG (generation.md 1.6). Then times the
diagonal loop against (calls per iteration) x (time of one denoiser call on one window), measured side by
side in the same process. Prints one JSON line per setting:

    python benchmarks/fifo.py [--window 4] [--partitions 2] [--frames 12] [--size 64] [--repeats 8] [--loops 2]

Goal: calls equal the count exactly; wall time per frame at most 1.1x calls x single-call time
(`time_ratio`; on a shared CPU it drifts with the load, so `loop_over_time_in_calls` also reports the loop's
time over the time spent inside its own denoiser calls, which isolates the queue bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--frames", type=int, default=12, help="output frames N")
    ap.add_argument("--size", type=int, default=64, help="pixels (latents are size / 8)")
    ap.add_argument("--repeats", type=int, default=8, help="single-call timings (the fastest counts)")
    ap.add_argument("--loops", type=int, default=2, help="timed diagonal loops (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vidgen.diffusion.fifo import FifoPlan, fifo_iterate, init_queue
    from vidgen.diffusion.samplers import base_sample, sampling_sigmas
    from vidgen.models.svd.model import tiny
    from vidgen.models.svd.pipeline import SVDDenoiser

    model = tiny(num_frames=args.window)
    evaluations = 0

    def count(module, inputs):  # conv_in sees [B * F, C, H, W]: B evaluations of one window
        nonlocal evaluations
        evaluations += inputs[0].shape[0] // args.window

    model.unet.conv_in.register_forward_pre_hook(count)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = args.size // model.vae_scale_factor
    shape = (1, args.window, 4, lat, lat)

    for lookahead in (True, False):
        for guidance in (1.0, 3.0):
            plan = FifoPlan(args.window, args.partitions, lookahead)
            den = SVDDenoiser(model, guidance, guidance)
            cond = den.condition(image, 7, 127, 0.02, torch.Generator().manual_seed(0))
            gen = torch.Generator().manual_seed(1)
            sigmas = sampling_sigmas(model.scheduler, plan.steps)
            base = base_sample(den, cond, model.scheduler, shape, plan.steps, generator=gen)
            x = torch.randn(shape, generator=gen)
            s = sigmas[1:plan.window + 1].flip(0).view(1, -1)
            den(x, s, cond)  # warm-up
            single = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                den(x, s, cond)
                single.append(time.perf_counter() - t0)
            call_s = min(single)  # minima: other processes on the machine only ever add time

            levels = sigmas.flip(0)
            iterations = plan.iterations(args.frames)
            inside = [0.0]

            def timed(x, sigma, c, den=den, inside=inside):  # time spent in the denoiser, within the loop
                t = time.perf_counter()
                out = den(x, sigma, c)
                inside[0] += time.perf_counter() - t
                return out

            loops = []
            for _ in range(args.loops):
                queue = init_queue(base, levels, plan, generator=gen)
                evaluations, inside[0] = 0, 0.0
                t0 = time.perf_counter()
                frames = sum(1 for _ in fifo_iterate(timed, cond, queue, levels, plan, args.frames, generator=gen))
                loops.append((time.perf_counter() - t0, inside[0]))
            loop_s, in_calls_s = min(loops)
            cfg_mult = 2 if den.guided else 1
            expected = len(plan.windows()) * cfg_mult  # 2n (LD) or n, x2 with CFG
            per_iter = evaluations / iterations
            print(json.dumps({
                "lookahead": lookahead, "cfg": den.guided, "window": args.window, "partitions": args.partitions,
                "frames": frames, "iterations": iterations,
                "unet_evals_per_iteration": per_iter, "expected_per_iteration": expected,
                "calls_exact": per_iter == expected,
                "unet_evals_per_output_frame": evaluations / frames,
                "expected_per_output_frame": expected * iterations / frames,
                "single_call_s": round(call_s, 5), "single_call_median_s": round(statistics.median(single), 5),
                "seconds_per_iteration": round(loop_s / iterations, 5),
                "time_ratio": round(loop_s / iterations / (len(plan.windows()) * call_s), 4),
                "loop_over_time_in_calls": round(loop_s / in_calls_s, 4),  # FIFO's own bookkeeping cost
            }), flush=True)


if __name__ == "__main__":
    main()
