"""Prompt sources (generation.md 1.9, 2.1, 4.1-4.3, 5.3): formats, edge cases, seeds and safe names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vidgen.config import GenerateConfig, ModelConfig, VidgenConfig, load_config
from vidgen.data.prompts import (
    detect_format,
    expand_samples,
    load_rows,
    read_i2v,
    read_opv2v_scenes,
    read_vbench,
    safe_stem,
    vbench_name,
)
from vidgen.errors import ConfigError, DataError
from vidgen.generate.job import prepare_rows

LONG = ("a " + "very " * 60)[:288] + " long prompt"  # 300 characters


def test_long_prompt_is_300_characters():
    assert len(LONG) == 300


def test_text_prompts_skip_blank_lines_and_keep_unicode(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n\n   \n  東京の夜景, ネオン  \n" + LONG + "\na cat\n", encoding="utf-8")
    rows = load_rows(str(p))
    assert [r["prompt"] for r in rows] == ["a cat", "東京の夜景, ネオン", LONG]  # duplicate merged
    assert all(r["sample_prompt"] == r["prompt"] and r["image"] == "" for r in rows)
    assert detect_format(str(p)) == "text" and detect_format("x.jsonl") == "jsonl"
    assert detect_format("x.json") == "vbench"


def test_augmented_prompts_sample_with_augmented_and_name_by_original(tmp_path):
    (tmp_path / "orig.txt").write_text("a dog\na bird\n")
    (tmp_path / "aug.txt").write_text("a fluffy dog running on grass\na small bird on a branch\n")
    rows = load_rows(str(tmp_path / "orig.txt"), augmented=str(tmp_path / "aug.txt"))
    assert [(r["prompt"], r["sample_prompt"]) for r in rows] == [
        ("a dog", "a fluffy dog running on grass"), ("a bird", "a small bird on a branch")]
    videos = expand_samples(rows, 2)
    names = [vbench_name(v["prompt"], v["sample"]) for v in videos]
    assert names == ["a dog-0.mp4", "a dog-1.mp4", "a bird-0.mp4", "a bird-1.mp4"]
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(DataError, match="short.txt: 1 prompts, expected one per prompt"):
        load_rows(str(tmp_path / "orig.txt"), augmented=str(tmp_path / "short.txt"))


def test_i2v_lines_split_at_the_first_semicolon_relative_to_the_file(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    p = sub / "i2v.txt"
    p.write_text("\nimgs/a.png;a car; then a truck\n\n/abs/b.jpg;  plain  \ns3://bucket/c.png;remote\n")
    rows = read_i2v(str(p))
    assert [(r["image"], r["prompt"]) for r in rows] == [
        (str(sub / "imgs" / "a.png"), "a car; then a truck"),
        ("/abs/b.jpg", "plain"),
        ("s3://bucket/c.png", "remote"),
    ]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    (tmp_path / "bad.txt").write_text("ok.png;fine\nno separator here\n")
    with pytest.raises(DataError, match=r"bad.txt:2: expected `image_path;prompt`"):
        read_i2v(str(tmp_path / "bad.txt"))


def test_opv2v_scene_folders_first_frame_in_numeric_order(tmp_path):
    for scene, frames in (("2021_08_18/641", ["10.jpg", "9.jpg", "2.jpg"]), ("2021_08_20/650", ["0.png"])):
        d = tmp_path / scene
        d.mkdir(parents=True)
        for f in frames:
            (d / f).write_bytes(b"x")
        (d / "prompt.txt").write_text(f"driving {scene}\n")
    (tmp_path / "no_prompt").mkdir()
    (tmp_path / "no_prompt" / "0.jpg").write_bytes(b"x")
    rows = read_opv2v_scenes(str(tmp_path))
    assert [(Path(r["image"]).relative_to(tmp_path).as_posix(), r["prompt"]) for r in rows] == [
        ("2021_08_18/641/2.jpg", "driving 2021_08_18/641"), ("2021_08_20/650/0.png", "driving 2021_08_20/650")]
    assert [r["id"] for r in rows] == ["2021_08_18_641", "2021_08_20_650"]
    assert detect_format(str(tmp_path)) == "opv2v"


def test_vbench_full_info_filters_by_dimension_and_merges_duplicates(shared_dir):
    uri = str(shared_dir / "fixtures" / "vbench" / "VBench_full_info.json")
    raw = json.loads(Path(uri).read_text())
    assert len(raw) == 946
    rows = load_rows(uri)
    assert len(rows) == 944 == len({e["prompt_en"] for e in raw})
    for twice in ("The bund Shanghai, oil painting",
                  "A beautiful coastal beach in spring, waves lapping on sand by Hokusai, in the style of Ukiyo"):
        assert [r["prompt"] for r in rows].count(twice) == 1
    dims = ["appearance_style", "overall_consistency"]
    picked = load_rows(uri, dimensions=dims)
    expected = list(dict.fromkeys(e["prompt_en"] for e in raw if set(e["dimension"]) & set(dims)))
    assert [r["prompt"] for r in picked] == expected
    assert all(r["vbench"] for r in picked)
    with pytest.raises(ConfigError, match="generate.dimensions: colour not in"):
        read_vbench(uri, ["colour"])
    names = {vbench_name(r["prompt"], 0) for r in rows}
    assert len(names) == 944 and all(n == r["prompt"] + "-0.mp4" for n, r in zip(sorted(names), sorted(
        rows, key=lambda r: r["prompt"] + "-0.mp4"), strict=True))  # VBench prompts are kept verbatim


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "..", ".hidden", "a/b\\c", "tab\there", "x" * 300,
                                    "東京" * 80, "/abs", "new\nline"])
def test_safe_names_never_leave_the_folder_and_stay_distinct(tmp_path, prompt):
    name = vbench_name(prompt, 3)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert len(name.encode()) <= 255
    root = tmp_path / "videos"
    assert os.path.dirname(os.path.normpath(os.path.join(root, name))) == str(root)
    assert name.endswith("-3.mp4")
    assert safe_stem(prompt) != safe_stem(prompt + "!")
    assert safe_stem("a/b") != safe_stem("a_b")  # the mapping does not merge different prompts


def test_samples_and_seeds():
    rows = [{"prompt": "p", "seed": None}, {"prompt": "q", "seed": 40}]
    assert [(v["sample"], v["seed"]) for v in expand_samples(rows, 3, seed=7)] == [
        (0, 7), (1, 8), (2, 9), (0, 40), (1, 41), (2, 42)]
    assert [v["seed"] for v in expand_samples(rows, 2, seeds=[5, 11])] == [5, 11, 5, 11]
    with pytest.raises(ConfigError, match="generate.seeds: 1 seeds for samples_per_prompt=2"):
        load_config(None, ["generate.seeds=[1]", "generate.samples_per_prompt=2"])


def test_prepare_rows_names_and_refuses_svd_without_images(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n../escape\n")
    cfg = VidgenConfig(generate={"prompts": str(p), "samples_per_prompt": 2, "naming": "vbench"})
    with pytest.raises(ConfigError, match="generate.images: SVD is image-conditioned"):
        prepare_rows(cfg)
    cfg = VidgenConfig(generate={"prompts": str(p), "samples_per_prompt": 2, "naming": "vbench",
                                 "images": "/data/frame.png"})
    videos = prepare_rows(cfg)
    assert [v["name"] for v in videos][:2] == ["a cat-0.mp4", "a cat-1.mp4"]
    assert all("/" not in v["name"] for v in videos) and videos[2]["name"].startswith("_._escape~")
    hashed = prepare_rows(cfg.model_copy(update={"generate": GenerateConfig(
        prompts=str(p), samples_per_prompt=2, images="/data/frame.png")}))
    assert len({v["name"] for v in hashed}) == 4  # auto naming on a text file: hashes, seeds differ
    assert ModelConfig().family == "svd"


ROOT = Path(__file__).resolve().parents[1]


def test_jsonl_and_i2v_image_paths_resolve_from_the_prompt_file(tmp_path, monkeypatch):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "p.jsonl").write_text(json.dumps({"image": "imgs/a.png", "prompt": "x"}) + "\n"
                                                + json.dumps({"image": "/abs/b.png"}) + "\n")
    (tmp_path / "suite" / "p.txt").write_text("imgs/a.png;x\n")
    monkeypatch.chdir(tmp_path)  # relative to the file, not to where vidgen runs
    want = str(tmp_path / "suite" / "imgs" / "a.png")
    assert [r["image"] for r in load_rows("suite/p.jsonl")] == ["suite/imgs/a.png", "/abs/b.png"]
    assert [r["image"] for r in load_rows(str(tmp_path / "suite" / "p.jsonl"))][0] == want
    assert [r["image"] for r in load_rows(str(tmp_path / "suite" / "p.txt"))] == [want]
    (tmp_path / "suite" / "up.jsonl").write_text(json.dumps({"image": "../secret.png"}) + "\n")
    with pytest.raises(DataError, match=r"up.jsonl: image path '../secret.png' leaves the prompt file's folder"):
        load_rows("suite/up.jsonl")


@pytest.mark.parametrize("name,text,want", [
    ("p.jsonl", '{"image": "a.png", "prompt": "x"}\n', [("x", "a.png")]),
    ("p.txt", "a cat\n", [("a cat", "")]),
    ("p.json", '[{"prompt_en": "a dog", "dimension": ["subject_consistency"]}]', [("a dog", "")]),
    ("i2v.txt", "a.png;a car\n", [("a car", "a.png")]),
])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, text, want):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    rows = load_rows(str(tmp_path / name))
    assert [(r["prompt"], r["image"].rsplit("/", 1)[-1]) for r in rows] == want


def test_auto_tells_i2v_from_text_by_its_lines(tmp_path):
    (tmp_path / "i2v.txt").write_text("a.png;a car\n\nsub/b.JPG; a road; at night\n")
    (tmp_path / "text.txt").write_text("a car; then a truck\na.png;mixed\n")
    assert detect_format(str(tmp_path / "i2v.txt")) == "i2v" and detect_format(str(tmp_path / "text.txt")) == "text"
    assert [r["prompt"] for r in load_rows(str(tmp_path / "i2v.txt"))] == ["a car", "a road; at night"]


def test_a_pinned_format_that_does_not_fit_says_where_and_how_to_change_it(tmp_path):
    vbench = tmp_path / "VBench_full_info.json"
    vbench.write_text('[{"prompt_en": "a dog", "dimension": ["subject_consistency"]}]')
    with pytest.raises(DataError) as e:
        load_rows(str(vbench), "i2v")
    assert str(e.value) == (f"{vbench}:1: expected `image_path;prompt`, got '[{{\"prompt_en\": \"a dog\", "
                            "\"dimension\": [\"subject_consistency\"]}]' (read as generate.prompt_format=i2v, "
                            "which the config pins; the file looks like vbench: set generate.prompt_format=auto "
                            "or vbench)")


def test_generate_demo_config_reads_every_documented_prompt_source(tmp_path):
    """generate_demo.yaml pins no format: an i2v file, a JSONL file and a synth folder all load; a VBench JSON
    gets the image-conditioning message, not a parse error."""
    from vidgen.data.synth import make_moving_shapes

    make_moving_shapes(str(tmp_path / "data"), 2, 2, 16, 16, seed=0)
    (tmp_path / "p.txt").write_text("data/sample_000/0.png;a\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "data/sample_001/0.png"}) + "\n")
    cfg_file = ROOT / "jobs" / "configs" / "generate_demo.yaml"
    for src, n in (("p.txt", 2), ("p.jsonl", 2), ("data", 4)):
        videos = prepare_rows(load_config(cfg_file, [f"generate.prompts={tmp_path / src}"]))
        assert len(videos) == n and all(Path(v["image"]).is_file() for v in videos), src
    (tmp_path / "v.json").write_text('[{"prompt_en": "a dog", "dimension": ["subject_consistency"]}]')
    with pytest.raises(ConfigError, match="generate.images: SVD is image-conditioned, and 1 prompts have no image"):
        prepare_rows(load_config(cfg_file, [f"generate.prompts={tmp_path / 'v.json'}"]))
    demo = (ROOT / "jobs" / "configs" / "demo.yaml").read_text()
    assert "PROMPTS" not in demo and "generate.prompts=./work/demo-data" in demo
