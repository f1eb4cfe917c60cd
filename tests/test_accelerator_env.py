"""Defects that only GPUs show, caught on CPU: the environment a worker gets, the device of every collective and
of the EMA copy, ZeRO-Offload, and an export configured for xformers on a machine without CUDA.

A GPU run would crash on each of these; here each class is pinned down where the CPU can see it: the deciding
function (which accelerator a worker uses), or the `meta` device standing in for CUDA (a tensor created on the
CPU among meta tensors fails exactly as a CPU tensor in an NCCL collective or among CUDA tensors does).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.train import loop

META = torch.device("meta")


# ---- the environment a worker gets -----------------------------------------------------------------------


def test_the_driver_sets_no_accelerator_for_the_workers(monkeypatch):
    """A KubeRay entrypoint's driver runs on a GPU-less head: nothing it decides about accelerators may travel."""
    from vidgen import ray_env

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    ray_env.set_driver_env()
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # set on the driver by hand, or by an older vidgen
    assert "DS_ACCELERATOR" not in ray_env.shared_env()


@pytest.mark.parametrize("use_gpu, accelerator", [(True, "cuda"), (False, "cpu")])
def test_a_worker_environment_follows_its_own_resources(monkeypatch, use_gpu, accelerator):
    from vidgen.ray_env import apply_worker_env
    from vidgen.train.launch import worker_runtime_env

    monkeypatch.setenv("DS_ACCELERATOR", "xpu" if use_gpu else "cuda")  # what a driver elsewhere might have
    env = worker_runtime_env(use_gpu)
    assert env["DS_ACCELERATOR"] == accelerator
    assert env["HF_HUB_OFFLINE"] == "1" and not any(k.startswith("AWS_") for k in env)
    apply_worker_env(use_gpu)  # inside the worker: whatever the job's runtime env said
    assert os.environ["DS_ACCELERATOR"] == accelerator


# ---- collectives and the EMA copy on the compute device ---------------------------------------------------


class _Collected(Exception):
    pass


@pytest.fixture
def collective_devices(monkeypatch):
    """torch.distributed's collectives replaced by a recorder of their tensors' devices (no process group)."""
    seen: list[torch.device] = []

    def record(tensor_or_list, *args, **kwargs):
        tensors = tensor_or_list if isinstance(tensor_or_list, list) else [tensor_or_list]
        tensors += [a for a in args if isinstance(a, torch.Tensor)]
        seen.extend(t.device for t in tensors)
        raise _Collected  # the values of meta tensors cannot be read: stop at the collective

    monkeypatch.setattr(torch.distributed, "all_reduce", record)
    monkeypatch.setattr(torch.distributed, "all_gather", record)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    return seen


@pytest.mark.parametrize("collective", ["data_positions", "same_step", "ranks_agree", "mean_loss"])
def test_every_collective_runs_on_the_compute_device(collective_devices, collective):
    """NCCL (Ray's backend for GPU workers) takes CUDA tensors only: a tensor made on the CPU fails there."""
    params = [torch.nn.Parameter(torch.empty(3, 2, device=META)), torch.nn.Parameter(torch.empty(4, device=META))]
    calls = {
        "data_positions": lambda: loop.data_positions(5, 1, 2, META),
        "same_step": lambda: loop._check_same_step(7, META),
        "ranks_agree": lambda: loop.check_ranks_agree(params, 3, META),
        "mean_loss": lambda: loop.step_totals([torch.empty((), device=META)] * 2, 3, META),
    }
    with pytest.raises(_Collected):
        calls[collective]()
    assert collective_devices and all(d == META for d in collective_devices), collective_devices


def test_ema_resume_loads_onto_the_workers_device(tmp_path):
    """The EMA copy is saved from one device and resumed on another; it is updated in place from the live
    (device) weights, so it must come back on their device."""
    saved = {"w": torch.randn(3, 2)}
    torch.save(saved, tmp_path / "ema.pt")
    ema = loop.load_ema(tmp_path / "ema.pt", META)
    assert ema["w"].device == META
    live = [torch.nn.Parameter(torch.empty(3, 2, device=META))]
    loop._ema_update(ema, ["w"], live, 0.9)  # a CPU copy here would raise, as a CPU copy among CUDA weights does
    assert ema["w"].device == META and ema["w"].shape == (3, 2)


# ---- ZeRO-Offload and an xformers export, through the real stack -----------------------------------------


