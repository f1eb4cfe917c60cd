"""Per-sample work, the same in Ray Data tasks and in-process: one sample -> its clip rows.

Shapes: F frames per clip, H/W pixels; rows carry frames uint8 [F, H, W, 3] (see vidgen.data.pipeline
for the row columns). Everything here raises `BadSample` (a short reason for counting, a detail
naming the file) for input that cannot make a clip; the pipeline turns that into a skip record.
Only the frames a clip uses are read and decoded, JPEGs at a reduced DCT scale when they are at
least twice the target size, and every clip is resized in one uint8 call.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vidgen import storage
from vidgen.data.buckets import Bucket, bucket_name, nearest_bucket
from vidgen.data.clips import clip_span, clip_starts, cover_crop_box, frame_stride, resize_cover_crop, sample_rng
from vidgen.data.decode import decode_image, image_size
from vidgen.data.listing import Sample
from vidgen.data.shards import read_shard_clip
from vidgen.data.video import probe_video, read_video
from vidgen.errors import DataError, StorageError


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Everything a data task needs besides the sample; pickled once into the Ray closure."""

    num_frames: int
    height: int  # the output size when `buckets` is None
    width: int
    fps: float | None  # target fps; None keeps every source frame
    source_fps: float  # frame-folder layouts that do not know their rate; videos and OPV2V carry their own
    train: bool  # random starts and crops (seeded) vs fixed, evenly spread starts and centre crops
    seed: int
    epoch: int
    clips_per_video: int
    default_prompt: str
    buckets: tuple[Bucket, ...] | None = None  # (height, width) sizes; each clip goes to the nearest

    def target(self, src_h: int, src_w: int) -> Bucket:
        """The (height, width) a clip of source size src_h x src_w is resized and cropped to."""
        return nearest_bucket(src_h, src_w, self.buckets) if self.buckets else (self.height, self.width)


