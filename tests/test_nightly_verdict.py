"""The nightly's verdict on real nights (tiny SVD generation -> VideoMAE-v2 features -> FVD/KVD with bootstrap
intervals -> comparison with the last good night): a fresh draw of the unchanged model is noise, a damaged
checkpoint is a regression.

The tiny VideoMAE-v2 has 32-d features, so 40 clips per set carry intervals (an interval needs at least as many
clips as feature dimensions; I3D's 400 would need 400 videos a night). A random-init SVD makes noise-like videos
far from any real clips, so the reference set here is the unchanged model's own output under other seeds: its
nights are draws from the reference distribution, the damaged checkpoint's are not."""

from __future__ import annotations

import json

import pytest
import torch

from vidgen.config import load_config
from vidgen.eval.nightly import run_nightly
from vidgen.generate.job import run_generation

N = 40  # clips per set, above the tiny VideoMAE's 32 dimensions


def _prompts(path, real, seed0: int):
    images = sorted(real.rglob("0.png"))[:N]
    path.write_text("".join(json.dumps({"image": str(p), "seed": seed0 + i, "id": f"s{i}"}) + "\n"
                            for i, p in enumerate(images)))
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_unchanged_model_is_noise_damaged_checkpoint_regresses(tmp_path, mlflow_server, ray_session):
    from vidgen.data.synth import make_moving_shapes
    from vidgen.models.svd.model import tiny

    images = tmp_path / "images"
    make_moving_shapes(str(images), N, 2, 64, 64, seed=0)  # the conditioning images
    good, damaged = tmp_path / "good-unet", tmp_path / "damaged-unet"
    unet = tiny(seed=0, num_frames=8).unet
    unet.save_pretrained(good)
    with torch.no_grad():  # a botched fine-tune: the output layer's bias shifted
        unet.conv_out.bias.add_(3.0)
    unet.save_pretrained(damaged)

    base = [f"run.workdir={tmp_path}/work", f"tracking.uri={mlflow_server}", "tracking.experiment=verdict",
            "model.flavor=tiny", "model.num_frames=8", "generate.sampler=base", "generate.num_frames=8",
            "generate.num_inference_steps=4", "generate.min_guidance_scale=1.0", "generate.max_guidance_scale=1.0",
            "generate.height=64", "generate.width=64", f"eval.real={tmp_path / 'reference' / 'videos'}",
            "eval.real_layout=videos", "eval.num_frames=8", "eval.features=videomae", "eval.protocol=cd-fvd",
            "nightly.suite=verdict"]  # the default thresholds: FVD 10%, KVD 25%
    reference = load_config(None, [*base, f"generate.prompts={_prompts(tmp_path / 'ref.jsonl', images, 10_000)}",
                                   f"generate.unet={good}", f"generate.output={tmp_path / 'reference'}"])
    run_generation(reference)
    nights = {}
    # A fresh draw of seeds each night. The second night's draw happens to score 22% worse than the first's: the
    # default 10% threshold alone would flag it; the intervals know it for noise.
    nights_plan = [("2026-06-01", good, 3000), ("2026-06-02", good, 0), ("2026-06-03", damaged, 1000)]
    for k, (date, ckpt, seed0) in enumerate(nights_plan):
        prompts = _prompts(tmp_path / f"prompts-{k}.jsonl", images, seed0)
        cfg = load_config(None, [*base, f"generate.prompts={prompts}", f"nightly.date={date}",
                                 f"nightly.checkpoints.main={ckpt}"])
        (r,) = run_nightly(cfg)
        nights[date] = r
        m = r.night.metrics
        print(date, {k: float(f"{m[k]:.3g}") for k in ("fvd", "fvd_lo", "fvd_hi", "kvd", "kvd_lo", "kvd_hi")
                     if k in m}, r.comparison.verdict, r.comparison.rules)
    first, again, broken = nights.values()
    assert first.comparison.verdict == "first" and first.night.metrics["n_fake"] == N
    assert again.night.metrics["fvd"] > 1.1 * first.night.metrics["fvd"]  # beyond the threshold ...
    assert again.comparison.verdict == "ok" and again.comparison.rules["fvd"] == "interval"  # ... but noise
    assert broken.comparison.verdict == "regressed" and "fvd" in broken.comparison.regressed
    assert broken.comparison.rules["fvd"] == "interval" and broken.comparison.baseline.date == "2026-06-02"
    assert broken.night.metrics["fvd_lo"] > again.night.metrics["fvd_hi"]

