"""`vidgen prepare opv2v`: cut OPV2V camera sequences into Hotshot-XL scene folders.

`prepare_opv2v` lists the OpenCOOD tree through the `opv2v` layout (vidgen.data.layouts,
vidgen.data.opv2v), cuts each CAV's camera sequence into clips of min_seconds..max_seconds and writes
them as Hotshot-XL scene folders (`0.jpg ... n-1.jpg` + `prompt.txt`), as the Hotshot-XL-OPV2V seed
did; see its docstring for the names, atomicity and resume rules. Nothing in the layout modules
imports this one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from vidgen import storage
from vidgen.data.clips import frame_stride
from vidgen.data.decode import decode_image
from vidgen.data.layouts import FPS_FILE, list_samples
from vidgen.data.listing import DEFAULT_PROMPT_TEMPLATE
from vidgen.data.opv2v import OPV2V_FPS
from vidgen.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)


def contiguous_runs(timestamps: list[int], max_gap_factor: float = 1.5) -> list[tuple[int, int]]:
    """[start, stop) index ranges of `timestamps` without a gap: a step above max_gap_factor times
    the median step means missing frames, and a clip across it would jump."""
    if len(timestamps) < 3:
        return [(0, len(timestamps))] if timestamps else []
    steps = np.diff(np.asarray(timestamps))
    limit = max_gap_factor * float(np.median(steps))
    cuts = [i + 1 for i, step in enumerate(steps) if step > limit]
    bounds = [0, *cuts, len(timestamps)]
    return list(zip(bounds[:-1], bounds[1:]))


def cut_clips(num_frames: int, min_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering `num_frames` with as few clips of at most max_frames as possible,
    of near-equal lengths (52 frames at max 50 -> 26 + 26, not 50 + 2); ranges under min_frames are
    dropped (only possible when the whole run is that short, or min_frames > max_frames / 2)."""
    if num_frames < max(1, min_frames):
        return []
    k = math.ceil(num_frames / max_frames)
    bounds = [round(i * num_frames / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= min_frames]


def prepare_opv2v(
    root: str,
    out: str,
    *,
    camera: int = 0,
    min_seconds: float = 2.0,
    max_seconds: float = 5.0,
    fps: float | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    quality: int = 95,
    workers: int = 4,
) -> dict:
    """Write `camera` clips of min_seconds..max_seconds from the OPV2V tree at `root` under `out`.

    Maps 1:1 to `vidgen prepare opv2v ROOT --out URI [--camera K] [--min-seconds S] [--max-seconds S]
    [--fps F] [--prompt-template T]`. fps: output frame rate; frames are strided from 10 Hz
    (None keeps all of them). Each CAV sequence is split at timestamp gaps, then cut into clips of
    near-equal length. A clip is written to
        <out>/<split>/<scenario>_cav<cav>_camera<k>_<first timestamp>/{0..n-1}.jpg + prompt.txt
    (JPEG at `quality`, frames converted to RGB). Local clips appear atomically as whole folders;
    on object storage prompt.txt is written last and marks the clip complete. A rerun skips clips
    whose prompt.txt exists, so an interrupted prepare resumes. A clip with an unreadable frame is
    skipped and listed under "bad". Returns {clips, written, existing, too_short, bad, out}.
    """
    if not 0 < min_seconds <= max_seconds:
        raise ConfigError(f"prepare opv2v: need 0 < min_seconds <= max_seconds, got {min_seconds}, "
                          f"{max_seconds}")
    if fps is not None and not fps > 0:
        raise ConfigError(f"prepare opv2v fps: must be > 0 or unset, got {fps}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"prepare opv2v quality: expected 1-100, got {quality}")
    stride = frame_stride(OPV2V_FPS, fps)
    out_fps = OPV2V_FPS / stride
    min_frames = math.ceil(min_seconds * out_fps - 1e-9)
    max_frames = math.floor(max_seconds * out_fps + 1e-9)
    if max_frames < 1:
        raise ConfigError(f"prepare opv2v: max_seconds={max_seconds} holds no frame at {out_fps} fps")

    samples = list_samples(root, "opv2v", camera=camera, prompt_template=prompt_template)
    _record_fps(out, out_fps)
    done = _complete_clips(out)
    jobs, too_short = [], 0
    for sample in samples:
        ts, uris = sample.meta["timestamps"], sample.frame_uris or []
        for a, b in contiguous_runs(ts):
            run = list(range(a, b, stride))  # indices into the sequence, strided to the output fps
            ranges = cut_clips(len(run), min_frames, max_frames)
            if run and not ranges:
                too_short += 1
            for lo, hi in ranges:
                picked = run[lo:hi]
                name = f"{sample.meta['scenario']}_cav{sample.meta['cav']}_camera{camera}_{ts[picked[0]]:06d}"
                clip_uri = storage.join(out, sample.meta["split"], name) if sample.meta["split"] else \
                    storage.join(out, name)
                jobs.append((clip_uri, [uris[i] for i in picked], sample.prompt or ""))
    pending = [j for j in jobs if j[0].rstrip("/") not in done]
    bad: list[dict] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes/encodes without holding the GIL
        for error in pool.map(lambda job: _write_clip(*job, quality=quality), pending):
            if error is not None:
                bad.append(error)
    log.info("prepare opv2v: %d clips (%d written, %d already there, %d bad) from %d sequences under %s",
             len(jobs), len(pending) - len(bad), len(jobs) - len(pending), len(bad), len(samples), out)
    return {"clips": len(jobs), "written": len(pending) - len(bad), "existing": len(jobs) - len(pending),
            "too_short": int(too_short), "bad": bad, "fps": out_fps, "out": out}


def _record_fps(out: str, fps: float) -> None:
    """<out>/fps.json: the clips' frame rate, which the frame layouts read (else they assume data.source_fps)."""
    uri = storage.join(out, FPS_FILE)
    if storage.exists(uri):
        previous = json.loads(storage.read_text(uri)).get("fps")
        if previous != fps:
            raise ConfigError(f"prepare opv2v --fps: {out} holds clips at {previous} fps ({uri}), these would be "
                              f"{fps:g} fps; prepare into a new --out")
        return
    storage.makedirs(out)
    storage.write_json(uri, {"fps": fps})


def _complete_clips(out: str) -> set[str]:
    """Clip folders under `out` that already hold prompt.txt (written last, so they are complete)."""
    try:
        files = storage.walk_files(out) if storage.exists(out) else []
    except StorageError:
        return set()
    return {u.rpartition("/")[0].rstrip("/") for u in files if u.endswith("/prompt.txt")}


def _write_clip(clip_uri: str, frame_uris: list[str], prompt: str, quality: int) -> dict | None:
    """Write one clip; a bad frame skips the clip and comes back as {uri, reason, detail}."""
    try:
        encoded = [_to_jpeg(storage.read_bytes(u), u, quality) for u in frame_uris]
    except (DataError, StorageError) as e:
        reason = "corrupt image" if isinstance(e, DataError) else "unreadable object"
        return {"uri": clip_uri, "reason": reason, "detail": str(e)}
    files = [(f"{i}.jpg", data) for i, data in enumerate(encoded)]
    files.append(("prompt.txt", (prompt + "\n").encode()))
    if storage.local_path(clip_uri) is not None:
        with storage.atomic_local(clip_uri) as tmp:  # the whole folder appears at once
            _write_files(tmp, files)
    else:
        for name, data in files:  # prompt.txt last: it marks the clip complete
            storage.write_bytes(storage.join(clip_uri, name), data)
    return None


def _write_files(folder: str, files: list[tuple[str, bytes]]) -> None:
    os.makedirs(folder)
    for name, data in files:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def _to_jpeg(data: bytes, name: str, quality: int) -> bytes:
    rgb = decode_image(data, name)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
