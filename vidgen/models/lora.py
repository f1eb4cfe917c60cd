"""LoRA on the SVD UNet with PEFT: injection, parameter count, export, load, merge.

Stock diffusers gives `UNetSpatioTemporalConditionModel` no PEFT mixin and the SVD pipeline no LoRA loader
(training.md 1.11), so vidgen injects with `peft.inject_adapter_in_model` and writes both files layouts
the ecosystem reads, into one directory:

  adapter_config.json + adapter_model.safetensors   PEFT: keys `base_model.model.<module>.lora_A.weight`
  pytorch_lora_weights.safetensors                  diffusers: keys `unet.<module>.lora_A.weight`, the
                                                    adapter config as `lora_adapter_metadata` in the header

`load_lora` reads either (or a bare .safetensors file in either key format) into any SVD UNet.
Injection works on a UNet built on the meta device (no weights), which `vidgen plan` relies on.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from vidgen.errors import ConfigError, ModelError, brief

ADAPTER = "default"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header key for the adapter config
TEMPORAL = "temporal_transformer_blocks"  # SVD's temporal attention lives under these blocks


def _suffix_match(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def target_names(unet: torch.nn.Module, lora_cfg) -> list[str]:
    """Full names of the Linear layers `lora_cfg` selects (target suffixes, then scope, then patterns)."""
    names = []
    for name, module in unet.named_modules():
        if not _suffix_match(name, lora_cfg.target_modules):
            continue
        temporal = TEMPORAL in name
        if (lora_cfg.scope == "spatial" and temporal) or (lora_cfg.scope == "temporal" and not temporal):
            continue
        if lora_cfg.patterns and not any(p in name for p in lora_cfg.patterns):
            continue
        if hasattr(module, "get_base_layer"):  # already wrapped: judge the layer underneath
            module = module.get_base_layer()
        if not isinstance(module, torch.nn.Linear):
            raise ConfigError(f"train.lora.target_modules: {name} is a {type(module).__name__}, "
                              "expected Linear layers only")
        names.append(name)
    if not names:
        raise ConfigError(f"train.lora: no Linear layer matches target_modules={lora_cfg.target_modules} "
                          f"with scope={lora_cfg.scope} and patterns={lora_cfg.patterns}")
    return names


def lora_parameter_count(unet: torch.nn.Module, lora_cfg) -> int:
    """r * (in + out) per targeted Linear: A is [r, in], B is [out, r]. Works on meta-device UNets."""
    modules = dict(unet.named_modules())
    total = 0
    for n in target_names(unet, lora_cfg):
        m = modules[n].get_base_layer() if hasattr(modules[n], "get_base_layer") else modules[n]
        total += lora_cfg.rank * (m.in_features + m.out_features)
    return total


def peft_config(lora_cfg, targets: list[str]):
    from peft import LoraConfig  # lazy: heavy (peft)

    return LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha if lora_cfg.alpha is not None else lora_cfg.rank,
        lora_dropout=lora_cfg.dropout,
        init_lora_weights=True if lora_cfg.init == "default" else "gaussian",
        target_modules=targets,  # explicit full names: exact, and readable back by PEFT and diffusers
    )


def inject_lora(unet: torch.nn.Module, lora_cfg) -> list[str]:
    """Wrap the selected Linear layers with LoRA (fp32 adapters; on meta if the base is on meta), freeze
    everything else, and return the wrapped modules' names. `lora_cfg` is a `vidgen.config.LoraConfig`."""
    from peft import inject_adapter_in_model  # lazy: heavy (peft)

    targets = target_names(unet, lora_cfg)
    meta = any(p.is_meta for p in unet.parameters())
    unet.requires_grad_(False)
    inject_adapter_in_model(peft_config(lora_cfg, targets), unet, adapter_name=ADAPTER, low_cpu_mem_usage=meta)
    for name, p in unet.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        if is_lora and not meta and p.dtype != torch.float32:  # PEFT copies the base dtype; adapters train in fp32
            p.data = p.data.float()
    return targets


