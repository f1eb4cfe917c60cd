"""A tiny synthetic video dataset for tests and the demo: coloured shapes moving in straight lines.

Written in the Hotshot-XL layout, through `vidgen.storage` (so `out` may be s3://...):
    out/sample_000/0.png 1.png ... 10.png ...   (numbered from 0, not zero padded)
    out/sample_000/prompt.txt                    "a red circle moving right on a dark blue background"
Everything is drawn from one seeded generator per video, so a seed always gives the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vidgen import storage
from vidgen.errors import ConfigError

SHAPE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 110, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "magenta": (220, 50, 200),
    "cyan": (40, 210, 220),
}
# Dark backgrounds only, so every shape colour stands out against every background.
BACKGROUNDS = {
    "dark blue": (15, 20, 70),
    "black": (0, 0, 0),
    "dark green": (10, 50, 20),
    "dark grey": (45, 45, 45),
    "dark red": (70, 10, 10),
    "dark purple": (40, 10, 60),
}
# direction -> (dy, dx) unit step
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}
SHAPES = ("circle", "square")
FORMATS = {"png": "PNG", "jpg": "JPEG"}


def make_moving_shapes(
    out: str, num_videos: int, num_frames: int, height: int, width: int, seed: int = 0, fmt: str = "png"
) -> list[str]:
    """Write `num_videos` clips of `num_frames` [height, width] frames under `out`; return their URIs."""
    if fmt not in FORMATS:
        raise ConfigError(f"make_moving_shapes fmt: expected one of {sorted(FORMATS)}, got {fmt!r}")
    for key, value, low in (("num_videos", num_videos, 1), ("num_frames", num_frames, 2),
                            ("height", height, 8), ("width", width, 8)):
        if value < low:
            raise ConfigError(f"make_moving_shapes {key}: must be >= {low}, got {value}")
    storage.makedirs(out)
    uris = []
    for i in range(num_videos):
        rng = np.random.default_rng([seed % (1 << 64), i])
        frames_thwc, prompt = moving_shape_clip(rng, num_frames, height, width)
        sample = storage.join(out, f"sample_{i:03d}")
        storage.makedirs(sample)
        for t, frame in enumerate(frames_thwc):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format=FORMATS[fmt], **({"quality": 95} if fmt == "jpg" else {}))
            storage.write_bytes(storage.join(sample, f"{t}.{fmt}"), buf.getvalue())
        storage.write_text(storage.join(sample, "prompt.txt"), prompt + "\n")
        uris.append(sample)
    return uris


def moving_shape_clip(rng: np.random.Generator, num_frames: int, height: int, width: int
                      ) -> tuple[np.ndarray, str]:
    """One clip, uint8 [T, H, W, 3], and the prompt that describes it."""
    colour = _pick(rng, SHAPE_COLOURS)
    background = _pick(rng, BACKGROUNDS)
    direction = _pick(rng, DIRECTIONS)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    dy, dx = DIRECTIONS[direction]

    short = min(height, width)
    r = int(rng.integers(max(2, short // 10), max(3, short // 5) + 1))  # half size in pixels
    along, across = (width, height) if dx else (height, width)  # axis lengths: motion, other
    room = along - 1 - 2 * r  # centre positions that keep the whole shape inside the frame
    travel = int(rng.integers(room // 2, room + 1))
    first = r + int(rng.integers(0, room - travel + 1))
    other = r + int(rng.integers(0, across - 2 * r))
    if dx < 0 or dy < 0:  # moving left / up: start at the far end
        first = along - 1 - first

    yy, xx = np.ogrid[:height, :width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        pos = first + (dx + dy) * (travel * t // (num_frames - 1))
        cy, cx = (other, pos) if dx else (pos, other)
        if shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        frames[t] = BACKGROUNDS[background]
        frames[t][mask] = SHAPE_COLOURS[colour]
    return frames, f"a {colour} {shape} moving {direction} on a {background} background"


def _pick(rng: np.random.Generator, table: dict) -> str:
    names = list(table)
    return names[int(rng.integers(len(names)))]
