"""ControlNet-guided Hotshot-XL: key frames as Hotshot picks them, Canny maps, per-frame residuals inside the
guidance window, control frames riding FIFO's queue, the driver's refusals, and the OPV2V job end to end."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen.config import GenerateConfig, load_config
from vidgen.data.synth import make_moving_shapes
from vidgen.data.video import read_video
from vidgen.diffusion.fifo import FifoPlan
from vidgen.diffusion.samplers import base_sample, fifo_sample, sampling_sigmas
from vidgen.errors import ConfigError, DataError, ModelError
from vidgen.generate.job import prepare_rows
from vidgen.models.hotshot import model as hotshot
from vidgen.models.hotshot.control import canny, control_clip, keyframe_indices, load_controlnet, load_depth_estimator
from vidgen.models.hotshot.pipeline import DDIMSigmas, HotshotDenoiser, HotshotPipeline

H = W = 32
WINDOW = 4


def hotshot_midpoint(n: int, count: int, frame_ms: float, target_ms: float) -> list[int]:
    """Hotshot-XL's extract_gif_frames_from_midpoint on frame indices, restated from its loop."""
    upper = n - 1
    skip = n // count
    best = list(range(0, n, skip))[:count]
    off = (upper - best[-1]) // 2
    best = [x + off for x in best]
    best_d = (best[-1] - best[0]) * frame_ms
    while True:
        skip -= 1
        if skip == 0:
            break
        idx = list(range(0, n, skip))[:count]
        off = (upper - idx[-1]) // 2
        if off == 0:
            break
        idx = [x + off for x in idx]
        d = (idx[-1] - idx[0]) * frame_ms
        if abs(d - target_ms) > abs(best_d - target_ms):
            break
        best, best_d = idx, d
    return best


@pytest.mark.parametrize("n, count, frame_ms, target", [(24, 8, 70, 1000), (35, 16, 100, 2000), (8, 8, 125, 1000),
                                                        (100, 8, 100, 1000), (40, 4, 40, 3000), (17, 5, 70, 250)])
def test_key_frames_are_hotshots_midpoint_pick(n, count, frame_ms, target):
    assert keyframe_indices(n, count, frame_ms, target) == hotshot_midpoint(n, count, frame_ms, target)
    assert keyframe_indices(24, 8, None, 1000) == [4, 6, 8, 10, 12, 14, 16, 18]  # 70 ms guessed: 980 ms span


def test_canny_marks_the_outline_of_a_sharp_shape_only():
    img = np.zeros((1, 24, 24, 3), np.uint8)
    img[0, 6:18, 8:20] = (255, 255, 255)
    edges = canny(img)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all()
    on = edges[0, ..., 0] > 0
    inside, outside = on[8:16, 10:18], np.concatenate([on[:4].ravel(), on[20:].ravel(), on[:, :6].ravel()])
    assert not inside.any() and not outside.any()
    rows, cols = np.nonzero(on)
    assert set(rows) <= set(range(5, 19)) and set(cols) <= set(range(7, 21))
    assert on[11, 7:9].sum() + on[11, 19:21].sum() == 2  # one pixel wide on each vertical side
    faint = img // 8  # a step of 31 levels: Sobel's L1 magnitude 124 < 200, no strong edge starts
    assert not canny(faint).any()
    np.testing.assert_array_equal(canny(img), edges)


@pytest.fixture(scope="module")
def tiny_model():
    return hotshot.build("tiny", seed=0)


def _schedule(model):
    return DDIMSigmas(model.scheduler.config)


