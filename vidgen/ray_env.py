"""Ray start-up, the environment each Ray process gets, and where a job's remote processes may write.

Three rules that only a real cluster tests:
- The driver's environment is not a worker's. A KubeRay entrypoint runs on a head pod without a GPU; what it
  decides about accelerators must never reach GPU workers. Each worker's accelerator settings follow the
  resources it reserved (`worker_env`), never the driver's machine.
- Settings every process shares (`SHARED_ENV`) travel in the runtime env; credentials never do (Ray logs runtime
  envs in plain text): local workers inherit them, cluster nodes bring their own.
- Files written by workers and actors (validation videos, generated videos, skip records, cache shards) are read
  by the driver. On a cluster of several nodes they must live on storage every node shares: a local path is
  refused in one line before anything starts (`require_shared`), unless the config says it is a shared mount.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from vidgen import storage
from vidgen.config import VidgenConfig
from vidgen.errors import ConfigError, raised_remotely

log = logging.getLogger(__name__)

# Shared by every Ray process of a job; none of them depends on the machine it runs on.
SHARED_ENV = ("RAY_DATA_USE_DATASOURCE_V2", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "VIDGEN_S3_ENDPOINT_URL")

# Ray starts its worker processes at niceness 15, below every process at the default 0 (its own raylet and GCS,
# the driver, a node's daemons, other jobs). The processes a job waits on, and that reserved their CPUs, start at
# 0 instead (a runtime env setting of Ray's, read as the worker starts; lowering a niceness later needs a
# privilege containers lack): the train workers, the export, and the actors of generation, evaluation and the
# latent cache. Beside one busy process per core, a worker at 15 gets about 1/30 of its core
# (benchmarks/worker_priority.py). Data tasks keep Ray's 15: a trainer that needs its core wins it from them.
FOREGROUND_ENV = {"RAY_worker_niceness": "0"}
# A task inherits the runtime env of the process that starts it, this setting included: the data tasks a train
# worker starts to read its share would run at 0 too, and beside a busy process take the trainer's core from it
# (64x64x4, ZeRO-2: about 1.9 s of CPU per data worker as it starts, during the first steps, then about 1% of a
# core each). They get Ray's own 15 back (`data_task_args`).
BACKGROUND_ENV = {"RAY_worker_niceness": "15"}


def data_task_args() -> dict:
    """Ray remote args for the Ray Data tasks this process starts: inside a process started at the foreground
    priority (a train worker), Ray's 15 again; elsewhere nothing, so that the tasks share the job's worker pool."""
    if os.environ.get("RAY_worker_niceness") == FOREGROUND_ENV["RAY_worker_niceness"]:
        return {"runtime_env": {"env_vars": dict(BACKGROUND_ENV)}}
    return {}


def start_data_stats_actor() -> None:
    """Start Ray Data's stats actor from this process, the driver, unless the cluster has it already.

    It is one detached actor per cluster, started by the first process that runs a dataset, with that process's
    runtime env and on its node. Started by a train worker, it would run at the foreground priority on a training
    node (its start-up beside the first steps, then about 1% of a core while a worker streams its share); from the
    driver it gets Ray's 15 and the driver's node, where Ray Data means it to live. Ray Data has no public call
    for it: if this one is gone, the actor starts as before."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor  # lazy: private Ray Data API; heavy

        get_or_create_stats_actor()
    except Exception as e:  # only a priority is lost
        log.debug("Ray Data's stats actor not started from the driver: %s", e)


def set_driver_env() -> None:
    """Defaults of the shared settings, set on the driver before `ray.init` so local workers inherit them."""
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")  # v2 parquet reader starts 32 actors per epoch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are paths, never hub downloads
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vidgen" / "torch_extensions"))


