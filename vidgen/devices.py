"""Which device a process computes on: decided by the GPUs it reserved, never guessed.

Ray 2.60 no longer hides the GPUs from an actor or task that reserved none (it leaves CUDA_VISIBLE_DEVICES
alone when num_gpus=0), so `torch.cuda.is_available()` is True in every CPU actor on a GPU node; choosing CUDA
from it would put all of them on an unreserved cuda:0, beside whichever actor did reserve it. Whether a job uses
GPUs is a config field (latents.gpus_per_actor, eval.use_gpu, generate.use_gpu); the number of GPUs it reserves
from Ray follows from that field, and so does the device, through `compute_device`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vidgen.errors import ConfigError

if TYPE_CHECKING:
    import torch


def compute_device(gpus_reserved: float, field: str = "GPUs reserved") -> torch.device:
    """CUDA when this process reserved GPUs (> 0, fractions included), else the CPU even where CUDA is visible.

    With a reservation, Ray sets CUDA_VISIBLE_DEVICES to the reserved GPUs, so "cuda" is the first of them.
    `field` names the config field the reservation came from, for the error raised when no GPU is usable."""
    import torch  # lazy: vidgen.devices loads no torch until a device is chosen

    if gpus_reserved <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}={gpus_reserved:g}: this worker reserved a GPU, but torch.cuda.is_available() "
                          "is False here (a CPU-only torch build, or no usable GPU on its node)")
    return torch.device("cuda")