def _clips(n: int = 8):
    import ray

    clip = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    return ray.data.from_items([{"frames": clip, "fps": 7.0} for _ in range(n)]), clip


@pytest.fixture(scope="module")
def offload_runs(ray_session, tmp_path_factory):
    runs = {}

    def get(stage: int):
        if stage not in runs:
            from vidgen.train.launch import fit

            tmp = tmp_path_factory.mktemp(f"offload{stage}")
            cfg = load_config(None, [f"run.workdir={tmp}", f"run.name=o-{uuid.uuid4().hex[:8]}", "model.num_frames=4",
                                     "train.num_workers=2", "train.lr=1e-3", f"train.zero_stage={stage}",
                                     "train.offload_optimizer=true", "train.max_steps=1", "train.checkpoint_every=1"])
            ds, clip = _clips()
            runs[stage] = (cfg, fit(cfg, ds), clip)
        return runs[stage]

    return get


@pytest.mark.ray
@pytest.mark.parametrize("stage", [2, 3])
def test_offload_optimizer_fits_and_trains_like_a_plain_step(offload_runs, stage):
    """DeepSpeed refuses a client torch optimizer under ZeRO-Offload; vidgen gives it DeepSpeed's CPU Adam. The
    update must match a plain PyTorch AdamW step (same data, same noise), as the runs without offload do."""
    from vidgen.models.svd import model as svd

    cfg, result, clip = offload_runs(stage)
    assert [r["step"] for r in result.metrics] == [1]
    trained = svd.load_unet(result.export_dir).state_dict()
    plain = _plain_step_update(cfg, clip)
    w0 = svd.tiny(num_frames=4).unet.state_dict()
    d_ds = torch.cat([(trained[k] - w0[k]).flatten() for k in w0])
    d_plain = torch.cat([(plain[k] - w0[k]).flatten() for k in w0])
    rel = ((d_ds - d_plain).norm() / d_plain.norm()).item()
    assert d_plain.norm() > 0 and rel < 0.02, f"ZeRO-{stage} offload update differs from the plain step's by {rel:.2%}"


def test_offload_with_the_8bit_optimizer_is_refused_before_any_worker():
    from vidgen.errors import ConfigError
    from vidgen.train.launch import check

    cfg = load_config(None, ["train.offload_optimizer=true", "train.adam_8bit=true", "train.use_gpu=true"])
    with pytest.raises(ConfigError, match="train.adam_8bit=true with train.offload_optimizer=true"):
        check(cfg)


@pytest.mark.ray
def test_export_of_an_xformers_run_needs_no_cuda(offload_runs, tmp_path, monkeypatch):
    """Workers train with xformers on their GPUs; the export runs where there may be no CUDA (a head, a CPU
    task) and builds nothing that needs it: the weights do not depend on the attention kernel. It runs in a
    Ray task, not in the driver (a head pod cannot hold a full UNet and its fp32 state): the driver's own
    consolidation function is broken here, and the export still succeeds."""
    from ray.train import Checkpoint

    from vidgen.models.svd import model as svd
    from vidgen.train import launch
    from vidgen.train.launch import export_on_worker

    def not_on_the_driver(*args, **kwargs):
        raise AssertionError("the export consolidated the checkpoint in the driver process")

    monkeypatch.setattr(launch, "consolidated_state_dict", not_on_the_driver)
    cfg, result, _ = offload_runs(2)
    xf = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attention": "xformers"})})
    pid = export_on_worker(xf, Checkpoint(result.checkpoint_dir), str(tmp_path / "unet"))
    # its process exits with it: an idle Ray worker would keep the GBs consolidation left in its allocator
    assert pid != os.getpid() and _gone(pid, within_s=30)
    a, b = svd.load_unet(str(tmp_path / "unet")).state_dict(), svd.load_unet(result.export_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _gone(pid: int, within_s: float) -> bool:
    import time

    import psutil

    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


def _plain_step_update(cfg, clip) -> dict[str, torch.Tensor]:
    from vidgen.models.registry import build_recipe

    recipe = build_recipe(cfg.model, cfg.train, cfg.run.seed)
    unet, params = recipe.unet, recipe.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, eps=1e-8)
    gens = [torch.Generator().manual_seed(loop.rank_seed(cfg.run.seed, r, 0)) for r in range(2)]
    batch = {"frames": torch.from_numpy(clip[None]), "fps": torch.tensor([7.0], dtype=torch.float64)}
    mean = torch.stack([recipe.loss(batch, lambda x, t, e, i: unet(x, t, e, i).sample, g)[0] for g in gens]).mean()
    mean.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    opt.step()
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


