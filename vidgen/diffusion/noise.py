"""Random draws that work with any generator on any device: drawn where the generator lives, then moved.

A generator can only draw on its own device: `torch.randn(..., generator=<CPU generator>, device="cuda")` raises
on a GPU (and silently works on the CPU, so CPU tests never see it). Every random draw in vidgen goes through
these helpers instead. They draw on the generator's device (the CPU when there is no generator) in torch's
default dtype and only then move and cast to `device` / `dtype`, as diffusers' `randn_tensor` does, so

- seeded CPU generators give the same numbers on every GPU type (diffusers' advice for reproducible videos), and
  the same numbers as a plain `torch.randn(shape, generator=g)` on the CPU, bit for bit;
- a CUDA generator draws on its GPU, with no host round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Device = torch.device | str | None


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where `generator` can draw: its own device, or the CPU (torch's default generator) when None."""
    return generator.device if generator is not None else torch.device("cpu")


def _moved(x: torch.Tensor, device: Device, dtype: torch.dtype | None) -> torch.Tensor:
    return x.to(device=device, dtype=dtype) if device is not None or dtype is not None else x


def randn(shape: Sequence[int], generator: torch.Generator | None = None, device: Device = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """N(0, 1) of `shape`, drawn on the generator's device, returned on `device` (default: where drawn)."""
    x = torch.randn(tuple(shape), generator=generator, device=generator_device(generator))
    return _moved(x, device, dtype)


def rand(shape: Sequence[int], generator: torch.Generator | None = None, device: Device = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """U[0, 1) of `shape`, drawn on the generator's device, returned on `device`."""
    x = torch.rand(tuple(shape), generator=generator, device=generator_device(generator))
    return _moved(x, device, dtype)


def randint(low: int, high: int, shape: Sequence[int], generator: torch.Generator | None = None,
            device: Device = None) -> torch.Tensor:
    """Integers (int64) uniform in [low, high) of `shape`, drawn on the generator's device, returned on `device`."""
    x = torch.randint(low, high, tuple(shape), generator=generator, device=generator_device(generator))
    return _moved(x, device, None)
