"""The latent cache: `vidgen prepare latents` and training with data.latents.

What is proven: the cached encodings are bit-identical to those computed on the fly and give the same loss for
the same generator (every family); a cache of another config, or of another family, is refused in one line naming
the field; training reads a cached clip's bucket from its latents; a prepare job killed mid-shard resumes, leaving
finished shards untouched; a Ray prepare + a training fit on the cache run end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.data.pipeline import read_clips_local
from vidgen.data.synth import make_moving_shapes
from vidgen.errors import ConfigError, DataError
from vidgen.models.registry import build_recipe
from vidgen.train import latents

FAMILY = {"svd": ["train.recipe=svd_full"],
          "hotshot": ["model.family=hotshot", "train.recipe=hotshot_temporal", "train.ddpm.caption_dropout=0.5"],
          # Wan's causal VAE: 5 frames -> 2 latent frames
          "wan": ["model.family=wan", "train.recipe=wan_lora", "model.num_frames=5"]}
RERUN = {  # a field that changes what is stored, and the refusal naming it
    "svd": ("model.num_frames=5", "model.num_frames=4, this config has model.num_frames=5"),
    "hotshot": ("model.num_frames=5", "model.num_frames=4, this config has model.num_frames=5"),
    "wan": ("data.default_prompt=a video", "data.default_prompt='', this config has data.default_prompt='a video'"),
}


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("clips")
    make_moving_shapes(str(out), num_videos=5, num_frames=6, height=48, width=64, seed=0)
    return str(out)


def config(tmp_path, clips_dir, family="svd", *overrides):
    return load_config(None, [f"run.workdir={tmp_path}", f"run.name=l-{uuid.uuid4().hex[:8]}",
                              f"data.source={clips_dir}", "data.height=32", "data.width=32",
                              "model.num_frames=4", "latents.shard_size=2", "latents.batch_size=2",
                              *FAMILY[family], *overrides])


def on_the_fly(cfg) -> list[dict]:
    d = cfg.data
    return list(read_clips_local(d.source, d.layout, num_frames=cfg.model.num_frames, height=d.height,
                                 width=d.width, fps=d.fps, source_fps=d.source_fps, train=False,
                                 seed=cfg.run.seed, default_prompt=d.default_prompt))


def collate(rows: list[dict], keys) -> dict:
    out = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in keys}
    out["fps"] = torch.tensor([r["fps"] for r in rows])
    out["prompt"] = [r["prompt"] for r in rows]
    return out


@pytest.mark.parametrize("family", ["svd", "hotshot", "wan"])
def test_cache_is_bit_exact_and_gives_the_same_loss(tmp_path, clips_dir, family):
    cfg = config(tmp_path, clips_dir, family)
    manifest = latents.prepare_latents(cfg, use_ray=False)
    assert manifest["clips"] == 5 and len(manifest["shards"]) == 3 and manifest["written"] == 3
    cached = list(latents.read_rows(latents.cache_uri(cfg), manifest))
    clips = on_the_fly(cfg)
    assert [r["clip_id"] for r in cached] == [c["clip_id"] for c in clips]

    recipe = build_recipe(cfg.model, cfg.train, cfg.run.seed)
    keys = type(recipe).ENCODED
    unet = recipe.unet
    unet_fn = lambda *a, **k: unet(*a, return_dict=False, **k)[0]  # noqa: E731
    for start in (0, 2, 4):  # the cache's batches: clips [0, 2), [2, 4), [4, 5)
        rows, group = cached[start:start + 2], clips[start:start + 2]
        fresh = recipe.encode(collate(group, ["frames"]))
        for k in keys:
            got = torch.from_numpy(np.stack([r[k] for r in rows]))
            assert got.dtype == fresh[k].dtype and torch.equal(got, fresh[k]), k  # bit-exact
        batch_clips = collate(group, ["frames"])
        batch_cache = collate(rows, keys)
        with torch.no_grad():
            a, _ = recipe.loss(batch_clips, unet_fn, torch.Generator().manual_seed(start))
            b, _ = recipe.loss(batch_cache, unet_fn, torch.Generator().manual_seed(start))
        assert a.item() == b.item() and np.isfinite(a.item())

    # a config that changes what is stored is refused, naming the field; one that does not is accepted
    train_cfg = config(tmp_path, clips_dir, family, f"data.latents={latents.cache_uri(cfg)}", "data.source=")
    assert latents.open_cache(train_cfg)["clips"] == 5
    other = config(tmp_path, clips_dir, family, f"data.latents={latents.cache_uri(cfg)}", "data.height=40")
    with pytest.raises(ConfigError) as e:
        latents.open_cache(other)
    msg = str(e.value)
    assert "\n" not in msg and "cache was written with data.height=32, this config has data.height=40" in msg
    field, refusal = RERUN[family]
    rerun = config(tmp_path, clips_dir, family, f"latents.output={latents.cache_uri(cfg)}", field)
    with pytest.raises(ConfigError, match=refusal):
        latents.prepare_latents(rerun, use_ray=False)
    # another family's cache, however many other fields differ: refused naming the family first
    stranger = "svd" if family != "svd" else "wan"
    wrong = config(tmp_path, clips_dir, stranger, f"data.latents={latents.cache_uri(cfg)}", "data.source=")
    with pytest.raises(ConfigError) as e:
        latents.open_cache(wrong)
    assert "\n" not in str(e.value) and (f"the cache was written with model.family={family!r}, this config has "
                                         f"model.family={stranger!r}") in str(e.value)

    # training from the cache batches a clip by its latents' size (the bucket column; 32 pixels = 4 latents)
    stream = latents.CacheStream(train_cfg, manifest)
    assert stream.latents == keys[0]
    item = {"uri": stream.files[0], "slot": 0, "order": 0, "wanted": [True, True], "seed": [0, 0, 0],
            "latents": stream.latents}
    rows = latents._share_rows({"item": json.dumps(item)})
    assert len(rows) == 2 and {r["bucket"] for r in rows} == {"4x4"}


def test_killed_prepare_resumes_without_redoing_finished_shards(tmp_path, clips_dir):
    cfg = config(tmp_path, clips_dir)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(cfg.to_yaml())
    out = Path(latents.cache_uri(cfg))
    env = {**os.environ, "VIDGEN_FAULT_LATENTS": "1"}  # dies in the middle of its second shard (vidgen/faults.py)
    proc = subprocess.run([sys.executable, "-m", "vidgen.cli", "prepare", "latents", "--config", str(cfg_file),
                           "--local"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["_latents.json", "part-00000.done.json",
                                                     "part-00000.parquet"]  # nothing half-written
    first = (out / "part-00000.parquet").stat()

    manifest = latents.prepare_latents(cfg, use_ray=False)
    assert (manifest["written"], manifest["existing"], manifest["clips"]) == (2, 1, 5)
    again = (out / "part-00000.parquet").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not recomputed
    assert latents.prepare_latents(cfg, use_ray=False)["written"] == 0


@pytest.mark.ray
def test_ray_prepare_then_training_reads_the_cache(ray_session, tmp_path, clips_dir):
    from vidgen.runner import tracker_for, train_job

    cfg = config(tmp_path, clips_dir, "svd", "latents.actors=1")
    manifest = latents.prepare_latents(cfg, use_ray=True)
    assert manifest["clips"] == 5 and manifest["written"] == 3
    train = config(tmp_path, clips_dir, "svd", f"data.latents={latents.cache_uri(cfg)}", "train.num_workers=2",
                   "train.max_steps=2", "train.checkpoint_every=2", "train.lr=1e-3", "tracking.enabled=false")
    result = train_job(train, tracker_for(train))
    assert result["steps"] == 2 and np.isfinite(result["last_loss"])
    assert result["data_report"]["total"] == 5 and Path(result["export_dir"], "config.json").exists()


def test_fp16_keeps_a_force_upcast_vae_in_fp32(tmp_path, clips_dir):
    """SDXL's VAE (force_upcast in its config) overflows fp16 to NaN: latents.dtype=fp16 leaves it fp32, as
    diffusers' SDXL pipelines do, and casts only the text encoders."""
    cfg = config(tmp_path, clips_dir, "hotshot", "latents.dtype=fp16")
    recipe, _ = latents.load_encoders(cfg)
    vae, text = recipe.model.vae, recipe.model.text
    assert vae.config.force_upcast
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    for enc in (text.text_encoder, text.text_encoder_2):
        assert {p.dtype for p in enc.parameters()} == {torch.float16}
    clip = on_the_fly(cfg)[:1]
    encoded = recipe.encode(collate(clip, ["frames"]))
    assert all(torch.isfinite(v.float()).all() for v in encoded.values())