# ---- outputs that remote processes write --------------------------------------------------------------------


def _nodes(monkeypatch, *gpus: int):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": float(g)}}
                                               for g in gpus] + [{"Alive": False, "Resources": {}}])


@pytest.mark.parametrize("job, field, overrides", [
    ("train", "run.workdir", []),
    ("train", "train.storage_path", ["run.workdir=s3://b/w", "train.storage_path=/data/ckpt"]),
    ("generate", "generate.output", ["run.workdir=s3://b/w", "generate.output=/data/videos"]),
    ("eval", "run.workdir", []),
    ("latents", "latents.output", ["run.workdir=s3://b/w", "latents.output=./cache"]),
])
def test_a_local_output_on_a_cluster_of_several_nodes_is_refused(monkeypatch, job, field, overrides):
    from vidgen.errors import ConfigError
    from vidgen.runner import check_outputs_shared

    cfg = load_config(None, ["run.workdir=./work", *overrides])
    _nodes(monkeypatch, 0)
    check_outputs_shared(cfg, job)  # one node: every process sees the driver's disk
    _nodes(monkeypatch, 0, 1, 1)
    with pytest.raises(ConfigError, match=rf"^{field}=.*a local path, but the Ray cluster has 3 nodes"):
        check_outputs_shared(cfg, job)
    check_outputs_shared(cfg.model_copy(update={"run": cfg.run.model_copy(update={"shared_filesystem": True})}), job)


def test_gpu_workers_to_come_count_as_other_nodes(monkeypatch):
    """An autoscaling cluster at zero GPU workers: the GPU workers will start on nodes not up yet."""
    from vidgen.errors import ConfigError
    from vidgen.runner import check_outputs_shared

    _nodes(monkeypatch, 0)
    with pytest.raises(ConfigError, match="GPU workers will start on nodes other than this GPU-less one"):
        check_outputs_shared(load_config(None, ["train.use_gpu=true"]), "train")
    _nodes(monkeypatch, 1)
    check_outputs_shared(load_config(None, ["train.use_gpu=true"]), "train")
    check_outputs_shared(load_config(None, ["train.use_gpu=true", "run.workdir=s3://b/w"]), "train")


def test_the_latent_cache_driver_builds_no_xformers_model(monkeypatch, tmp_path):
    """With Ray, the driver of `vidgen prepare latents` builds the encoders only to hash their weights; on a
    GPU-less head it must build with a kernel it can run (the actors, on GPUs, use the configured one)."""
    import ray

    from vidgen.data.synth import make_moving_shapes
    from vidgen.errors import ConfigError
    from vidgen.models import attention
    from vidgen.train import latents

    seen = []
    real = latents.load_encoders
    monkeypatch.setattr(latents, "load_encoders", lambda cfg, gpus=0.0: (seen.append(cfg.model.attention),
                                                                          real(cfg, gpus))[1])
    monkeypatch.setattr(attention, "check_backend", lambda b: None)  # on CPU it would refuse xformers outright
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # stop right after the driver's part
    make_moving_shapes(str(tmp_path / "clips"), 2, 4, 64, 64)
    cfg = load_config(None, ["model.attention=xformers", "model.num_frames=4", f"run.workdir={tmp_path}",
                             f"data.source={tmp_path / 'clips'}"])
    with pytest.raises(ConfigError, match="needs a running Ray"):
        latents.prepare_latents(cfg, use_ray=True)
    assert seen == ["sdpa"]
    assert attention.portable(cfg.model).path == cfg.model.path and cfg.model.attention == "xformers"


@pytest.mark.ray
def test_a_cpu_worker_runs_as_many_threads_as_the_cpus_ray_reserved_for_it(ray_session):
    """Never the node's core count: more threads than reserved cores share them with the data tasks, and a
    contended step collapses (benchmarks/train_overhead.py --contend)."""
    import ray

    from vidgen.train.loop import reserved_cpus

    got = [ray.get(ray.remote(num_cpus=c)(reserved_cpus).remote()) for c in (1, 2, 0.5)]
    assert got == [1, 2, 1]


