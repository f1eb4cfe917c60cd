"""Clip streams: samples -> decoded, strided, resized clips, one row per clip, through Ray Data.

Shapes: F frames per clip, H/W pixels. Each row is
  frames uint8 [F, H, W, 3], prompt str, fps float (after striding), clip_id str ("<uri>#<start>"),
  source_uri str, start_frame int, stride int (source frames from one clip frame to the next),
  bucket str ("HxW": the clip's size, one of `buckets` when given).
With `buckets`, H and W vary between rows: batch them with `vidgen.data.buckets.bucket_batches`.

The driver only lists samples; `ray.data.from_items` of small JSON descriptors + `flat_map` does the
reading, decoding, clip sampling and resizing in CPU tasks, streaming clip by clip. A bad sample
(corrupt frame, too short, missing prompt, ...) never fails the job: it yields no rows and leaves one
small JSON record under `report_dir`, which `ClipStream.report()` sums up and `check_bad_fraction`
turns into a DataError when too much was skipped. `iter_local()` runs the same code without Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np

from vidgen import storage
from vidgen.data.buckets import Bucket, bucket_name, nearest_bucket, parse_buckets
from vidgen.data.clips import clip_span, clip_starts, frame_stride, resize_cover_crop, sample_rng
from vidgen.data.decode import decode_image, image_size
from vidgen.data.layouts import list_samples
from vidgen.data.listing import DEFAULT_PROMPT_TEMPLATE, Sample
from vidgen.data.shards import read_shard_clip
from vidgen.data.video import probe_video, read_video
from vidgen.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)


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


def read_clips(
    source: str,
    layout: str = "auto",
    *,
    num_frames: int,
    height: int | None = None,
    width: int | None = None,
    buckets: str | list[Bucket] | None = None,
    fps: float | None = None,
    source_fps: float = 8.0,
    train: bool = True,
    seed: int = 0,
    epoch: int = 0,
    clips_per_video: int = 1,
    default_prompt: str = "",
    camera: int = 0,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_bad_fraction: float = 0.05,
    report_dir: str | None = None,
    num_cpus: float = 0.25,
) -> ClipStream:
    """List the samples under `source` (on the driver) and describe the clip stream over them.

    height, width: every clip's size; or buckets (a preset such as "hotshot-512" or "svd", or
    'WxH,...', see vidgen.data.buckets), and each clip gets the size nearest its aspect ratio
    (height/width are then ignored). camera, prompt_template: the opv2v layout's (LayoutOptions).
    epoch: training draws different (seeded) clips per epoch; use `stream.for_epoch(e)`.
    report_dir: where skipped samples are recorded; on a multi-node cluster give a shared URI
    (s3://...). Default: a fresh temporary directory on the driver's disk.
    """
    bucket_list = parse_buckets(buckets)
    if bucket_list is None and (height is None or width is None):
        raise ConfigError("data.height and data.width: required unless data.buckets is set")
    height, width = (height, width) if bucket_list is None else bucket_list[0]
    for key, value in (("num_frames", num_frames), ("height", height), ("width", width),
                       ("clips_per_video", clips_per_video)):
        if value < 1:
            raise ConfigError(f"data.{key}: must be >= 1, got {value}")
    if fps is not None and not fps > 0:
        raise ConfigError(f"data.fps: must be > 0 or unset, got {fps}")
    if not source_fps > 0:
        raise ConfigError(f"data.source_fps: must be > 0, got {source_fps}")
    if not 0 <= max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction: must be within [0, 1], got {max_bad_fraction}")
    samples = list_samples(source, layout, camera=camera, prompt_template=prompt_template)
    spec = ClipSpec(num_frames=num_frames, height=height, width=width, fps=fps, source_fps=source_fps,
                    train=train, seed=seed, epoch=epoch, clips_per_video=clips_per_video,
                    default_prompt=default_prompt, buckets=tuple(bucket_list) if bucket_list else None)
    report_dir = report_dir or tempfile.mkdtemp(prefix="vidgen-skipped-")
    storage.makedirs(report_dir)  # fail here, on the driver, if it cannot be written
    return ClipStream(source, samples, spec, report_dir, max_bad_fraction, num_cpus, uuid.uuid4().hex)


def read_clips_local(source: str, layout: str = "auto", **kwargs: Any) -> Iterator[dict]:
    """The rows of `read_clips(source, layout, **kwargs)`, in sample order, without Ray."""
    yield from read_clips(source, layout, **kwargs).iter_local()


class ClipStream:
    """The clips of one dataset read: a lazily built Ray Dataset, or a local iterator, plus a report."""

    def __init__(self, source: str, samples: list[Sample], spec: ClipSpec, report_dir: str,
                 max_bad_fraction: float, num_cpus: float, token: str):
        self.source, self.samples, self.spec = source, samples, spec
        self.report_dir, self.max_bad_fraction, self.num_cpus = report_dir, max_bad_fraction, num_cpus
        self._token = token  # tags this read's skip records; older records in report_dir are ignored
        self._dataset = None

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def dataset(self):
        """`ray.data.Dataset`, one row per clip, streamed: each input block holds one sample."""
        if self._dataset is None:
            import ray.data  # imported here: listing and local reads must not pay for Ray

            if ray.is_initialized() and not storage.is_remote(self.report_dir) and len(ray.nodes()) > 1:
                log.warning("report_dir %s is on the driver's local disk but Ray has %d nodes: skips on "
                            "other nodes will be missing from report(); pass a shared URI (s3://...)",
                            self.report_dir, len(ray.nodes()))
            # JSON strings, not dicts: Arrow would have to infer one schema for list/None/meta fields.
            items = [{"sample": json.dumps(dataclasses.asdict(s))} for s in self.samples]
            ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
            fn = partial(_rows_for_item, spec=self.spec, report_dir=self.report_dir, token=self._token)
            self._dataset = ds.flat_map(fn, num_cpus=self.num_cpus)
        return self._dataset

    def for_epoch(self, epoch: int) -> ClipStream:
        """The same samples and report, with the clips (and crops) of another training epoch."""
        spec = dataclasses.replace(self.spec, epoch=epoch)
        return ClipStream(self.source, self.samples, spec, self.report_dir, self.max_bad_fraction,
                          self.num_cpus, self._token)

    def iter_local(self) -> Iterator[dict]:
        """The same rows as `dataset`, in sample order, computed in this process."""
        for sample in self.samples:
            yield from _rows_or_record(sample, self.spec, self.report_dir, self._token)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_local()

    def report(self) -> dict:
        """{total, skipped, reasons: {reason: count}, bad: [{uri, reason, detail}], report_dir}.

        Complete once the dataset (or iter_local) has been consumed.
        """
        uris = {s.uri for s in self.samples}
        bad = []
        if storage.exists(self.report_dir):
            for uri in storage.walk_files(self.report_dir, suffixes=(".json",)):
                record = json.loads(storage.read_text(uri))
                if record.get("token") == self._token and record.get("uri") in uris:
                    bad.append({k: record[k] for k in ("uri", "reason", "detail")})
        bad.sort(key=lambda r: r["uri"])
        reasons = Counter(r["reason"] for r in bad)
        return {"total": self.num_samples, "skipped": len(bad), "reasons": dict(reasons.most_common()),
                "bad": bad, "report_dir": self.report_dir}

    def check(self) -> dict:
        """report(), raising DataError when more than max_bad_fraction of the samples was skipped."""
        report = self.report()
        check_bad_fraction(report, self.max_bad_fraction)
        return report


def check_bad_fraction(report: dict, limit: float) -> None:
    """DataError naming the commonest skip reasons and an example when skipped/total > limit."""
    total, skipped = report["total"], report["skipped"]
    if total == 0 or skipped / total <= limit:
        return
    common = ", ".join(f"{reason} ({n})" for reason, n in Counter(report["reasons"]).most_common(3))
    example = report["bad"][0] if report["bad"] else None
    example_text = f"; e.g. {example['uri']}: {example.get('detail', example['reason'])}" if example else ""
    where = f"; one record per sample under {report['report_dir']}" if report.get("report_dir") else ""
    raise DataError(f"{skipped} of {total} samples skipped ({skipped / total:.1%}), more than "
                    f"data.max_bad_fraction={limit}: {common}{example_text}{where}")


# ---- per-sample work (runs in Ray tasks or locally) ------------------------------------------------


def _rows_for_item(item: dict, spec: ClipSpec, report_dir: str, token: str) -> list[dict]:
    sample = Sample(**json.loads(item["sample"]))
    return _rows_or_record(sample, spec, report_dir, token)


def _rows_or_record(sample: Sample, spec: ClipSpec, report_dir: str, token: str) -> list[dict]:
    """The sample's clip rows; on any failure, [] and a skip record (never an exception)."""
    try:
        return sample_clips(sample, spec)
    except BadSample as e:
        reason, detail = e.reason, e.detail
    except Exception as e:  # a bug or an unforeseen input: skipped and reported, still not fatal
        log.warning("unexpected error on %s", sample.uri, exc_info=True)
        reason, detail = f"unexpected {type(e).__name__}", f"{sample.uri}: {e}"[:500]
    record = {"uri": sample.uri, "reason": reason, "detail": detail, "token": token}
    name = hashlib.blake2b(sample.uri.encode("utf-8"), digest_size=10).hexdigest() + ".json"
    storage.write_json(storage.join(report_dir, name), record)
    return []


def sample_clips(sample: Sample, spec: ClipSpec) -> list[dict]:
    """Rows for one sample; raises BadSample when it is unusable."""
    rng = sample_rng(spec.seed, spec.epoch, 0, sample.uri) if spec.train else None
    if sample.meta.get("layout") == "shards":
        return _shard_clips(sample, spec, rng)
    prompt = resolve_prompt(sample, spec.default_prompt)
    if sample.frame_uris is not None:
        return _frame_folder_clips(sample, prompt, spec, rng)
    return _video_clips(sample, prompt, spec, rng)


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
    target = spec.target(*_header_size(blobs[wanted[0]], frame_uris[wanted[0]]))
    # JPEG draft decoding (when frames are >= 2x the target) needs one format per folder, or
    # drafted and full-size frames of the same source size would no longer stack.
    single_format = len({frame_uris[i].rpartition(".")[2].lower() for i in wanted}) == 1
    frames = _decode_all(blobs, [frame_uris[i] for i in wanted], (target[1], target[0]) if single_format else None)
    rows = []
    for start in starts:
        clip = np.stack([frames[start + i * stride] for i in range(spec.num_frames)])
        rows.append(_row(sample.uri, start, prompt, source_fps / stride, stride,
                         resize_cover_crop(clip, *target, rng)))
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
            rows.append(_row(sample.uri, start, prompt, clip_fps, stride, resize_cover_crop(clip, *target, rng)))
        return rows
    except DataError as e:
        text = str(e) if str(e).startswith(sample.uri) else f"{sample.uri}: {e}"
        raise BadSample("unreadable video", text) from e


def _shard_clips(sample: Sample, spec: ClipSpec, rng) -> list[dict]:
    """Clips from one packed clip: re-windowed and resized only when the request differs from the pack."""
    try:
        record = read_shard_clip(sample.meta["shard"], int(sample.meta["row"]))
    except StorageError as e:
        raise BadSample("unreadable object", str(e)) from e
    except Exception as e:  # ArrowInvalid and friends: a damaged shard
        raise BadSample("corrupt shard", f"{sample.uri}: {e}"[:500]) from e
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
                   record["prompt"] or spec.default_prompt, float(record["fps"]) / stride, packed_stride * stride,
                   resize_cover_crop(clip, *target, rng))
        if start == 0:
            row["clip_id"] = record["clip_id"]
        rows.append(row)
    return rows


def _row(source_uri: str, start: int, prompt: str, fps: float, stride: int, frames_fhwc: np.ndarray) -> dict:
    return {
        "frames": frames_fhwc,
        "prompt": prompt,
        "fps": float(fps),
        "clip_id": f"{source_uri}#{start}",
        "source_uri": source_uri,
        "start_frame": int(start),
        "stride": int(stride),
        "bucket": bucket_name(frames_fhwc.shape[1:3]),
    }


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except StorageError as e:
        raise BadSample("unreadable object", str(e)) from e