def _video(denoiser, cond, steps=3, seed=1):
    shape = (1, WINDOW, denoiser.model.unet.config.out_channels, H // 8, W // 8)
    return base_sample(denoiser, cond, _schedule(denoiser.model), shape, steps,
                       generator=torch.Generator().manual_seed(seed))


def _maps(tmp_path) -> np.ndarray:
    make_moving_shapes(str(tmp_path / "clip"), 1, 12, 48, 40, seed=3)
    (clip,) = sorted((tmp_path / "clip").iterdir())
    return control_clip(str(clip), WINDOW, H, W, fps=8, kind="canny")


def test_a_frame_folder_decodes_only_its_key_frames(tmp_path):
    """Frames the midpoint rule does not pick are never decoded: a damaged one of them changes nothing, a damaged
    key frame is named in one line."""
    make_moving_shapes(str(tmp_path / "clip"), 1, 12, 48, 40, seed=3)
    (clip,) = sorted((tmp_path / "clip").iterdir())
    frame_number = lambda p: int("".join(filter(str.isdigit, p.stem)))  # noqa: E731
    files = sorted((p for p in clip.iterdir() if p.suffix == ".png"), key=frame_number)
    picked = set(keyframe_indices(len(files), WINDOW, None, 1000.0 * WINDOW / 8))
    before = control_clip(str(clip), WINDOW, H, W, fps=8, kind="canny")
    skipped = next(i for i in range(len(files)) if i not in picked)
    files[skipped].write_bytes(b"not a png")
    assert np.array_equal(control_clip(str(clip), WINDOW, H, W, fps=8, kind="canny"), before)
    key = files[min(picked)]
    key.write_bytes(b"not a png")
    with pytest.raises(DataError, match=key.name):
        control_clip(str(clip), WINDOW, H, W, fps=8, kind="canny")


def test_control_steers_and_zero_scale_is_exactly_uncontrolled(tmp_path, tiny_model):
    maps = _maps(tmp_path)
    assert maps.shape == (WINDOW, H, W, 3) and maps.any()
    net = load_controlnet("tiny", tiny_model, "", seed=0)
    plain = HotshotDenoiser(tiny_model, 2.0)
    base = _video(plain, plain.condition(["a road"], H, W))
    videos = {}
    for scale in (0.0, 0.7):
        d = HotshotDenoiser(tiny_model, 2.0, net, scale)
        videos[scale] = _video(d, d.condition(["a road"], H, W, control_frames=maps[None]))
        assert d.control_calls == (3 if scale else 0)
    assert torch.equal(videos[0.0], base)
    assert (videos[0.7] - base).abs().mean() > 1e-3
    other = maps[::-1].copy()  # another control clip steers elsewhere
    d = HotshotDenoiser(tiny_model, 2.0, net, 0.7)
    assert (_video(d, d.condition(["a road"], H, W, control_frames=other[None])) - videos[0.7]).abs().mean() > 1e-4


def test_guidance_window_is_hotshots_step_fractions(tmp_path, tiny_model):
    maps = _maps(tmp_path)
    net = load_controlnet("tiny", tiny_model, "", seed=0)
    for (start, end), steps, acting in [((0.5, 1.0), 4, 2), ((0.25, 0.75), 4, 2), ((0.3, 1.0), 5, 3)]:
        table = sampling_sigmas(_schedule(tiny_model), steps)
        d = HotshotDenoiser(tiny_model, 1.0, net, 0.7, (start, end), table)
        _video(d, d.condition(["a road"], H, W, control_frames=maps[None]), steps=steps)
        expected = sum(not (i / steps < start or (i + 1) / steps > end) for i in range(steps))
        assert d.control_calls == expected == acting


def test_fifo_carries_each_frames_control_map_with_its_latent(tmp_path, tiny_model):
    n_frames, plan = 6, FifoPlan(WINDOW, 1, lookahead=True)
    frames = np.arange(n_frames, dtype=np.uint8)[:, None, None, None] * np.ones((1, H, W, 3), np.uint8)
    net = load_controlnet("tiny", tiny_model, "", seed=0)
    schedule = _schedule(tiny_model)
    d = HotshotDenoiser(tiny_model, 1.0, net, 0.7)
    cond = d.condition(["a road"], H, W, control_frames=frames[None])
    seen = []

    def window_cond(c, idx):
        out = c.frames(idx)
        seen.append([int(round(v * 255)) for v in out.control[0, :, 0, 0, 0].tolist()])
        return out

    shape = (1, WINDOW, tiny_model.unet.config.out_channels, H // 8, W // 8)
    latents = fifo_sample(d, cond, schedule, shape, n_frames, plan, torch.Generator().manual_seed(0),
                          window_cond=window_cond)
    assert latents.shape[1] == n_frames
    iterations, windows = plan.iterations(n_frames), len(plan.windows())
    assert d.calls == d.control_calls == plan.steps + iterations * windows  # base video + the diagonal
    assert seen[0] == list(range(WINDOW))  # the base video is output frames 0 .. F-1
    warmup = plan.steps - plan.window
    expect = [[min(max(it - warmup + j - plan.offset, 0), n_frames - 1) for j in range(s, e)]
              for it in range(iterations) for s, e, _ in plan.windows()]
    assert seen[1:] == expect

    # the guidance window per frame: a frame at queue level l (1 = next to leave) is at step nf - l
    table = sampling_sigmas(schedule, plan.steps)
    late = HotshotDenoiser(tiny_model, 1.0, net, 0.7, (0.5, 1.0), table)
    levels = torch.arange(1, plan.steps + 1)
    scales = late.control_scales(table.flip(0)[levels][None])[0]
    steps = plan.steps - levels
    assert scales.tolist() == pytest.approx([0.7 * (i / plan.steps >= 0.5) for i in steps.tolist()])


def _tiny_depth_model(root: Path) -> str:
    """A random-init DPT depth model directory in transformers' format (30k parameters, 32 x 32 input)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8],
                    fusion_hidden_size=8, head_hidden_size=8)
    DPTForDepthEstimation(cfg).save_pretrained(root)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(root)
    return str(root)


def test_depth_control_maps_as_diffusers_examples_steer_deterministically(tmp_path, tiny_model):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    path = _tiny_depth_model(tmp_path / "depth")
    make_moving_shapes(str(tmp_path / "clip"), 1, 12, 48, 40, seed=3)
    (clip,) = sorted((tmp_path / "clip").iterdir())
    maps = control_clip(str(clip), WINDOW, H, W, fps=8, kind="depth", depth=load_depth_estimator(path, ""))
    assert maps.shape == (WINDOW, H, W, 3) and maps.dtype == np.uint8
    assert (maps[..., 0] == maps[..., 2]).all()
    assert [(f.min(), f.max()) for f in maps] == [(0, 255)] * WINDOW  # each frame spans the whole range

    # diffusers' SDXL depth ControlNet example on the same key frames: processor, predicted_depth, bicubic to the
    # frame size, per-image min-max, x 255 truncated
    keys = control_clip(str(clip), WINDOW, H, W, fps=8, kind="none")
    proc, model = AutoImageProcessor.from_pretrained(path), AutoModelForDepthEstimation.from_pretrained(path)
    with torch.no_grad():
        d = model(proc(images=list(keys), return_tensors="pt").pixel_values).predicted_depth
    d = torch.nn.functional.interpolate(d.unsqueeze(1), size=(H, W), mode="bicubic", align_corners=False)
    d = (d - d.amin(dim=[1, 2, 3], keepdim=True)) / (d.amax(dim=[1, 2, 3], keepdim=True) - d.amin(dim=[1, 2, 3],
                                                                                                 keepdim=True))
    ref = (torch.cat([d] * 3, dim=1).permute(0, 2, 3, 1).numpy() * 255.0).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(maps, ref)

    again = control_clip(str(clip), WINDOW, H, W, fps=8, kind="depth", depth=load_depth_estimator(path, ""))
    np.testing.assert_array_equal(again, maps)  # deterministic, model loading included
    # the job's path: the pipeline computes the maps of a row's control clip with its depth model
    plain = HotshotDenoiser(tiny_model, 1.0)
    d = HotshotDenoiser(tiny_model, 1.0, load_controlnet("tiny", tiny_model, "", seed=0), 0.7)
    pipe = HotshotPipeline(tiny_model, d, _schedule(tiny_model), load_depth_estimator(path, ""))
    g = GenerateConfig(controlnet="tiny", control=dict(type="depth", depth_model=path, source="path"),
                       num_frames=WINDOW, height=H, width=W, fps=8)
    cond = pipe.condition({"id": "0", "sample_prompt": "a road", "control": str(clip)}, g, None, None)
    np.testing.assert_array_equal((cond.control[0] * 255).round().byte().permute(0, 2, 3, 1).numpy(), maps)
    steered = _video(d, cond, steps=1)
    assert (steered - _video(plain, plain.condition(["a road"], H, W), steps=1)).abs().mean() > 1e-3


def _synth_opencood(root: Path) -> None:
    """An OpenCOOD-style tree: one scenario, one CAV, 40 timestamps at 10 Hz, four cameras of moving shapes."""
    make_moving_shapes(str(root.parent / "shapes"), 1, 40, 60, 80, seed=5)
    (src,) = sorted((root.parent / "shapes").iterdir())
    folder = root / "test" / "2021_08_20_21_10_24" / "641"
    folder.mkdir(parents=True)
    for t in range(40):
        for k in range(4):
            shutil.copy(src / f"{t}.png", folder / f"{2 * t:06d}_camera{k}.png")
        (folder / f"{2 * t:06d}.yaml").write_text("lidar_pose: [0, 0, 0]\n")


@pytest.mark.ray
def test_opv2v_controlnet_config_end_to_end(ray_session, tmp_path):
    from vidgen.cli import main

    _synth_opencood(tmp_path / "opv2v")
    assert main(["prepare", "opv2v", str(tmp_path / "opv2v"), "--out", str(tmp_path / "clips")]) == 0
    out = tmp_path / "out"
    argv = ["generate", "--config", "jobs/configs/generate_opv2v_hotshot_controlnet.yaml", "model.flavor=tiny",
            "model.path=null", f"model.num_frames={WINDOW}", "generate.controlnet=tiny",
            f"generate.prompts={tmp_path / 'clips'}", f"generate.output={out}", f"run.workdir={tmp_path / 'w'}",
            "generate.num_frames=8", "generate.fifo.partitions=1", f"generate.height={H}", f"generate.width={W}",
            "generate.use_gpu=false", "generate.num_actors=1", "generate.min_actors=1", "generate.samples_per_prompt=1",
            "tracking.enabled=false"]
    assert main(argv) == 0
    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == 1 and read_video(str(videos[0]))[0].shape == (8, H, W, 3)


def test_driver_refuses_what_controlnet_generation_cannot_run(tmp_path):
    (tmp_path / "prompts.txt").write_text("a road\n")
    common = [f"run.workdir={tmp_path}", "model.family=hotshot", "model.flavor=tiny", f"model.num_frames={WINDOW}",
              f"generate.prompts={tmp_path / 'prompts.txt'}", "generate.prompt_format=text"]
    with pytest.raises(ConfigError, match="generate.control.source=clip: 1 of 1 prompts have no control clip"):
        prepare_rows(load_config(None, [*common, "generate.controlnet=tiny"]))
    with pytest.raises(ModelError, match=r"generate.controlnet=.*nowhere: no config.json there"):
        prepare_rows(load_config(None, [*common, f"generate.controlnet={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="not autoregressive"):
        prepare_rows(load_config(None, [*common, "generate.controlnet=tiny", "generate.sampler=autoregressive"]))
    with pytest.raises(ConfigError, match="guidance_start=0.8 must be below"):
        load_config(None, [*common, "generate.control.guidance_start=0.8", "generate.control.guidance_end=0.5"])
    with pytest.raises(ConfigError, match="generate.control.depth_model: required with generate.control.type=depth"):
        load_config(None, [*common, "generate.controlnet=tiny", "generate.control.type=depth"])
    (tmp_path / "clipnet").mkdir()
    (tmp_path / "clipnet" / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(ModelError, match=r"depth_model=.*clipnet: config.json describes a 'clip_vision_model' model, "
                                         "not a depth-estimation one"):
        prepare_rows(load_config(None, [*common, "generate.controlnet=tiny", "generate.control.type=depth",
                                        f"generate.control.depth_model={tmp_path / 'clipnet'}"]))
    svd = [f"run.workdir={tmp_path}", "model.flavor=tiny", "generate.controlnet=tiny",
           f"generate.prompts={tmp_path / 'prompts.txt'}"]
    with pytest.raises(ConfigError, match="generate.controlnet"):
        prepare_rows(load_config(None, svd))
    assert math.isfinite(0.7)
