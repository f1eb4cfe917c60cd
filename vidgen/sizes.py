"""Clip sizes for aspect-ratio buckets: the preset table and the parsing of `data.buckets`.

A leaf module (it imports only vidgen.errors), so that `vidgen.config` can validate `data.buckets`
when a config loads and `vidgen.data.buckets` can bucket clips, without either importing the other.

Bucket sizes are (height, width). Presets:
  hotshot-512  Hotshot-XL's seven training sizes around 512x512 (shared/seeds/hotshot-xl.md,
               "Supported Aspect Ratios"): 320x768, 384x672, 416x608, 512x512, 608x416, 672x384,
               768x320. The README lists them as "W x H" with aspect ratio W/H (0.42 for 320 x 768);
               the set is symmetric, so it reads the same either way.
  svd          Stable Video Diffusion's 1024x576 (W x H): 576 high, 1024 wide.
A user list is 'WxH,WxH,...' (width first, like the presets' sources and image tools).
"""

from __future__ import annotations

from collections.abc import Sequence

from vidgen.errors import ConfigError

Bucket = tuple[int, int]  # (height, width)

PRESETS: dict[str, tuple[Bucket, ...]] = {
    "hotshot-512": ((768, 320), (672, 384), (608, 416), (512, 512), (416, 608), (384, 672), (320, 768)),
    "svd": ((576, 1024),),
}


def parse_buckets(spec: str | Sequence[Bucket] | None) -> list[Bucket] | None:
    """A preset name or 'WxH,WxH,...' -> [(height, width), ...] sorted by aspect ratio (w/h); None -> None.

    Sizes must be positive multiples of 8 (the VAE downsamples by 8). A sequence of (h, w) pairs
    passes through the same checks.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if not text:
            return None
        if text in PRESETS:
            return sorted(PRESETS[text], key=_aspect)
        pairs = []
        for part in text.split(","):
            w, sep, h = part.strip().partition("x")
            if not sep or not w.strip().isdigit() or not h.strip().isdigit():
                raise ConfigError(f"data.buckets: {part.strip()!r} in {spec!r} is not WxH; expected a preset "
                                  f"({', '.join(PRESETS)}) or a list like '512x320,320x512'")
            pairs.append((int(h), int(w)))
    else:
        pairs = [(int(h), int(w)) for h, w in spec]
    for h, w in pairs:
        if h < 8 or w < 8 or h % 8 or w % 8:
            raise ConfigError(f"data.buckets: {w}x{h} (WxH) must be at least 8 and multiples of 8 "
                              "(the VAE downsamples by 8)")
    if not pairs:
        raise ConfigError(f"data.buckets: {spec!r} names no bucket")
    return sorted(dict.fromkeys(pairs), key=_aspect)


def _aspect(bucket: Bucket) -> float:
    return bucket[1] / bucket[0]
