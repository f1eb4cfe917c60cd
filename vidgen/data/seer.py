"""The `sthv2` layout: the frame trees of Seer's README (shared/seeds/seer.md), told apart by shape.

  Something-Something v2   <root>/rawframes/<id>/img_00001.jpg ...  + <root>/annotations/*.json
                           (lists of {"id", "label", "template", ...}); the prompt is `label`, else
                           `template` without its brackets. Entries with neither (test.json) are not
                           training samples and are left out; a rawframes folder that no annotation
                           names is a sample with a missing prompt (skipped and reported). Without
                           rawframes/, videos/<id>.mp4|webm are read instead.
  Bridge                   <root>/rawframes/<task>/<n>/img_00001.jpg ... (no annotations/); the
                           prompt is the task folder name, as Seer builds it: "_distractors"
                           dropped, "_" and "-" as spaces.
  Epic-Kitchens            <root>/<P01>/rgb_frames/<P01_01>/frame_0000000001.jpg ...; with an
                           EPIC-100 narration CSV anywhere under the root (participant_id, video_id,
                           narration, start_frame, stop_frame) each narration is a sample over its
                           frame range, prompted by the narration; without one, each video folder
                           is a sample with the default prompt.
Frames always play in natural (numeric) order; the frame rate is `data.source_fps` (set it to the
rate the frames were extracted at: 12 for sthv2's webm videos).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re

from vidgen import storage
from vidgen.data.decode import natural_key
from vidgen.data.listing import LayoutOptions, Listing, Sample
from vidgen.errors import DataError

log = logging.getLogger(__name__)

EXPECTED = ("Seer's trees: rawframes/<id>/img_*.jpg + annotations/*.json (Something-Something v2), "
            "rawframes/<task>/<n>/img_*.jpg (Bridge), or <P>/rgb_frames/<video>/frame_*.jpg (Epic-Kitchens)")
_NARRATION_FIELDS = ("video_id", "narration", "start_frame", "stop_frame")
_DIGITS = re.compile(r"(\d+)")


def detect(listing: Listing) -> bool:
    rels = listing.frame_dir_rels()
    if any(r.startswith("rawframes/") or "rgb_frames" in r.split("/")[:-1] for r in rels):
        return True
    has_videos = listing.num_videos > 0 and any(listing.rel(v).startswith("videos/") for v in listing.videos)
    return has_videos and bool(_annotation_files(listing))


def seer_samples(listing: Listing, options: LayoutOptions) -> list[Sample]:
    if _annotation_files(listing):
        return _sthv2(listing)
    if any("rgb_frames" in listing.rel(d).split("/")[:-1] for d in listing.frame_dirs):
        return _epic(listing)
    return _bridge(listing)


def _sorted_frames(frames: list[str]) -> list[str]:
    return sorted(frames, key=lambda u: natural_key(u.rpartition("/")[2]))


# ---- Something-Something v2 ------------------------------------------------------------------------


def _annotation_files(listing: Listing) -> list[str]:
    return sorted(u for u in listing.files if re.fullmatch(r"annotations/[^/]+\.json", listing.rel(u)))


def read_annotations(listing: Listing) -> tuple[dict[str, str], set[str]]:
    """(id -> prompt, ids listed without label or template) over every annotations/*.json list.

    Files that are not lists of objects with an "id" (sthv2's labels.json maps templates to class
    numbers) are ignored; a file that is not JSON at all is a DataError naming it.
    """
    prompts: dict[str, str] = {}
    unlabelled: set[str] = set()
    for uri in _annotation_files(listing):
        try:
            entries = json.loads(storage.read_bytes(uri).decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{uri}: not a UTF-8 JSON file ({e})") from e
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
            log.debug("%s: not a list of {id, label} objects; ignored", uri)
            continue
        for entry in entries:
            key = str(entry["id"])
            text = str(entry.get("label") or "").strip()
            if not text and entry.get("template"):
                text = re.sub(r"[\[\]]", "", str(entry["template"])).strip()
            if text:
                prompts[key] = text
            else:
                unlabelled.add(key)
    return prompts, unlabelled - set(prompts)


def _sthv2(listing: Listing) -> list[Sample]:
    prompts, unlabelled = read_annotations(listing)
    found: dict[str, tuple[str, list[str] | None]] = {}  # id -> (uri, frames or None for a video)
    for folder, frames in listing.frame_dirs.items():
        rel = listing.rel(folder)
        if rel.startswith("rawframes/"):
            found[rel.removeprefix("rawframes/")] = (folder, _sorted_frames(frames))
    if not found:
        for uri in listing.videos:
            rel = listing.rel(uri)
            if rel.startswith("videos/"):
                found[rel.removeprefix("videos/").rpartition(".")[0]] = (uri, None)
    samples = []
    for key, (uri, frames) in found.items():
        if key in unlabelled:
            continue  # the unlabelled test split: nothing to train on
        samples.append(Sample(
            uri=uri, frame_uris=frames, prompt=prompts.get(key), prompt_uri=None,
            meta={"layout": "sthv2", "dataset": "sthv2", "name": key, "id": key, "prompt_required": True,
                  "missing_prompt": f"id {key!r} has no label in annotations/*.json"},
        ))
    log.info("sthv2: %d samples, %d annotated ids without frames", len(samples),
             len(set(prompts) - set(found)))
    return samples


# ---- Bridge ----------------------------------------------------------------------------------------


def bridge_prompt(task: str) -> str:
    return re.sub(r"\s+", " ", task.replace("_distractors", "").replace("_", " ").replace("-", " ")).strip()


def _bridge(listing: Listing) -> list[Sample]:
    samples = []
    for folder, frames in listing.frame_dirs.items():
        rel = listing.rel(folder)
        if not rel.startswith("rawframes/"):
            continue
        task = rel.split("/")[1]
        samples.append(Sample(
            uri=folder, frame_uris=_sorted_frames(frames), prompt=bridge_prompt(task) or None,
            prompt_uri=None,
            meta={"layout": "sthv2", "dataset": "bridge", "name": rel, "prompt_required": True,
                  "missing_prompt": f"task folder name {task!r} gives no prompt"},
        ))
    return samples


# ---- Epic-Kitchens ---------------------------------------------------------------------------------


def _frame_number(uri: str) -> int:
    digits = _DIGITS.findall(uri.rpartition("/")[2])
    return int(digits[-1]) if digits else -1


def _narrations(listing: Listing) -> list[dict]:
    """Rows of every CSV under the root whose header has the EPIC-100 narration columns."""
    rows = []
    for uri in sorted(u for u in listing.files if u.lower().endswith(".csv")):
        try:
            text = storage.read_bytes(uri).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        reader = csv.DictReader(io.StringIO(text))
        if not set(_NARRATION_FIELDS) <= set(reader.fieldnames or ()):
            continue
        for lineno, row in enumerate(reader, 2):
            try:
                rows.append({"video_id": row["video_id"].strip(),
                             "narration": (row["narration"] or "").strip(),
                             "start": int(row["start_frame"]), "stop": int(row["stop_frame"]),
                             "id": (row.get("narration_id") or "").strip()})
            except (TypeError, ValueError) as e:
                raise DataError(f"{uri}:{lineno}: start_frame/stop_frame must be integers ({e})") from e
    return rows


def _epic(listing: Listing) -> list[Sample]:
    videos = {}  # video_id -> (folder URI, rel, [(frame number, uri)] sorted)
    for folder, frames in listing.frame_dirs.items():
        rel = listing.rel(folder)
        if "rgb_frames" in rel.split("/")[:-1]:
            videos[rel.rpartition("/")[2]] = (folder, rel, sorted((_frame_number(u), u) for u in frames))
    narrations = _narrations(listing)
    if not narrations:
        return [Sample(uri=folder, frame_uris=[u for _, u in numbered], prompt=None, prompt_uri=None,
                       meta={"layout": "sthv2", "dataset": "epic-kitchens", "name": rel,
                             "prompt_required": False})
                for folder, rel, numbered in videos.values()]
    samples, missing = [], 0
    for row in narrations:
        if row["video_id"] not in videos:
            missing += 1
            continue
        folder, rel, numbered = videos[row["video_id"]]
        tag = row["id"] or f"{row['start']}-{row['stop']}"
        samples.append(Sample(
            uri=f"{folder}#{tag}",
            frame_uris=[u for n, u in numbered if row["start"] <= n <= row["stop"]],
            prompt=row["narration"] or None, prompt_uri=None,
            meta={"layout": "sthv2", "dataset": "epic-kitchens", "name": f"{rel}#{row['start']:010d}",
                  "prompt_required": True, "first_frame": row["start"],
                  "missing_prompt": f"narration {tag} is empty"},
        ))
    if missing:
        log.info("epic-kitchens: %d narrations name videos that are not under %s", missing, listing.root)
    return samples
