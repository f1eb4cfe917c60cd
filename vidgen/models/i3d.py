"""Inception-I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?", 2017), the FVD feature network.

State-dict keys and shapes match the 400-class Kinetics checkpoint `i3d_pretrained_400.pt` that
VideoGPT, TATS, Seer and cd-fvd load (converted from tf.hub `deepmind/i3d-kinetics-400/1`), e.g.
`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1b.bn.running_var`, `logits.conv3d.bias`. That file holds
no `num_batches_tracked` buffers; loading accepts it with or without them.

Behaviour follows the TF original: SAME padding computed from the input size (asymmetric, extra
pixel at the end), BatchNorm eps 1e-3 (Sonnet's default; the VideoGPT/cd-fvd ports use 1e-5, set
`I3DConfig.bn_eps` to reproduce their numbers bit for bit), a [2, 7, 7] average pool, a 1x1x1 logits
conv and logits averaged over time. The output is the 400-d pre-softmax logit vector FVD uses.

Shapes: B batch, C channels, T frames, H/W pixels.
  input  x_bcthw  [B, 3, T, H, W] float in [-1, 1]
  output logits   [B, num_classes]
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vidgen import storage
from vidgen.errors import ConfigError, ModelError, brief
from vidgen.models.loading import key_report, read_state_dict

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]

# Output channels of each Inception block's branches, in the published order:
# (b0 1x1, b1a 1x1, b1b 3x3, b2a 1x1, b2b 3x3, b3b 1x1 after a 3x3x3 max pool).
# b2b is "3x3" here as in the original I3D code (Inception-v1's 5x5 branch became 3x3x3).
MIXED: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

# Max pools between stages: name -> (kernel, stride). They hold no weights.
POOLS: dict[str, tuple[Triple, Triple]] = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}

# Forward order of the trunk (TF endpoint names; also the module names in the checkpoint).
ENDPOINTS = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)

FINAL_POOL: Triple = (2, 7, 7)  # [T, H, W] of the last feature map for 16+ frames at 224 x 224

WEIGHTS_HELP = (
    "vidgen never downloads weights. Get a copy of the 400-class Kinetics I3D checkpoint "
    "`i3d_pretrained_400.pt` (the PyTorch conversion of tf.hub deepmind/i3d-kinetics-400 used by "
    "VideoGPT, TATS and cd-fvd; TATS keeps one at tats/fvd/i3d_pretrained_400.pt), put it where the "
    "job can read it (a local path or an s3:// / gs:// URI) and pass it as eval.i3d_path."
)


@dataclass
class I3DConfig:
    num_classes: int = 400
    width: float = 1.0  # channel multiplier; the tiny flavor uses 1/8
    in_channels: int = 3
    bn_eps: float = 1e-3  # TF/Sonnet value; VideoGPT and cd-fvd ports use 1e-5
    dropout: float = 0.5  # only active in train mode; FVD runs in eval mode

    def channels(self, c: int) -> int:
        return max(1, round(c * self.width))


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding for one dim: output = ceil(size / stride); odd totals put the extra at the end."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def pad_same(x_bcthw: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    t, h, w = x_bcthw.shape[2:]
    pt, ph, pw = (_same_pad(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    if not any(pt + ph + pw):
        return x_bcthw
    return F.pad(x_bcthw, (*pw, *ph, *pt))  # F.pad wants the last dim first


class Unit3D(nn.Module):
    """Conv3d (SAME padding, no bias) -> BatchNorm -> ReLU; the logits layer: conv with bias, nothing else."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        bn_eps: float | None = 1e-3,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bn_eps is None)
        # Momentum matters only when training; 0.01 is the PyTorch spelling of TF's decay 0.99.
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps, momentum=0.01) if bn_eps is not None else None

    def forward(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(pad_same(x_bcthw, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        # Zero padding equals TF's -inf padding here: every pool follows a ReLU, so inputs are >= 0.
        return F.max_pool3d(pad_same(x_bcthw, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool->1x1."""

    def __init__(self, in_channels: int, outs: tuple[int, ...], bn_eps: float) -> None:
        super().__init__()
        o0, o1a, o1b, o2a, o2b, o3b = outs
        self.b0 = Unit3D(in_channels, o0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, o1a, bn_eps=bn_eps)
        self.b1b = Unit3D(o1a, o1b, (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, o2a, bn_eps=bn_eps)
        self.b2b = Unit3D(o2a, o2b, (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, o3b, bn_eps=bn_eps)
        self.out_channels = o0 + o1b + o2b + o3b

    def forward(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.b0(x_bcthw),
                self.b1b(self.b1a(x_bcthw)),
                self.b2b(self.b2a(x_bcthw)),
                self.b3b(self.b3a(x_bcthw)),
            ],
            dim=1,
        )


class I3D(nn.Module):
    def __init__(self, config: I3DConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or I3DConfig()
        ch, eps = cfg.channels, cfg.bn_eps
        self.Conv3d_1a_7x7 = Unit3D(cfg.in_channels, ch(64), (7, 7, 7), (2, 2, 2), bn_eps=eps)
        self.Conv3d_2b_1x1 = Unit3D(ch(64), ch(64), bn_eps=eps)
        self.Conv3d_2c_3x3 = Unit3D(ch(64), ch(192), (3, 3, 3), bn_eps=eps)
        for name, (kernel, stride) in POOLS.items():
            self.add_module(name, MaxPool3dSame(kernel, stride))
        channels = ch(192)
        for name, outs in MIXED.items():
            block = InceptionBlock(channels, tuple(ch(c) for c in outs), eps)
            self.add_module(name, block)
            channels = block.out_channels
        self.dropout = nn.Dropout(cfg.dropout)
        self.logits = Unit3D(channels, cfg.num_classes, bn_eps=None, relu=False)
        self.feature_dim = cfg.num_classes

    def forward(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> pre-softmax logits [B, num_classes], averaged over time."""
        if x_bcthw.ndim != 5 or x_bcthw.shape[1] != self.config.in_channels:
            raise ValueError(f"I3D wants [B, {self.config.in_channels}, T, H, W], got {tuple(x_bcthw.shape)}")
        x = x_bcthw
        for name in ENDPOINTS:
            x = getattr(self, name)(x)
        # At 224 x 224 with 16+ frames this is exactly the reference [2, 7, 7] pool; on smaller
        # inputs (tests, short clips) the kernel shrinks to the feature map instead of failing.
        kernel = tuple(min(k, s) for k, s in zip(FINAL_POOL, x.shape[2:]))
        x = F.avg_pool3d(x, kernel, stride=1)
        x = self.logits(self.dropout(x))  # [B, classes, T', H', W']
        # The reference squeezes H', W' (both 1 at 224) and averages over T'; averaging all three
        # is the same there and still gives one vector per clip at other sizes.
        return x.mean(dim=(2, 3, 4))


def init_weights(model: I3D) -> None:
    """Variance-preserving init so random (tiny) models give O(1) logits that still depend on the input."""
    for module in model.modules():
        if isinstance(module, Unit3D):
            conv = module.conv3d
            if module.relu:
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            else:
                fan_in = conv.weight[0].numel()
                nn.init.normal_(conv.weight, std=1.0 / math.sqrt(fan_in))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)


TINY = I3DConfig(width=1 / 8)


def build_i3d(flavor: Literal["tiny", "pretrained"], path: str | None = None, seed: int = 0,
              bn_eps: float | None = None) -> I3D:
    """An I3D in eval mode.

    tiny: random init from `TINY` (width 1/8), seeded, for tests and CPU demos.
    pretrained: full width with the weights in `path` (local path or fsspec URI), loaded strictly.
    bn_eps: BatchNorm epsilon (None: 1e-3, TF/Sonnet and piergiaj/pytorch-i3d; 1e-5 as VideoGPT's port).
    """
    eps = {} if bn_eps is None else {"bn_eps": bn_eps}
    if flavor == "tiny":
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            torch.manual_seed(seed)
            model = I3D(dataclasses.replace(TINY, **eps))
            init_weights(model)
        return model.eval()
    if flavor != "pretrained":
        raise ConfigError(f"eval.i3d_flavor: expected 'tiny' or 'pretrained', got {flavor!r}")
    if not path:
        raise ModelError(f"I3D flavor 'pretrained' needs eval.i3d_path (got {path!r}). {WEIGHTS_HELP}")
    model = I3D(I3DConfig(**eps))
    load_checkpoint(model, path)
    return model.eval()


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's TorchScript I3D (`i3d_torchscript.pt`, an export of the tf.hub model), called as its FVD
    calls it (universome/stylegan-v `src/metrics/frechet_video_distance.py` L23): uint8 [B, 3, T, H, W] in,
    rescaling and resizing inside the script, the 400-d pre-softmax features out."""

    def __init__(self, path: str):
        super().__init__()
        try:
            self.net = torch.jit.load(io.BytesIO(_read_bytes(path)), map_location="cpu").eval()
        except Exception as e:
            raise ModelError(f"eval.i3d_path={path}: not a loadable TorchScript I3D (eval.protocol=stylegan-v "
                             f"needs StyleGAN-V's i3d_torchscript.pt): {brief(e)}") from None

    def forward(self, frames_bcthw: torch.Tensor) -> torch.Tensor:
        return self.net(frames_bcthw, rescale=True, resize=True, return_features=True)


def check_torchscript(path: str | None) -> None:
    """On the driver: eval.i3d_path exists and is a TorchScript archive (a zip), read no further."""
    try:
        with storage.open(path or "", "rb") as f:
            magic = f.read(4)
    except Exception as e:
        raise ModelError(f"eval.i3d_path={path}: cannot read it ({brief(e)}); eval.protocol=stylegan-v needs "
                         "StyleGAN-V's i3d_torchscript.pt") from None
    if magic != b"PK\x03\x04":
        raise ModelError(f"eval.i3d_path={path}: not a TorchScript archive; eval.protocol=stylegan-v needs "
                         "StyleGAN-V's i3d_torchscript.pt")


def weights_digest(flavor: str, path: str | None = None, seed: int = 0) -> str:
    """What identifies the weights a `build_i3d` call uses: sha256 of the checkpoint file's bytes for
    `pretrained` (a renamed or moved copy of the same file keeps its digest), the seed for `tiny`."""
    if flavor == "tiny":
        return f"tiny-width{TINY.width:g}-seed{seed}"
    if not path:
        raise ModelError(f"I3D flavor 'pretrained' needs eval.i3d_path (got {path!r}). {WEIGHTS_HELP}")
    try:
        data = _read_bytes(path)
    except Exception as e:
        raise ModelError(f"cannot read I3D weights at {path!r} (eval.i3d_path): {brief(e)}. {WEIGHTS_HELP}") from e
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _read_bytes(path: str) -> bytes:
    # vidgen.storage is the one place that opens URIs; plain open() keeps local paths working without it.
    if importlib.util.find_spec("vidgen.storage") is not None:
        from vidgen import storage  # lazy: heavy (fsspec); optional: plain open() without it

        if hasattr(storage, "read_bytes"):
            return storage.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict file into `model`; every weight and BN statistic must be present with its shape."""
    check_state_dict(model, state := read_checkpoint(path), path)
    # The published file has no num_batches_tracked buffers (converted from TF); they do not affect
    # inference, so they are the only keys allowed to be absent.
    model.load_state_dict(state, strict=False)


def read_checkpoint(path: str | None) -> dict[str, torch.Tensor]:
    if not path:
        raise ModelError(f"I3D flavor 'pretrained' needs eval.i3d_path (got {path!r}). {WEIGHTS_HELP}")
    try:  # tensors only (weights_only): a pickle that would run code is refused
        return read_state_dict(path, "eval.i3d_path")
    except ModelError as e:
        raise ModelError(f"{e}. {WEIGHTS_HELP}") from None


def check_weights(path: str | None) -> None:
    """On the driver, before any actor builds the network: the file at eval.i3d_path reads as tensors and fits the
    400-class I3D key for key (the model is built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = I3D()
    check_state_dict(model, read_checkpoint(path), path)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    skip = "num_batches_tracked"
    problems = key_report({k: v.shape for k, v in model.state_dict().items() if not k.endswith(skip)},
                          {k: v.shape for k, v in state.items() if not k.endswith(skip)})
    if problems:
        raise ModelError(f"I3D weights at {path!r} (eval.i3d_path) do not fit the 400-class Inception-I3D: "
                         f"{problems}. {WEIGHTS_HELP}")
