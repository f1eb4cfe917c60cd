"""Wan LoRA files in the three layouts the ecosystem loads: PEFT, diffusers and ComfyUI.

Shapes: per adapted Linear [out, in], A (PEFT `lora_A`, kohya `lora_down`) is [r, in] and B (`lora_B`, `lora_up`)
is [out, r]; the update is `scaling * B @ A` with scaling = alpha / r (alpha / sqrt(r) under rsLoRA).

vidgen trains the LoRA on diffusers' `WanTransformer3DModel` (PEFT adapter "default", module names like
`blocks.0.attn1.to_q`) and writes into one directory:

  adapter_config.json + adapter_model.safetensors   PEFT: keys `base_model.model.<module>.lora_A.weight`
  pytorch_lora_weights.safetensors                  diffusers: keys `transformer.<module>.lora_A.weight` and the
                                                    adapter config as `lora_adapter_metadata` (fields prefixed
                                                    `transformer.`), what `WanPipeline.load_lora_weights(dir)` reads
                                                    (diffusers 0.42 `WanLoraLoaderMixin` -> `load_lora_adapter`)
  wan_lora_comfyui.safetensors                      ComfyUI: the original Wan module names, keys
                                                    `diffusion_model.<wan module>.lora_down.weight` / `.lora_up.weight`
                                                    and a 0-d `.alpha` per module

ComfyUI reads the last one as it is: `comfy/lora.py` (`model_lora_keys_unet`) maps `diffusion_model.<name>` onto its
native Wan weight `diffusion_model.<name>.weight` (`comfy/ldm/wan/model.py` keeps the original names), and
`comfy/weight_adapter/lora.py` applies `alpha / rows(lora_down) * up @ down`, so alpha / r survives exactly.
diffusers' loader reads it too (`_convert_non_diffusers_wan_lora_to_diffusers`, which folds alpha / r into the two
matrices). musubi-tuner's own files use the same names flattened
(`lora_unet_blocks_0_self_attn_q.lora_down.weight`), and its `convert_lora.py --target other` writes
`diffusion_model.` + `lora_A`/`lora_B` with alpha folded in; `read_comfy` reads all three.

The module names are the inverse of diffusers' `convert_wan_transformer_to_diffusers`
(`diffusers/loaders/single_file_utils.py`, its TRANSFORMER_KEYS_RENAME_DICT) over the Linear layers.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch

from vidgen.errors import ModelError, brief
from vidgen.models.lora import ADAPTER, DIFFUSERS_WEIGHTS, METADATA_KEY, PEFT_CONFIG, PEFT_WEIGHTS, lora_state_dict

COMFY_WEIGHTS = "wan_lora_comfyui.safetensors"
DIFFUSERS_PREFIX = "transformer."  # WanLoraLoaderMixin.transformer_name
COMFY_PREFIX = "diffusion_model."
MUSUBI_PREFIX = "lora_unet_"

# diffusers name -> original Wan name, per block (`blocks.<i>.` in front) and at the top level
BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",  # image-to-video checkpoints
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
TOP_NAMES = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
KEY_PARTS = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up", ".lora_B.weight": "up",
             ".alpha": "alpha"}  # kohya names (ComfyUI, musubi-tuner) and PEFT names (musubi-tuner's "other")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _rename(name: str, blocks: dict[str, str], top: dict[str, str], kind: str) -> str:
    m = _BLOCK.fullmatch(name)
    new = top.get(name) if m is None else (f"blocks.{m[1]}.{blocks[m[2]]}" if m[2] in blocks else None)
    if new is None:
        known = ", ".join([*(f"blocks.<i>.{k}" for k in blocks), *top])
        raise ModelError(f"LoRA module {name!r}: not a Wan {kind} Linear layer this exporter maps (expected one of "
                         f"{known})")
    return new


def wan_name(module: str) -> str:
    """The original Wan (ComfyUI, musubi-tuner) name of diffusers' Wan module `module`."""
    return _rename(module, BLOCK_NAMES, TOP_NAMES, "diffusers")


