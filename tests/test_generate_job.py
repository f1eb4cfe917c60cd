"""Batch generation job: prompt files, deterministic output names, the per-actor generator, Ray fan-out.

Shapes: T frames, H/W pixels.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidgen.config import GenerateConfig, ModelConfig, VidgenConfig
from vidgen.data.video import read_video
from vidgen.errors import ConfigError, DataError, JobError, StorageError
from vidgen.generate.job import COLUMNS, VideoGenerator, load_prompts, output_name, run_generation, summarize

WINDOW = 4
GEN = dict(sampler="fifo", num_frames=6, fifo=dict(partitions=1), min_guidance_scale=1.0,
           max_guidance_scale=1.0, height=32, width=32, fps=7)
MODEL = dict(flavor="tiny", num_frames=WINDOW)


def _png(path: Path, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """What Ray Data hands a map_batches UDF: one numpy column per key."""
    rows = [{"sample_prompt": r["prompt"], "sample": 0, "name": output_name(r, GenerateConfig(**GEN),
                                                                             ModelConfig(**MODEL)), **r} for r in rows]
    return {k: np.array([r.get(k, "") for r in rows]) for k in COLUMNS}


# ---------------------------------------------------------------------------------------- prompts


def test_load_prompts_defaults(tmp_path):
    uri = _jsonl(tmp_path / "p.jsonl", [
        json.dumps({"image": "s3://bucket/frames/red car.png"}),
        "",
        json.dumps({"image": "/data/x.y.jpg", "prompt": "a road", "seed": 42, "id": "mine"}),
        json.dumps({"image": "plain"}),
    ])
    rows = [{k: r[k] for k in ("image", "prompt", "seed", "id")} for r in load_prompts(uri)]
    assert rows == [
        {"image": "s3://bucket/frames/red car.png", "prompt": "", "seed": 0, "id": "red_car"},
        {"image": "/data/x.y.jpg", "prompt": "a road", "seed": 42, "id": "mine"},
        {"image": str(tmp_path / "plain"), "prompt": "", "seed": 3, "id": "plain"},  # relative to the file
    ]


@pytest.mark.parametrize("lines,where,what", [
    (['{"image": "a.png"}', '{"image": "b.png",}'], ":2:", "not a JSON object"),
    (['{"prompt": "no image"}'], ":1:", '"image"'),
    (['{"image": ""}'], ":1:", '"image"'),
    (['{"image": 3}'], ":1:", '"image"'),
    (['["a.png"]'], ":1:", '"image"'),
])
def test_load_prompts_errors_name_file_and_line(tmp_path, lines, where, what):
    uri = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_prompts(uri)
    assert f"{uri}{where}" in str(e.value) and what in str(e.value)


def test_load_prompts_empty_and_missing(tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match="no prompt rows"):
        load_prompts(empty)
    with pytest.raises(ConfigError, match="generate.prompts"):
        load_prompts("")
    with pytest.raises(StorageError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------------------ names


def test_output_name_is_deterministic_and_keyed_by_what_changes_pixels():
    row = {"image": "s3://b/a.png", "prompt": "", "seed": 1, "id": "a"}
    gen, model = GenerateConfig(**GEN), ModelConfig(**MODEL)
    name = output_name(row, gen, model)
    assert re.fullmatch(r"a-[0-9a-f]{12}\.mp4", name)
    assert output_name(dict(row), GenerateConfig(**GEN), ModelConfig(**MODEL)) == name
    changed = [
        output_name({**row, "seed": 2}, gen, model),
        output_name({**row, "image": "s3://b/b.png"}, gen, model),
        output_name({**row, "prompt": "x"}, gen, model),
        output_name(row, GenerateConfig(**{**GEN, "sampler": "base"}), model),
        output_name(row, GenerateConfig(**GEN, unet="/runs/7/unet"), model),
        output_name(row, GenerateConfig(**{**GEN, "fifo": dict(partitions=2)}), model),
        output_name(row, gen, ModelConfig(**{**MODEL, "num_frames": 8})),
    ]
    assert name not in changed and len(set(changed)) == len(changed)
    same = [  # where the video goes and how it is computed do not change the pixels
        output_name(row, GenerateConfig(**GEN, output="/elsewhere", num_actors=3, use_gpu=True), model),
        output_name(row, gen, ModelConfig(**MODEL, cache_dir="/tmp/other-cache")),
    ]
    assert same == [name, name]


# -------------------------------------------------------------------------------- the generator UDF


@pytest.fixture(scope="module")
def fifo_generator(tmp_path_factory):
    out = tmp_path_factory.mktemp("generated")
    return VideoGenerator(MODEL, GEN, str(out))


def test_generator_writes_a_video_then_skips_it(fifo_generator, tmp_path):
    row = {"image": _png(tmp_path / "frame.png", 0), "prompt": "", "seed": 5, "id": "frame"}
    res = fifo_generator(_batch([row]))
    assert res["status"] == ["generated"] and res["error"] == [""]
    path = res["path"][0]
    assert os.path.basename(path) == output_name(row, GenerateConfig(**GEN), ModelConfig(**MODEL))
    assert res["num_frames"] == [6] and res["seed"] == [5] and res["id"] == ["frame"] and res["fps"] == [7]
    assert res["sampler"] == ["fifo"] and json.loads(res["params"][0])["fifo"]["partitions"] == 1
    frames, fps = read_video(path)
    assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(7.0)
    # FIFO cost: nf base steps + (N + nf - F) iterations x 2n lookahead windows, no CFG (guidance 1)
    nf = WINDOW * 1
    assert fifo_generator.denoiser.calls == nf + (6 + nf - WINDOW) * 2
    root = Path(fifo_generator.root)
    record = json.loads((root / "records" / (Path(path).stem + ".json")).read_text())
    assert record["status"] == "generated" and record["seed"] == 5 and record["checkpoint"] == "tiny"

    before = (Path(path).read_bytes(), os.stat(path).st_mtime_ns)
    calls = fifo_generator.denoiser.calls
    again = fifo_generator(_batch([row]))
    assert again["status"] == ["skipped"] and again["path"] == [path]
    assert (Path(path).read_bytes(), os.stat(path).st_mtime_ns) == before
    assert fifo_generator.denoiser.calls == calls
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp leftovers

    # the base video cache is keyed by the seed (the original's was not): another seed, another entry;
    # the same seed under another name (N = 6 -> video reused) costs only the diagonal part
    cache = root / "cache" / "base"
    assert len(os.listdir(cache)) == 1
    import torch

    from vidgen.diffusion.fifo import FifoPlan

    other = {**_batch([row]), "seed": np.array([6])}
    other = {k: v[0].item() for k, v in other.items()}
    cond = fifo_generator.denoiser.condition(torch.zeros(1, 3, 32, 32), 7, 127, 0.02)
    fifo_generator.base_video(other, cond, (1, WINDOW, 4, 4, 4), FifoPlan(WINDOW, 1), torch.Generator())
    assert len(os.listdir(cache)) == 2
    calls = fifo_generator.denoiser.calls
    video = fifo_generator(_batch([{**row, "id": "renamed"}]))
    assert video["status"] == ["generated"]
    assert fifo_generator.denoiser.calls - calls == (6 + nf - WINDOW) * 2  # no base steps: cached
    np.testing.assert_array_equal(read_video(video["path"][0])[0], frames)  # cached base: same pixels


def test_generator_records_failures_per_row(tmp_path):
    image = _png(tmp_path / "frame.png", 1)
    base = VideoGenerator(MODEL, {**GEN, "sampler": "base", "num_inference_steps": 2}, str(tmp_path / "out"))
    rows = [{"image": image, "prompt": "", "seed": 0, "id": "long"},
            {"image": str(tmp_path / "absent.png"), "prompt": "", "seed": 0, "id": "absent"}]
    res = base(_batch(rows))
    assert res["status"] == ["failed", "failed"]
    assert res["error"][0].startswith("ConfigError: generate.num_frames=6")
    assert "model.num_frames=4" in res["error"][0] and "sampler=fifo" in res["error"][0]
    assert "absent.png" in res["error"][1]
    assert not any(os.path.exists(p) for p in res["path"])
    assert summarize([{"status": s} for s in res["status"]]) == {"failed": 2}


# --------------------------------------------------------------------------------------- Ray job


def _manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_generate_job_logs_to_mlflow_then_rerun_skips(ray_session, tmp_path):
    from mlflow import MlflowClient

    from vidgen.runner import generate_job, tracker_for

    images = [_png(tmp_path / f"img{i}.png", 10 + i) for i in range(2)]
    prompts = _jsonl(tmp_path / "prompts.jsonl", [json.dumps({"image": p}) for p in images])
    cfg = VidgenConfig(run={"workdir": str(tmp_path / "work")}, model=MODEL,
                       generate={**GEN, "prompts": prompts, "extra_outputs": ["gif", "frames"]})
    root = tmp_path / "work" / "generated"
    with tracker_for(cfg) as tracker:
        out = generate_job(cfg, tracker)
        run_id, uri = tracker.run_id, tracker.tracking_uri
    assert out["counts"] == {"generated": 2} and out["output_dir"] == str(root / "videos")
    assert [m["status"] for m in _manifest(root)] == ["generated", "generated"]
    assert [m["id"] for m in _manifest(root)] == ["img0", "img1"]
    assert sorted(os.listdir(root / "videos")) == sorted(os.path.basename(p) for p in out["videos"])
    for path in out["videos"]:
        frames, _ = read_video(path)
        assert frames.shape == (6, 32, 32, 3)
        stem = Path(path).stem
        assert (root / "gif" / f"{stem}.gif").stat().st_size > 0
        assert sorted(os.listdir(root / "frames" / stem)) == [f"{i:04d}.png" for i in range(6)]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.metrics["generate/videos_per_hour"] > 0 and run.data.metrics["generate/frames_per_s"] > 0
    assert run.data.params["generate.fifo.unet_calls_per_frame"] == "2"  # 2n windows, n = 1, no CFG
    arts = {a.path for d in ("grid", "generate", "videos") for a in client.list_artifacts(run_id, d)}
    assert {"grid/grid.mp4", "generate/manifest.jsonl"} <= arts and len([a for a in arts if "videos/" in a]) == 2
    stamps = {p: os.stat(p).st_mtime_ns for p in out["videos"]}

    rerun = run_generation(cfg)
    assert summarize(rerun) == {"skipped": 2}
    assert {r["path"]: os.stat(r["path"]).st_mtime_ns for r in rerun} == stamps
    assert [(m["status"], m["seed"]) for m in _manifest(root)] == [("skipped", 0), ("skipped", 1)]


EDGE_PROMPTS = [
    "",
    "frame.png;a red car; then a blue truck",  # `;` inside the prompt
    "   ",
    "frame.png;東京の夜景、ネオンが光る 🚗",  # unicode
    "frame.png;" + ("a very long prompt " * 20)[:300],  # 300 characters
    "absent.png;a frame that does not exist",  # missing image: counted failure
    "frame.png;a red car; then a blue truck",  # duplicate: merged
    "frame.png;../../escape/the root",  # must stay under videos/
    "",
]


@pytest.mark.ray
def test_i2v_edge_cases_three_windows_long_vbench_names(ray_session, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "frame.png", 3)
    (src / "i2v.txt").write_text("\n".join(EDGE_PROMPTS), encoding="utf-8")
    root = tmp_path / "out"
    cfg = VidgenConfig(model=MODEL, generate={
        **GEN, "num_frames": 3 * WINDOW, "fifo": {"partitions": 1, "lookahead": False},
        "prompts": str(src / "i2v.txt"), "prompt_format": "i2v", "naming": "vbench",
        "output": str(root), "max_failed_fraction": 0.25})
    results = run_generation(cfg)
    assert len(results) == 5  # 6 non-blank lines, one duplicate merged
    by_status = summarize(results)
    assert by_status == {"generated": 4, "failed": 1}, [r["error"] for r in results]
    failed = next(r for r in results if r["status"] == "failed")
    assert "absent.png" in failed["error"] and not os.path.exists(failed["path"])
    videos = sorted(os.listdir(root / "videos"))
    assert len(videos) == 4 and all(os.path.dirname(os.path.realpath(root / "videos" / v)) ==
                                    os.path.realpath(root / "videos") for v in videos)
    assert "a red car; then a blue truck-0.mp4" in videos and "東京の夜景、ネオンが光る 🚗-0.mp4" in videos
    assert any(v.startswith("_._.._escape_the root~") for v in videos)
    assert not (tmp_path / "escape").exists()
    for v in videos:
        frames, _ = read_video(str(root / "videos" / v))
        assert frames.shape == (3 * WINDOW, 32, 32, 3)  # three times the model's window
    rows = _manifest(root)
    assert [r["status"] for r in rows] == [r["status"] for r in results]
    assert rows[0]["prompt"] == "a red car; then a blue truck" and rows[0]["params"]["window"] == WINDOW

    # too many failures: a clear error, and the manifest still records every row
    strict = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"max_failed_fraction": 0.0})})
    with pytest.raises(JobError, match=r"1 of 5 videos failed, more than generate.max_failed_fraction=0"):
        run_generation(strict)
    assert [r["status"] for r in _manifest(root)].count("skipped") == 4


def test_generator_applies_a_lora_with_its_scale(tmp_path):
    import torch

    from vidgen.config import LoraConfig
    from vidgen.models.lora import inject_lora, lora_layers, save_lora
    from vidgen.models.svd.model import tiny

    unet = tiny(num_frames=WINDOW).unet
    targets = inject_lora(unet, LoraConfig())
    with torch.no_grad():  # B starts at zero (no change): make the update visible
        for m in lora_layers(unet).values():
            for p in m.lora_B.parameters():
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_lora(unet, LoraConfig(), targets, str(tmp_path / "lora"))
    row = {"image": _png(tmp_path / "frame.png", 4), "prompt": "", "seed": 1, "id": "x"}
    base_gen = {**GEN, "sampler": "base", "num_frames": WINDOW, "num_inference_steps": 2}
    videos = []
    for extra in ({}, {"lora": str(tmp_path / "lora")}, {"lora": str(tmp_path / "lora"), "lora_scale": 0.0}):
        gen = VideoGenerator(MODEL, {**base_gen, **extra}, str(tmp_path / f"out{len(videos)}"))
        res = gen(_batch([row]))
        assert res["status"] == ["generated"], res["error"]
        assert ("lora=" in res["checkpoint"][0]) == bool(extra)
        videos.append(read_video(res["path"][0])[0].astype(int))
    d_lora, d_zero = np.abs(videos[1] - videos[0]).mean(), np.abs(videos[2] - videos[0]).mean()
    assert d_zero < 0.05 and d_lora > 10 * max(d_zero, 0.01), (d_lora, d_zero)  # scale 0: base model up to rounding


def test_output_name_follows_the_options_each_sampler_uses():
    row = {"image": "s3://b/a.png", "prompt": "", "seed": 1, "id": "a"}
    model = ModelConfig(**MODEL)

    def name(**gen):
        return output_name(row, GenerateConfig(**{**GEN, **gen}), model)

    fifo = name()
    assert len({fifo, name(consistency={"seed_frame": True}), name(consistency={"qcache": True}),
                name(fifo={"partitions": 1, "uniform_latents": True}), name(lora="/l", lora_scale=0.5),
                name(lora="/l")}) == 6
    assert name(num_inference_steps=3) == fifo  # FIFO takes its steps from n x window
    assert name(autoregressive={"overlap": 2}) == fifo
    base = dict(sampler="base", num_frames=WINDOW)
    assert name(**base, consistency={"seed_frame": True}) == name(**base)  # FIFO-only option
    assert name(**base, consistency={"qcache": True}) != name(**base)  # the UNet itself changes
    assert name(**base, fifo={"partitions": 3}) == name(**base)
    ar = dict(sampler="autoregressive", num_frames=10)
    assert name(**ar, autoregressive={"overlap": 1}) != name(**ar)
    assert name(samples_per_prompt=5, seeds=[1, 2, 3, 4, 5], naming="vbench", max_failed_fraction=0.5,
                extra_outputs=["gif"], min_actors=1, gpus_per_actor=0.5, actor_restarts=0) == fifo
