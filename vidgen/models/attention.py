"""The attention kernel of a model family (`model.attention`): sdpa, xformers or eager.

Every diffusers `Attention` layer computes through a processor object; switching the backend swaps the processor
of every layer of the family's diffusers models (UNet, VAE; spatial, temporal and cross attention alike):

- sdpa: `AttnProcessor2_0`, torch's `scaled_dot_product_attention` (fused flash / memory-efficient kernels on
  GPU, a math kernel on CPU). The default, and what diffusers picks itself.
- xformers: diffusers' own switch, `enable_xformers_memory_efficient_attention()`; needs the xformers package
  and a CUDA GPU, refused in one line otherwise.
- eager: `AttnProcessor`, explicit matmul + softmax: slow and memory-hungry, the numeric reference.

The transformers encoders (CLIP image, CLIP/OpenCLIP text) take `sdpa` or `eager` through their own
`set_attn_implementation`; with xformers they keep sdpa (transformers has no xformers path). Layers that carry
a processor of their own (vidgen's query cache in generation) are left alone.
"""

from __future__ import annotations

import logging

import torch

from vidgen.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers", "eager")


def check_backend(backend: str) -> None:
    """Refuse a backend this machine cannot run, in one line, before any model is touched."""
    if backend not in BACKENDS:
        raise ConfigError(f"model.attention={backend}: expected one of {', '.join(BACKENDS)}")
    if backend != "xformers":
        return
    if not torch.cuda.is_available():
        raise ConfigError("model.attention=xformers: needs a CUDA GPU (torch.cuda.is_available() is False); "
                          "use model.attention=sdpa")
    try:
        import xformers  # noqa: F401  # lazy: optional, GPU only
    except ImportError:
        raise ConfigError("model.attention=xformers: the xformers package is not installed "
                          "(pip install xformers matching your torch); or use model.attention=sdpa") from None


def portable(model_cfg):
    """`model_cfg` (a ModelConfig) with an attention kernel any process can build: sdpa in place of xformers.

    For models built only to read or write weights (exports, weight hashes on a driver): the weights do not
    depend on the kernel, and the process building them (a GPU-less head, a CPU task) may have no CUDA."""
    return model_cfg.model_copy(update={"attention": "sdpa"}) if model_cfg.attention == "xformers" else model_cfg


def _is_plain(processor: object) -> bool:
    """A stock diffusers processor, safe to replace (not a LoRA/IP-adapter/custom one)."""
    from diffusers.models.attention_processor import (  # lazy: heavy (diffusers)
        AttnProcessor,
        AttnProcessor2_0,
        XFormersAttnProcessor,
    )

    return type(processor) in (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor)


def set_attention(module: torch.nn.Module, backend: str) -> int:
    """Put every stock attention processor under `module` on `backend`; returns the number of layers switched."""
    from diffusers.models.attention_processor import (  # lazy: heavy (diffusers)
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
    )

    check_backend(backend)
    layers = [m for m in module.modules() if isinstance(m, Attention) and _is_plain(m.processor)]
    if backend == "xformers":  # pragma: no cover - CUDA only: diffusers' own switch, over the whole model
        module.enable_xformers_memory_efficient_attention()
        return len(layers)
    for m in layers:
        m.set_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    return len(layers)


def set_encoder(encoder: torch.nn.Module, backend: str) -> None:
    """A transformers encoder (CLIP) on `backend`: its own attention switch (eager or sdpa; xformers: sdpa)."""
    setter = getattr(encoder, "set_attn_implementation", None)  # transformers releases without it: left as is
    if setter is not None:
        setter("eager" if backend == "eager" else "sdpa")


def apply(backend: str, diffusers_modules: list[torch.nn.Module], encoders: list[torch.nn.Module] = ()) -> None:
    """Switch a model's diffusers modules (UNet, VAE) and transformers encoders to `backend` (each family's model
    names its own parts: `SVD.set_attention`, `Hotshot.set_attention`)."""
    check_backend(backend)
    n = sum(set_attention(m, backend) for m in diffusers_modules)
    for encoder in encoders:
        set_encoder(encoder, backend)
    log.debug("attention: %d diffusers layers on %s", n, backend)