@pytest.mark.ray
def test_the_processes_a_job_waits_on_run_at_normal_priority_while_data_tasks_keep_rays_lowered_one(ray_session):
    """Ray starts its workers at niceness 15. A train worker at 15 loses its core to any process at 0 (Ray's own,
    a node's daemons, other jobs): beside one busy process per core it gets about 1/30 of a core
    (benchmarks/worker_priority.py). The train workers (Ray Train's worker runtime env, `worker_runtime_env`), the
    export task and the actors of generation, evaluation and the latent cache start at 0; data tasks stay at
    Ray's 15, so the process the job waits on wins its core. The job's own environment still reaches them."""
    import ray

    from vidgen.ray_env import FOREGROUND_ENV
    from vidgen.train.launch import worker_runtime_env

    def niceness_and_env() -> tuple[int, str | None]:  # defined here: Ray ships it by value
        return os.nice(0), os.environ.get("HF_HUB_OFFLINE")

    task = ray.remote(num_cpus=0)(niceness_and_env)
    assert ray.get(task.remote()) == (15, "1")  # Ray's default, as every read task gets it
    assert ray.get(task.options(runtime_env={"env_vars": worker_runtime_env(False)}).remote()) == (0, "1")
    assert ray.get(task.options(runtime_env={"env_vars": FOREGROUND_ENV}).remote()) == (0, "1")  # export_on_worker

    class Niceness:  # the actors of generation, evaluation and the latent cache: Ray Data's actor pools
        def __call__(self, batch):
            return {"nice": np.full(len(batch["id"]), os.nice(0))}

    pool = ray.data.range(2).map_batches(Niceness, concurrency=1, batch_size=1, num_cpus=0,
                                         runtime_env={"env_vars": FOREGROUND_ENV})
    assert {int(r["nice"]) for r in pool.take_all()} == {0}


@pytest.mark.ray
def test_the_data_tasks_a_train_worker_starts_keep_rays_lowered_priority(ray_session, tmp_path):
    """A Ray task inherits the runtime env of the process that starts it, the foreground priority included: the
    read tasks of a train worker's share would run at 0 and, beside a busy process, take the trainer's core from
    it (benchmarks/train_overhead.py --contend). The share's tasks get Ray's 15 back; so does Ray Data's stats
    actor, which the driver starts before any worker (`fit`)."""
    import ray

    from vidgen.data.pipeline import read_config_clips
    from vidgen.data.synth import make_moving_shapes
    from vidgen.ray_env import data_task_args, start_data_stats_actor
    from vidgen.train.launch import worker_runtime_env

    make_moving_shapes(str(tmp_path / "clips"), 2, 4, 32, 32)
    cfg = load_config(None, ["model.num_frames=4", "data.height=32", "data.width=32", f"run.workdir={tmp_path}",
                             f"data.source={tmp_path / 'clips'}"])
    stream = read_config_clips(cfg, train=True)
    assert data_task_args() == {}  # on the driver: tasks get Ray's 15 anyway, and share the job's worker pool
    start_data_stats_actor()

    def in_a_train_worker(stream) -> dict:  # defined here: Ray ships it by value
        def nice(_row):
            return {"nice": os.nice(0)}

        share = stream.share_dataset(0, np.arange(2), np.ones((2, stream.clips_per_sample), dtype=bool))
        return {"worker": os.nice(0),
                "inherited": {r["nice"] for r in ray.data.range(2, override_num_blocks=2).map(nice).take_all()},
                "given_back": {r["nice"] for r in ray.data.range(2, override_num_blocks=2)
                               .map(nice, **data_task_args()).take_all()},
                "share_args": share._logical_plan.dag.ray_remote_args,
                "clips": len(share.take_all())}

    got = ray.get(ray.remote(num_cpus=0)(in_a_train_worker)
                  .options(runtime_env={"env_vars": worker_runtime_env(False)}).remote(stream))
    assert got["worker"] == 0 and got["inherited"] == {0}  # what the share's tasks would get unasked
    assert got["given_back"] == {15}
    assert got["share_args"]["runtime_env"] == {"env_vars": {"RAY_worker_niceness": "15"}}
    assert got["clips"] == 2 * stream.clips_per_sample
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE  # the actor Ray Data made

    stats = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
    assert ray.get(stats.__ray_call__.remote(lambda _self: os.nice(0))) == 15
