"""Driver side of training: Ray Train TorchTrainer over the loop, live metrics, export of the weights.

`fit(cfg, dataset)` runs `train.num_workers` workers under DeepSpeed ZeRO, resumes from the newest complete
checkpoint in `storage_path/<run.name>` when one exists (a rerun with the same name continues where a dead or
stopped run stopped: vidgen/train/checkpoints.py), and exports the trained UNet as a diffusers directory to
`storage_path/<run.name>/export` (per run, beside its checkpoints). Ctrl-C and SIGTERM end it with
`signals.Interrupted`, whose message names the checkpoint a rerun resumes from.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vidgen import faults, storage
from vidgen.config import VidgenConfig
from vidgen.data.position import Shares
from vidgen.errors import ConfigError, DataError, JobError, ModelError, raised_remotely
from vidgen.models import registry
from vidgen.ray_env import FOREGROUND_ENV, shared_env, start_data_stats_actor, worker_env
from vidgen.signals import Interrupted, raising
from vidgen.train import checkpoints
from vidgen.train.manifest import verify_manifest

log = logging.getLogger(__name__)

TEST_HOOK_ENV = ("VIDGEN_DUMP_STATE", "VIDGEN_CLIP_LOG")  # vidgen/train/loop.py; faults: vidgen/faults.py


@ray.remote(num_cpus=0)
class MetricsSink:
    """Rank 0 reports here; the driver drains and logs (the driver owns MLflow).

    Rows become final when a checkpoint at or after their step is committed. A restarted attempt calls
    `start_attempt(step)` first, which drops the failed attempt's uncommitted rows: those steps are
    trained again, and each step reaches MLflow exactly once. (An attempt that had to fall back past a
    committed checkpoint, its newest being damaged, trains steps again that were already delivered: their
    first rows stand, the repeats are dropped.)
    """

    def __init__(self):
        self.pending: list[dict] = []
        self.artifacts: list[tuple[int, list[str]]] = []
        self.committed = 0
        self.delivered = 0  # the last step drained
        self.data_stop: tuple[int, int] | None = None  # (step, samples skipped): the workers stopped for bad data

    def last_step(self) -> int:
        """The last step rank 0 reported, committed or not."""
        return max([self.delivered, *(r["step"] for r in self.pending)])

    def put(self, rows: list[dict]) -> None:
        self.pending.extend(rows)

    def put_artifacts(self, step: int, paths: list[str]) -> None:
        self.artifacts.append((step, paths))

    def start_attempt(self, step: int) -> None:
        self.pending = [r for r in self.pending if r["step"] <= step]
        self.artifacts = [a for a in self.artifacts if a[0] <= step]
        self.committed = min(self.committed, step)

    def stop_for_data(self, step: int, skipped: int) -> None:
        self.data_stop = (step, skipped)

    def stopped_for_data(self) -> tuple[int, int] | None:
        return self.data_stop

    def commit(self, step: int) -> None:
        self.committed = max(self.committed, step)

    def drain(self) -> tuple[list[dict], list[tuple[int, list[str]]]]:
        rows = [r for r in self.pending if self.delivered < r["step"] <= self.committed]
        self.pending = [r for r in self.pending if r["step"] > self.committed]
        self.delivered = max([self.delivered, *(r["step"] for r in rows)])
        arts = [a for a in self.artifacts if a[0] <= self.committed]
        self.artifacts = [a for a in self.artifacts if a[0] > self.committed]
        return rows, arts


class CommitOnCheckpoint(ray.train.UserCallback):
    """Runs in Ray Train's controller: a reported checkpoint is registered (a restart will resume from it)
    before this is called, so only then are the metrics up to its step final."""

    def __init__(self, sink):
        self.sink = sink

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None and metrics and "step" in metrics[0]:
            self.sink.commit.remote(int(metrics[0]["step"]))


@dataclass
class TrainResult:
    checkpoint_dir: str  # the last Ray checkpoint (DeepSpeed shards of every rank)
    export_dir: str  # the trained UNet, diffusers format (svd_lora: the LoRA directory, see models/lora.py)
    metrics: list[dict] = field(default_factory=list)  # every row rank 0 reported, in step order
    merged_dir: str | None = None  # svd_lora with train.lora.export_merged: base UNet + LoRA, diffusers format
    export_s: float = 0.0  # consolidating the shards and writing the export(s)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A warning about the config, logged once per process: `vidgen train` checks its config more than once."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def check(cfg: VidgenConfig) -> None:
    """Refuse combinations that would only fail inside the workers, before any worker starts."""
    t = cfg.train
    registry.check(cfg.model, t.recipe)
    registry.spec(cfg.model).check_train(cfg)  # sizes and frame counts the family cannot train on
    if cfg.model.attention == "xformers" and not t.use_gpu:
        raise ConfigError("model.attention=xformers: needs train.use_gpu=true (a CUDA GPU per worker); "
                          "use model.attention=sdpa")
    if not t.use_gpu and t.precision == "fp16":
        raise ConfigError("train.precision=fp16: DeepSpeed has no fp16 on CPU; expected fp32 or bf16")
    if t.zero_stage == 3 and t.num_workers == 1 and not t.offload_params:
        warn_once("train.zero_stage=3 on one worker without train.offload_params: one worker's partition is the "
                  "whole model, so it holds no less memory than train.zero_stage=2 (`vidgen plan` shows both), "
                  "while ZeRO-3 gathers and releases parameters module by module every step (on CPU, a step "
                  "1.4-1.6x ZeRO-2's at 64x64x4, 1.06x at 128x128x8)")
    if t.adam_8bit and t.offload_optimizer:
        raise ConfigError("train.adam_8bit=true with train.offload_optimizer=true: the 8-bit optimizer steps on the "
                          "GPU; ZeRO-Offload steps on the CPU with DeepSpeed's CPU Adam. Choose one")
    if t.adam_8bit:
        if not t.use_gpu:
            raise ConfigError("train.adam_8bit=true: 8-bit AdamW needs train.use_gpu=true")
        try:
            import bitsandbytes  # noqa: F401  # lazy: optional, GPU only
        except ImportError:
            raise ConfigError("train.adam_8bit=true: the bitsandbytes package is not installed") from None


def user_deepspeed_config(cfg: VidgenConfig) -> dict:
    path = cfg.train.deepspeed_config
    if not path:
        return {}
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config={path}: not JSON (line {e.lineno}: {e.msg})") from None
    from vidgen.train.loop import user_config  # lazy: loop imports torch (fit, the caller, imports it anyway)

    return user_config(data, path)


def share_columns(cfg: VidgenConfig) -> list[str]:
    """What the recipe reads from a row of data.source's clips or of the latent cache (both have every optional
    column); the recipe's optional columns (`Recipe.OPTIONAL_COLUMNS`) are passed when the dataset has them."""
    recipe = registry.recipe_class(cfg.model, cfg.train.recipe)
    inputs = list(recipe.ENCODED) if cfg.data.latents else ["frames"]
    return [*inputs, "fps", *recipe.OPTIONAL_COLUMNS]


