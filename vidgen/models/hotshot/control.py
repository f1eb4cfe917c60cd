"""ControlNet guidance for Hotshot-XL: control clips, key frames, Canny maps, the ControlNet and its step window.

Hotshot-XL steers its layout with one SDXL ControlNet applied frame by frame (hotshotco/Hotshot-XL `inference.py`,
`hotshot_xl/pipelines/hotshot_xl_controlnet_pipeline.py`). What decides the result, as Hotshot does it:
- key frames: `keyframe_indices`, Hotshot's `extract_gif_frames_from_midpoint`: N frames at a whole-frame stride
  chosen so that they span about the video's duration (N / fps), centred in the source clip;
- each key frame scaled to cover the output size and centre-cropped (`scale_aspect_fill`);
- the conditioning scale (Hotshot's default 0.7) and the guidance window: the ControlNet acts at step i of N only
  when start <= i / N and (i + 1) / N <= end (`controlnet_keep`);
- control images in [0, 1], the same for the unconditional and the text half of classifier-free guidance.
Hotshot's inference passes the source frames to the ControlNet as they are; vidgen computes Canny maps for a Canny
ControlNet (`canny`, the algorithm of OpenCV's `Canny(image, 100, 200)` that diffusers' SDXL Canny ControlNet
examples use), depth maps for a depth ControlNet (`depth`: a transformers depth-estimation model, DPT or
Depth-Anything, normalised as diffusers' SDXL depth ControlNet examples do) or takes the frames as control maps
(`type: none`: precomputed depth, pose, segmentation ...).

Shapes: N output frames, H/W output pixels.
  control clip  uint8 [N, H, W, 3]
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from vidgen import storage
from vidgen.data.clips import resize_cover_crop
from vidgen.data.decode import decode_image, is_image_name, natural_key
from vidgen.data.video import read_video
from vidgen.errors import ConfigError, DataError, ModelError

CONTROLNET_PARTS = ("config.json",)


def keyframe_indices(num_source: int, count: int, frame_ms: float | None, target_ms: float) -> list[int]:
    """`count` source frame indices: Hotshot's midpoint rule. Start from the widest whole-frame stride that fits
    (num_source // count), then narrow it while the span of the picked frames (first to last, in ms) gets closer
    to `target_ms` and can still be centred; the picks are centred in the clip. `frame_ms` None: Hotshot's guess
    for clips that do not say (125 ms, 8 fps, up to 16 frames; else 70 ms)."""
    if num_source < count:
        raise DataError(f"control clip: {num_source} frames, fewer than the {count} key frames needed")
    if frame_ms is None:
        frame_ms = 1000 / 8 if num_source <= 16 else 70.0
    last = num_source - 1

    def centred(stride: int) -> list[int]:
        picks = list(range(0, num_source, stride))[:count]
        return [i + (last - picks[-1]) // 2 for i in picks]

    stride = num_source // count
    best = centred(stride)
    best_gap = abs((best[-1] - best[0]) * frame_ms - target_ms)
    while stride > 1:
        stride -= 1
        picks = list(range(0, num_source, stride))[:count]
        if (last - picks[-1]) // 2 == 0:  # no room left to centre: Hotshot stops here
            break
        cand = centred(stride)
        gap = abs((cand[-1] - cand[0]) * frame_ms - target_ms)
        if gap > best_gap:
            break
        best, best_gap = cand, gap
    return best


def canny(frames_nhwc: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Canny edge maps, uint8 [N, H, W, 3] (0 or 255 in every channel), of uint8 RGB frames [N, H, W, 3].

    The steps of OpenCV's `Canny(img, low, high)` (aperture 3, L1 gradient): 3 x 3 Sobel derivatives per colour
    channel with the border replicated, at each pixel the channel of largest |gx| + |gy|; non-maximum suppression
    along the gradient direction (4 sectors, 22.5 degree boundaries); pixels above `high` are edges, pixels
    above `low` join an edge they touch (8-connected), repeated until nothing changes. Deterministic.
    """
    x = torch.as_tensor(np.asarray(frames_nhwc)).permute(0, 3, 1, 2).float()  # [N, 3, H, W]
    n, c, h, w = x.shape
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kx, kx.T])[:, None]  # [2, 1, 3, 3]: d/dx, d/dy
    padded = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(padded, kernels).reshape(n, c, 2, h, w)
    mag = g.abs().sum(2)  # [N, 3, H, W]
    best = mag.argmax(1, keepdim=True)
    mag = mag.gather(1, best)[:, 0]
    gx = g[:, :, 0].gather(1, best)[:, 0]
    gy = g[:, :, 1].gather(1, best)[:, 0]
    # direction sectors: 0 horizontal gradient (compare left/right), 1 vertical, 2 and 3 the diagonals
    ax, ay = gx.abs(), gy.abs()
    tan22, tan67 = math.tan(math.radians(22.5)), math.tan(math.radians(67.5))
    horizontal = ay <= ax * tan22
    vertical = ay > ax * tan67
    same_sign = (gx * gy) > 0
    m = F.pad(mag, (1, 1, 1, 1))

    def at(dy: int, dx: int) -> torch.Tensor:
        return m[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    # OpenCV keeps a pixel that is > its predecessor and >= its successor along the gradient
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d1 = (mag > at(-1, -1)) & (mag >= at(1, 1))  # gradient along +x+y (image y points down)
    keep_d2 = (mag > at(-1, 1)) & (mag >= at(1, -1))
    diagonal = torch.where(same_sign, keep_d1, keep_d2)
    peak = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, diagonal))
    candidate = peak & (mag > low)
    edges = candidate & (mag > high)
    while True:  # hysteresis: grow strong edges through weak ones
        grown = candidate & (F.max_pool2d(edges[:, None].float(), 3, 1, 1)[:, 0] > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    out = edges.to(torch.uint8) * 255
    return out[..., None].expand(n, h, w, 3).numpy().copy()


class DepthEstimator:
    """Depth maps of key frames from a transformers depth-estimation model, as diffusers' SDXL depth ControlNet
    examples make them: the model's image processor, `predicted_depth` resized bicubically to the frame size,
    min-max normalised per frame to [0, 1], times 255 truncated to uint8 in all three channels. A flat map (no
    depth range) is black instead of the examples' NaN."""

    def __init__(self, processor, model):
        self.processor, self.model = processor, model

    def to(self, device) -> DepthEstimator:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, frames_nhwc: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] of uint8 RGB frames [N, H, W, 3]."""
        n, h, w, _ = frames_nhwc.shape
        param = next(self.model.parameters())
        pixels = self.processor(images=list(frames_nhwc), return_tensors="pt").pixel_values
        depth = self.model(pixel_values=pixels.to(param.device, param.dtype)).predicted_depth.float()
        depth = F.interpolate(depth[:, None], size=(h, w), mode="bicubic", align_corners=False)
        lo, hi = depth.amin((1, 2, 3), keepdim=True), depth.amax((1, 2, 3), keepdim=True)
        span = hi - lo
        depth = torch.where(span > 0, (depth - lo) / torch.where(span > 0, span, 1.0), 0.0)
        out = (depth[:, 0].cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(out[..., None], 3, axis=-1))


def check_depth_model_dir(path: str | None) -> None:
    """On the driver: `generate.control.depth_model` is a transformers depth-estimation model directory."""
    from transformers.models.auto.modeling_auto import (  # lazy: heavy (transformers)
        MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES as DEPTH_TYPES,
    )

    field = f"generate.control.depth_model={path}"
    expected = ("expected a transformers depth-estimation model directory, e.g. DPT or Depth-Anything: config.json, "
                "its weights and preprocessor_config.json; vidgen never downloads weights")
    if not path:
        raise ConfigError(f"generate.control.depth_model: required with generate.control.type=depth ({expected})")
    cfg = storage.join(path, "config.json")
    if not storage.exists(cfg):
        raise ModelError(f"{field}: no config.json there ({expected})")
    try:
        conf = json.loads(storage.read_text(cfg))
    except Exception as e:
        raise ModelError(f"{field}: config.json is not readable JSON ({e})") from None
    kind = conf.get("model_type") if isinstance(conf, dict) else None
    if kind not in DEPTH_TYPES:
        raise ModelError(f"{field}: config.json describes a {kind!r} model, not a depth-estimation one (expected "
                         f"model_type one of {', '.join(sorted(DEPTH_TYPES))})")
    if not storage.exists(storage.join(path, "preprocessor_config.json")):
        raise ModelError(f"{field}: no preprocessor_config.json there ({expected})")


def load_depth_estimator(path: str, cache_dir: str) -> DepthEstimator:
    """The depth model of `generate.control.depth_model` (local directory or URI), on the CPU."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation  # lazy: heavy (transformers)

    from vidgen.models.loading import resolve_model_dir  # lazy: keeps this module's imports light

    check_depth_model_dir(path)
    local = resolve_model_dir(path, cache_dir, "transformers depth-estimation model", ())
    try:
        processor = AutoImageProcessor.from_pretrained(str(local))
        model = AutoModelForDepthEstimation.from_pretrained(str(local)).eval()
    except Exception as e:
        raise ModelError(f"generate.control.depth_model={path}: not loadable as a depth-estimation model ({e})") \
            from None
    return DepthEstimator(processor, model)