class BadSample(Exception):
    """A sample to skip: `reason` is a short category for counting, `detail` says what exactly."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _utf8(name: str) -> bool:
    """False for a local file name that is not UTF-8 (Python keeps its bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def sample_clips(sample: Sample, spec: ClipSpec) -> list[dict]:
    """Rows for one sample; raises BadSample when it is unusable."""
    if not all(_utf8(u) for u in [sample.uri, *(sample.frame_uris or [])]):
        raise BadSample("file name not UTF-8", f"{sample.uri!r}: names must be UTF-8 to be stored and logged "
                                               "(rename the files)")
    rng = sample_rng(spec.seed, spec.epoch, 0, sample.uri) if spec.train else None
    check_has_frames(sample)
    if sample.meta.get("layout") == "shards":
        return _shard_clips(sample, spec, rng)
    prompt = resolve_prompt(sample, spec.default_prompt)
    if sample.frame_uris is not None:
        return _frame_folder_clips(sample, prompt, spec, rng)
    return _video_clips(sample, prompt, spec, rng)


def check_has_frames(sample: Sample) -> None:
    """BadSample "no frames" for a sample folder holding no frame (or none of the chosen OPV2V camera)."""
    if sample.frame_uris is not None and not sample.frame_uris:
        camera = f" of camera {sample.meta['camera']}" if "camera" in sample.meta else ""
        raise BadSample("no frames", f"{sample.uri}: the sample folder holds no image frames{camera}")


def decode_every_frame(sample: Sample, chunk: int = 32) -> int:
    """Read and decode every frame of `sample` through the decoders training uses, `chunk` frames at a time
    (a long video never sits in memory whole); the number of frames, or BadSample for the first that fails."""
    check_has_frames(sample)
    if sample.meta.get("layout") == "shards":  # a packed clip is small: decoded whole
        record = _shard_record(sample)
        if record["format"] == "mp4":
            try:
                got = len(read_video(record["video"])[0])
            except DataError as e:
                raise BadSample("corrupt shard", f"{sample.uri}: {e}") from e
        else:
            got = len(_decode_all(dict(enumerate(record["frames"])),
                                  [f"{sample.uri} frame {i}" for i in range(len(record["frames"]))], None))
        if got < int(record["num_frames"]):
            raise BadSample("too few frames", f"{sample.uri}: {got} decodable frames, header said "
                            f"{record['num_frames']}")
        return got
    if sample.frame_uris is not None:
        first = None
        for lo in range(0, len(sample.frame_uris), chunk):
            names = sample.frame_uris[lo:lo + chunk]
            frames = _decode_all({i: _read(u) for i, u in enumerate(names, lo)}, names, None)
            first = first or (names[0], next(iter(frames.values())).shape)
            shape = next(iter(frames.values())).shape
            if shape != first[1]:
                raise BadSample("mixed frame sizes", f"{names[0]} is {shape[1]}x{shape[0]}, "
                                f"{first[0]} is {first[1][1]}x{first[1][0]}")
        return len(sample.frame_uris)
    source: str | bytes = _read(sample.uri) if storage.is_remote(sample.uri) else sample.uri
    try:
        total = probe_video(source)[0]
        for lo in range(0, total, chunk):
            got = len(read_video(source, lo, chunk)[0])
            if got < min(chunk, total - lo):
                raise BadSample("too few frames", f"{sample.uri}: only {lo + got} frames decodable, the header "
                                f"says {total}")
    except DataError as e:
        raise BadSample("unreadable video", str(e) if str(e).startswith(sample.uri) else f"{sample.uri}: {e}") from e
    return total


def resolve_prompt(sample: Sample, default_prompt: str = "") -> str:
    """The sample's prompt (reading its prompt file if it has one); BadSample when a required prompt is
    missing, empty or not UTF-8."""
    required = bool(sample.meta.get("prompt_required"))
    if sample.prompt_uri is not None:
        data = _read(sample.prompt_uri)
        try:
            text = data.decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise BadSample("prompt not UTF-8", f"{sample.prompt_uri}: {e.reason} at byte {e.start}") from e
        if text:
            return text
        if required:
            raise BadSample("empty prompt", f"{sample.prompt_uri} is empty")
    elif required and not sample.prompt:
        hint = sample.meta.get("missing_prompt", "no prompt.txt beside the frames")
        raise BadSample("missing prompt", f"{sample.uri}: {hint}")
    return sample.prompt or default_prompt


def _too_few(uri: str, available: int, spec: ClipSpec, stride: int, what: str = "frames") -> BadSample:
    return BadSample("too few frames", f"{uri}: {available} {what}, a clip needs "
                     f"{clip_span(spec.num_frames, stride)} (num_frames={spec.num_frames}, stride={stride})")


def _frame_folder_clips(sample: Sample, prompt: str, spec: ClipSpec, rng) -> list[dict]:
    frame_uris = sample.frame_uris or []
    source_fps = float(sample.meta.get("fps") or spec.source_fps)  # OPV2V knows its 10 Hz
    stride = frame_stride(source_fps, spec.fps)
    starts = clip_starts(len(frame_uris), spec.num_frames, stride, spec.clips_per_video, rng)
    if not starts:
        raise _too_few(sample.uri, len(frame_uris), spec, stride)
    # Read only the frames the clips use: scene folders can hold hundreds of frames.
    wanted = sorted({s + i * stride for s in starts for i in range(spec.num_frames)})
    blobs = {i: _read(frame_uris[i]) for i in wanted}
    src_hw = _header_size(blobs[wanted[0]], frame_uris[wanted[0]])
    target = spec.target(*src_hw)
    # JPEG draft decoding (when frames are >= 2x the target) needs one format per folder, or
    # drafted and full-size frames of the same source size would no longer stack.
    single_format = len({frame_uris[i].rpartition(".")[2].lower() for i in wanted}) == 1
    draft = (target[1], target[0]) if single_format else None
    frames = _decode_all(blobs, [frame_uris[i] for i in wanted], draft)
    rows = []
    for start in starts:
        clip = np.stack([frames[start + i * stride] for i in range(spec.num_frames)])
        rows.append(_row(sample.uri, start, prompt, source_fps / stride, stride, *_fit(clip, target, rng, src_hw)))
    return rows


def _header_size(data: bytes, uri: str) -> tuple[int, int]:
    try:
        w, h = image_size(data, uri)
    except DataError as e:
        raise BadSample("corrupt image", str(e)) from e
    return h, w


def _decode_all(blobs: dict[int, bytes], names: list[str], draft) -> dict[int, np.ndarray]:
    """Decode every blob (a dict keyed by frame index, names in the same order); BadSample on a corrupt
    frame or frames of different sizes."""
    try:
        frames = {i: decode_image(data, name, draft) for (i, data), name in zip(blobs.items(), names)}
    except DataError as e:
        raise BadSample("corrupt image", str(e)) from e
    first = next(iter(frames.values())).shape
    for frame, name in zip(frames.values(), names):
        if frame.shape != first:
            raise BadSample("mixed frame sizes", f"{name} is {frame.shape[1]}x{frame.shape[0]}, "
                            f"{names[0]} is {first[1]}x{first[0]}")
    return frames


def _video_clips(sample: Sample, prompt: str, spec: ClipSpec, rng) -> list[dict]:
    # Remote videos are fetched once and probed/decoded from memory; local ones are opened in place.
    source: str | bytes = _read(sample.uri) if storage.is_remote(sample.uri) else sample.uri
    try:
        num_available, source_fps, src_h, src_w = probe_video(source)
        stride = frame_stride(source_fps, spec.fps)
        starts = clip_starts(num_available, spec.num_frames, stride, spec.clips_per_video, rng)
        if not starts:
            raise _too_few(sample.uri, num_available, spec, stride)
        target = spec.target(src_h, src_w)
        rows = []
        for start in starts:
            clip, clip_fps = read_video(source, start, spec.num_frames, stride)
            if len(clip) < spec.num_frames:  # the header promised more frames than the stream has
                raise BadSample("too few frames", f"{sample.uri}: only {len(clip)} frames decodable "
                                f"from frame {start} at stride {stride}, clip needs {spec.num_frames}")
            rows.append(_row(sample.uri, start, prompt, clip_fps, stride,
                             *_fit(clip, target, rng, (src_h, src_w))))
        return rows
    except DataError as e:
        text = str(e) if str(e).startswith(sample.uri) else f"{sample.uri}: {e}"
        raise BadSample("unreadable video", text) from e


def _shard_clips(sample: Sample, spec: ClipSpec, rng) -> list[dict]:
    """Clips from one packed clip: re-windowed and resized only when the request differs from the pack."""
    record = _shard_record(sample)
    available = int(record["num_frames"])
    stride = frame_stride(float(record["fps"]), spec.fps)
    starts = clip_starts(available, spec.num_frames, stride, spec.clips_per_video, rng)
    if not starts:
        raise _too_few(sample.uri, available, spec, stride, what="frames in the packed clip")
    target = spec.target(int(record["height"]), int(record["width"]))
    wanted = sorted({s + i * stride for s in starts for i in range(spec.num_frames)})
    if record["format"] == "mp4":
        try:
            video, _ = read_video(record["video"])
        except DataError as e:
            raise BadSample("corrupt shard", f"{sample.uri}: {e}") from e
        frames = {i: video[i] for i in wanted if i < len(video)}
        if len(frames) < len(wanted):
            raise BadSample("too few frames", f"{sample.uri}: {len(video)} decodable frames, header said "
                            f"{available}")
    else:
        names = [f"{sample.uri} frame {i}" for i in wanted]
        frames = _decode_all({i: record["frames"][i] for i in wanted}, names, (target[1], target[0]))
    rows = []
    for start in starts:
        clip = np.stack([frames[start + i * stride] for i in range(spec.num_frames)])
        # Provenance survives packing: the clip's position in its original source, not in the shard.
        packed_stride = int(record["stride"] or 1)
        row = _row(record["source_uri"], int(record["start_frame"]) + start * packed_stride,
                   record["prompt"] or spec.default_prompt, float(record["fps"]) / stride,
                   packed_stride * stride, *_refit(clip, target, rng, record))
        if start == 0:
            row["clip_id"] = record["clip_id"]
        rows.append(row)
    return rows


def _shard_record(sample: Sample) -> dict:
    try:
        return read_shard_clip(sample.meta["shard"], int(sample.meta["row"]))
    except StorageError as e:
        raise BadSample("unreadable object", str(e)) from e
    except Exception as e:  # ArrowInvalid and friends: a damaged shard
        raise BadSample("corrupt shard", f"{sample.uri}: {e}"[:500]) from e


def _fit(clip: np.ndarray, target: tuple[int, int], rng, orig_hw: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """Resize-to-cover + crop, and the SDXL micro-conditioning of it: the source size (h, w) and the crop's
    top-left in the scaled image (top, left), in that order (Hotshot's trainer mixed (w, h) in)."""
    box = cover_crop_box(clip.shape[1], clip.shape[2], *target, rng)
    geometry = {"orig_height": int(orig_hw[0]), "orig_width": int(orig_hw[1]),
                "crop_top": int(box[2]), "crop_left": int(box[3])}
    return resize_cover_crop(clip, *target, box=box), geometry


def _refit(clip: np.ndarray, target: tuple[int, int], rng, record: dict) -> tuple[np.ndarray, dict]:
    """A packed clip at the requested size: its pack-time geometry kept when no further resize happens; after
    a re-resize the original size is kept and the crop is the new one (in the packed clip's scale)."""
    frames, geometry = _fit(clip, target, rng, clip.shape[1:3])
    packed = {k: record.get(k) for k in ("orig_height", "orig_width", "crop_top", "crop_left")}
    if packed["orig_height"] is None:  # packed before geometry was recorded: the packed size stands in
        return frames, geometry
    if tuple(target) == tuple(clip.shape[1:3]):
        return frames, packed
    return frames, {**geometry, "orig_height": packed["orig_height"], "orig_width": packed["orig_width"]}


def _row(source_uri: str, start: int, prompt: str, fps: float, stride: int, frames_fhwc: np.ndarray,
         geometry: dict) -> dict:
    return {
        "frames": frames_fhwc,
        "prompt": prompt,
        "fps": float(fps),
        "clip_id": f"{source_uri}#{start}",
        "source_uri": source_uri,
        "start_frame": int(start),
        "stride": int(stride),
        "bucket": bucket_name(frames_fhwc.shape[1:3]),
        **geometry,
    }


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except StorageError as e:
        raise BadSample("unreadable object", str(e)) from e