def train_columns(cfg: VidgenConfig, dataset: ray.data.Dataset) -> list[str]:
    """`share_columns`, less the recipe's optional columns that a dataset of the caller's own does not have."""
    columns, optional = share_columns(cfg), registry.recipe_class(cfg.model, cfg.train.recipe).OPTIONAL_COLUMNS
    if not optional:
        return columns
    schema = dataset.schema()  # reads one block at most
    have = set(schema.names) if schema is not None else set()
    return [c for c in columns if c not in optional or c in have]


def storage_root(cfg: VidgenConfig) -> str:
    path = cfg.train.storage_path or os.path.join(cfg.run.workdir, "train")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def export_root(cfg: VidgenConfig) -> str:
    """Where the run's weights are exported: beside its checkpoints, `<storage root>/<run.name>/export`."""
    return storage.join(storage_root(cfg), cfg.run.name, "export")


def ray_storage(cfg: VidgenConfig):
    """(path, filesystem) for Ray Train: remote roots through vidgen's own fsspec filesystem, so that Ray reaches
    the same store as vidgen (VIDGEN_S3_ENDPOINT_URL, fsspec's credentials), not one it builds from the URI."""
    root = storage_root(cfg)
    if not storage.is_remote(root):
        return root, None
    fs, path = storage.filesystem(root)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def checkpoint_uri(cfg: VidgenConfig, checkpoint) -> str:
    """A Ray checkpoint's location as a URI (Ray gives the path within `ray_storage`'s filesystem)."""
    root = storage_root(cfg)
    return f"{root.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}" if "://" in root else checkpoint.path


