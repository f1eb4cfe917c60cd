"""The `vidgen` command: help texts, one-line errors with exit status 2, config show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vidgen.cli import build_parser, main
from vidgen.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "jobs" / "configs" / "demo.yaml"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidgen.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def subcommand_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if nested:
            for child_name, child in nested[0].choices.items():
                yield f"{name} {child_name}", child
        else:
            yield name, p


def test_every_argument_of_every_subcommand_has_help():
    names = []
    for name, p in subcommand_parsers():
        names.append(name)
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"`vidgen {name}`: argument {action.dest} has no help text"
        assert p.description, f"`vidgen {name}` has no description"
    assert {"demo", "train", "generate", "eval", "config show", "prepare synth"} <= set(names)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["config", "show", "--help"], ["demo", "--help"]])
def test_help_exits_zero_and_explains(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: vidgen" in out and len(out.splitlines()) > 5


def test_bad_value_is_one_line_and_exit_2():
    proc = run_cli("train", "--config", str(DEMO_YAML), "train.zero_stage=7")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"vidgen: error: {DEMO_YAML}: train.zero_stage=7: expected one of 0, 1, 2, 3"
    assert "Traceback" not in proc.stderr


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n  lr: [1e-4\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vidgen: error: {bad}:4:") and "YAML syntax error" in err
    assert len(err.splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    from vidgen.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["config", "show", "--debug", str(DEMO_YAML), "train.zero_stage=9"])


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", str(DEMO_YAML), "train.lr=3e-4", "generate.fifo.partitions=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == pytest.approx(3e-4)
    assert shown["generate"]["fifo"]["partitions"] == 3
    assert shown["train"]["zero_stage"] == 2  # from the file
    assert shown["eval"]["batch_size"] == 4  # a default the file does not state
    assert load_config(None, []).model_validate(shown) == load_config(DEMO_YAML, ["train.lr=3e-4",
                                                                                  "generate.fifo.partitions=3"])


def test_prepare_synth_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "clips"
    assert main(["prepare", "synth", str(out), "--videos", "2", "--frames", "3", "--height", "16",
                 "--width", "24", "--format", "jpg"]) == 0
    assert sorted(p.name for p in (out / "sample_000").iterdir()) == ["0.jpg", "1.jpg", "2.jpg", "prompt.txt"]
    assert "wrote 2 clips" in capsys.readouterr().out


def test_missing_weights_error_says_no_download(tmp_path, capsys):
    from vidgen.models.svd import model as svd

    with pytest.raises(Exception) as e:
        svd.build("pretrained", path="stabilityai/stable-video-diffusion-img2vid-xt")
    assert "never downloads weights" in str(e.value) and "model.path" in str(e.value)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_validates_and_opens_with_its_command(path):
    lines = path.read_text().splitlines()
    head = [ln for ln in lines[:8] if ln.startswith("#")]
    assert head and any(cmd in ln for ln in head for cmd in ("vidgen ", "ray job submit", "python jobs/")), \
        f"{path.name} must open with a comment giving the exact command that runs it"
    load_config(path)


def test_data_inspect_and_prepare_pack_commands(tmp_path, capsys):
    import json

    src, out = tmp_path / "clips", tmp_path / "shards"
    assert main(["prepare", "synth", str(src), "--videos", "3", "--frames", "6", "--height", "16",
                 "--width", "16"]) == 0
    (src / "sample_001" / "prompt.txt").write_text("")  # one bad sample: empty prompt
    capsys.readouterr()
    assert main(["data", "inspect", str(src), "--layout", "hotshot", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 3 and report["usable"] == 2
    assert [b["uri"].rsplit("/", 1)[-1] for b in report["bad"]] == ["sample_001"]
    assert main(["prepare", "pack", str(src), "--layout", "hotshot", "--out", str(out), "--num-frames", "4",
                 "--height", "16", "--width", "16", "--clips-per-shard", "1", "--max-bad-fraction", "0.5"]) == 0
    assert capsys.readouterr().out.startswith("2 clips in ")  # shards are planned per sample, before reading
    assert main(["data", "inspect", str(out), "--layout", "shards", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usable"] == 2


@pytest.mark.parametrize("argv", [["--debug", "config", "show"], ["config", "show", "--debug"],
                                  ["--debug", "config", "show", "-v"]])
def test_debug_works_before_and_after_the_command(argv):
    from vidgen.errors import ConfigError

    with pytest.raises(ConfigError, match="train.zero_stage=9"):
        main([*argv, str(DEMO_YAML), "train.zero_stage=9"])


def test_debug_before_the_command_still_one_line_without_it(capsys):
    assert main(["-v", "config", "show", str(DEMO_YAML), "train.zero_stage=9"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--config", str(DEMO_YAML), "train.lr=3e-4"],
                                  ["-c", str(DEMO_YAML), "train.lr=3e-4"],
                                  ["train.lr=3e-4", "--config", str(DEMO_YAML)]])
def test_config_show_takes_config_as_an_option_too(argv, capsys):
    assert main(["config", "show", *argv]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == pytest.approx(3e-4) and shown["train"]["zero_stage"] == 2  # file and override


def test_config_show_option_names_a_missing_file(tmp_path, capsys):
    assert main(["config", "show", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"vidgen: error: {tmp_path / 'nope.yaml'}: config file not found"
