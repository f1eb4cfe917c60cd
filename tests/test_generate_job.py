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
from vidgen.errors import ConfigError, DataError, StorageError
from vidgen.generate.job import VideoGenerator, load_prompts, output_name, run_generation, summarize

WINDOW = 4
GEN = dict(sampler="fifo", num_frames=6, fifo=dict(partitions=1), min_guidance_scale=1.0,
           max_guidance_scale=1.0, height=64, width=64, fps=7)
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
    return {k: np.array([r[k] for r in rows]) for k in ("image", "prompt", "seed", "id")}


# ---------------------------------------------------------------------------------------- prompts


def test_load_prompts_defaults(tmp_path):
    uri = _jsonl(tmp_path / "p.jsonl", [
        json.dumps({"image": "s3://bucket/frames/red car.png"}),
        "",
        json.dumps({"image": "/data/x.y.jpg", "prompt": "a road", "seed": 42, "id": "mine"}),
        json.dumps({"image": "plain"}),
    ])
    rows = load_prompts(uri)
    assert rows == [
        {"image": "s3://bucket/frames/red car.png", "prompt": "", "seed": 0, "id": "red_car"},
        {"image": "/data/x.y.jpg", "prompt": "a road", "seed": 42, "id": "mine"},
        {"image": "plain", "prompt": "", "seed": 3, "id": "plain"},  # seed = line number - 1
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
    assert res["num_frames"] == [6] and res["seed"] == [5] and res["id"] == ["frame"]
    frames, fps = read_video(path)
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(7.0)
    # FIFO cost: nf base steps + (N + nf - F) iterations x 2n lookahead windows, no CFG (guidance 1)
    nf = WINDOW * 1
    assert fifo_generator.denoiser.calls == nf + (6 + nf - WINDOW) * 2

    before = (Path(path).read_bytes(), os.stat(path).st_mtime_ns)
    calls = fifo_generator.denoiser.calls
    again = fifo_generator(_batch([row]))
    assert again["status"] == ["skipped"] and again["path"] == [path]
    assert (Path(path).read_bytes(), os.stat(path).st_mtime_ns) == before
    assert fifo_generator.denoiser.calls == calls
    assert [p for p in os.listdir(os.path.dirname(path))] == [os.path.basename(path)]  # no temp leftovers


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


@pytest.mark.ray
def test_run_generation_through_ray_then_rerun_skips(ray_session, tmp_path):
    images = [_png(tmp_path / f"img{i}.png", 10 + i) for i in range(2)]
    prompts = _jsonl(tmp_path / "prompts.jsonl", [json.dumps({"image": p}) for p in images])
    cfg = VidgenConfig(run={"workdir": str(tmp_path / "work")}, model=MODEL,
                       generate={**GEN, "prompts": prompts})

    results = run_generation(cfg)
    assert [r["id"] for r in results] == ["img0", "img1"]
    assert [r["status"] for r in results] == ["generated", "generated"], [r["error"] for r in results]
    out_dir = tmp_path / "work" / "generated"
    assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(r["path"]) for r in results)
    for r in results:
        frames, _ = read_video(r["path"])
        assert frames.shape == (6, 64, 64, 3)
    stamps = {r["path"]: os.stat(r["path"]).st_mtime_ns for r in results}

    rerun = run_generation(cfg)
    assert summarize(rerun) == {"skipped": 2}
    assert {r["path"]: os.stat(r["path"]).st_mtime_ns for r in rerun} == stamps
