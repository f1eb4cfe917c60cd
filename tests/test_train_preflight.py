"""`vidgen train` before its workers start: data provably over data.max_bad_fraction, output locations that cannot
be written and unsafe run names are refused in one line; bad data the headers hide stops the run as soon as the
stream proves it; every run exports under its own name."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servers import mlflow_runs

from vidgen.config import load_config
from vidgen.data.listing import Sample, SampleTable
from vidgen.data.preflight import check_sample, wilson_lower
from vidgen.errors import ConfigError, DataError, StorageError

TOY = ["model.family=toy", "model.family_module=tests.toy_family", "train.recipe=toy_full", "model.num_frames=2",
       "data.height=32", "data.width=32", "tracking.enabled=false"]


def _jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def frame_folders(root: Path, n: int, bad: set[int], frames: int = 2, truncated: bool = False) -> Path:
    """n folders of `frames` JPEGs; those in `bad` hold a frame 0 that is not an image, or (truncated) every frame
    cut short after its header, which a header read cannot tell from a good one."""
    good = _jpeg()
    cut = good[:good.index(b"\xff\xda") + 20]  # up to the start of the scan: the header is intact
    for i in range(n):
        d = root / f"s{i:04d}"
        d.mkdir(parents=True)
        for f in range(frames):
            data = good if i not in bad else cut if truncated else b"not an image" if f == 0 else good
            (d / f"{f}.jpg").write_bytes(data)
    return root


def train_config(tmp_path, data, *extra: str, name: str | None = None):
    return load_config(None, [f"run.workdir={tmp_path / 'work'}", f"run.name={name or 'p-' + uuid.uuid4().hex[:8]}",
                              f"data.source={data}", *TOY, *extra])


# ---- run.name ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["naïve", "../../escaped", "a/b", "a..b", "-lead", "x" * 101])
def test_unsafe_run_names_are_refused_in_the_config(name):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"run.name={name}"])
    msg = str(e.value)
    assert msg.startswith("run.name=") and "\n" not in msg
    assert "expected 1-100 of the letters A-Z a-z, digits 0-9, '.', '_', '-'" in msg and "without '..'" in msg


def test_safe_run_names_are_kept():
    for name in ("svd-full-xt", "Run_2.v1", "x" * 100):
        assert load_config(None, [f"run.name={name}"]).run.name == name


# ---- the sampled header check ----------------------------------------------------------------------------------


def test_wilson_lower_bound_numbers():
    assert wilson_lower(0, 256) == 0.0
    assert wilson_lower(5, 0) == 0.0
    # 77 bad of 256 (30%): at z=3.29 the bound is 0.2161 (Wilson's formula worked by hand)
    assert wilson_lower(77, 256) == pytest.approx(0.2161, abs=5e-4)
    assert wilson_lower(256, 256) == pytest.approx(1 / (1 + 3.29 ** 2 / 256), abs=1e-9)


def _table(root: Path, n: int, bad: set[int]) -> SampleTable:
    good, corrupt = root / "good.jpg", root / "bad.jpg"
    good.write_bytes(_jpeg())
    corrupt.write_bytes(b"not an image")
    return SampleTable.from_samples(
        Sample(uri=f"{root}/s{i:04d}", frame_uris=[str(corrupt if i in bad else good)] * 2, prompt="p", prompt_uri=None,
               meta={"layout": "frames"}) for i in range(n))


def test_a_sample_of_a_large_dataset_refuses_it_only_beyond_reasonable_doubt(tmp_path):
    kw = {"num_frames": 2, "fps": None, "source_fps": 8.0, "seed": 0}
    n = 5000
    bad30 = {i for i in range(n) if i % 10 < 3}
    with pytest.raises(DataError) as e:
        check_sample(_table(tmp_path, n, bad30), "data.source=SRC", 0.05, **kw)
    msg = str(e.value)
    k = int(msg.removeprefix("data.source=SRC: ").split()[0])
    assert 50 <= k <= 105, msg  # about 30% of 256
    assert msg.startswith(f"data.source=SRC: {k} of 256 samples read before training are bad ({k / 256:.1%}), so "
                          f"at least {wilson_lower(k, 256):.1%} of all 5000 are (99.95% confidence), more than "
                          f"data.max_bad_fraction=0.05: corrupt image ({k}); e.g. corrupt image: ")
    assert "bad.jpg" in msg and "\n" not in msg
    # 5% bad under a 5% limit: the sample cannot prove it over, the job goes on (the stream decides)
    out = check_sample(_table(tmp_path, n, set(range(0, n, 20))), "data.source=SRC", 0.05, **kw)
    assert out["sampled"] == 256 and 3 <= out["bad"] <= 25 and out["bound"] <= 0.05
    assert check_sample(_table(tmp_path, n, bad30), "data.source=SRC", 0.5, **kw)["bound"] < 0.5
    # of 1000 samples, the bad ones of the sample alone are already more than 5% of them all
    with pytest.raises(DataError, match=r"^data.source=SRC: \d+ of 256 samples read before training are bad, "
                                        r"already more than all 1000 allow at data.max_bad_fraction=0.05: "):
        check_sample(_table(tmp_path, 1000, {i for i in range(1000) if i % 10 < 3}), "data.source=SRC", 0.05, **kw)


def test_too_short_samples_count_as_bad(tmp_path):
    with pytest.raises(DataError, match=r"2 of the 2 samples are bad \(100.0%\).*too few frames \(2\); "
                                        r"e.g. too few frames: .*s0000: 2 frames, a clip needs 4"):
        check_sample(_table(tmp_path, 2, set()), "data.source=SRC", 0.0, num_frames=4, fps=None, source_fps=8.0, seed=0)


def test_train_refuses_data_over_the_limit_before_any_worker_starts(tmp_path):
    from vidgen.runner import tracker_for, train_job

    data = frame_folders(tmp_path / "data", 10, bad={1, 4, 7})  # 30% corrupt
    cfg = train_config(tmp_path, data, "data.max_bad_fraction=0.05", "train.max_steps=30")
    with pytest.raises(DataError) as e:
        train_job(cfg, tracker_for(cfg))
    assert str(e.value).startswith(f"data.source={data}: 3 of the 10 samples are bad (30.0%), more than "
                                   "data.max_bad_fraction=0.05: corrupt image (3); e.g. corrupt image: ")
    assert "s0001/0.jpg" in str(e.value)
    run_dir = tmp_path / "work" / "train" / cfg.run.name  # Ray Train's run folder: checkpoints and the export
    assert not run_dir.exists() and not (tmp_path / "work" / "export").exists()


def test_prepare_latents_refuses_data_over_the_limit_before_the_encoders_load(tmp_path, monkeypatch):
    from vidgen.train import latents

    def load_encoders(*a, **k):
        raise AssertionError("the encoders loaded")

    monkeypatch.setattr(latents, "load_encoders", load_encoders)
    data = frame_folders(tmp_path / "data", 10, bad={2, 5, 8})  # 30% corrupt
    cfg = train_config(tmp_path, data, "data.max_bad_fraction=0.05", f"latents.output={tmp_path / 'cache'}")
    with pytest.raises(DataError) as e:
        latents.prepare_latents(cfg, use_ray=False)
    assert str(e.value).startswith(f"data.source={data}: 3 of the 10 samples are bad (30.0%), more than "
                                   "data.max_bad_fraction=0.05: corrupt image (3); e.g. corrupt image: ")
    assert "s0002/0.jpg" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()  # nothing written


def _cli_train(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`vidgen train ARGS` in this process, with Ray's start skipped and Ray Train's fit failing the test: every
    refusal here must come before either."""
    from vidgen import ray_env
    from vidgen.cli import main
    from vidgen.train import launch

    def fit(*a, **k):
        raise AssertionError("Ray Train started")

    monkeypatch.setattr(ray_env, "init_ray", lambda cfg: None)
    monkeypatch.setattr(launch, "fit", fit)
    rc = main(["train", *args])
    return rc, capsys.readouterr().err