def _frame_files(uri: str) -> list[str]:
    files = [f for f in storage.listdir(uri) if is_image_name(f)]
    files.sort(key=lambda f: natural_key(f.rsplit("/", 1)[-1]))
    if not files:
        raise DataError(f"{uri}: no frames in the control clip folder (expected image files)")
    return files


def _stack(uri: str, frames: list[np.ndarray]) -> np.ndarray:
    if len({f.shape for f in frames}) > 1:
        raise DataError(f"{uri}: control frames of different sizes")
    return np.stack(frames)


def read_clip(uri: str) -> tuple[np.ndarray, float | None]:
    """Every frame of a control source, uint8 [T, H, W, 3], and its frame rate when it says (videos)."""
    if storage.isdir(uri):
        return _stack(uri, [decode_image(storage.read_bytes(f), f) for f in _frame_files(uri)]), None
    if not storage.exists(uri):
        raise DataError(f"{uri}: no such control clip (a frame folder or a video)")
    source: str | bytes = storage.read_bytes(uri) if storage.is_remote(uri) else uri
    return read_video(source)


def _key_frames(uri: str, count: int, fps: float, source_fps: float | None) -> np.ndarray:
    """The clip's key frames [count, H, W, 3]. A frame folder decodes only the frames picked; a video decodes whole
    (its length and rate come from the decode)."""
    def pick(n: int, rate: float | None) -> list[int]:
        return keyframe_indices(n, count, 1000.0 / rate if rate else None, 1000.0 * count / fps)

    if storage.isdir(uri):
        files = _frame_files(uri)
        idx = pick(len(files), source_fps)
        decoded = {i: decode_image(storage.read_bytes(files[i]), files[i]) for i in sorted(set(idx))}
        return _stack(uri, [decoded[i] for i in idx])
    frames, own_fps = read_clip(uri)
    return frames[pick(len(frames), source_fps or own_fps)]


