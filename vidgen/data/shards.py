"""Packed clip shards: the parquet format `vidgen prepare pack` writes and the `shards` layout reads.

One parquet row per clip, one row group per row (so a reader fetches one clip with a ranged read,
never a whole shard). Columns:
  clip_id, source_uri, prompt, bucket, format: string   (format: jpeg | png | mp4)
  start_frame, stride, height, width, num_frames: int64    (stride: source frames per clip frame)
  fps: float64                                              (of the clip's frames)
  orig_height, orig_width, crop_top, crop_left: int64      (SDXL micro-conditioning of the pack's resize/crop;
                                                            absent in shards packed before they were recorded)
  frames: list<binary>   one encoded image per frame (jpeg/png; empty for mp4)
  video: binary          the clip as an mp4 (mp4 only)
Each shard `part-NNNNN.parquet` is written whole and atomically; `part-NNNNN.done.json` beside it
says it is complete (pack's resume key), and `_manifest.json` lists every shard with its clip count
so that listing a packed dataset is one small read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile

import numpy as np
from PIL import Image

from vidgen import storage
from vidgen.data.decode import natural_key
from vidgen.data.listing import LayoutOptions, Listing, Sample
from vidgen.data.video import write_video
from vidgen.errors import DataError, StorageError

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".parquet"
MANIFEST = "_manifest.json"
FORMATS = ("jpeg", "png", "mp4")
EXPECTED = f"parquet shards (part-*{SHARD_SUFFIX}) written by `vidgen prepare pack`"
GEOMETRY = ("orig_height", "orig_width", "crop_top", "crop_left")
_COLUMNS = ("clip_id", "source_uri", "prompt", "bucket", "format", "start_frame", "stride", "height", "width",
            "num_frames", "fps", "frames", "video", *GEOMETRY)


def schema():
    import pyarrow as pa  # lazy: heavy; read tasks of other layouts never load pyarrow

    return pa.schema([
        ("clip_id", pa.string()), ("source_uri", pa.string()), ("prompt", pa.string()),
        ("bucket", pa.string()), ("format", pa.string()), ("start_frame", pa.int64()), ("stride", pa.int64()),
        ("height", pa.int64()), ("width", pa.int64()), ("num_frames", pa.int64()), ("fps", pa.float64()),
        ("frames", pa.list_(pa.binary())), ("video", pa.binary()),
        *[(k, pa.int64()) for k in GEOMETRY],
    ])


# ---- writing --------------------------------------------------------------------------------------


def encode_clip(row: dict, fmt: str, quality: int = 95) -> dict:
    """A clip row from read_clips -> a shard record (frames encoded as `fmt`)."""
    frames = np.asarray(row["frames"])
    f, h, w, _ = frames.shape
    record = {k: row[k] for k in ("clip_id", "source_uri", "prompt", "start_frame", "fps")}
    record.update(bucket=row.get("bucket", f"{h}x{w}"), format=fmt, stride=int(row.get("stride", 1)),
                  height=h, width=w,
                  num_frames=f, frames=[], video=None, **{k: row.get(k) for k in GEOMETRY})
    if fmt == "mp4":
        record["video"] = _encode_mp4(frames, row["fps"])
    elif fmt in ("jpeg", "png"):
        record["frames"] = [_encode_image(frame, fmt, quality) for frame in frames]
    else:
        raise DataError(f"pack frame_format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return record


def _encode_image(frame_hwc: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(frame_hwc).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(frame_hwc).save(buf, format="PNG", compress_level=1)  # fast; PNG is for exactness
    return buf.getvalue()


def _encode_mp4(frames_fhwc: np.ndarray, fps: float) -> bytes:
    with tempfile.TemporaryDirectory(prefix="vidgen-pack-") as tmp:
        path = os.path.join(tmp, "clip.mp4")
        write_video(path, frames_fhwc, fps=fps, keyframe_interval=len(frames_fhwc))
        with open(path, "rb") as f:
            return f.read()


class ShardWriter:
    """Writes one shard's records one row group each to a local path (wrap it in storage.atomic_local)."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq  # lazy: heavy; read tasks of other layouts never load pyarrow

        self._writer = pq.ParquetWriter(path, schema(), compression="none")  # jpeg/png/mp4 are compressed
        self.count = 0

    def write(self, record: dict) -> None:
        import pyarrow as pa  # lazy: heavy; read tasks of other layouts never load pyarrow

        self._writer.write_table(pa.Table.from_pylist([record], schema=schema()))
        self.count += 1

    def close(self) -> None:
        self._writer.close()


# ---- the `shards` layout ---------------------------------------------------------------------------


def detect(listing: Listing) -> bool:
    if listing.num_frame_dirs or listing.num_videos:
        return False
    return any(n.endswith(SHARD_SUFFIX) for n in listing.tree.names)


def shard_samples(listing: Listing, options: LayoutOptions) -> list[Sample]:
    """One sample per clip: `<shard>#<row>`. Clip counts come from _manifest.json when it lists the
    shard, else from the shard's parquet footer."""
    counts = _manifest_counts(listing)
    samples = []
    for uri in sorted((u for u in listing.files if u.endswith(SHARD_SUFFIX)), key=natural_key):
        rel = listing.rel(uri)
        n = counts[rel] if rel in counts else _footer_rows(uri)
        samples += [Sample(uri=f"{uri}#{i}", frame_uris=None, prompt=None, prompt_uri=None,
                           meta={"layout": "shards", "name": f"{rel}#{i:06d}", "shard": uri, "row": i,
                                 "prompt_required": False})
                    for i in range(n)]
    return samples


def _manifest_counts(listing: Listing) -> dict[str, int]:
    uri = next((u for u in listing.files if listing.rel(u) == MANIFEST), None)
    if uri is None:
        return {}
    try:
        manifest = json.loads(storage.read_bytes(uri))
        return {s["name"]: int(s["clips"]) for s in manifest["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable manifest (%s); counting clips from the shard footers", uri, e)
        return {}


def _footer_rows(uri: str) -> int:
    import pyarrow.parquet as pq  # lazy: heavy; read tasks of other layouts never load pyarrow

    try:
        with storage.open(uri) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except StorageError:
        raise
    except Exception as e:  # ArrowInvalid: not a parquet file
        raise DataError(f"{uri}: not a readable parquet shard ({e})") from e


def read_shard_clip(shard_uri: str, row: int) -> dict:
    """Record `row` of a shard (frames still encoded), fetching only the row group that holds it."""
    import pyarrow.parquet as pq  # lazy: heavy; read tasks of other layouts never load pyarrow

    with storage.open(shard_uri) as f:
        pf = pq.ParquetFile(f)
        first = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if row < first + n:
                table = pf.read_row_group(group, columns=[c for c in _COLUMNS if c in pf.schema_arrow.names])
                return table.slice(row - first, 1).to_pylist()[0]
            first += n
    raise DataError(f"{shard_uri}: has {first} clips, no row {row} (shard changed since it was listed?)")
