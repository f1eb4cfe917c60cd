"""The hostile-input corpus: every entry point fed truncated, zero-byte, huge, wrongly typed, looping, non-UTF-8
and path-traversing inputs.

Each input must end in a clear one-line error (the CLI's `vidgen: error: ...` naming the file, exit 2) or a
counted skip (the sample in the data report with its reason), never a stack trace; and nothing may be written
outside the output root. CLI entry points run as real `vidgen` subprocesses; weight files go through the loaders
the jobs call (a whole Ray job per bad file would cost minutes). No Ray here: the suite takes seconds.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidgen.errors import VidgenError

VIDGEN = Path(sys.executable).parent / "vidgen"


def png(h: int = 16, w: int = 16, seed: int = 0) -> bytes:
    frame = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that is all header: 8-bit RGB at width x height, no pixel data (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


class Evil:
    """A pickle that runs a command when loaded: what a hostile .pt file is."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def huge_video(path: Path, side: int = 8200, frames: int = 3) -> None:
    """A black mp4 of side x side frames (over vidgen's 8192x8192 limit); x264 makes it in about a second."""
    import av

    with av.open(str(path), "w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=8)  # PyAV's wheels ship x264; mpeg4 stops at 8191
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame(side, side, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for _ in range(frames):
            c.mux(stream.encode(frame))
        c.mux(stream.encode())


def files_under(root: Path) -> set[str]:
    out = set()
    for d, dirs, names in os.walk(root):
        out |= {os.path.join(d, n) for n in names + [x for x in dirs if os.path.islink(os.path.join(d, x))]}
    return out


def vidgen(*args: str, cwd: Path, timeout: float = 120) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDGEN_FAULT")}
    p = subprocess.run([str(VIDGEN), *args], cwd=cwd, capture_output=True, timeout=timeout, env=env)
    # stdout/stderr as bytes: output that is not UTF-8 must not break the check itself
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def assert_one_line_error(rc: int, err: str, *names: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("vidgen: error: ")]
    assert rc == 2 and len(lines) == 1, f"exit {rc}, stderr:\n{err}"
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


class Sandbox:
    """tmp_path with a `cwd` to run in. `inputs_ready()` after writing the hostile inputs; `check(*roots)`: no
    file appeared since, outside `roots`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "cwd").mkdir()
        self.before = files_under(tmp)

    def inputs_ready(self) -> None:
        self.before = files_under(self.tmp)

    def check(self, *roots: Path) -> None:
        new = files_under(self.tmp) - self.before
        outside = sorted(f for f in new if not any(f.startswith(f"{r}/") for r in roots))
        assert not outside, f"written outside {[str(r) for r in roots]}: {outside}"


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


# ---- frames and videos: a dataset root with one bad sample of each kind beside good ones ---------------------


def hostile_frames(root: Path) -> dict[str, str]:
    """Frame folders: two good ones and one per hostile kind; returns {folder: kind}."""
    good = [png(seed=i) for i in range(3)]
    kinds = {"zero-byte frame": b"", "truncated frame": good[0][: len(good[0]) // 2],
             "huge dimensions (100000x100000 header)": png_header(100_000, 100_000),
             "wrong type (text named .png)": b"just some text\n"}
    folders = {}
    for name in ("good_a", "good_b"):
        (root / name).mkdir(parents=True)
        for t, data in enumerate(good):
            (root / name / f"{t}.png").write_bytes(data)
    for i, (kind, data) in enumerate(kinds.items()):
        d = root / f"bad_{i}"
        d.mkdir()
        for t, frame in enumerate(good):
            (d / f"{t}.png").write_bytes(data if t == 1 else frame)
        folders[d.name] = kind
    d = root / "bad_loop"  # a frame that is a symlink to itself (ELOOP on open)
    d.mkdir()
    for t, frame in enumerate(good):
        if t == 1:
            os.symlink("1.png", d / "1.png")
        else:
            (d / f"{t}.png").write_bytes(frame)
    folders[d.name] = "symlink loop (a frame linking to itself)"
    os.symlink("..", root / "good_a" / "up")  # a directory loop: listing must not follow it
    d = root / "bad_name"
    d.mkdir()
    for t, frame in enumerate(good):  # a non-UTF-8 file name (bytes 0xff 0xfe), valid pixels
        with open(os.path.join(os.fsencode(d), b"\xff\xfe" + str(t).encode() + b".png"), "wb") as f:
            f.write(frame)
    folders[d.name] = "non-UTF-8 file names"
    return folders


@pytest.mark.parametrize("layout", ["frames", "videos"])
def test_hostile_samples_are_skipped_and_counted_never_crash(sandbox, layout, faults):
    from vidgen.data.video import write_video

    tmp = sandbox.tmp
    root, out = tmp / "data", tmp / "packed"
    if layout == "frames":
        kinds = hostile_frames(root)
        good = 2
    else:
        root.mkdir()
        clip = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
        write_video(str(root / "good_a.mp4"), clip, fps=8)
        data = (root / "good_a.mp4").read_bytes()
        (root / "good_b.mp4").write_bytes(data)
        (root / "bad_zero.mp4").write_bytes(b"")
        (root / "bad_truncated.mp4").write_bytes(data[: len(data) // 2])
        (root / "bad_garbage.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
        (root / "bad_text.mp4").write_text("not a video\n")
        os.symlink("bad_loop.mp4", root / "bad_loop.mp4")
        with open(os.path.join(os.fsencode(root), b"bad_name_\xff.mp4"), "wb") as f:
            f.write(data)
        huge_video(root / "bad_huge.mp4")
        kinds = {"bad_zero.mp4": "zero-byte video", "bad_truncated.mp4": "truncated video",
                 "bad_garbage.mp4": "random bytes as .mp4", "bad_text.mp4": "wrong type (text named .mp4)",
                 "bad_loop.mp4": "symlink loop", "bad_name_": "non-UTF-8 file name",
                 "bad_huge.mp4": "huge dimensions (8200x8200 frames)"}
        good = 2
    sandbox.inputs_ready()

    rc, text, err = vidgen("data", "inspect", str(root), "--layout", layout, "--json", "--num-frames", "3",
                           cwd=tmp / "cwd")
    assert rc == 0 and "Traceback" not in err, err
    report = json.loads(text)
    assert report["samples"] >= good + 1

    args = ("prepare", "pack", str(root), "--layout", layout, "--out", str(out), "--num-frames", "3",
            "--height", "16", "--width", "16", "--frame-format", "png")
    rc, _, err = vidgen(*args, cwd=tmp / "cwd")  # default --max-bad-fraction 0.05: fails, in one line
    line = assert_one_line_error(rc, err, "skipped")
    rc, text, err = vidgen(*args, "--max-bad-fraction", "1", cwd=tmp / "cwd")
    assert rc == 0 and "Traceback" not in err, err
    manifest = json.loads((out / "_manifest.json").read_text())
    bad = {b["uri"]: b for b in manifest["report"]["bad"]}
    counted = {kind: [u for u in bad if marker in u] for marker, kind in kinds.items()}
    for kind, uris in counted.items():
        assert len(uris) == 1, f"{kind}: {uris} in the skip report {sorted(bad)}"
    assert manifest["clips"] == good and manifest["report"]["skipped"] == len(kinds), manifest["report"]
    assert manifest["samples"] == good + len(kinds), "a sample vanished from the listing without a count"
    if layout == "videos":  # refused for its size before decoding, not for some later symptom
        assert "8200x8200" in bad[counted["huge dimensions (8200x8200 frames)"][0]]["detail"], bad
    sandbox.check(out)
    for kind, uris in counted.items():
        faults.record(f"{layout}: {kind}", injected=1, survived=True, lost=0,
                      detail=f"skipped and counted: {bad[uris[0]]['reason']}")
    faults.record(f"{layout}: too many bad samples for --max-bad-fraction", injected=1, survived=True, lost=0,
                  detail=line[:90])


# ---- configs --------------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))

CONFIGS = {  # name: (bytes, what the error must name)
    "truncated YAML": (b"train:\n  lr: [1e-4,\n  zero_stage: 2\n", "YAML syntax error"),
    "non-UTF-8": (b"train:\n  lr: 1e-4 \xff\xfe\n", "cannot read config file"),
    "wrong type": (b"train:\n  lr: fast\n", "train.lr"),
    "list at the top": (b"- train\n- lr\n", "expected a mapping"),
    "YAML alias bomb (9^9 elements)": (f"train:\n  lr: 1e-4\n{BOMB}generate:\n  seeds: *i\n".encode(),
                                       "aliases expand to more than"),
    "self-referring alias": (b"generate:\n  seeds: &s [1, *s]\n", "refer to themselves"),
    "python object tag": (b"train: !!python/object/apply:os.system ['touch PWNED']\n", "YAML syntax error"),
    "2 MiB file": (b"# " + b"x" * (2 << 20) + b"\n", "more than a config can be"),
}


def test_hostile_configs_get_one_line_errors(sandbox, faults):
    tmp = sandbox.tmp
    paths = {}
    for name, (data, _) in CONFIGS.items():
        paths[name] = tmp / f"{name.split()[0]}.yaml"
        paths[name].write_bytes(data)
    os.symlink("loop.yaml", tmp / "loop.yaml")
    (tmp / "dir.yaml").mkdir()
    sandbox.inputs_ready()
    cases = {**{n: (paths[n], e) for n, (_, e) in CONFIGS.items()},
             "symlink loop": (tmp / "loop.yaml", "cannot read config file"), "a directory": (tmp / "dir.yaml", "")}
    for name, (path, expect) in cases.items():
        rc, _, err = vidgen("config", "show", str(path), cwd=tmp / "cwd", timeout=60)
        line = assert_one_line_error(rc, err, str(path), expect)
        assert len(line) < 1000, f"{name}: the error line is {len(line)} characters"
        faults.record(f"config: {name}", injected=1, survived=True, lost=0,
                      detail=line[15:].replace(f"{tmp}/", "")[:90])
    rc, _, err = vidgen("train", "--config", str(paths["wrong type"]), "data.source=../../etc", cwd=tmp / "cwd")
    assert_one_line_error(rc, err, "train.lr")
    assert not (tmp / "cwd" / "PWNED").exists()
    sandbox.check()


# ---- prompt files ---------------------------------------------------------------------------------------


def generate(tmp: Path, prompts: Path, *extra: str) -> tuple[int, str, str]:
    return vidgen("generate", f"generate.prompts={prompts}", f"run.workdir={tmp / 'work'}", "model.num_frames=4",
                  "generate.num_frames=4", "generate.images=" + str(tmp / "img.png"), *extra, cwd=tmp / "cwd")


PROMPT_FILES = {  # file name: (bytes, what the error must name)
    "zero.txt": (b"", "no prompt rows"),
    "latin1.txt": ("a caf\xe9 at night\n".encode("latin-1"), "not utf-8 text"),
    "truncated.json": (b'[{"prompt_en": "a cat", "dimension": ["color"]}, {"prompt_en": "a d', "not JSON"),
    "types.json": (b'{"prompt_en": 5}', "expected VBench_full_info.json"),
    "image-type.jsonl": (b'{"image": 5, "prompt": "a cat"}\n', ':1: expected an object with an "image"'),
    "seed-type.jsonl": (b'{"image": "img.png", "prompt": "a cat"}\n{"image": "img.png", "seed": "abc"}\n',
                        ':2: "seed" must be an integer'),
    "prompt-type.jsonl": (b'{"image": "img.png", "prompt": ["a", "b"]}\n', ':1: "prompt" must be a string'),
    "not-object.jsonl": (b"[1, 2]\n", ":1: expected an object"),
    "traversal.i2v": (b"../../../../etc/passwd;a cat\n", "leaves the prompt file's folder"),
}


def test_hostile_prompt_files_fail_before_any_work(sandbox, faults):
    tmp = sandbox.tmp
    (tmp / "img.png").write_bytes(png())
    for name, (data, _) in PROMPT_FILES.items():
        (tmp / name).write_bytes(data)
    os.symlink("loop.txt", tmp / "loop.txt")
    sandbox.inputs_ready()
    for name, (_, expect) in [*PROMPT_FILES.items(), ("loop.txt", (b"", ""))]:
        fmt = ["generate.prompt_format=i2v"] if name.endswith(".i2v") else []
        rc, _, err = generate(tmp, tmp / name, *fmt)
        line = assert_one_line_error(rc, err, name, expect)
        faults.record(f"prompts: {name if name != 'loop.txt' else 'symlink loop'}", injected=1, survived=True,
                      lost=0, detail=line[15:].replace(f"{tmp}/", "")[:90])
    sandbox.check()
    assert not (tmp / "work").exists(), "a bad prompt file started work"


def test_hostile_prompts_and_ids_name_files_inside_the_output_root(tmp_path, faults):
    """Prompts and ids that look like paths, control bytes, a 20 kB prompt: each video's name is one plain file
    name in videos/, distinct prompts get distinct names, and nothing can point outside the job's folder."""
    from vidgen.config import load_config
    from vidgen.generate.job import prepare_rows
    from vidgen.generate.outputs import output_dir

    hostile = ["../../../../tmp/escape", "/etc/passwd", "..", ".", ".hidden", "a/b\\c", "nul\x00byte",
               "new\nline", "x" * 20_000, "caf\u00e9 \u2603 \U0001f600", ""]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"image": "img.png", "prompt": p, "id": p}) + "\n" for p in hostile))
    text = tmp_path / "p.txt"
    text.write_text("".join(p.replace("\n", " ").replace("\x00", " ") + "\n" for p in hostile if p.strip()))
    for src, naming in ((jsonl, "hash"), (text, "vbench"), (text, "hash")):
        cfg = load_config(None, [f"generate.prompts={src}", f"run.workdir={tmp_path / 'work'}",
                                 f"generate.naming={naming}", "generate.images=img.png"])
        videos = prepare_rows(cfg)
        root = os.path.realpath(output_dir(cfg))
        names = [v["name"] for v in videos]
        for name in names:
            assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
            assert len(name.encode()) <= 255, f"{len(name.encode())}-byte name"
            assert os.path.dirname(os.path.realpath(os.path.join(root, name))) == root
        assert len(set(names)) == len(names), "two different prompts share a file name"
    faults.record("prompts: path-like / control-byte / 20 kB prompts and ids", injected=len(hostile),
                  survived=True, lost=0, detail="every name one plain file in videos/")