def control_clip(uri: str, count: int, height: int, width: int, fps: float, kind: str,
                 source_fps: float | None = None, low: float = 100.0, high: float = 200.0,
                 depth: DepthEstimator | None = None) -> np.ndarray:
    """The control maps of one video: uint8 [count, height, width, 3] from the clip at `uri` (`depth`: the
    estimator for kind `depth`)."""
    picked = resize_cover_crop(_key_frames(uri, count, fps, source_fps), height, width)
    if kind == "canny":
        return canny(picked, low, high)
    if kind == "depth":
        if depth is None:
            raise ConfigError("generate.control.type=depth: no depth model loaded (generate.control.depth_model)")
        return depth(picked)
    return np.ascontiguousarray(picked, dtype=np.uint8)


def step_keep(step: torch.Tensor, num_steps: int, start: float, end: float) -> torch.Tensor:
    """1.0 where the ControlNet acts at (0-based) `step` of `num_steps`, else 0.0 (Hotshot's controlnet_keep)."""
    off = (step / num_steps < start) | ((step + 1) / num_steps > end)
    return (~off).float()


def check_controlnet_dir(path: str) -> None:
    """On the driver: the ControlNet directory exists and its config is an SDXL ControlNet's."""
    if path == "tiny":
        return
    cfg = storage.join(path, "config.json")
    if not storage.exists(cfg):
        raise ModelError(f"generate.controlnet={path}: no config.json there (expected a diffusers SDXL ControlNet "
                         "directory: config.json and diffusion_pytorch_model.safetensors; vidgen never downloads "
                         "weights)")
    try:
        conf = json.loads(storage.read_text(cfg))
    except Exception as e:
        raise ModelError(f"generate.controlnet={path}: config.json is not readable JSON ({e})") from None
    if conf.get("_class_name") not in ("ControlNetModel", None) or "addition_embed_type" not in conf:
        raise ModelError(f"generate.controlnet={path}: config.json describes a {conf.get('_class_name')!r}, not an "
                         "SDXL ControlNetModel (expected addition_embed_type 'text_time')")


def load_controlnet(path: str, unet_model, cache_dir: str, seed: int = 0):
    """The ControlNet of `generate.controlnet`: a diffusers directory (local or URI), or `tiny`: a ControlNet made
    from the Hotshot UNet's spatial layers with its zero convolutions given seeded random weights, so that
    the control image visibly steers a random-init model (tests, demos)."""
    from diffusers import ControlNetModel  # lazy: heavy (diffusers)

    from vidgen.models.hotshot.pipeline import controlnet_from_spatial  # lazy: the pipeline imports this module
    from vidgen.models.loading import resolve_model_dir  # lazy: keeps this module's imports light

    if path == "tiny":
        net = controlnet_from_spatial(unet_model)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            # diffusers zero-initialises the outputs and the control image's embedding: a fresh ControlNet adds
            # nothing and sees no image. Variance-preserving random weights there instead, so that the image's
            # edges reach the residuals at the scale of the UNet's own activations.
            for conv in [*net.controlnet_cond_embedding.modules(), *net.controlnet_down_blocks,
                         net.controlnet_mid_block]:
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                    torch.nn.init.zeros_(conv.bias)
        return net.eval()
    check_controlnet_dir(path)
    local = resolve_model_dir(path, cache_dir, "diffusers SDXL ControlNet", ())
    try:
        return ControlNetModel.from_pretrained(str(local)).eval()
    except Exception as e:
        raise ModelError(f"generate.controlnet={path}: not loadable as an SDXL ControlNet ({e})") from None


def check_control_kind(kind: str) -> None:
    if kind not in ("canny", "depth", "none"):
        raise ConfigError(f"generate.control.type={kind!r}: expected canny (computed here), depth (from "
                          "generate.control.depth_model) or none (the clip's frames are the control maps)")
