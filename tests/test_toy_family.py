"""The extension point: a family from this folder alone (tests/toy_family.py) trains, exports and generates
through vidgen's normal jobs, on Ray workers and actors that import it by the config's `model.family_module`."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.errors import ConfigError
from vidgen.models import registry

TOY = ["model.family=toy", "model.family_module=tests.toy_family", "train.recipe=toy_full"]


def test_an_unimportable_family_module_is_refused_naming_the_field(tmp_path):
    cfg = load_config(None, ["model.family=toy", "model.family_module=tests.no_such_family"])
    with pytest.raises(ConfigError, match="model.family_module=tests.no_such_family: cannot be imported"):
        registry.check(cfg.model)


def test_a_registered_family_cannot_take_another_familys_recipe():
    with pytest.raises(ConfigError, match="recipe 'svd_lora' already belongs to 'svd'"):
        registry.register("mine", "my.module", ("svd_lora",))
    assert "mine" not in registry.FAMILIES


@pytest.mark.ray
@pytest.mark.slow
def test_a_toy_family_trains_exports_and_generates_through_the_jobs(ray_session, tmp_path):
    from vidgen.data.synth import make_moving_shapes
    from vidgen.data.video import read_video
    from vidgen.runner import generate_job, tracker_for, train_job

    make_moving_shapes(str(tmp_path / "data"), num_videos=4, num_frames=4, height=32, width=32)
    common = [f"run.workdir={tmp_path / 'work'}", "tracking.enabled=false", *TOY, "model.num_frames=2",
              "data.height=32", "data.width=32"]
    train = load_config(None, [*common, f"run.name=toy-{uuid.uuid4().hex[:8]}", f"data.source={tmp_path / 'data'}",
                               "train.num_workers=2", "train.max_steps=3", "train.checkpoint_every=3", "train.lr=0.05",
                               "train.validation_every=3", "train.validation_steps=2", "train.validation_count=1"])
    earlier = tmp_path / "work" / "train" / "earlier-run" / "export" / "toy"  # another run's export: left alone
    earlier.mkdir(parents=True)
    (earlier / "toy.safetensors").write_bytes(b"earlier")
    result = train_job(train, tracker_for(train))
    assert result["steps"] == 3 and np.isfinite(result["last_loss"])
    export = Path(result["export_dir"])
    assert export == tmp_path / "work" / "train" / train.run.name / "export" / "toy"  # per run; recipe's EXPORT_NAME
    assert (earlier / "toy.safetensors").read_bytes() == b"earlier"
    from safetensors.torch import load_file

    from tests.toy_family import WEIGHTS, ToyUNet

    trained, init = load_file(str(export / WEIGHTS)), ToyUNet(train.run.seed).state_dict()
    assert set(trained) == set(init) and any(not torch.equal(trained[k], init[k]) for k in init)
    videos = sorted((tmp_path / "work" / "validation").rglob("*.mp4"))  # rank 0 rendered it with the family's code
    assert len(videos) == 1 and read_video(str(videos[0]))[0].shape == (2, 32, 32, 3)

    (tmp_path / "prompts.txt").write_text("a square\na circle\n")
    gen = load_config(None, [*common, f"generate.prompts={tmp_path / 'prompts.txt'}", "generate.prompt_format=text",
                             f"generate.unet={export}", "generate.sampler=fifo", "generate.num_frames=4",
                             "generate.fifo.partitions=1", "generate.height=32", "generate.width=32"])
    with tracker_for(gen) as tracker:
        out = generate_job(gen, tracker)
    assert out["counts"] == {"generated": 2}
    frames = [read_video(p)[0] for p in out["videos"]]
    assert all(f.shape == (4, 32, 32, 3) for f in frames)  # FIFO: twice the toy model's 2-frame window
