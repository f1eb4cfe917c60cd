"""Decode image bytes into RGB frames, and order frame files the way a human numbers them.

Shapes: H, W pixels; every frame leaves this module as uint8 [H, W, 3].

The reference projects broke here: SVD_Xtend sorted `frame_10` before `frame_2` and never converted
RGBA or greyscale frames to RGB; Hotshot-XL took frames in filesystem order. So: `natural_key` for
order, one `decode_image` that turns every PIL mode into RGB, and a `DataError` naming the file for
anything PIL cannot read.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from vidgen.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

_DIGITS = re.compile(r"(\d+)")
# Modes PIL can convert to RGB directly without losing meaning.
_DIRECT_TO_RGB = {"1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key that compares digit runs as numbers: `frame_2` < `frame_10`, `9.png` < `10.png`.

    `re.split` with a capturing group alternates text and digits, so position i always holds the
    same type in every key and tuples compare without mixing str and int. The name itself breaks ties
    (`1.png` vs `01.png`) so the order is total and stable.
    """
    parts = _DIGITS.split(name)
    key = tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))
    return key, name


def natural_order(names: list[str]) -> list[int]:
    """The positions of `names` in `sorted(names, key=natural_key)` order, through keys a third the size of
    natural_key's tuples (what sorting a million folder names costs). Each key is one str that compares as the
    natural_key tuple does: text parts lowercased and closed by "\x01", numbers as chr(2 + digits) + digits (more
    digits, larger number), then "\x00" + the name itself (the tie-break). Names holding a character below "\x02"
    (never seen in file names) fall back to natural_key itself."""
    if names and min("".join(names) or "\x02") < "\x02":
        return sorted(range(len(names)), key=lambda i: natural_key(names[i]))
    keys = [_packed_key(n) for n in names]
    return sorted(range(len(names)), key=keys.__getitem__)


def _packed_key(name: str) -> str:
    parts = _DIGITS.split(name)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            digits = str(int(part))
            out.append(chr(2 + len(digits)) + digits)
        else:
            out.append(part.lower() + "\x01")
    out.append("\x00")
    out.append(name)
    return "".join(out)


def decode_image(data: bytes, name: str, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image to uint8 [H, W, 3] RGB.

    draft_size: (width, height), PIL order as `Image.draft` takes it, of the size the caller will
    resize to. A JPEG at least twice that size in both dimensions is decoded at a reduced scale
    (1/2, 1/4 or 1/8, never below draft_size), which is several times faster than a full decode.
    Raises DataError naming `name` for corrupt, truncated or unidentifiable data.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if draft_size is not None and img.format == "JPEG":
            tw, th = draft_size
            if 2 * tw <= img.width and 2 * th <= img.height:
                img.draft("RGB", (tw, th))
        img.load()  # decode now, so truncation is reported here and not later
        return to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise image_error(name, e) from e


def image_error(name: str, e: BaseException) -> DataError:
    """The DataError for image `name` that PIL could not read: the file named, PIL's reason without its buffer."""
    return DataError(f"{name}: cannot decode image: {_reason(e)}")


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels; DataError naming `name`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as e:
        raise image_error(name, e) from e


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 [H, W, 3]: alpha composited on black, 16-bit scaled (not clipped)."""
    if "transparency" in img.info and img.mode in {"P", "L", "RGB"}:
        img = img.convert("RGBA")  # palette / tRNS transparency becomes a real alpha channel
    mode = img.mode
    if mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:4]
        # Composite on black = premultiply; integer rounding keeps opaque pixels exact.
        rgb = (rgba[..., :3] * alpha + 127) // 255
        return np.ascontiguousarray(rgb.astype(np.uint8))
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale (PNG 'I;16', or 'I' holding 0..65535): map 65535 -> 255 with rounding.
        # Pillow's own convert("L") clips at 255, which turns most 16-bit images white.
        grey = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[..., None], 3, axis=2))
    if mode == "F":
        # Float images have no agreed range; treat them like 8-bit values (PIL's convention).
        grey8 = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[..., None], 3, axis=2))
    if mode not in _DIRECT_TO_RGB:
        raise ValueError(f"unsupported image mode {mode!r}")
    if mode == "RGB":  # the common case: one copy out of PIL (convert() would add another)
        return np.asarray(img)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):  # PIL's text names its buffer (<_io.BytesIO object at 0x...>)
        return "not an image format PIL reads (expected JPEG, PNG, WebP or BMP)"
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 200 else text[:197] + "..."
