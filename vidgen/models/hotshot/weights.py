"""Hotshot-XL weights <-> vidgen's HotshotUNet: the temporal-layer file, a full `unet/` directory, spatial swaps.

Hotshot names a temporal layer `{down,up}_blocks.i.temporal_attentions.j.*`; diffusers names the same module
`{down,up}_blocks.i.motion_modules.j.*`. Inside it (training.md 2.4, checked numerically by the tests):

    Hotshot                                                      diffusers (UNetMotionModel)
    transformer_blocks.0.attention_blocks.{0,1}.*               transformer_blocks.0.attn{1,2}.*
    transformer_blocks.0.norms.{0,1}.*                          transformer_blocks.0.norm{1,2}.*
    transformer_blocks.0.ff_norm.*                              transformer_blocks.0.norm3.*
    transformer_blocks.0.attention_blocks.{0,1}.pos_encoder     transformer_blocks.0.pos_embed.pe   (one table;
        .positional_encoding  [1, 24, C] (two equal copies)                                          checked equal)
    norm, proj_in, proj_out, transformer_blocks.0.ff.*          the same

Spatial keys are diffusers' UNet2DConditionModel keys in both (Hotshot's 3-D blocks keep the 2-D names), so a full
Hotshot `unet/` directory is: config.json (a UNet2DConditionModel config with 3-D block names and
`_class_name: UNet3DConditionModel`) + one state dict holding both. Every conversion is strict: a missing or
unexpected key is a ModelError that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vidgen.errors import ModelError, brief

TEMPORAL_FILE = "hsxl_temporal_layers.safetensors"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_INNER = ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."), (".norm1.", ".norms.0."),
          (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."))
_PE = "transformer_blocks.0.pos_embed.pe"
_BLOCKS_2D_TO_3D = {"DownBlock2D": "DownBlock3D", "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
                    "UpBlock2D": "UpBlock3D", "CrossAttnUpBlock2D": "CrossAttnUpBlock3D",
                    "UNetMidBlock2DCrossAttn": "UNetMidBlock3DCrossAttn"}


def _keys_error(what: str, missing, unexpected) -> ModelError:
    def show(keys):
        keys = sorted(keys)
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
    parts = ([f"missing keys {show(missing)}"] if missing else []) + (
        [f"unexpected keys {show(unexpected)}"] if unexpected else [])
    return ModelError(f"{what}: {'; '.join(parts)}")


def hotshot_name(key: str) -> list[str]:
    """Hotshot key(s) of one diffusers temporal key (the positional table has two Hotshot copies)."""
    prefix, rest = key.split(".motion_modules.", 1)
    idx, sub = rest.split(".", 1)
    head = f"{prefix}.temporal_attentions.{idx}."
    if sub == _PE:
        return [head + f"transformer_blocks.0.attention_blocks.{k}.pos_encoder.positional_encoding" for k in (0, 1)]
    sub = "." + sub
    for a, b in _INNER:
        sub = sub.replace(a, b)
    return [head + sub[1:]]


def is_temporal(key: str) -> bool:
    return ".motion_modules." in key or ".temporal_attentions." in key


# -- temporal layers ------------------------------------------------------------------------------


def temporal_state_dict(unet) -> dict[str, torch.Tensor]:
    """The temporal layers under Hotshot's names (what `hsxl_temporal_layers.safetensors` holds)."""
    out = {}
    for k, v in unet.state_dict().items():
        if ".motion_modules." in k:
            for name in hotshot_name(k):
                out[name] = v.detach().clone().contiguous()
    return out


def load_temporal(unet, state: dict[str, torch.Tensor], what: str = "temporal layers") -> None:
    """Load Hotshot-named temporal weights into `unet`; any key mismatch or non-matching table is a ModelError."""
    own = {k: v for k, v in unet.state_dict().items() if ".motion_modules." in k}
    wanted = {h: k for k in own for h in hotshot_name(k)}
    given = {k: v for k, v in state.items() if is_temporal(k)}
    missing, unexpected = set(wanted) - set(given), set(given) - set(wanted)
    if missing or unexpected:
        raise _keys_error(what, missing, unexpected)
    out: dict[str, torch.Tensor] = {}
    for h, v in given.items():
        k = wanted[h]
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelError(f"{what}: {h} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                             "(model.max_frames must equal the file's positional-table length)" if k.endswith(_PE)
                             else f"{what}: {h} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        if k in out and not torch.equal(out[k], v):
            raise ModelError(f"{what}: the two positional tables of {h.rsplit('.attention_blocks', 1)[0]} differ")
        out[k] = v
    unet.load_state_dict(out, strict=False)


def load_spatial(unet, state: dict[str, torch.Tensor], what: str) -> None:
    """Load an SDXL UNet2DConditionModel state dict (temporal keys, if any, are ignored) strictly."""
    spatial = {k: v for k, v in state.items() if not is_temporal(k)}
    own = [k for k in unet.state_dict() if ".motion_modules." not in k]
    missing, unexpected = set(own) - set(spatial), set(spatial) - set(own)
    if missing or unexpected:
        raise _keys_error(what, missing, unexpected)
    try:
        unet.load_state_dict(spatial, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelError(f"{what}: {str(e).splitlines()[-1].strip()}") from None


def spatial_state_dict(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items() if ".motion_modules." not in k}


# -- files ----------------------------------------------------------------------------------------


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:  # tensors only: a pickle that asks to run code is refused
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, zero bytes, another format, a pickle with code in it
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch state dict (weights_only)"
        raise ModelError(f"{path}: not a readable {kind} file ({brief(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelError(f"{path}: expected a state dict (names to tensors), got {type(state).__name__}")
    return state


def read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{path}: not a readable JSON config ({brief(e)})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _write(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)  # atomic: a killed writer leaves no partial weights file


def read_temporal_file(unet, path: str | Path) -> None:
    load_temporal(unet, read_tensors(Path(path)), str(path))


def write_temporal_file(unet, path: str | Path) -> None:
    _write(temporal_state_dict(unet), Path(path))


def hotshot_config(unet) -> dict:
    """Hotshot's UNet3DConditionModel config for `unet`: its 2-D config with 3-D block names."""
    cfg = dict(unet.config_2d)
    cfg["_class_name"] = "UNet3DConditionModel"
    cfg["down_block_types"] = [_BLOCKS_2D_TO_3D[t] for t in cfg["down_block_types"]]
    cfg["up_block_types"] = [_BLOCKS_2D_TO_3D[t] for t in cfg["up_block_types"]]
    cfg["mid_block_type"] = _BLOCKS_2D_TO_3D[cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"]
    return cfg


def config_2d_from_hotshot(cfg: dict, where: str) -> dict:
    inverse = {v: k for k, v in _BLOCKS_2D_TO_3D.items()}
    out = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        for key in ("down_block_types", "up_block_types"):
            out[key] = [inverse[t] for t in cfg[key]]
        out["mid_block_type"] = inverse[cfg.get("mid_block_type") or "UNetMidBlock3DCrossAttn"]
    except KeyError as e:
        raise ModelError(f"{where}: block type {e.args[0]} is not a Hotshot-XL UNet block "
                         f"(expected one of {', '.join(sorted(inverse))})") from None
    return out


def save_hotshot_unet_dir(unet, out_dir: str | Path) -> None:
    """A full Hotshot-XL `unet/` directory: config.json + one safetensors with spatial and temporal weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write({**spatial_state_dict(unet), **temporal_state_dict(unet)}, out / WEIGHTS_FILE)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(hotshot_config(unet), indent=2, sort_keys=True))
    tmp.replace(out / "config.json")
