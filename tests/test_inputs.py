"""Wrong input refused or listed, never accepted silently: cameras a tree lacks, duplicate YAML keys, list
overrides, empty sample folders, frames that only a full decode finds broken, prepared clips' frame rate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidgen.cli import main
from vidgen.config import load_config
from vidgen.data import inspect_source, make_moving_shapes, pack, prepare_opv2v, read_clips
from vidgen.data.decode import decode_image
from vidgen.errors import ConfigError, DataError


def _opv2v(root: Path, cameras=(0, 1), timestamps=range(0, 60, 2)) -> Path:
    folder = root / "train" / "2021_08_16_22_26_54" / "641"
    folder.mkdir(parents=True)
    for t in timestamps:
        for k in cameras:
            Image.new("RGB", (16, 16), (t, 50 * k, 7)).save(folder / f"{t:06d}_camera{k}.png")
    return root


def _jpeg(size=(128, 96)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_camera_the_opv2v_tree_lacks_is_refused_naming_the_cameras_found(tmp_path: Path, capsys):
    root, out = _opv2v(tmp_path / "opv2v"), tmp_path / "clips"
    assert main(["prepare", "opv2v", str(root), "--out", str(out), "--camera", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "camera 5 (data.camera / --camera)" in err
    assert err.rstrip().endswith("no camera5 frames; cameras found: 0, 1")
    assert not out.exists()  # nothing written

    assert main(["data", "inspect", str(root), "--camera", "7"]) == 2
    assert "no camera7 frames; cameras found: 0, 1" in capsys.readouterr().err
    with pytest.raises(DataError, match="cameras found: 0, 1"):
        read_clips(str(root), "opv2v", num_frames=2, height=16, width=16, camera=3, report_dir=str(tmp_path / "r"))
    assert inspect_source(str(root), camera=1)["usable"] == 1  # a camera it has


def test_duplicate_yaml_keys_are_refused_naming_the_key_and_both_lines(tmp_path: Path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  zero_stage: 2\n  lr: 2e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:4: duplicate key 'lr' (first at line 2); a key may appear once per section"
    path.write_text("data:\n  height: 64\ntrain:\n  lr: 1e-4\ndata:\n  width: 64\n")
    assert main(["config", "show", str(path)]) == 2
    assert capsys.readouterr().err == (f"vidgen: error: {path}:5: duplicate key 'data' (first at line 1); a key may "
                                       "appear once per section\n")
    # A merge brings keys in that the mapping may override: not a duplicate.
    path.write_text("data: &d\n  height: 64\n  width: 64\ngenerate:\n  <<: *d\n  height: 128\n")
    assert (load_config(path).generate.height, load_config(path).generate.width) == (128, 64)


def test_list_overrides_take_the_comma_form_and_name_the_syntax_when_wrong():
    cfg = load_config(None, ["train.lora.target_modules=to_q,to_k", "generate.seeds=3, 5", "train.lora.patterns=",
                             "generate.extra_outputs=gif"])
    assert cfg.train.lora.target_modules == ["to_q", "to_k"]
    assert (cfg.generate.seeds, cfg.train.lora.patterns, cfg.generate.extra_outputs) == ([3, 5], [], ["gif"])
    assert load_config(None, ["train.lora.target_modules=[to_v, to_out.0]"]).train.lora.target_modules == [
        "to_v", "to_out.0"]  # the YAML form still works
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.trainable_patterns={a: 1}"])
    assert str(e.value) == ("train.trainable_patterns={a: 1}: expected a list: key=a,b,c on the command line, "
                            "[a, b, c] in YAML")
    with pytest.raises(ConfigError, match=r"generate.seeds.1=x: expected an integer"):
        load_config(None, ["generate.seeds=1,x"])


def test_empty_sample_folders_are_listed_and_counted_as_no_frames(tmp_path: Path):
    root = tmp_path / "data"
    make_moving_shapes(str(root), num_videos=2, num_frames=6, height=16, width=16, seed=0)
    (root / "prompt_only").mkdir()
    (root / "prompt_only" / "prompt.txt").write_text("frames never written")
    (root / "empty").mkdir()
    d = inspect_source(str(root))
    assert (d["layout"], d["samples"], d["usable"]) == ("hotshot", 4, 2)
    assert {Path(b["uri"]).name: b["reason"] for b in d["bad"]} == {"empty": "no frames", "prompt_only": "no frames"}
    assert d["sizes"] == {"16x16": 2}  # no 0x0 size from a folder without frames
    assert all(b["detail"].endswith("the sample folder holds no image frames") for b in d["bad"])

    stream = read_clips(str(root), "hotshot", num_frames=4, height=16, width=16, train=False,
                        max_bad_fraction=0.5, report_dir=str(tmp_path / "r"))
    assert len(list(stream.iter_local())) == 2
    report = stream.report()
    assert (report["total"], report["skipped"], report["reasons"]) == (4, 2, {"no frames": 2})

    # frames layout at any depth: a folder whose prompt.txt sits above frame folders is no sample of its own
    nested = tmp_path / "nested"
    make_moving_shapes(str(nested / "scene"), num_videos=2, num_frames=4, height=16, width=16, seed=0)
    (nested / "scene" / "prompt.txt").write_text("the scene")
    (nested / "other" / "cam0").mkdir(parents=True)
    d = inspect_source(str(nested), "frames")
    assert {Path(b["uri"]).relative_to(nested).as_posix(): b["reason"] for b in d["bad"]} == {
        "other/cam0": "no frames"}
    assert d["usable"] == 2


def test_decode_finds_a_jpeg_truncated_after_its_header(tmp_path: Path):
    root = tmp_path / "data"
    for name in ("good", "cut"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.jpg").write_bytes(_jpeg())
        (root / name / "prompt.txt").write_text(name)
    whole = (root / "cut" / "2.jpg").read_bytes()
    (root / "cut" / "2.jpg").write_bytes(whole[:len(whole) // 2])  # header intact, half the scan data gone

    assert inspect_source(str(root))["usable"] == 2  # the header check cannot see it
    d = inspect_source(str(root), decode=True)
    assert (d["usable"], d["decoded"], d["reasons"]) == (1, True, {"corrupt image": 1})
    assert d["bad"][0]["detail"].startswith(f"{root / 'cut' / '2.jpg'}: cannot decode image: image file is truncated")

    packed = tmp_path / "packed"  # packed clips decode whole too, and clean ones pass
    pack(str(root / "good"), "hotshot", str(packed), num_frames=4, height=16, width=16, train=False)
    assert inspect_source(str(packed), decode=True)["usable"] == 1


def test_image_errors_name_the_file_not_pils_buffer(tmp_path: Path):
    with pytest.raises(DataError) as e:
        decode_image(b"not an image", "clips/a/3.jpg")
    assert str(e.value) == ("clips/a/3.jpg: cannot decode image: not an image format PIL reads (expected JPEG, PNG, "
                            "WebP or BMP)")
    root = tmp_path / "data"
    make_moving_shapes(str(root), num_videos=1, num_frames=4, height=16, width=16, seed=0)
    (root / "sample_000" / "2.png").write_bytes(b"junk")
    for decode in (False, True):
        detail = inspect_source(str(root), decode=decode)["bad"][0]["detail"]
        assert detail == f"{root / 'sample_000' / '2.png'}: cannot decode image: not an image format PIL reads " \
                         "(expected JPEG, PNG, WebP or BMP)"


def test_prepared_opv2v_clips_carry_their_10_hz_to_inspect_and_training(tmp_path: Path):
    root, out = _opv2v(tmp_path / "opv2v", cameras=(0,)), tmp_path / "clips"
    assert prepare_opv2v(str(root), str(out))["clips"] == 1
    assert json.loads((out / "fps.json").read_text()) == {"fps": 10.0}
    assert inspect_source(str(out))["fps"] == {"10": 1}
    rows = list(read_clips(str(out), num_frames=4, height=16, width=16, fps=5, train=False,
                           report_dir=str(tmp_path / "r")).iter_local())
    assert [(r["fps"], r["stride"]) for r in rows] == [(5.0, 2)]  # 10 Hz strided to 5 fps, not 8 Hz to 8
    with pytest.raises(ConfigError, match=r"holds clips at 10.0 fps .*these would be 5 fps; prepare into a new --out"):
        prepare_opv2v(str(root), str(out), fps=5)
    (out / "fps.json").write_text('{"fps": "fast"}')
    with pytest.raises(DataError, match=r"fps.json: expected \{\"fps\": <frames per second > 0>\}"):
        inspect_source(str(out))


@pytest.mark.ray
def test_data_inspect_decode_runs_ray_tasks_and_lists_bad_frames(ray_session, tmp_path: Path, capsys):
    root = tmp_path / "data"
    make_moving_shapes(str(root), num_videos=3, num_frames=4, height=16, width=16, seed=0)
    jpg = root / "sample_001" / "1.png"
    whole = jpg.read_bytes()
    jpg.write_bytes(whole[:len(whole) * 3 // 4])  # the header (IHDR) intact, the pixel data cut
    capsys.readouterr()
    assert main(["data", "inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bad"] == []
    assert main(["data", "inspect", str(root), "--decode", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["usable"], [(Path(b["uri"]).name, b["reason"]) for b in report["bad"]]) == (
        2, [("sample_001", "corrupt image")])
    assert report["bad"][0]["detail"].startswith(f"{jpg}: cannot decode image")