def diffusers_name(module: str) -> str:
    """The diffusers `WanTransformer3DModel` name of original Wan module `module`."""
    return _rename(module, {v: k for k, v in BLOCK_NAMES.items()}, {v: k for k, v in TOP_NAMES.items()}, "original")


def _json_config(cfg: dict) -> dict:
    """A PEFT LoraConfig dict reduced to JSON values that `LoraConfig(**cfg)` takes back."""
    out = {}
    for k, v in cfg.items():
        v = getattr(v, "value", v)  # enums (peft_type, task_type)
        if isinstance(v, set | tuple):
            v = sorted(v)
        if v is None or isinstance(v, str | int | float | bool | list | dict):
            out[k] = v
    out["peft_type"] = "LORA"
    return out


def adapter_config(model: torch.nn.Module) -> dict:
    """The JSON form of the adapter config of `model`'s LoRA (PEFT adapter "default")."""
    configs = getattr(model, "peft_config", {})
    if ADAPTER not in configs:
        raise ModelError(f"this {type(model).__name__} has no LoRA adapter {ADAPTER!r} to export")
    return _json_config(configs[ADAPTER].to_dict())


def _scaling(cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling of `module`: alpha (alpha_pattern first) over r, or over sqrt(r) with rsLoRA."""
    from peft.utils.other import get_pattern_key  # lazy: heavy (peft)

    patterns = cfg.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(list(patterns), module), cfg.get("lora_alpha", rank))
    return alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)


def _modules(state: dict[str, torch.Tensor]) -> list[str]:
    odd = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise ModelError(f"LoRA state: {odd[0]!r} is not a plain LoRA matrix (expected `<module>.lora_A.weight` "
                         "and `<module>.lora_B.weight` only: no DoRA, LoRA bias or embedding adapters)")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    for m in modules:
        if f"{m}.lora_A.weight" not in state or f"{m}.lora_B.weight" not in state:
            raise ModelError(f"LoRA state: module {m!r} lacks its lora_A or lora_B matrix")
    return modules


def comfy_state(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """PEFT adapter weights (`<module>.lora_A.weight`, diffusers Wan names) and their config -> ComfyUI keys
    (`diffusion_model.<wan module>.lora_down.weight`, `.lora_up.weight`, `.alpha` = scaling * r)."""
    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise ModelError("LoRA config: use_dora / lora_bias have no ComfyUI LoRA form (expected plain LoRA)")
    out = {}
    for m in _modules(state):
        down, up = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
        rank = down.shape[0]
        key = COMFY_PREFIX + wan_name(m)
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(_scaling(cfg, m, rank) * rank, dtype=torch.float32)
    return out


def _module_key(key: str) -> tuple[str, str]:
    """(original Wan module, part) of one ComfyUI / musubi-tuner LoRA key; part is down | up | alpha."""
    suffix = next((s for s in KEY_PARTS if key.endswith(s)), None)
    if suffix is None:
        raise ModelError(f"LoRA key {key!r}: expected `<module>.lora_down.weight`, `.lora_up.weight`, "
                         "`.lora_A.weight`, `.lora_B.weight` or `.alpha`")
    name, part = key.removesuffix(suffix), KEY_PARTS[suffix]
    if name.startswith(COMFY_PREFIX):
        return name[len(COMFY_PREFIX):], part
    if name.startswith(MUSUBI_PREFIX):  # dots flattened to '_': put back the ones between names
        flat = name[len(MUSUBI_PREFIX):]
        m = re.fullmatch(r"blocks_(\d+)_(.+)", flat)
        names = BLOCK_NAMES.values() if m else TOP_NAMES.values()
        wan = next((w for w in names if w.replace(".", "_") == (m[2] if m else flat)), None)
        if wan is not None:
            return f"blocks.{m[1]}.{wan}" if m else wan, part
        raise ModelError(f"LoRA key {key!r}: no Wan Linear layer is named {flat!r} in musubi-tuner's form")
    raise ModelError(f"LoRA key {key!r}: expected the prefix {COMFY_PREFIX!r} (ComfyUI) or {MUSUBI_PREFIX!r} "
                     "(musubi-tuner)")


def state_from_comfy(comfy: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """ComfyUI / musubi-tuner Wan LoRA keys -> (PEFT adapter weights under diffusers names, PEFT config dict).
    A module without `.alpha` has alpha = r (what ComfyUI does). Ranks or alphas that differ between modules go
    to rank_pattern / alpha_pattern, keyed by the escaped full module name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in comfy.items():
        wan, part = _module_key(key)
        parts.setdefault(diffusers_name(wan), {})[part] = value
    if not parts:
        raise ModelError("LoRA file: no tensors (expected a Wan LoRA)")
    state, ranks, alphas = {}, {}, {}
    for m, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise ModelError(f"LoRA module {wan_name(m)!r}: lora_down and lora_up must both be present")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ModelError(f"LoRA module {wan_name(m)!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are "
                             "not [r, in] and [out, r] matrices")
        state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"] = down, up
        ranks[m] = down.shape[0]
        alphas[m] = p["alpha"].item() if "alpha" in p else float(ranks[m])
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(parts),
           "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
           "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha}}
    return state, cfg


def _save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file  # lazy: heavy (safetensors)

    save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt", **(metadata or {})})


def write_wan_lora_dir(state: dict[str, torch.Tensor], cfg: dict, local_dir: str) -> None:
    """Write the PEFT, diffusers and ComfyUI files of adapter weights `state` (keys `<module>.lora_A.weight`,
    diffusers Wan names) with PEFT config `cfg` into the existing local directory `local_dir`."""
    _modules(state)
    comfy = comfy_state(state, cfg)  # first: it refuses what ComfyUI cannot load before anything is written
    _save({f"base_model.model.{k}": v for k, v in state.items()}, os.path.join(local_dir, PEFT_WEIGHTS))
    Path(local_dir, PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    header = json.dumps({DIFFUSERS_PREFIX + k: v for k, v in cfg.items()}, sort_keys=True)
    _save({DIFFUSERS_PREFIX + k: v for k, v in state.items()}, os.path.join(local_dir, DIFFUSERS_WEIGHTS),
          {METADATA_KEY: header})
    _save(comfy, os.path.join(local_dir, COMFY_WEIGHTS))


def save_wan_lora(transformer: torch.nn.Module, uri: str) -> None:
    """Atomically write the LoRA of `transformer` (a diffusers WanTransformer3DModel with PEFT adapter "default")
    in all three layouts to directory `uri` (local or any storage URI)."""
    from vidgen import storage  # lazy: heavy (fsspec)

    state, cfg = lora_state_dict(transformer), adapter_config(transformer)
    with storage.atomic_local(uri) as tmp:
        os.makedirs(tmp)
        write_wan_lora_dir(state, cfg, tmp)


def read_comfy(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT adapter weights under diffusers Wan names, PEFT config dict) of the ComfyUI / musubi-tuner Wan LoRA
    file at `path` (local or URI), or of the ComfyUI file inside a vidgen LoRA directory."""
    from safetensors.torch import load_file  # lazy: heavy (safetensors)

    from vidgen import storage  # lazy: heavy (fsspec)

    if storage.isdir(path):
        path = storage.join(path, COMFY_WEIGHTS)
    if not storage.exists(path):
        raise ModelError(f"{path}: no such LoRA file")
    with tempfile.TemporaryDirectory(prefix="vidgen-lora-") as tmp:
        local = os.path.join(tmp, "w.safetensors")
        Path(local).write_bytes(storage.read_bytes(path))
        try:
            tensors = load_file(local)
        except Exception as e:
            raise ModelError(f"{path}: not a safetensors file ({brief(e)})") from None
    try:
        return state_from_comfy(tensors)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