def run_dir(cfg: VidgenConfig) -> str:
    """Where Ray Train keeps the run's checkpoints (and vidgen its MLflow run id: `mlflow_run_file`)."""
    return storage.join(storage_root(cfg), cfg.run.name)


def mlflow_run_file(cfg: VidgenConfig) -> str:
    """The MLflow run a rerun of this training run continues (vidgen.tracking.Tracker's run_file)."""
    return storage.join(run_dir(cfg), "vidgen-mlflow-run.json")


def check_resume(cfg: VidgenConfig, newest: str | None) -> None:
    """Refuse, before any worker starts, to resume from the checkpoint `newest` if it was written with another
    model/training config: its manifests (vidgen/train/manifest.py) carry the config hash. The workers check the
    hash again when they load the checkpoint (older checkpoints have no hash in their manifest)."""
    from vidgen.train.loop import config_hash  # lazy: loop imports torch; the driver does not

    if newest is None:
        return
    manifests = [u for u in storage.listdir(newest) if u.rstrip("/").rsplit("/", 1)[-1].startswith("vidgen-manifest")]
    try:
        written = json.loads(storage.read_text(manifests[0])).get("meta", {}).get("config_hash") if manifests else None
    except ValueError:  # a damaged manifest: the workers' checkpoint check names it and falls back
        return
    sections = registry.recipe_class(cfg.model, cfg.train.recipe).TRAIN_SECTIONS
    if written and written != config_hash(cfg.model.model_dump(), cfg.train.model_dump(), sections):
        raise JobError(f"run.name={cfg.run.name!r}: the checkpoint {newest} was written with another model/training "
                       "config; start a new run.name to train with this one (or restore the config it was made with)")


