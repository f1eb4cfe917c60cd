"""Driver side of training: Ray Train TorchTrainer over the loop, live metrics, export of the weights.

`fit(cfg, dataset)` runs `train.num_workers` workers under DeepSpeed ZeRO, resumes from the latest
checkpoint in `storage_path/<run.name>` when one exists (a rerun with the same name continues where a dead
run stopped), and exports the trained UNet as a diffusers directory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from vidgen.config import VidgenConfig
from vidgen.errors import ConfigError, JobError

log = logging.getLogger(__name__)

WORKER_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "RAY_DATA_USE_DATASOURCE_V2")


@ray.remote(num_cpus=0)
class MetricsSink:
    """Rank 0 puts metric rows here; the driver drains them and logs (the driver owns MLflow)."""

    def __init__(self):
        self.rows: list[dict] = []

    def put(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def drain(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


@dataclass
class TrainResult:
    checkpoint_dir: str  # the last Ray checkpoint (DeepSpeed shards of every rank)
    export_dir: str  # the trained UNet, diffusers format
    metrics: list[dict] = field(default_factory=list)  # every row rank 0 reported, in step order


def check(cfg: VidgenConfig) -> None:
    t = cfg.train
    if not t.use_gpu and t.precision == "fp16":
        raise ConfigError("train.precision=fp16: DeepSpeed has no fp16 on CPU; expected fp32 or bf16")


def storage_root(cfg: VidgenConfig) -> str:
    path = cfg.train.storage_path or os.path.join(cfg.run.workdir, "train")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def fit(cfg: VidgenConfig, dataset: ray.data.Dataset,
        on_metrics: Callable[[list[dict]], None] | None = None) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    check(cfg)
    sink = MetricsSink.remote()
    t = cfg.train
    loop_config = {"train": t.model_dump(), "model": cfg.model.model_dump(), "seed": cfg.run.seed,
                   "metrics_sink": sink}
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    trainer = TorchTrainer(
        _train_func,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        datasets={"train": dataset.select_columns(["frames", "fps"])},
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_root(cfg),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    rows: list[dict] = []
    stop = threading.Event()

    def pump() -> None:  # log metrics while the fit runs, not only at the end
        while not stop.wait(1.0):
            _drain(sink, rows, on_metrics)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the root cause in one line
        raise JobError(f"training run {cfg.run.name!r} failed: {_root_cause(e)}") from e
    finally:
        stop.set()
        pumper.join()
        _drain(sink, rows, on_metrics)
        ray.kill(sink)
    if result.checkpoint is None:
        raise JobError(f"training run {cfg.run.name!r} finished without a checkpoint")
    ckpt_dir = result.checkpoint.path
    export_dir = os.path.join(cfg.run.workdir, "export", "unet")
    export_unet(cfg, result.checkpoint, export_dir)
    rows.sort(key=lambda r: r["step"])
    return TrainResult(checkpoint_dir=ckpt_dir, export_dir=export_dir, metrics=rows)


def _train_func(config: dict) -> None:
    from vidgen.train.loop import train_func

    train_func(config)


def _drain(sink, rows: list[dict], on_metrics) -> None:
    try:
        new = ray.get(sink.drain.remote(), timeout=30)
    except Exception:  # the sink is gone or busy: nothing to log now
        return
    if new:
        rows.extend(new)
        if on_metrics:
            on_metrics(new)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def consolidated_state_dict(ckpt_dir: str) -> dict:
    """Full fp32 UNet weights from a DeepSpeed checkpoint of any ZeRO stage."""
    import torch

    latest = Path(ckpt_dir, "latest").read_text().strip()
    tag_dir = Path(ckpt_dir, latest)
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=latest))
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_unet(cfg: VidgenConfig, checkpoint, export_dir: str) -> None:
    """Consolidate the ranks' shards and write a diffusers UNet directory atomically."""
    from vidgen import storage
    from vidgen.train.recipes import build_recipe

    with checkpoint.as_directory() as d, contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints
        state = consolidated_state_dict(d)
    recipe = build_recipe(cfg.train.recipe, cfg.model, cfg.train, cfg.run.seed)
    with tempfile.TemporaryDirectory(prefix="vidgen-export-") as tmp:
        recipe.export(state, tmp)
        if storage.is_remote(export_dir):
            storage.upload_dir(tmp, export_dir)
        else:
            Path(export_dir).parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".unet-", dir=Path(export_dir).parent))
            shutil.copytree(tmp, staging, dirs_exist_ok=True)
            if Path(export_dir).exists():
                shutil.rmtree(export_dir)
            os.replace(staging, export_dir)
    log.info("exported UNet to %s", export_dir)