def lora_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer  # lazy: heavy (peft)

    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, keyed `<module>.lora_A.weight` (PEFT's format without the adapter name)."""
    from peft import get_peft_model_state_dict  # lazy: heavy (peft)

    return {k: v.detach().cpu().float().contiguous()
            for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def config_from_targets(lora_cfg, targets: list[str]) -> dict:
    cfg = peft_config(lora_cfg, targets).to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["peft_type"] = "LORA"
    return {k: v for k, v in cfg.items() if v is None or isinstance(v, str | int | float | bool | list | dict)}


def write_lora_dir(state: dict[str, torch.Tensor], adapter_config: dict, local_dir: str) -> None:
    """Write the PEFT and diffusers layouts of adapter weights `state` (keys `<module>.lora_A.weight`)
    into the existing local directory `local_dir`."""
    from safetensors.torch import save_file  # lazy: heavy (safetensors)

    state = {k: v.detach().cpu().float().contiguous() for k, v in state.items()}
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, os.path.join(local_dir, PEFT_WEIGHTS),
              metadata={"format": "pt"})
    Path(local_dir, PEFT_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True, default=str))
    meta = {f"unet.{k}": v for k, v in adapter_config.items()}  # diffusers packs configs with the prefix
    save_file({f"unet.{k}": v for k, v in state.items()}, os.path.join(local_dir, DIFFUSERS_WEIGHTS),
              metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True, default=str)})