def fit(cfg: VidgenConfig, data: Shares | ray.data.Dataset,
        on_metrics: Callable[[list[dict]], None] | None = None,
        validation_images: list | None = None,
        on_artifacts: Callable[[int, list[str]], None] | None = None) -> TrainResult:
    """Train; `validation_images` (uint8 [H, W, 3] first frames) enable validation videos.

    data: the clips of data.source (`read_config_clips`) or a latent cache (`latents.CacheStream`): each worker
    reads its own share of every epoch, in an order fixed by (run.seed, epoch), and a checkpoint records exactly
    which clips were trained (vidgen.data.position), so a resume, with any train.num_workers, trains every clip
    once per epoch. Any other Ray Dataset is split by Ray Train, and a resume skips as many batches per worker
    as the checkpoint counted."""
    from ray.train.torch import TorchTrainer  # lazy: imports torch; the driver does not

    check(cfg)
    t = cfg.train
    # The newest complete checkpoint on disk, whatever Ray's registry says (vidgen/train/checkpoints.py).
    resume = checkpoints.reset(run_dir(cfg), t.keep_checkpoints)
    check_resume(cfg, resume.uri if resume else None)
    start_data_stats_actor()  # before any worker runs a dataset: at Ray's priority, on this node
    # On the driver's node: it lives and dies with the driver, never with a worker node (a sink lost with a
    # node would lose every metric and validation video of the run, silently).
    sink = MetricsSink.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    loop_config = {"train": t.model_dump(), "model": cfg.model.model_dump(), "seed": cfg.run.seed,
                   "metrics_sink": sink, "deepspeed_user": user_deepspeed_config(cfg),
                   "resume_from": ray_checkpoint(cfg, resume.uri) if resume else None}
    if not isinstance(data, ray.data.Dataset):  # Shares: each worker reads its own rows
        if data.num_samples < t.num_workers:
            raise ConfigError(f"train.num_workers={t.num_workers}: more workers than the {data.num_samples} samples "
                              f"of {data.source}; each worker needs samples of its own")
        loop_config |= {"clips": ray.put(data), "columns": share_columns(cfg)}
        if getattr(data, "max_bad_fraction", None) is not None:  # the clips of data.source: bad samples are skipped
            loop_config["skip_limit"] = data.max_bad_fraction * data.num_samples
        datasets = {}
    else:
        datasets = {"train": data.select_columns(train_columns(cfg, data))}
    if t.validation_every and validation_images:
        height, width = cfg.data.largest_size()
        loop_config["validation"] = {
            "images": validation_images, "fps": round(cfg.data.fps or 7), "motion_bucket_id": t.edm.motion_bucket_id,
            "num_frames": cfg.model.num_frames, "height": height, "width": width,
            "out_dir": storage.join(cfg.run.workdir, "validation", cfg.run.name),
        }
    scaling = ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                      resources_per_worker=t.resources_per_worker or None,
                                      accelerator_type=t.accelerator_type)
    trainer = TorchTrainer(
        _train_func,
        train_loop_config=loop_config,
        scaling_config=scaling,
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=ray_storage(cfg)[0],
            storage_filesystem=ray_storage(cfg)[1],
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_runtime_env(t.use_gpu)},
            callbacks=[CommitOnCheckpoint(sink)],
        ),
    )
    rows: list[dict] = []
    stop = threading.Event()

    lost: list[JobError] = []  # the sink died: said once the fit is over, never silently

    def drain() -> bool:
        try:
            _drain(sink, rows, on_metrics, on_artifacts)
            return True
        except JobError as e:
            lost.append(e)
            return False

    def pump() -> None:  # log metrics while the fit runs, not only at the end
        while not stop.wait(1.0) and drain():
            pass

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    stopped: Interrupted | None = None
    try:
        result = _fit_in_thread(trainer)
        data_stop = ray.get(sink.stopped_for_data.remote())
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: say where the run stands and how to go on
        stopped = _interrupted(cfg, e, sink)
    except Exception as e:  # Ray wraps worker errors; show the root cause in one line
        raise JobError(f"training run {cfg.run.name!r} failed: {_root_cause(e)}") from e
    finally:
        stop.set()
        pumper.join()
        if not lost:
            drain()
        ray.kill(sink)
    if stopped is not None:
        raise stopped
    checkpoints.prune(run_dir(cfg), t.keep_checkpoints, incomplete=True)  # Ray's retention sees this fit's only
    if lost:
        raise lost[0]
    check_skipped(data, data_stop)
    result.checkpoint = result.checkpoint or loop_config["resume_from"]  # a rerun of a finished run: its last one
    if result.checkpoint is None:
        raise JobError(f"training run {cfg.run.name!r} finished without a checkpoint")
    recipe = registry.recipe_class(cfg.model, t.recipe)
    export_dir = storage.join(export_root(cfg), recipe.EXPORT_NAME)
    merged = "lora" in recipe.TRAIN_SECTIONS and t.lora.export_merged  # the base UNet with the adapters merged in
    merged_dir = storage.join(export_root(cfg), "unet") if merged else None
    t_export = time.perf_counter()
    export_on_worker(cfg, result.checkpoint, export_dir, merged_dir)
    rows.sort(key=lambda r: r["step"])
    return TrainResult(checkpoint_dir=checkpoint_uri(cfg, result.checkpoint), export_dir=export_dir, metrics=rows,
                       merged_dir=merged_dir, export_s=time.perf_counter() - t_export)


def check_skipped(data, data_stop: tuple[int, int] | None) -> None:
    """Before anything is exported: DataError when the workers stopped because more than data.max_bad_fraction of
    the samples were skipped, or when the data report (`ClipStream.check`) finds that many at the end."""
    where = f"training stopped at step {data_stop[0]}: " if data_stop else ""
    if callable(getattr(data, "check", None)):
        try:
            data.check()
        except DataError as e:
            raise DataError(f"{where}{e}") from None
    if data_stop:  # the report missed records the workers counted (a report_dir not every node shares)
        raise DataError(f"{where}{data_stop[1]} of the {data.num_samples} samples of {data.source} made no clip, "
                        f"more than data.max_bad_fraction={data.max_bad_fraction} allows")