def test_non_finite_encodings_are_never_cached(tmp_path, clips_dir, monkeypatch):
    """An encoding holding NaN leaves its sample out of the shard and in the report (as an undecodable sample
    is), naming the shard, the clip and the tensor; when every sample is hit, the job fails in one line."""
    real_load = latents.load_encoders
    poison = {"calls": 0, "all": False}

    def load_poisoned(cfg, *args):
        recipe, digest = real_load(cfg, *args)
        encode = recipe.encode

        def nan_encode(batch):
            out = encode(batch)
            poison["calls"] += 1
            if poison["all"] or poison["calls"] == 1:  # the first clip of the first shard (or every clip)
                rows = slice(None) if poison["all"] else slice(0, 1)
                out["latent_params"][rows] = float("nan")
            return out

        recipe.encode = nan_encode
        return recipe, digest

    monkeypatch.setattr(latents, "load_encoders", load_poisoned)
    cfg = config(tmp_path, clips_dir, "svd", "data.max_bad_fraction=0.5")
    manifest = latents.prepare_latents(cfg, use_ray=False)
    report = manifest["report"]
    assert (manifest["clips"], report["skipped"], report["reasons"]) == (4, 1, {"non-finite encoding": 1})
    bad = report["bad"][0]
    first = sorted(c["clip_id"] for c in on_the_fly(cfg))[0]
    assert "\n" not in bad["detail"] and bad["detail"].startswith("shard part-00000")
    assert f"clip {first}: latent_params holds" in bad["detail"]
    rows = list(latents.read_rows(latents.cache_uri(cfg), manifest))
    assert len(rows) == 4 and first not in [r["clip_id"] for r in rows]
    assert all(np.isfinite(r[k]).all() for r in rows for k in ("latent_params", "image_embeds", "cond_latent"))

    poison["all"] = True
    every = config(tmp_path, clips_dir, "svd", f"latents.output={tmp_path / 'all-nan'}")
    with pytest.raises(DataError, match=r"^5 of 5 samples skipped .*non-finite encoding \(5\)"):
        latents.prepare_latents(every, use_ray=False)
    written = json.loads((tmp_path / "all-nan" / latents.MANIFEST).read_text())
    assert written["clips"] == 0 and [s["clips"] for s in written["shards"]] == [0, 0, 0]  # no NaN was cached
