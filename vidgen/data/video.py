"""Video files with PyAV: write mp4 atomically, read a strided clip by seeking, probe cheaply.

Shapes: T frames, H/W pixels; frames are uint8 [T, H, W, 3] RGB.

Every path goes through `vidgen.storage`, so a URI may be local or remote (s3://...). Remote videos
are read into memory once: clips are short and PyAV seeks within the buffer.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from vidgen import storage
from vidgen.errors import DataError

if TYPE_CHECKING:
    import av

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi")

VideoSource = str | bytes

# Frames larger than this are refused before any pixel is decoded: one 8192x8192 RGB frame is 192 MiB, and a
# clip of them would exhaust a worker. Real footage is far smaller (8K UHD is 7680x4320, half of this).
MAX_FRAME_PIXELS = 8192 * 8192


def write_video(uri: str, frames_thwc: np.ndarray, fps: float, keyframe_interval: int | None = None) -> str:
    """Write uint8 [T, H, W, 3] frames as an mp4 at `uri`; a killed writer leaves no partial file.

    H.264 (libx264) when this PyAV build has it, else MPEG-4 part 2; yuv420p so every player can
    open it. The same frames always give the same file. yuv420p needs even sizes, so an odd height or
    width is padded by repeating the last row/column (the file is then one pixel larger than the input).
    keyframe_interval: frames between keyframes (None: the codec default, 250 for x264); short intervals
    make clip reads seek faster.
    Returns `uri`.
    """
    frames = np.asarray(frames_thwc)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise DataError(f"{uri}: write_video expects uint8 [T, H, W, 3] with T >= 1, "
                        f"got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise DataError(f"{uri}: write_video fps must be > 0, got {fps}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    codec = _encoder()
    import av  # lazy: heavy; planning and model code import vidgen.data without PyAV

    with storage.atomic_local(uri, ".mp4") as path, av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        if keyframe_interval:
            stream.codec_context.gop_size = keyframe_interval
        if codec == "libx264":
            # mbtree=0: x264's macroblock-tree rate control made the same frames encode to different files from
            # run to run (2 to 24 distinct decodes in 30 encodes of small noisy clips); off, every encode is the
            # same, at the same size and PSNR (within 0.3% and 0.02 dB on 512x320x25)
            stream.options = {"crf": "17", "preset": "veryfast", "x264-params": "mbtree=0"}
        else:  # mpeg4's default bit rate smears frames: fixed quantiser 2 (near-lossless) instead
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 2 * 118  # 118 = FF_QP2LAMBDA
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    return uri


def read_video(
    source: VideoSource, start: int = 0, count: int | None = None, stride: int = 1
) -> tuple[np.ndarray, float]:
    """Frames start, start+stride, ... (at most `count`) as uint8 [T, H, W, 3], and their fps.

    The returned fps is that of the returned frames: source fps / stride. Seeks to the keyframe
    before `start` instead of decoding from the beginning; frame indices come from timestamps, so a
    seek that lands late (broken index) is detected and redone from the start. Fewer than `count`
    frames come back when the video ends first. Corrupt or unreadable input raises DataError.
    """
    if start < 0 or stride < 1 or (count is not None and count < 0):
        raise ValueError(f"need start >= 0, stride >= 1, count >= 0; got {start}, {stride}, {count}")
    name = _name(source)
    with _open(source) as container:
        stream = container.streams.video[0]
        fps = _fps(stream, name)
        frames = _decode(container, stream, fps, start, count, stride, seek=start > 0)
        if frames is None:  # the seek overshot `start`: decode from the beginning instead
            container.seek(0)
            frames = _decode(container, stream, fps, start, count, stride, seek=False)
        if not frames:
            h, w = stream.codec_context.height, stream.codec_context.width
            return np.zeros((0, h, w, 3), dtype=np.uint8), fps / stride
        return np.stack(frames), fps / stride


def probe_video(source: VideoSource) -> tuple[int, float, int, int]:
    """(num_frames, fps, height, width) without decoding pixels.

    The frame count comes from the container header when it has one (mp4, mov), else from counting
    packets (webm, mkv, gif), which reads the file but decodes nothing.
    """
    name = _name(source)
    with _open(source) as container:
        stream = container.streams.video[0]
        fps = _fps(stream, name)
        num_frames = stream.frames
        if not num_frames:
            num_frames = sum(1 for p in container.demux(stream) if p.size)
        return int(num_frames), fps, stream.codec_context.height, stream.codec_context.width


def _decode(container, stream, fps: float, start: int, count: int | None, stride: int,
            seek: bool) -> list[np.ndarray] | None:
    """Decode the wanted frames; None when a seek landed after `start`."""
    t0 = stream.start_time or 0
    if seek:
        target = t0 + int(start / fps / stream.time_base)
        container.seek(target, stream=stream, backward=True, any_frame=False)
    out: list[np.ndarray] = []
    if count == 0:
        return out
    counter = -1
    first = True
    for frame in container.decode(stream):
        counter += 1
        if frame.pts is None:
            if seek:  # no timestamps: positions after a seek are unknowable
                return None
            index = counter
        else:
            index = round(float((frame.pts - t0) * stream.time_base) * fps)
        if first and seek and index > start:
            return None
        first = False
        if index < start or (index - start) % stride:
            continue
        out.append(frame.to_ndarray(format="rgb24"))
        if count is not None and len(out) >= count:
            break
    return out


@contextlib.contextmanager
def _open(source: VideoSource) -> Iterator[av.container.InputContainer]:
    """Open a local path, a remote URI (read into memory) or bytes; map every failure to DataError."""
    import av  # lazy: heavy; planning and model code import vidgen.data without PyAV

    name = _name(source)
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            target = io.BytesIO(bytes(source))
        elif storage.is_remote(source):
            target = io.BytesIO(storage.read_bytes(source))
        else:
            target = storage.local_path(source)
        with av.open(target, mode="r") as container:
            if not container.streams.video:
                raise DataError(f"{name}: no video stream")
            ctx = container.streams.video[0].codec_context
            if ctx.width * ctx.height > MAX_FRAME_PIXELS:
                raise DataError(f"{name}: {ctx.width}x{ctx.height} video frames are larger than vidgen decodes "
                                f"(at most {MAX_FRAME_PIXELS} pixels, 8192x8192)")
            yield container
    except DataError:
        raise
    except Exception as e:  # av.error.FFmpegError, StorageError, OSError, EOFError...
        text = str(e).strip() or type(e).__name__
        raise DataError(f"{name}: cannot read video: {text[:200]}") from e


def _fps(stream, name: str) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise DataError(f"{name}: video stream has no frame rate")
    return float(rate)


def _encoder() -> str:
    import av  # lazy: heavy; planning and model code import vidgen.data without PyAV

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except ValueError:  # UnknownCodecError: this PyAV/FFmpeg build has no x264 encoder
        return "mpeg4"


def _name(source: VideoSource) -> str:
    return source if isinstance(source, str) else f"<{len(source)} bytes of video>"