def ray_checkpoint(cfg: VidgenConfig, uri: str) -> ray.train.Checkpoint:
    """The checkpoint folder `uri` as Ray Train names it (the inverse of `checkpoint_uri`)."""
    fs = ray_storage(cfg)[1]
    return ray.train.Checkpoint(storage.filesystem(uri)[1] if fs is not None else uri, filesystem=fs)


def _fit_in_thread(trainer):
    """`trainer.fit()` in a thread, this (main) thread waiting under `signals.raising`: Ctrl-C and SIGTERM reach
    vidgen, not Ray Train's own SIGINT handler (main thread only), which aborts the run and exits without a word.
    The workers go with this process (the Ray Train controller is an actor it owns)."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # noqa: B036  # handed to the waiting thread
            out["error"] = e

    fitter = threading.Thread(target=target, name="vidgen-fit", daemon=True)
    with raising():
        fitter.start()
        while fitter.is_alive():
            fitter.join(0.5)
    if "error" in out:
        raise out["error"]
    return out["result"]


def _interrupted(cfg: VidgenConfig, e: KeyboardInterrupt, sink) -> Interrupted:
    """The one line of a stopped fit. Metrics up to the newest complete checkpoint are committed (the rerun resumes
    there, so they are not trained again); retention is applied (Ray's lags behind a stopped run)."""
    signum = getattr(e, "signum", signal.SIGINT)
    try:
        step = ray.get(sink.last_step.remote(), timeout=10)
    except Exception:  # the line is said anyway, without the step
        step = None
    checkpoints.prune(run_dir(cfg), cfg.train.keep_checkpoints)  # complete ones only: a worker may still write
    newest = checkpoints.newest_complete(checkpoints.scan(run_dir(cfg)))
    if newest is not None:
        sink.commit.remote(newest.step)
    at = f" at step {step}" if step else ""
    kept = (f"the newest complete checkpoint is step {newest.step} at {newest.uri}; rerun the same command to resume"
            if newest else "no checkpoint was complete yet; rerunning the same command starts at step 0")
    return Interrupted(signum, f"training run {cfg.run.name!r} interrupted by {signal.Signals(signum).name}{at}; "
                               f"{kept}")


def worker_runtime_env(use_gpu: bool) -> dict[str, str]:
    """The environment of every training worker: the shared settings, the accelerator settings that follow the
    worker's own resources (never the driver's: a GPU-less head must not make GPU workers use the CPU), the
    normal priority (`FOREGROUND_ENV`), and the test hooks when set."""
    hooks = {**{k: os.environ[k] for k in TEST_HOOK_ENV if k in os.environ}, **faults.all_from_env()}
    return {**shared_env(), **hooks, **worker_env(use_gpu), **FOREGROUND_ENV}


def _train_func(config: dict) -> None:
    from vidgen.train.loop import train_func  # lazy: loop imports torch; the driver does not

    train_func(config)


def _drain(sink, rows: list[dict], on_metrics, on_artifacts=None) -> None:
    try:
        new, artifacts = ray.get(sink.drain.remote(), timeout=30)
    except ray.exceptions.GetTimeoutError:  # busy: the next drain takes it
        return
    except ray.exceptions.RayActorError as e:  # it lives on the driver's node: only a dying driver loses it
        raise JobError(f"the metrics collector died; metrics after the last drain are lost: {_root_cause(e)}") from e
    if new:
        rows.extend(new)
        if on_metrics:
            on_metrics(new)
    for step, paths in artifacts:
        if on_artifacts:
            on_artifacts(step, paths)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def consolidated_state_dict(ckpt_dir: str, verify: bool = True) -> dict:
    """Full fp32 UNet weights from a DeepSpeed checkpoint of any ZeRO stage. The manifest is checked first
    (`verify=False`: the caller did) because DeepSpeed's zero_to_fp32 unpickles with weights_only=False."""
    import torch  # lazy: the driver does not load torch

    if verify and (problems := verify_manifest(ckpt_dir)):
        raise ModelError(f"checkpoint {ckpt_dir}: {problems[0]}" + (
            f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    latest = Path(ckpt_dir, "latest").read_text().strip()
    tag_dir = Path(ckpt_dir, latest)
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from vidgen.train.loop import import_deepspeed  # lazy: loop imports torch; the driver does not

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # lazy: deepspeed, ZeRO only

        return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=latest))
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}


