"""Aspect-ratio buckets: every clip is resized to the bucket nearest its own aspect ratio, and batches
hold one bucket each. Pure Python + numpy, no Ray.

Shapes: B clips per batch, F frames, H/W pixels; frames are uint8 [F, H, W, 3] per clip.

Bucket sizes are (height, width). The presets (hotshot-512, svd) and `parse_buckets` ('WxH,WxH,...'
or a preset name) live in `vidgen.sizes`, which `vidgen.config` also uses to validate `data.buckets`;
they are importable from here as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from vidgen.sizes import PRESETS, Bucket, parse_buckets

__all__ = ["PRESETS", "Bucket", "bucket_batches", "bucket_name", "collate", "nearest_bucket",
           "parse_buckets"]  # PRESETS, Bucket, parse_buckets: re-exported from vidgen.sizes


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the clip's in log space (so 2:1 and 1:2 are equally
    far from 1:1); ties go to the first in `buckets` order."""
    if height < 1 or width < 1:
        raise ValueError(f"clip size must be positive, got {height}x{width}")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - target))


def bucket_name(bucket: Bucket) -> str:
    """'HxW', the `bucket` column of every clip row."""
    return f"{bucket[0]}x{bucket[1]}"


def bucket_batches(rows: Iterable[dict], batch_size: int, drop_last: bool = True) -> Iterator[dict]:
    """Group a stream of clip rows into batches that each hold one bucket (one frame size).

    Each batch is a dict of columns: `frames` uint8 [B, F, H, W, 3] (stacked), numeric columns as
    numpy arrays, everything else as lists. A batch is emitted as soon as its bucket has batch_size
    rows, so at most (number of buckets) x (batch_size - 1) rows wait at any time: memory stays
    bounded however long the stream. Rows without a `bucket` column are grouped by frame shape.
    drop_last=False also emits the incomplete batches left at the end (largest first).

    How the trainer uses it: each Ray Train worker iterates its shard row by row,
        for batch in bucket_batches(shard.iter_rows(), cfg.train.batch_size):
            loss = recipe.loss(batch) ...
    instead of `shard.iter_batches(batch_size)`, which would mix sizes in one batch. Ranks may then
    see different numbers of batches per epoch; with DeepSpeed every rank must step together, so
    the loop runs a fixed number of steps (train.max_steps) over an endless stream of epochs, or
    stops an epoch at the first rank that runs dry, rather than relying on the epoch's end.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: dict[str, list[dict]] = {}
    for row in rows:
        key = row.get("bucket") or "x".join(str(d) for d in np.shape(row["frames"])[1:3])
        group = pending.setdefault(key, [])
        group.append(row)
        if len(group) == batch_size:
            yield collate(group)
            pending[key] = []
    if not drop_last:
        for group in sorted(pending.values(), key=len, reverse=True):
            if group:
                yield collate(group)


def collate(rows: list[dict]) -> dict:
    """Rows with equal frame shapes -> one batch of columns (see bucket_batches)."""
    batch: dict = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "frames":
            batch[key] = np.stack(values)
        elif all(isinstance(v, int | float | np.number) for v in values):
            batch[key] = np.asarray(values)
        else:
            batch[key] = values
    return batch