def test_cli_train_refuses_data_over_the_limit_before_its_mlflow_run_opens(tmp_path, monkeypatch, capsys):
    data = frame_folders(tmp_path / "data", 10, bad={1, 4, 7})  # 30% corrupt
    db = tmp_path / "mlflow.db"
    rc, err = _cli_train(monkeypatch, capsys, f"run.workdir={tmp_path / 'work'}", "run.name=bad-data",
                         f"data.source={data}", *TOY, "tracking.enabled=true", f"tracking.uri=sqlite:///{db}",
                         "data.max_bad_fraction=0.05")
    assert rc == 2
    assert err.startswith(f"vidgen: error: data.source={data}: 3 of the 10 samples are bad (30.0%), more than "
                          "data.max_bad_fraction=0.05: corrupt image (3); e.g. corrupt image: ")
    assert err.count("\n") == 1
    assert mlflow_runs(db) == []  # no FAILED run left behind
    assert not (tmp_path / "work" / "train").exists()


def test_cli_train_checks_model_path_before_ray_train_starts(tmp_path, monkeypatch, capsys):
    data = frame_folders(tmp_path / "data", 2, bad=set())
    typo = tmp_path / "stable-video-difusion"
    db = tmp_path / "mlflow.db"
    common = [f"run.workdir={tmp_path / 'work'}", "run.name=weights", f"data.source={data}", "model.num_frames=2",
              "data.height=32", "data.width=32", "model.flavor=pretrained", f"tracking.uri=sqlite:///{db}"]
    rc, err = _cli_train(monkeypatch, capsys, *common, f"model.path={typo}")
    assert rc == 2
    assert err == (f"vidgen: error: model.path={typo}: no such directory; expected a diffusers-format SVD directory "
                   "(with unet, vae, image_encoder, feature_extractor, scheduler/) (vidgen never downloads weights)\n")
    (typo / "unet").mkdir(parents=True)  # a folder that is not an SVD model
    rc, err = _cli_train(monkeypatch, capsys, *common, f"model.path={typo}")
    assert rc == 2 and err.startswith(f"vidgen: error: model.path={typo}: missing subfolder(s) vae, ")
    assert err.count("\n") == 1
    assert mlflow_runs(db) == []


