"""OPV2V (OpenCOOD) camera frames: the `opv2v` layout, and `prepare_opv2v` into Hotshot scene folders.

Source tree (shared/reference/generation.md section 5):
    <root>/{train,validate,test,test_culvercity}/<scenario>/<cav_id>/<timestamp>_camera<k>.png
plus <timestamp>.pcd / .yaml and data_protocol.yaml, which are ignored here. Recorded at 10 Hz;
camera0 is the front camera. Timestamps are parsed as integers whatever their width (the docs show
`00069`, the annotation doc `000069`), and frames play in timestamp order, never in listing order.
The root may also be one split folder (then the split is "").

Prompts: `<root>/prompts.json` mapping "<split>/<scenario>" or "<scenario>" to a prompt, else
`prompt_template` formatted with {scenario}, {split}, {cav}.

`prepare_opv2v` cuts each CAV's camera sequence into clips of min_seconds..max_seconds and writes
them as Hotshot-XL scene folders (`0.jpg ... n-1.jpg` + `prompt.txt`), as the Hotshot-XL-OPV2V seed
did; see its docstring for the names, atomicity and resume rules.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from vidgen import storage
from vidgen.data.clips import frame_stride
from vidgen.data.decode import decode_image
from vidgen.data.listing import DEFAULT_PROMPT_TEMPLATE, LayoutOptions, Listing, Sample
from vidgen.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)

OPV2V_FPS = 10.0
PROMPTS_FILE = "prompts.json"
EXPECTED = "OpenCOOD folders <split>/<scenario>/<cav_id>/ holding <timestamp>_camera<k>.png frames"
_FRAME = re.compile(r"^(\d+)_camera(\d+)\.(?:png|jpe?g)$", re.IGNORECASE)


def detect(listing: Listing) -> bool:
    """True when most image files are named <timestamp>_camera<k>."""
    counts = listing.image_name_counts()  # name -> files: one regex match per distinct name
    total = sum(counts.values())
    return bool(total) and 2 * sum(n for name, n in counts.items() if _FRAME.match(name)) > total


def opv2v_samples(listing: Listing, options: LayoutOptions) -> list[Sample]:
    """One sample per (split, scenario, cav) folder: its `camera` frames in timestamp order."""
    prompts = _read_prompt_map(listing)
    samples = []
    for folder, frames in listing.frame_dirs.items():
        parsed = [(m, u) for u in frames if (m := _FRAME.match(u.rpartition("/")[2]))]
        if not parsed:
            continue  # not a camera folder (a stray image elsewhere in the tree)
        chosen = sorted((int(m.group(1)), u.rpartition("/")[2], u) for m, u in parsed
                        if int(m.group(2)) == options.camera)
        name = listing.rel(folder)
        parts = name.split("/")
        split, scenario, cav = "/".join(parts[:-2]), (parts[-2] if len(parts) > 1 else ""), parts[-1]
        prompt = prompts.get(f"{split}/{scenario}") or prompts.get(scenario)
        if prompt is None:
            prompt = options.prompt_template.format(scenario=scenario, split=split, cav=cav)
        samples.append(Sample(
            uri=folder,
            frame_uris=[u for _, _, u in chosen],  # empty when this CAV has no such camera: "too few frames"
            prompt=prompt,
            prompt_uri=None,
            meta={"layout": "opv2v", "name": name, "prompt_required": False, "fps": OPV2V_FPS,
                  "split": split, "scenario": scenario, "cav": cav, "camera": options.camera,
                  "timestamps": [t for t, _, _ in chosen]},
        ))
    return samples


def _read_prompt_map(listing: Listing) -> dict[str, str]:
    uri = next((u for u in listing.files if listing.rel(u) == PROMPTS_FILE), None)
    if uri is None:
        return {}
    try:
        table = json.loads(storage.read_bytes(uri).decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{uri}: not a UTF-8 JSON file ({e})") from e
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise DataError(f"{uri}: expected a JSON object mapping scenario (or split/scenario) to a prompt")
    return {str(k).strip("/"): v.strip() for k, v in table.items() if v.strip()}


# ---- prepare: camera sequences -> Hotshot scene folders --------------------------------------------


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
    from vidgen.data.layouts import list_samples  # layouts imports this module

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