def export_on_worker(cfg: VidgenConfig, checkpoint, export_dir: str, merged_dir: str | None = None) -> int:
    """`export_unet` as a Ray task on a worker node: consolidating a full UNet holds the model and its fp32
    state (15-20 GB for SVD-XT), more than a head pod has. The head reserves no CPU (cluster/kuberay), so a
    one-CPU task never lands there; on a single machine it runs beside the driver. The task's process exits when
    it is done (max_calls=1): the allocator keeps most of what consolidation freed (4.5 GiB after a full-size
    SVD-XT export, measured), which an idle Ray worker would otherwise hold for the rest of the job. It runs at
    the normal priority (`FOREGROUND_ENV`): the job waits on it. Errors come back as the task's own exception.
    Returns the pid of the process that ran it."""
    task = ray.remote(num_cpus=1, max_retries=1, max_calls=1, runtime_env={"env_vars": FOREGROUND_ENV})(_export_task)
    try:
        return ray.get(task.remote(cfg, checkpoint, export_dir, merged_dir))
    except ray.exceptions.RayTaskError as e:
        cause = raised_remotely(e) or e.cause
        raise (cause if isinstance(cause, Exception) else JobError(f"export failed: {_root_cause(e)}")) from None


def _export_task(cfg: VidgenConfig, checkpoint, export_dir: str, merged_dir: str | None) -> int:
    export_unet(cfg, checkpoint, export_dir, merged_dir)
    return os.getpid()


def export_unet(cfg: VidgenConfig, checkpoint, export_dir: str, merged_dir: str | None = None) -> None:
    """Consolidate the ranks' shards and write the recipe's export (a diffusers UNet directory, or a LoRA
    directory) atomically; `merged_dir`: also the base UNet with the LoRA merged in. A checkpoint that
    fails its manifest is skipped for the newest older one that passes, with a warning (loop.valid_checkpoint)."""
    from vidgen.train.loop import valid_checkpoint  # lazy: loop imports torch; the driver does not

    ema = None
    with valid_checkpoint(checkpoint) as d, contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints
        state = consolidated_state_dict(d, verify=False)
        if Path(d, "ema.pt").exists():
            import torch  # lazy: the driver does not load torch

            ema = torch.load(Path(d, "ema.pt"), map_location="cpu", weights_only=True)
    if ema is not None:  # the EMA weights, exported beside the raw ones
        _export(cfg, {**state, **ema}, export_dir + "_ema")
    _export(cfg, state, export_dir)
    log.info("exported %s's weights to %s", cfg.train.recipe, export_dir)
    if merged_dir:
        _export(cfg, state, merged_dir, merged=True)
        log.info("exported the merged UNet to %s", merged_dir)


def _export(cfg: VidgenConfig, state: dict, export_dir: str, merged: bool = False) -> None:
    from vidgen.models.attention import portable  # lazy: imports torch; the driver does not
    # Weights do not depend on the attention kernel: the export computes nothing, so it builds with sdpa, which
    # runs anywhere (xformers needs CUDA, which the process exporting may not have).
    recipe = registry.build_recipe(portable(cfg.model), cfg.train, cfg.run.seed)
    with tempfile.TemporaryDirectory(prefix="vidgen-export-") as tmp:
        (recipe.export_merged if merged else recipe.export)(state, tmp)
        if storage.is_remote(export_dir):
            storage.upload_dir(tmp, export_dir)
        else:
            Path(export_dir).parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".unet-", dir=Path(export_dir).parent))
            shutil.copytree(tmp, staging, dirs_exist_ok=True)
            if Path(export_dir).exists():
                shutil.rmtree(export_dir)
            os.replace(staging, export_dir)