# ---- weights files --------------------------------------------------------------------------------------


def weight_files(tmp: Path, good: dict[str, torch.Tensor], suffix: str) -> dict[str, Path]:
    """Hostile variants of a valid weights file (`good` saved in the format `suffix` names)."""
    from safetensors.torch import save_file

    valid = tmp / f"valid{suffix}"
    if suffix == ".safetensors":
        save_file(good, str(valid))
    else:
        torch.save(good, valid)
    data = valid.read_bytes()
    files = {"zero-byte": b"", "truncated": data[: len(data) // 2], "JSON, not weights": b'{"weight": [1, 2]}',
             "wrong shapes": None}
    if suffix == ".safetensors":  # a header that claims 2^60 bytes of JSON
        files["huge header length"] = struct.pack("<Q", 1 << 60) + b"{}"
    else:
        buf = io.BytesIO()
        pickle.dump(Evil(tmp / "PWNED"), buf)
        files["pickle that runs code"] = buf.getvalue()
    out = {}
    for name, content in files.items():
        path = tmp / f"{name.replace(' ', '-').replace(',', '')}{suffix}"
        if content is None:
            wrong = {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in good.items()}
            save_file(wrong, str(path)) if suffix == ".safetensors" else torch.save(wrong, path)
        else:
            path.write_bytes(content)
        out[name] = path
    os.symlink(f"loop{suffix}", tmp / f"loop{suffix}")
    out["symlink loop"] = tmp / f"loop{suffix}"
    return out


def check_weights(kind: str, load, files: dict[str, Path], tmp: Path, faults) -> None:
    for name, path in files.items():
        with pytest.raises(VidgenError) as e:
            load(str(path))
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and len(msg) < 1000, f"{kind} {name}: {msg!r}"
        faults.record(f"weights: {kind}, {name}", injected=1, survived=True, lost=0,
                      detail=msg.replace(str(tmp) + "/", "")[:90])
    assert not (tmp / "PWNED").exists(), "a weights file ran code"


def test_hostile_i3d_weights(tmp_path, faults):
    from vidgen.models.i3d import build_i3d, load_checkpoint

    model = build_i3d("tiny")
    good = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    check_weights("I3D .pt", lambda p: load_checkpoint(model, p), weight_files(tmp_path, good, ".pt"), tmp_path,
                  faults)


def test_hostile_lora_weights(tmp_path, faults):
    from vidgen.config import LoraConfig
    from vidgen.models.lora import inject_lora, load_lora, lora_state_dict
    from vidgen.models.svd import model as svd

    donor = svd.tiny(num_frames=4).unet
    inject_lora(donor, LoraConfig(rank=2))
    good = {f"unet.{k}": v for k, v in lora_state_dict(donor).items()}
    files = weight_files(tmp_path, good, ".safetensors")
    bad_cfg = tmp_path / "bad-config"
    bad_cfg.mkdir()
    (bad_cfg / "adapter_model.safetensors").write_bytes((tmp_path / "valid.safetensors").read_bytes())
    (bad_cfg / "adapter_config.json").write_bytes(b'{"r": 2, "lora_alpha": ')
    files["truncated adapter_config.json"] = bad_cfg
    check_weights("LoRA", lambda p: load_lora(svd.tiny(num_frames=4).unet, p), files, tmp_path, faults)


def test_hostile_hotshot_temporal_weights(tmp_path, faults):
    from vidgen.models.hotshot.model import tiny_unet
    from vidgen.models.hotshot.weights import read_temporal_file, temporal_state_dict

    unet = tiny_unet()
    good = temporal_state_dict(unet)
    for suffix in (".safetensors", ".pt"):
        d = tmp_path / suffix.strip(".")
        d.mkdir()
        check_weights(f"Hotshot temporal {suffix}", lambda p: read_temporal_file(unet, p),
                      weight_files(d, good, suffix), d, faults)


def test_hostile_unet_directory(tmp_path, faults):
    """generate.unet / a trained export: config.json and weights damaged in turn."""
    from vidgen.models.svd import model as svd

    good = tmp_path / "unet"
    svd.tiny(num_frames=4).unet.save_pretrained(good)
    weights = next(good.glob("*.safetensors"))
    cases = {"config.json not UTF-8": ("config.json", b'{"sample_size": 8, "x": "\xff"}'),
             "config.json truncated": ("config.json", (good / "config.json").read_bytes()[:40]),
             "config.json wrong type": ("config.json", b'{"sample_size": "big", "in_channels": [8]}'),
             "weights truncated": (weights.name, weights.read_bytes()[:1000]),
             "weights zero-byte": (weights.name, b"")}
    for name, (file, data) in cases.items():
        d = tmp_path / name.replace(" ", "-").replace(".", "")
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(data if f.name == file else f.read_bytes())
        with pytest.raises(VidgenError) as e:
            svd.load_unet(str(d))
        msg = str(e.value)
        assert "\n" not in msg and str(d) in msg and len(msg) < 1000, f"{name}: {msg!r}"
        faults.record(f"weights: UNet directory, {name}", injected=1, survived=True, lost=0,
                      detail=msg.replace(str(tmp_path) + "/", "")[:90])


# ---- job entrypoints with bad weights paths: refused on the driver, before Ray starts ---------------------------


def bad_weights(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (command line, what the error line must name)}: the generate, eval and nightly entrypoints."""
    (tmp / "img.png").write_bytes(png())
    (tmp / "p.jsonl").write_text('{"image": "img.png", "prompt": "a cat"}\n')
    (tmp / "vae").mkdir()
    (tmp / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (tmp / "i3d.pt").write_bytes(b"PK\x03\x04" + bytes(200))  # a zip header, then nothing: a cut-off download
    gen = ["generate", f"generate.prompts={tmp / 'p.jsonl'}", f"run.workdir={tmp / 'work'}", "model.num_frames=4",
           "generate.num_frames=4"]
    nightly = [sys.executable, str(Path(__file__).parents[2] / "jobs" / "nightly_eval.py"),
               f"run.workdir={tmp / 'work'}", f"eval.real={tmp}", f"generate.prompts={tmp / 'p.jsonl'}"]
    return {
        "generate: a typo in generate.unet": ([*gen, f"generate.unet={tmp / 'unte'}"], "generate.unet="),
        "generate: model.path missing": ([*gen, "model.flavor=pretrained", f"model.path={tmp / 'svd'}"], "model.path="),
        "generate: a folder that is not a UNet": ([*gen, f"generate.unet={tmp / 'vae'}"], "AutoencoderKL"),
        "eval: a corrupt I3D file": (["eval", "fvd", "--real", str(tmp), "--fake", str(tmp), "--i3d-weights",
                                      str(tmp / "i3d.pt"), f"run.workdir={tmp / 'work'}"], "eval.i3d_path="),
        "nightly: a bad weights path": ([*nightly, f"generate.unet={tmp / 'unte'}"], "generate.unet="),
    }


@pytest.mark.parametrize("case", ["generate: a typo in generate.unet", "generate: model.path missing",
                                  "generate: a folder that is not a UNet", "eval: a corrupt I3D file",
                                  "nightly: a bad weights path"])
def test_bad_weights_paths_end_jobs_before_any_actor(sandbox, faults, case):
    """One line naming the field and the path, exit 2, nothing else on stderr (no Ray started: no Ray traceback),
    nothing written."""
    tmp = sandbox.tmp
    argv, expect = bad_weights(tmp)[case]
    sandbox.inputs_ready()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIDGEN_FAULT", "RAY_ADDRESS"))}
    cmd = argv if argv[0] == sys.executable else [str(VIDGEN), *argv]
    p = subprocess.run(cmd, cwd=tmp / "cwd", capture_output=True, timeout=120, env=env)
    err = p.stderr.decode("utf-8", "replace")
    prefix = "nightly_eval: error: " if case.startswith("nightly") else "vidgen: error: "
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(prefix), f"exit {p.returncode}:\n{err}"
    assert expect in lines[0] and str(tmp) in lines[0], lines[0]
    assert "rerun" not in lines[0] and "internal error" not in lines[0]
    sandbox.check()
    assert not (tmp / "work").exists(), "a job with bad weights started work"
    faults.record(f"weights path: {case}", injected=1, survived=True, lost=0,
                  detail=lines[0][len(prefix):].replace(f"{tmp}/", "")[:90])