# ---- outputs -----------------------------------------------------------------------------------------------------


def test_output_folders_that_cannot_be_written_are_refused_naming_the_field(tmp_path):
    from vidgen.train.preflight import check_outputs_writable

    (tmp_path / "a-file").write_text("x")  # a folder cannot be made under a file, not even by root
    for field, extra in (("train.storage_path", [f"train.storage_path={tmp_path / 'a-file' / 'ckpt'}"]),
                         ("run.workdir", [f"run.workdir={tmp_path / 'a-file' / 'work'}"])):
        with pytest.raises(StorageError) as e:
            check_outputs_writable(train_config(tmp_path, tmp_path, *extra))
        msg = str(e.value)
        assert msg.startswith(f"{field}={tmp_path / 'a-file'}/") and ": not writable, expected a folder" in msg
        assert "\n" not in msg
    from vidgen.runner import tracker_for

    with pytest.raises(StorageError, match=r"^run.workdir=.*a-file/work: cannot create the folder \(Not a direc"):
        tracker_for(train_config(tmp_path, tmp_path, f"run.workdir={tmp_path / 'a-file' / 'work'}"))
    check_outputs_writable(train_config(tmp_path, tmp_path, f"train.storage_path={tmp_path / 'ok'}"))
    assert not list((tmp_path / "ok").iterdir()) and not list((tmp_path / "work").iterdir())  # made, probes gone


def test_each_run_exports_under_its_own_name(tmp_path):
    from vidgen.train.launch import export_root

    a, b = (train_config(tmp_path, tmp_path, f"train.storage_path={tmp_path / 's'}", name=n) for n in ("a", "b"))
    assert export_root(a) == str(tmp_path / "s" / "a" / "export")
    assert export_root(b) == str(tmp_path / "s" / "b" / "export")
    assert export_root(train_config(tmp_path, tmp_path, name="c")) == str(tmp_path / "work" / "train" / "c" / "export")
    # a real export lands there, beside another run's: tests/test_toy_family.py


# ---- on the real stack -------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_bad_data_the_headers_hide_stops_training_early_and_exports_nothing(ray_session, tmp_path):
    """8 samples, 4 with every frame truncated after an intact header: the preflight reads them as good; the
    workers (2) stop as soon as more than 2 (25% of 8) of them made no clip, long before max_steps."""
    from vidgen.runner import tracker_for, train_job

    data = frame_folders(tmp_path / "data", 8, bad={0, 2, 5, 7}, truncated=True)
    cfg = train_config(tmp_path, data, "data.max_bad_fraction=0.25", "train.num_workers=2", "train.max_steps=40",
                       "train.checkpoint_every=40", "train.max_failures=0")
    with pytest.raises(DataError) as e:
        train_job(cfg, tracker_for(cfg))
    msg = str(e.value)
    step = int(msg.split("training stopped at step ")[1].split(":")[0])
    assert 1 <= step < 10, msg  # 4 good samples, batch 1 per worker: epoch 0 is read within 2 steps
    assert "4 of 8 samples skipped (50.0%), more than data.max_bad_fraction=0.25: corrupt image (4)" in msg
    run_dir = tmp_path / "work" / "train" / cfg.run.name
    assert not (run_dir / "export").exists() and not list(run_dir.glob("checkpoint_*"))
