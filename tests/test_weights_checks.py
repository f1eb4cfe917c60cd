"""The driver-side weights checks (vidgen.models.loading and the families' check_weights): each bad file or folder
is refused in one line naming the config field, the path and what was expected, reading headers only; and the
driver's handling of an error raised inside a Ray actor (its own line, Ray's traceback of it not logged)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from vidgen.errors import ModelError, ray_failure
from vidgen.models import loading


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refused(fn, *names: str) -> str:
    with pytest.raises(ModelError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    return msg


def test_key_report_counts_missing_unexpected_and_wrong_shapes():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    assert loading.key_report(expected, dict(expected)) == ""
    report = loading.key_report(expected, {"a": (3, 2), "b": (4,), "x": (1,), "y": (1,)})
    assert report == ("1 missing keys (e.g. c); 2 unexpected keys (e.g. x, y); "
                      "1 keys with the wrong shape (e.g. a: file (3, 2), expected (2, 3))")


def test_safetensors_header_gives_shapes_and_refuses_damaged_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(5)}, str(good))
    assert loading.weights_header(str(good), "generate.lora") == {"w": (2, 3), "b": (5,)}
    data = good.read_bytes()
    cases = {"truncated": (data[:-4], "truncated"), "zero-byte": (b"", "0 bytes"),
             "huge-header": (struct.pack("<Q", 1 << 60) + b"{}", "header length"),
             "not-json": (struct.pack("<Q", 4) + b"{{{{", "not JSON")}
    for name, (content, why) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        refused(lambda p=path: loading.weights_header(str(p), "generate.lora"), f"generate.lora={path}", why)
    refused(lambda: loading.weights_header(str(tmp_path / "none.safetensors"), "generate.lora"), "cannot read it")


def test_state_dict_is_read_as_tensors_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, good)
    state = loading.read_state_dict(str(good), "eval.i3d_path")
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(tmp_path / "PWNED")))
    msg = refused(lambda: loading.read_state_dict(str(evil), "eval.i3d_path"), f"eval.i3d_path={evil}")
    assert "weights_only=False" not in msg and not (tmp_path / "PWNED").exists()
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, wrapped)
    assert set(loading.read_state_dict(str(wrapped), "f", unwrap=("model",))) == {"w"}
    refused(lambda: loading.read_state_dict(str(wrapped), "f"), "expected a state dict")
    torch.save({}, tmp_path / "empty.pt")
    refused(lambda: loading.read_state_dict(str(tmp_path / "empty.pt"), "f"), "(empty)")


def test_model_dir_checks_kind_class_and_weights(tmp_path):
    from vidgen.models.svd import model as svd
    from vidgen.models.svd.checks import check_unet

    unet = tmp_path / "unet"
    svd.tiny(num_frames=4).unet.save_pretrained(unet)
    config, shapes = loading.check_model_dir(str(unet), "generate.unet", ("UNetSpatioTemporalConditionModel",), "X")
    assert config["_class_name"] == "UNetSpatioTemporalConditionModel" and len(shapes) > 100
    check_unet(str(unet), "generate.unet")
    what = ("UNetSpatioTemporalConditionModel",)
    refused(lambda: loading.check_model_dir(str(tmp_path / "unte"), "generate.unet", what, "X"), "no such directory")
    weights = next(unet.glob("*.safetensors"))
    refused(lambda: loading.check_model_dir(str(weights), "generate.unet", what, "X"), "a file, not a directory")
    refused(lambda: loading.check_model_dir(str(tmp_path), "generate.unet", what, "X"), "no config.json")
    refused(lambda: loading.check_model_dir(str(unet), "generate.unet", ("AutoencoderKL",), "X"),
            "_class_name is 'UNetSpatioTemporalConditionModel'")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((unet / "config.json").read_bytes())
    refused(lambda: check_unet(str(bare), "generate.unet"), "no weights file")
    (bare / weights.name).write_bytes(weights.read_bytes()[:-100])
    refused(lambda: check_unet(str(bare), "generate.unet"), "truncated")
    (bare / weights.name).write_bytes(weights.read_bytes())  # weights of another width than its config.json says
    config = json.loads((unet / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 128]}))
    refused(lambda: check_unet(str(bare), "generate.unet"), "do not fit its config.json", "wrong shape")


def test_i3d_checked_on_the_meta_device(tmp_path):
    from vidgen.models.i3d import I3D, check_weights

    good = tmp_path / "i3d.pt"
    torch.save({k: v for k, v in I3D().state_dict().items() if not k.endswith("num_batches_tracked")}, good)
    check_weights(str(good))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:5000])
    refused(lambda: check_weights(str(corrupt)), f"eval.i3d_path={corrupt}", "never downloads")
    tiny = tmp_path / "tiny.pt"
    from vidgen.models.i3d import build_i3d

    torch.save(build_i3d("tiny").state_dict(), tiny)
    refused(lambda: check_weights(str(tiny)), "wrong shape")


def test_actor_errors_are_told_by_their_cause_and_not_logged_twice():
    from vidgen.ray_env import HideVidgenErrors

    text = ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker().__init__()"
            "\x1b[39m (pid=1)\nTraceback (most recent call last):\n  File x\nOSError: disk gone")
    assert ray_failure(RuntimeError(text)) == (False, "an actor failed to start: OSError: disk gone")
    assert ray_failure(RuntimeError("node lost\nmore")) == (True, "RuntimeError: node lost")
    hide = HideVidgenErrors()

    def record(exc):
        return logging.LogRecord("ray.data.exceptions", logging.ERROR, "f", 1, "Full stack trace:", None,
                                 (type(exc), exc, None))

    assert not hide.filter(record(RuntimeError(text + "\nvidgen.errors.ModelError: generate.unet=x: no such dir")))
    assert hide.filter(record(RuntimeError(text)))



def test_uris_are_checked_like_local_paths():
    """fsspec URIs (here memory://) go through the same checks, reading the header bytes only."""
    import fsspec
    from safetensors.torch import save

    fs, data = fsspec.filesystem("memory"), save({"w": torch.zeros(2, 3)})
    fs.pipe("/weights-check/unet/config.json", b'{"_class_name": "UNetSpatioTemporalConditionModel"}')
    fs.pipe("/weights-check/unet/diffusion_pytorch_model.safetensors", data)
    fs.pipe("/weights-check/cut.safetensors", data[:-3])
    config, shapes = loading.check_model_dir("memory://weights-check/unet", "generate.unet",
                                             ("UNetSpatioTemporalConditionModel",), "X")
    assert shapes == {"w": (2, 3)}
    refused(lambda: loading.weights_header("memory://weights-check/cut.safetensors", "generate.lora"),
            "generate.lora=memory://weights-check/cut.safetensors", "the file has 93")
    refused(lambda: loading.check_model_dir("memory://weights-check/unte", "generate.unet", (), "X"),
            "generate.unet=memory://weights-check/unte: no such directory")


def test_hotshot_temporal_layers_must_be_temporal(tmp_path):
    from vidgen.models.hotshot.checks import check_temporal

    good, other = tmp_path / "t.safetensors", tmp_path / "lora.safetensors"
    save_file({"down_blocks.0.temporal_attentions.0.proj_in.weight": torch.zeros(2, 2)}, str(good))
    save_file({"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)}, str(other))
    check_temporal(str(good), "model.temporal_layers")
    refused(lambda: check_temporal(str(other), "generate.unet"), f"generate.unet={other}", "1 of 1 tensors")


def test_cli_reports_an_actors_own_error_in_its_line(monkeypatch, capsys):
    """What `vidgen eval` gets when an I3D actor dies in its constructor: Ray's ActorDiedError, whose text ends with
    the actor's vidgen error. The CLI prints that error, exit 2, not "internal error"."""
    from vidgen import cli

    def dies(args, name):
        raise RuntimeError("The actor died because of an error raised in its creation task, ray::MapWorker()\n"
                           "Traceback (most recent call last):\n  File \"x\", line 1\n"
                           "vidgen.errors.ModelError: eval.i3d_path=/w/i3d.pt: not a PyTorch state dict of tensors")

    monkeypatch.setattr(cli, "_run_job", dies)
    assert cli.main(["eval"]) == 2
    assert capsys.readouterr().err == ("vidgen: error: eval.i3d_path=/w/i3d.pt: not a PyTorch state dict of "
                                       "tensors\n")
