"""`vidgen eval fvd` end to end on tiny data: Ray Data clip reading, the I3D actor stage, windows,
per-video metrics, MLflow logging, and the real-feature cache (a second run makes no I3D pass)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servers import mlflow_runs

from vidgen.cli import _eval_text, main
from vidgen.config import load_config
from vidgen.data.synth import make_moving_shapes, moving_shape_clip
from vidgen.data.video import read_video, write_video

NUM_FRAMES = 8


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """sqrtm of 400 x 400 matrices: 0.3 s on one BLAS thread, 6 s on two on a shared 2-core box."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    real, fake = root / "real", root / "fake"
    make_moving_shapes(str(real), 6, 10, 48, 64, seed=0)  # hotshot frame folders, non-square
    fake.mkdir()
    for i in range(4):
        clip, _ = moving_shape_clip(np.random.default_rng([7, i]), 20, 32, 48)
        write_video(str(fake / f"video_{i}.mp4"), clip, fps=8)
    write_video(str(fake / "short.mp4"), clip[:5], fps=8)  # shorter than a clip: skipped and counted
    return {"root": root, "real": real, "fake": fake}


def _overrides(root: Path, *extra: str) -> list[str]:
    return [f"run.workdir={root / 'work'}", f"eval.cache_dir={root / 'cache'}", "eval.i3d_flavor=tiny",
            f"eval.num_frames={NUM_FRAMES}", "eval.resolution=32", "eval.windows=[early,late]",
            "data.max_bad_fraction=0.5", *extra]


def _real_clips(real: Path) -> np.ndarray:
    clips = []
    for folder in sorted(real.iterdir()):
        frames = [np.asarray(Image.open(folder / f"{t}.png").convert("RGB")) for t in range(NUM_FRAMES)]
        clips.append(np.stack(frames))
    return np.stack(clips)