def shared_env() -> dict[str, str]:
    return {k: os.environ[k] for k in SHARED_ENV if k in os.environ}


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Accelerator settings of a worker that reserved GPUs (`use_gpu`) or not: DeepSpeed's accelerator is
    chosen here from the worker's own resources (a CPU worker must not probe for CUDA either: a GPU node's CPU
    workers see the GPUs)."""
    return {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}


def apply_worker_env(use_gpu: bool) -> None:
    """Inside a worker, before DeepSpeed is imported: whatever the driver or the job's runtime env said."""
    for k, v in worker_env(use_gpu).items():
        if os.environ.get(k) not in (None, v):
            log.warning("%s=%s in this worker's environment ignored: it %s a GPU, so %s=%s",
                        k, os.environ[k], "reserved" if use_gpu else "reserved no", k, v)
        os.environ[k] = v


class HideVidgenErrors(logging.Filter):
    """Drops a log record about an exception that carries a vidgen error (a Ray actor's or task's bad input): the
    driver reports that error in one line itself. Ray Data logs an actor that dies in its constructor as an internal
    error, with Ray's whole traceback, while the exception is being handled (so `sys.exc_info` holds it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or raised_remotely(exc) is None


def hide_vidgen_errors_in_ray_logs() -> None:
    logger = logging.getLogger("ray.data.exceptions")  # Ray Data's logger of failed executions
    if not any(isinstance(f, HideVidgenErrors) for f in logger.filters):
        logger.addFilter(HideVidgenErrors())


def init_ray(cfg: VidgenConfig) -> None:
    import ray  # lazy: Ray is heavy; ray_env loads only fsspec

    set_driver_env()
    hide_vidgen_errors_in_ray_logs()
    if ray.is_initialized():
        return
    env = shared_env()
    if os.environ.get("RAY_ADDRESS") and not cfg.ray.address:
        # Inside `ray job submit`: the job's runtime env already reaches every worker, and Ray refuses a
        # second one that sets the same keys.
        ray.init()
        return
    if cfg.ray.address:  # cluster nodes bring their own credentials (instance roles, secrets): none are shipped
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": env}, configure_logging=True,
                 logging_level=logging.WARNING)
        return
    # A local cluster's workers are children of the raylet this process starts, so they inherit its environment,
    # credentials included. Credentials are never put in a runtime env: Ray logs runtime envs in plain text
    # (runtime_env_agent.log) and keeps them in its GCS. More logical CPUs than cores, so that data tasks can
    # run beside the train workers.
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
             configure_logging=True, logging_level=logging.WARNING)


# -- where remote processes write -------------------------------------------------------------------------


def remote_nodes_reason(needs_gpu: bool) -> str | None:
    """Why processes of a job may run on another node than the driver, or None when they cannot.

    Several alive nodes; or GPUs wanted while no alive node has one (an autoscaling cluster at zero GPU
    workers: they will start elsewhere)."""
    import ray  # lazy: Ray is heavy; ray_env loads only fsspec

    if not ray.is_initialized():
        return None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        return f"the Ray cluster has {len(nodes)} nodes"
    if needs_gpu and not any(n.get("Resources", {}).get("GPU", 0) for n in nodes):
        return "GPU workers will start on nodes other than this GPU-less one"
    return None


def require_shared(cfg: VidgenConfig, outputs: dict[str, str], needs_gpu: bool) -> None:
    """Refuse local output paths that processes on other nodes would write to and the driver would read.

    `outputs`: {config field: the location it resolves to}. A `run.shared_filesystem=true` config vouches that
    local paths are a mount every node shares (NFS, EFS, Lustre)."""
    if cfg.run.shared_filesystem:
        return
    local = {f: u for f, u in outputs.items() if u and storage.local_path(u) is not None}
    if not local:
        return
    reason = remote_nodes_reason(needs_gpu)
    if reason is None:
        return
    field, uri = next(iter(local.items()))
    raise ConfigError(f"{field}={uri}: a local path, but {reason}: files that processes on other nodes write "
                      "there would never reach this driver; use a URI every node shares (s3://..., gs://...), or "
                      "set run.shared_filesystem=true if the path is a mount every node shares")
