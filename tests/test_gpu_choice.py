"""GPU use is configured, never guessed: the latents and eval jobs reserve GPUs from their config fields (not
from `ray.cluster_resources()`, which shows no GPU on an autoscaling cluster before GPU workers start), and an
actor computes on CUDA only when it reserved GPUs, even where CUDA is visible (Ray 2.60 no longer hides the GPUs
from num_gpus=0 actors, so `torch.cuda.is_available()` says nothing about what an actor may use).

No GPU is needed: CUDA "visibility" and the cluster's GPUs are faked, Ray Data's actor stage is replaced by a
recorder of what it was asked to reserve.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from vidgen.config import load_config
from vidgen.data.synth import make_moving_shapes
from vidgen.errors import ConfigError
from vidgen.train import latents


class Reserved(Exception):
    """Raised by the fake Ray Data stage, carrying the keyword arguments of its map_batches call."""

    def __init__(self, kwargs: dict):
        super().__init__("map_batches called")
        self.kwargs = kwargs


class FakeDataset:
    def map_batches(self, fn, **kwargs):
        raise Reserved(kwargs)


@pytest.fixture
def cuda_visible(monkeypatch):
    """torch says CUDA is available (as in a num_gpus=0 actor on a GPU node under Ray 2.60)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def gpu_cluster(monkeypatch):
    """Ray looks running and its cluster has 8 GPUs; the actor stage only records what it would reserve."""
    import ray
    import ray.data

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: FakeDataset())
    monkeypatch.setattr(ray, "put", lambda value: value)  # no object store: the value itself stands for its ref


def test_compute_device_follows_the_reservation(cuda_visible, monkeypatch):
    from vidgen.devices import compute_device

    assert compute_device(0) == torch.device("cpu")  # visible CUDA is not a reservation
    assert compute_device(0.0, "eval.use_gpu") == torch.device("cpu")
    assert compute_device(1).type == "cuda"
    assert compute_device(0.5).type == "cuda"  # a fractional reservation is still this actor's GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        compute_device(1, "latents.gpus_per_actor")
    assert "\n" not in str(e.value) and str(e.value).startswith("latents.gpus_per_actor=1: this worker reserved a GPU")
    assert compute_device(0) == torch.device("cpu")


# ---- prepare latents ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("clips")
    make_moving_shapes(str(out), num_videos=2, num_frames=6, height=48, width=64, seed=0)
    return str(out)


def latents_config(tmp_path, clips_dir, *overrides):
    return load_config(None, [f"run.workdir={tmp_path}", f"run.name=g-{uuid.uuid4().hex[:8]}",
                              f"data.source={clips_dir}", "data.height=32", "data.width=32", "model.num_frames=4",
                              "train.recipe=svd_full", *overrides])


def test_latent_encoders_use_cpu_unless_a_gpu_is_reserved(tmp_path, clips_dir, cuda_visible):
    cfg = latents_config(tmp_path, clips_dir)
    assert cfg.latents.gpus_per_actor == 0  # the default: no GPU, whatever the cluster has
    recipe, _ = latents.load_encoders(cfg)
    for module in recipe.encoders():
        assert {p.device.type for p in module.parameters()} == {"cpu"}


def test_prepare_latents_reserves_the_configured_gpus(tmp_path, clips_dir, gpu_cluster):
    for overrides, gpus in (((), 0), (("latents.gpus_per_actor=1",), 1), (("latents.gpus_per_actor=0.5",), 0.5)):
        cfg = latents_config(tmp_path / str(gpus), clips_dir, *overrides)
        with pytest.raises(Reserved) as got:
            latents.prepare_latents(cfg, use_ray=True)
        kwargs = got.value.kwargs
        assert kwargs["num_gpus"] == gpus, overrides  # from the config, not from the cluster's 8 GPUs
        assert kwargs["fn_constructor_args"][-1] == gpus  # the actor computes on what it reserved


# ---- eval ----------------------------------------------------------------------------------------------


def test_eval_reserves_the_configured_gpus(gpu_cluster):
    from vidgen.eval.job import featurize

    for overrides, gpus in (((), 0), (("eval.use_gpu=true",), 1)):
        cfg = load_config(None, ["eval.i3d_flavor=tiny", *overrides])
        with pytest.raises(Reserved) as got:
            featurize(FakeDataset(), cfg)
        kwargs = got.value.kwargs
        assert kwargs["num_gpus"] == gpus, overrides  # from eval.use_gpu, not from the cluster's 8 GPUs
        assert kwargs["fn_constructor_kwargs"]["gpus_reserved"] == gpus
        assert kwargs["fn_constructor_kwargs"].get("device") is None  # the actor decides from its reservation


def test_i3d_actor_uses_cpu_unless_a_gpu_is_reserved(cuda_visible):
    from vidgen.eval.features import ClipFeatures

    udf = ClipFeatures(flavor="tiny", resolution=32, seed=0)
    assert {p.device.type for p in udf.model.parameters()} == {"cpu"}