def save_lora(unet: torch.nn.Module, lora_cfg, targets: list[str], uri: str) -> None:
    """Atomically write the LoRA of `unet` (injected by `inject_lora(unet, lora_cfg)`) to directory `uri`."""
    from vidgen import storage  # lazy: heavy (fsspec)

    with storage.atomic_local(uri) as tmp:
        os.makedirs(tmp)
        write_lora_dir(lora_state_dict(unet), config_from_targets(lora_cfg, targets), tmp)


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights keyed `<module>.lora_A.weight`, adapter config) from a LoRA directory or .safetensors file."""
    from safetensors import safe_open  # lazy: heavy (safetensors)

    from vidgen import storage  # lazy: heavy (fsspec)

    with tempfile.TemporaryDirectory(prefix="vidgen-lora-") as tmp:
        if storage.isdir(path):
            files = {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(path)}
            name = PEFT_WEIGHTS if PEFT_WEIGHTS in files else DIFFUSERS_WEIGHTS if DIFFUSERS_WEIGHTS in files else None
            if name is None:
                raise ModelError(f"{path}: no {PEFT_WEIGHTS} or {DIFFUSERS_WEIGHTS} (expected a LoRA export)")
            weights = storage.join(path, name)
            config_text = storage.read_text(storage.join(path, PEFT_CONFIG)) if PEFT_CONFIG in files else None
        elif storage.exists(path):
            weights, config_text = path, None
        else:
            raise ModelError(f"{path}: no such LoRA file or directory")
        local = os.path.join(tmp, "w.safetensors")
        Path(local).write_bytes(storage.read_bytes(weights))
        try:
            with safe_open(local, framework="pt") as f:
                header = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ModelError(f"{weights}: not a safetensors file ({brief(e)})") from None
    state = {}
    for k, v in raw.items():
        for prefix in ("base_model.model.", "unet."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        state[k.replace(f".{ADAPTER}.", ".")] = v
    where = f"{path}/{PEFT_CONFIG}" if config_text is not None else f"{weights} (metadata {METADATA_KEY})"
    try:
        if config_text is not None:
            config = json.loads(config_text)
        elif METADATA_KEY in header:
            config = {k.removeprefix("unet."): v for k, v in json.loads(header[METADATA_KEY]).items()}
        else:
            config = None
    except (ValueError, AttributeError) as e:
        raise ModelError(f"{where}: expected a JSON object of LoRA settings ({brief(e)})") from None
    if config is not None and not isinstance(config, dict):
        raise ModelError(f"{where}: expected a JSON object of LoRA settings, got {type(config).__name__}")
    if config is None:  # no config anywhere: rank from the tensors, alpha = rank, targets from the keys
        a = next((v for k, v in state.items() if k.endswith("lora_A.weight")), None)
        if a is None or a.ndim != 2:
            raise ModelError(f"{weights}: no `<module>.lora_A.weight` matrices (expected a LoRA's weights)")
        config = {"r": a.shape[0], "lora_alpha": a.shape[0],
                  "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in state})}
    return state, config


def load_lora(unet: torch.nn.Module, path: str, scale: float = 1.0) -> list[str]:
    """Inject the LoRA at `path` (a vidgen/PEFT/diffusers LoRA directory or .safetensors file) into `unet`
    (e.g. a fresh pipeline's UNet) with its update scaled by `scale` (0: the base model); returns the
    wrapped module names. The adapter takes the device and dtype of the layers it wraps."""
    from peft import LoraConfig, inject_adapter_in_model  # lazy: heavy (peft)

    if lora_layers(unet):
        raise ModelError(f"{path}: this UNet has a LoRA already; load into a fresh UNet (or merge_lora first)")
    state, cfg = read_adapter(path)
    known = set(LoraConfig.__dataclass_fields__)
    try:
        peft_cfg = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k not in ("peft_type", "task_type")})
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: LoRA settings that PEFT refuses ({brief(e)})") from None
    peft_cfg.lora_dropout = 0.0  # inference
    modules = {n for n, _ in unet.named_modules()}
    missing = sorted({k.rsplit(".lora_", 1)[0] for k in state} - modules)
    if missing:
        raise ModelError(f"{path}: LoRA targets modules this UNet lacks, e.g. {missing[:3]}")
    inject_adapter_in_model(peft_cfg, unet, adapter_name=ADAPTER)
    try:
        set_peft_state(unet, state)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    except RuntimeError as e:  # tensors of the wrong shape for the layers they name
        raise ModelError(f"{path}: LoRA tensors do not fit this UNet ({brief(e)})") from None
    set_lora_scale(unet, scale)
    unet.requires_grad_(False)
    return sorted(lora_layers(unet))


def set_peft_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (keys `<module>.lora_A.weight`) into a UNet that already has the LoRA injected."""
    from peft import set_peft_model_state_dict  # lazy: heavy (peft)

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    bad = [k for k in result.unexpected_keys if ".lora_" in k]
    if bad:
        raise ModelError(f"LoRA tensors that fit no layer, e.g. {bad[:3]}")
    absent = [k for k in result.missing_keys if ".lora_" in k]
    if absent:
        raise ModelError(f"LoRA layers without weights in the file, e.g. {absent[:3]}")


def export_merged_unet(unet: torch.nn.Module, lora_path: str, out_dir: str, scale: float = 1.0) -> None:
    """Load the LoRA at `lora_path` into `unet` (a fresh base UNet), merge it at `scale` and write a full
    diffusers UNet directory to `out_dir` (local or URI), usable as `generate.unet`."""
    from vidgen import storage  # lazy: heavy (fsspec)

    load_lora(unet, lora_path, scale)
    merge_lora(unet)
    with storage.atomic_local(out_dir) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)


def set_lora_scale(unet: torch.nn.Module, scale: float) -> None:
    """Scale every LoRA update by `scale` (on top of alpha / r); 1.0 is the trained strength."""
    for layer in lora_layers(unet).values():
        layer.set_scale(ADAPTER, scale)


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA updates (at their current scale) into the base weights and remove the wrappers, leaving
    a plain UNet that `save_pretrained` writes as a full diffusers directory. In place; returns `unet`."""
    for name, layer in lora_layers(unet).items():
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, layer.get_base_layer())
    return unet