@pytest.mark.ray
def test_cli_json_end_to_end_then_cache_hit(ray_session, sets, capfd):
    from mlflow import MlflowClient

    from vidgen.eval.features import extract_features
    from vidgen.eval.fvd import fvd, kvd
    from vidgen.eval.job import run_eval
    from vidgen.models.i3d import build_i3d

    root = sets["root"]
    argv = ["eval", "fvd", "--real", str(sets["real"]), "--fake", str(sets["fake"]), "--json", *_overrides(root)]
    assert main(argv) == 0
    captured = capfd.readouterr()
    out = json.loads(captured.out)  # the whole of stdout is one JSON object
    assert isinstance(out, dict) and captured.out.strip().count("\n") == 0

    assert out["n_real"] == 6 and out["n_fake"] == 8  # 4 videos x 2 windows; short.mp4 skipped
    assert out["skipped"] == {"real": 0, "generated": 1}
    assert {w: v["n_fake"] for w, v in out["windows"].items()} == {"early": 4, "late": 4}
    assert out["real_cache"] == "miss" and out["params"]["fvd.real_cache"] == "miss"
    assert out["params"]["fvd.preprocess"] == "squash" and out["params"]["fvd.cov_norm"] == "n-1"
    assert any("fewer than eval.min_clips=400" in w for w in out["warnings"])
    assert any("clip shapes (TxHxW) differ" in w and "8x48x64" in w and "8x32x48" in w for w in out["warnings"])
    assert [v["video"].rsplit("/", 1)[1] for v in out["per_video"]] == [f"video_{i}.mp4" for i in range(4)]
    assert all(0 < v["temporal_flickering_score"] < 1 and v["motion_magnitude"] > 0 for v in out["per_video"])
    assert out["metrics"]["temporal_flickering_score_mean"] == pytest.approx(
        np.mean([v["temporal_flickering_score"] for v in out["per_video"]]))

    text = _eval_text(out)  # what `vidgen eval fvd` prints without --json
    assert text.startswith(f"FVD {out['fvd']:.4f}") and "early: FVD" in text and "warning: " in text

    # The same numbers from features computed here, outside Ray, on clips decoded independently.
    model = build_i3d("tiny", seed=0)
    real_feats = extract_features(model, _real_clips(sets["real"]), 32)
    videos = [read_video(str(sets["fake"] / f"video_{i}.mp4"))[0] for i in range(4)]
    early = extract_features(model, np.stack([v[:NUM_FRAMES] for v in videos]), 32)
    late = extract_features(model, np.stack([v[-NUM_FRAMES:] for v in videos]), 32)
    assert out["windows"]["early"]["kvd"] == pytest.approx(kvd(real_feats, early), rel=1e-4)
    assert out["windows"]["late"]["kvd"] == pytest.approx(kvd(real_feats, late), rel=1e-4)
    assert out["kvd"] == pytest.approx(kvd(real_feats, np.concatenate([early, late])), rel=1e-4)
    assert out["windows"]["early"]["fvd"] == pytest.approx(fvd(real_feats, early), rel=1e-3)
    assert out["fvd"] == pytest.approx(fvd(real_feats, np.concatenate([early, late])), rel=1e-3)

    # Logged to MLflow beside the numbers.
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'work' / 'mlflow.db'}")
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.metrics["fvd"] == pytest.approx(out["fvd"])
    assert run.data.metrics["fvd/late"] == pytest.approx(out["windows"]["late"]["fvd"])
    assert run.data.metrics["eval/motion_magnitude_mean"] == pytest.approx(out["metrics"]["motion_magnitude_mean"])
    assert run.data.params["fvd.preprocess"] == "squash" and run.data.params["fvd.cov_norm"] == "n-1"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/per_video.json"]

    # Second run: the real set's pixels are replaced by noise. A cache hit means its features are not
    # recomputed, so the numbers cannot move; with the cache off they do.
    rng = np.random.default_rng(1)
    for png in sets["real"].glob("*/*.png"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        png.write_bytes(buf.getvalue())
    cfg = load_config(None, _overrides(root))
    again = run_eval(cfg, str(sets["real"]), str(sets["fake"]))
    assert again.real_cache == "hit" and again.params["fvd.real_cache"] == "hit"
    # (the generated side is recomputed: thread scheduling moves its float32 features in the last bits)
    assert again.fvd == pytest.approx(out["fvd"], rel=1e-6) and again.kvd == pytest.approx(out["kvd"], rel=1e-6)
    assert len(list((root / "cache").glob("real-*.npz"))) == 1

    # ... while features of the new pixels would have moved them.
    noisy = extract_features(model, _real_clips(sets["real"]), 32)
    assert kvd(noisy, np.concatenate([early, late])) != pytest.approx(out["kvd"], rel=1e-3)


def test_cache_key_covers_what_the_real_features_depend_on(tmp_path):
    from vidgen.eval.job import cache_key, cache_uri

    def uri(*extra: str, samples=("a", "b")) -> str:
        cfg = load_config(None, _overrides(tmp_path, *extra))
        return cache_uri(cfg, cache_key(cfg, "s3://bucket/real", "hotshot", list(samples)))

    base = uri()
    assert base == uri() and base.startswith(str(tmp_path / "cache") + "/real-") and base.endswith(".npz")
    changed = [uri("eval.preprocess=center_crop"), uri("eval.resolution=64"), uri("eval.num_frames=4"),
               uri("eval.fps=4"), uri("run.seed=1"), uri("eval.clips_per_real_video=2"), uri("eval.max_real=10"),
               uri("eval.i3d_bn_eps=1e-5"), uri(samples=("a", "b", "c"))]
    assert len(set(changed)) == len(changed) and base not in changed
    # The covariance divisor and the generated set are applied after the cache: same entry.
    assert uri("eval.cov_norm=n", "eval.windows=[middle]", "eval.min_clips=2") == base


def test_cache_round_trip_and_damaged_files(tmp_path, caplog):
    from vidgen.eval.fvd import FeatureStats
    from vidgen.eval.job import FeatureSet, load_cache, save_cache

    feats = np.random.default_rng(3).normal(size=(5, 400)).astype(np.float32)
    fs = FeatureSet(feats, [f"c{i}" for i in range(5)], FeatureStats.of(feats), ["8x48x64"] * 5)
    uri, key = str(tmp_path / "real-x.npz"), {"version": 1, "source": "r", "fps": None}
    assert load_cache(uri, key) is None
    save_cache(uri, key, fs, skipped=2)
    back, skipped = load_cache(uri, key)
    assert skipped == 2 and back.clip_ids == fs.clip_ids and back.shapes == fs.shapes
    assert np.array_equal(back.features, feats) and np.array_equal(back.stats.m2, fs.stats.m2)
    assert load_cache(uri, key | {"fps": 8.0}) is None  # another key in the same file: not used
    (tmp_path / "real-x.npz").write_bytes(b"truncated")
    assert load_cache(uri, key) is None and "unusable real-feature cache" in caplog.text


def test_sets_over_the_bad_limit_are_refused_in_one_line_before_any_feature_actor(tmp_path, monkeypatch, capsys):
    """10 real frame folders of which 3 hold a frame that is not an image (30% > data.max_bad_fraction=0.05), then
    10 generated videos of which 3 are not videos: `vidgen eval fvd` exits 2 with one line naming the set, no
    feature actor starts (Ray is not even started here) and no MLflow run opens."""
    from vidgen import ray_env
    from vidgen.eval import job

    def featurize(*a, **k):
        raise AssertionError("a feature actor stage started")

    monkeypatch.setattr(ray_env, "init_ray", lambda cfg: None)
    monkeypatch.setattr(job, "featurize", featurize)
    real, good, bad = tmp_path / "real", tmp_path / "good", tmp_path / "bad"
    make_moving_shapes(str(real), 10, NUM_FRAMES, 16, 16, seed=1)
    folders = sorted(p for p in real.iterdir() if p.is_dir())
    for i in (1, 4, 7):
        (folders[i] / "0.png").write_bytes(b"not an image")
    write_video(str(tmp_path / "v.mp4"), moving_shape_clip(np.random.default_rng(0), NUM_FRAMES, 16, 16)[0], fps=8)
    video = (tmp_path / "v.mp4").read_bytes()
    for folder, broken in ((good, ()), (bad, (2, 5, 8))):
        folder.mkdir()
        for i in range(10):
            (folder / f"video_{i}.mp4").write_bytes(b"not a video" if i in broken else video)
    db = tmp_path / "mlflow.db"
    opts = [f"run.workdir={tmp_path / 'work'}", f"eval.cache_dir={tmp_path / 'cache'}", "eval.i3d_flavor=tiny",
            f"eval.num_frames={NUM_FRAMES}", f"tracking.uri=sqlite:///{db}", "data.max_bad_fraction=0.05"]

    assert main(["eval", "fvd", "--real", str(real), "--fake", str(good), *opts]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vidgen: error: eval.real={real}: 3 of the 10 samples are bad (30.0%), more than "
                          "data.max_bad_fraction=0.05: corrupt image (3); e.g. corrupt image: ")
    assert f"{folders[1]}/0.png" in err and err.count("\n") == 1

    assert main(["eval", "fvd", "--real", str(real), "--fake", str(bad), *opts]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vidgen: error: eval.generated={bad}: 3 of the 10 samples are bad (30.0%), more than "
                          "data.max_bad_fraction=0.05: unreadable video (3); e.g. unreadable video: ")
    assert "video_2.mp4" in err and err.count("\n") == 1
    assert mlflow_runs(db) == []  # no FAILED run left behind


def test_eval_help_documents_both_forms(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "vidgen eval [fvd]" in text and "--real" in text and "--json" in text and "--i3d-weights" in text
    assert "vidgen eval --config C" in text
