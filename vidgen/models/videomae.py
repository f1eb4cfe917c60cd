"""VideoMAE-v2 ViT-g/14 (Wang et al., "VideoMAE V2", CVPR 2023), the second FVD feature network.

Content-debiased FVD (Ge et al., CVPR 2024; songweige/content-debiased-fvd, `cdfvd`) showed that I3D's Kinetics
logits weigh what a clip shows far above how it moves, and measures FVD on the features of this self-supervised
encoder instead: the token mean of the last block, layer-normed (`fc_norm`), 1408-d. The classification head of
the published checkpoint (SSv2, 174 classes) is loaded but never used.

Checkpoint: cd-fvd's `vit_g_hybrid_pt_1200e_ssv2_ft.pth` (OpenGVLab/InternVideoMAE_models, `mae-g/`), a dict whose
'model' (or 'module', as DeepSpeed saves) entry is the state dict, loaded strictly: `patch_embed.proj.{weight,bias}`,
`blocks.{i}.norm1`, `blocks.{i}.attn.{qkv.weight,q_bias,v_bias,proj.weight,proj.bias}` (the qkv projection has
biases for q and v only), `blocks.{i}.norm2`, `blocks.{i}.mlp.{fc1,fc2}`, `fc_norm`, `head`; 526 keys. The
positional code is a fixed sinusoid table computed here, not stored in the file.

Conventions that decide the numbers (cd-fvd `third_party/VideoMAEv2/videomaev2_finetune.py`, `utils.py`):
- input frames in [0, 1] (x / 255) squashed to 224 x 224 by bilinear resize, no mean/std normalisation;
- tubelets of 2 frames x 14 x 14 pixels: 16 frames give 8 x 16 x 16 = 2048 tokens;
- the sinusoid table is built for 8 x 16 x 16 positions; another frame count T stretches it over time by
  trilinear interpolation with scale factor (T // 2 + 0.1) / 8 (the 0.1 keeps the output length at T // 2);
- LayerNorm eps 1e-6, exact GELU, attention scale head_dim ** -0.5, no layer-scale.

Shapes: B clips, T frames (even), D width (1408), N tokens = T/2 * 16 * 16.
  input    x_bcthw   [B, 3, T, 224, 224] float in [0, 1]
  tokens             [B, N, D]
  output   features  [B, D]
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vidgen import storage
from vidgen.errors import ConfigError, ModelError, brief
from vidgen.models.loading import key_report, read_state_dict

WEIGHTS_HELP = (
    "vidgen never downloads weights. Get VideoMAE-v2's ViT-g checkpoint fine-tuned on SSv2, "
    "`vit_g_hybrid_pt_1200e_ssv2_ft.pth` (the file content-debiased FVD loads; OpenGVLab/InternVideoMAE_models, "
    "mae-g/), put it where the job can read it (a local path or an s3:// / gs:// URI) and pass it as "
    "eval.videomae_path."
)


@dataclass(frozen=True)
class VideoMAEConfig:
    dim: int = 1408
    depth: int = 40
    heads: int = 16
    mlp_hidden: int = 6144  # 1408 * 48 / 11
    patch: int = 14
    tubelet: int = 2
    image: int = 224
    frames: int = 16  # the frame count the positional table is built for
    num_classes: int = 174  # the SSv2 head of the published fine-tune (unused for features)
    ln_eps: float = 1e-6

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.frames // self.tubelet, self.image // self.patch, self.image // self.patch


FULL = VideoMAEConfig()
# Same token grid as the full model (the positional table is tied to 224 x 224 x 16 frames), narrow and shallow.
TINY = VideoMAEConfig(dim=32, depth=2, heads=2, mlp_hidden=64, num_classes=8)


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """[n_positions, dim] float32: position / 10000 ** (2 * (j // 2) / dim), sine on even j, cosine on odd j."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


class Attention(nn.Module):
    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.dim))
        self.v_bias = nn.Parameter(torch.zeros(cfg.dim))
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x_bnd: torch.Tensor) -> torch.Tensor:
        b, n, d = x_bnd.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x_bnd, self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        k = (cfg.tubelet, cfg.patch, cfg.patch)
        self.proj = nn.Conv3d(3, cfg.dim, kernel_size=k, stride=k)

    def forward(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        return self.proj(x_bcthw).flatten(2).transpose(1, 2)  # [B, N, D], tokens in (t, h, w) order


class VideoMAEv2(nn.Module):
    """The encoder as a feature extractor: forward gives the `fc_norm` token mean, [B, D] (see the module doc)."""

    def __init__(self, cfg: VideoMAEConfig = FULL) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_dim = cfg.dim
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)  # in the checkpoint; features never pass through it
        self._positions: dict[tuple[int, str], torch.Tensor] = {}

    def positions(self, t_tokens: int, device: torch.device) -> torch.Tensor:
        """[1, N, D] positional code for `t_tokens` tubelets in time (the stored grid stretched when it differs)."""
        key = (t_tokens, str(device))
        if key not in self._positions:
            gt, gh, gw = self.cfg.grid
            table = sinusoid_table(gt * gh * gw, self.cfg.dim)
            if t_tokens != gt:
                grid = table.T.reshape(1, self.cfg.dim, gt, gh, gw)
                grid = F.interpolate(grid, scale_factor=((t_tokens + 0.1) / gt, 1.0, 1.0), mode="trilinear")
                table = grid.reshape(self.cfg.dim, -1).T
            self._positions[key] = table[None].to(device)
        return self._positions[key]

    def forward(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x_bcthw.shape
        size = self.cfg.image
        if (h, w) != (size, size) or t < self.cfg.tubelet:
            raise ModelError(f"VideoMAE-v2 takes clips of at least {self.cfg.tubelet} frames at {size} x {size}, "
                             f"got {t} frames at {h} x {w} (eval.resolution must be {size})")
        x = self.patch_embed(x_bcthw)
        x = x + self.positions(t // self.cfg.tubelet, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x.mean(dim=1))


def build_videomae(flavor: Literal["tiny", "pretrained"], path: str | None = None, seed: int = 0,
                   config: VideoMAEConfig = FULL) -> VideoMAEv2:
    """A VideoMAE-v2 encoder in eval mode.

    tiny: random init from `TINY` (width 32, 2 blocks), seeded, for tests and CPU demos.
    pretrained: the ViT-g of `config` (the published one unless a test narrows it) with the checkpoint at `path`
    (local path or fsspec URI), loaded strictly.
    """
    if flavor == "tiny":
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            torch.manual_seed(seed)
            return VideoMAEv2(TINY).eval()
    if flavor != "pretrained":
        raise ConfigError(f"eval.videomae_flavor: expected 'tiny' or 'pretrained', got {flavor!r}")
    state = read_checkpoint(path)
    with torch.device("meta"):  # no second full-size copy: the loaded tensors become the parameters
        model = VideoMAEv2(config)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def read_checkpoint(path: str | None) -> dict[str, torch.Tensor]:
    """The state dict in a VideoMAE-v2 checkpoint file: its 'model' or 'module' entry, or the file itself (tensors
    only, memory-mapped when local)."""
    if not path:
        raise ModelError(f"eval.videomae_flavor=pretrained needs eval.videomae_path (got {path!r}). {WEIGHTS_HELP}")
    try:
        return read_state_dict(path, "eval.videomae_path", unwrap=("model", "module"))
    except ModelError as e:
        raise ModelError(f"{e}. {WEIGHTS_HELP}") from None


def check_weights(path: str | None, config: VideoMAEConfig = FULL) -> None:
    """On the driver, before any actor builds the encoder: a local checkpoint reads (memory-mapped, tensors only)
    and fits `config` key for key (the model is built on the meta device); a remote one (about 4 GB) exists."""
    if path and storage.is_remote(path):
        try:
            if storage.size(path) > 0:
                return
        except Exception as e:
            raise ModelError(f"eval.videomae_path={path}: cannot read it ({brief(e)}). {WEIGHTS_HELP}") from None
        raise ModelError(f"eval.videomae_path={path}: an empty file. {WEIGHTS_HELP}")
    state = read_checkpoint(path)
    with torch.device("meta"):
        model = VideoMAEv2(config)
    check_keys(model, state, path)


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], path: str | None) -> None:
    problems = key_report({k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()})
    if problems:
        raise ModelError(f"eval.videomae_path={path}: not VideoMAE-v2 ViT-g/14 weights: {problems}. {WEIGHTS_HELP}")


def weights_digest(flavor: str, path: str | None = None, seed: int = 0) -> str:
    """What identifies the weights `build_videomae` uses: sha256 of the checkpoint's bytes for `pretrained`
    (read in chunks: about 4 GB for ViT-g), the width and seed for `tiny`."""
    if flavor == "tiny":
        return f"videomae-tiny-dim{TINY.dim}-seed{seed}"
    if not path:
        raise ModelError(f"eval.videomae_flavor=pretrained needs eval.videomae_path (got {path!r}). {WEIGHTS_HELP}")
    try:
        key = (path, storage.size(path))
    except Exception as e:
        raise ModelError(f"eval.videomae_path={path}: cannot read it ({brief(e)}). {WEIGHTS_HELP}") from None
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path)
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int], str] = {}  # one read of a 4 GB file per process, not one per lookup


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with storage.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    except Exception as e:
        raise ModelError(f"eval.videomae_path={path}: cannot read it ({brief(e)}). {WEIGHTS_HELP}") from None
    return "sha256:" + digest.hexdigest()


def num_tokens(num_frames: int, cfg: VideoMAEConfig = FULL) -> int:
    return (num_frames // cfg.tubelet) * math.prod(cfg.grid[1:])
