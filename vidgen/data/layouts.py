"""Sample discovery: turn a dataset root (local or any storage URI) into a `SampleTable` of `Sample`s.

A layout is a function from one recursive listing of the root to samples. The listing is taken once
(os.scandir locally; on object storage the top-level prefixes listed in parallel, never one request
per frame) and kept grouped by folder without a URI per file; nothing is decoded here: prompts in
per-sample files are read later by the data workers, which also judge whether a sample is usable.
The frame-folder layouts build their table straight from the grouped listing (a million folders of
8 frames list in well under 2 minutes and 1 GiB); the others build `Sample`s and a table of them.

Layouts:
  hotshot  root/<sample>/<n>.jpg|png + prompt.txt (Hotshot-XL, Hotshot-XL-OPV2V scene folders);
           the prompt is required.
  frames   root/<video>/<frames> at any depth (SVD_Xtend, BDD100K frames); prompt from prompt.txt
           beside the frames, else a prompts.csv / prompts.jsonl sidecar at the root keyed by
           folder, else the default prompt.
  videos   video files anywhere under root; prompt from <stem>.txt beside the video, else the sidecar.
  opv2v    the OpenCOOD tree {split}/{scenario}/{cav}/{timestamp}_camera{k}.png (vidgen.data.opv2v).
  sthv2    Seer's trees: Something-Something v2 rawframes + annotations/*.json, Bridge rawframes,
           Epic-Kitchens rgb_frames (+ narration CSV) (vidgen.data.seer).
  shards   parquet shards written by `vidgen prepare pack`, one sample per clip (vidgen.data.shards).
A layout is a builder `(Listing, LayoutOptions) -> [Sample] | SampleTable` registered in LAYOUTS.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable

import numpy as np

from vidgen import storage
from vidgen.data import opv2v, seer, shards
from vidgen.data.decode import natural_key, natural_order
from vidgen.data.listing import (
    DEFAULT_PROMPT_TEMPLATE,
    LayoutOptions,
    Listing,
    Sample,
    SampleTable,
    Strings,
    encode_codes,
    offsets_of,
)
from vidgen.data.video import VIDEO_SUFFIXES
from vidgen.errors import DataError

log = logging.getLogger(__name__)

PROMPT_FILE = "prompt.txt"
FPS_FILE = "fps.json"
SIDECARS = ("prompts.jsonl", "prompts.csv")
_KEY_FIELDS = ("name", "video", "folder", "path", "id", "file")
_PROMPT_FIELDS = ("prompt", "caption", "text")


def scan(root: str) -> Listing:
    """List `root` recursively once; DataError when it is missing or holds no files."""
    if not storage.exists(root):
        raise DataError(f"{root}: dataset root does not exist")
    tree = storage.walk_tree(root)
    if not len(tree):
        raise DataError(f"{root}: dataset root is empty; {_EXPECTED}")
    return Listing(root, tree)


def detect_layout(root: str, listing: Listing | None = None) -> str:
    """Pick the layout from what the root holds (see the module docstring).

    Dataset trees with a signature go first (parquet shards only; OPV2V's `<t>_camera<k>` names;
    Seer's rawframes/ or rgb_frames/ trees); then videos vs frame folders by majority, and hotshot
    when most frame folders carry prompt.txt.
    """
    listing = listing or scan(root)
    for name, detect in (("shards", shards.detect), ("opv2v", opv2v.detect), ("sthv2", seer.detect)):
        if detect(listing):
            return name
    n_dirs, n_videos = listing.num_frame_dirs, listing.num_videos
    if n_dirs == 0 and n_videos == 0:
        raise DataError(f"{root}: no frame folders or video files found; {_EXPECTED}")
    if n_videos > n_dirs:
        return "videos"
    # Hotshot when most frame folders carry prompt.txt; the rest then show up as "missing prompt"
    # in the skip report instead of silently training on an empty prompt.
    with_prompt = int(listing.prompt_dirs(PROMPT_FILE)[listing.frame_dir_ids].sum())
    return "hotshot" if 2 * with_prompt >= n_dirs else "frames"


def list_samples(root: str, layout: str = "auto", *, camera: int = 0,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> SampleTable:
    """All samples under `root`, sorted naturally by their path relative to the root, as a `SampleTable`
    (`table[i]` is a `Sample`).

    camera, prompt_template: see `LayoutOptions` (only the opv2v layout uses them).
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise DataError(f"{root}: unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    options = LayoutOptions(camera=camera, prompt_template=prompt_template)
    listing = scan(root)
    if layout == "auto":
        layout = detect_layout(root, listing)
        log.info("%s: detected layout %r", root, layout)
    samples = LAYOUTS[layout](listing, options)
    if not len(samples):
        expected = _EXPECTS.get(layout, layout)
        raise DataError(f"{root}: layout {layout!r} found no samples; expected {expected} "
                        f"(found {listing.num_frame_dirs} frame folders, {listing.num_videos} videos)")
    if isinstance(samples, SampleTable):  # built in order
        return samples
    return SampleTable.from_samples(sorted(samples, key=lambda s: natural_key(s.meta.get("name", s.uri))))


def _frame_samples(listing: Listing, layout: str, required: bool) -> SampleTable:
    """One sample per folder holding images, built from the grouped listing's columns (no URI per frame)."""
    tree = listing.tree
    sidecar = {} if required else read_sidecar(listing)
    prompted = listing.prompt_dirs(PROMPT_FILE)
    dirs = _sample_dirs(listing, prompted)
    names = [tree.dirs[d] or listing.rel(tree.dir_uri(d)) or tree.dir_uri(d).rstrip("/").rpartition("/")[2]
             for d in dirs.tolist()]
    order = np.array(natural_order(names), dtype=np.int64)
    dirs, names = dirs[order], [names[i] for i in order.tolist()]
    del order
    # the image files, grouped by sample (in sample order), each folder's in natural order of their names
    position = np.full(len(tree.dirs), -1, dtype=np.int32)
    position[dirs] = np.arange(len(dirs), dtype=np.int32)
    images = listing.is_image[tree.codes]
    owner, codes = position[listing.file_dirs[images]], tree.codes[images]
    del images
    rank = np.zeros(len(tree.names), dtype=np.int32)
    image_codes = np.flatnonzero(listing.is_image)
    rank[image_codes[natural_order([tree.names[c] for c in image_codes.tolist()])]] = np.arange(len(image_codes))
    frame_codes = codes[np.lexsort((rank[codes], owner))]
    frame_counts = np.bincount(owner, minlength=len(dirs))
    del owner, codes
    # a folder's URI is the root's + its relative name (as tree.dir_uri spells it), but for the root itself
    prefix, name_column = storage.join(tree.uri, "x")[:-1], Strings.of(names)
    if "" in (tree.dirs[d] for d in dirs.tolist()):
        uris = Strings.of([prefix + tree.dirs[d] if tree.dirs[d] else tree.dir_uri(d) for d in dirs.tolist()])
    else:
        uris = name_column.with_prefix(prefix)  # the same bytes as the names
    prompts, prompt_vocab = encode_codes(_lookup(sidecar, n) for n in names) if sidecar else \
        (np.full(len(names), -1, dtype=np.int32), [])
    with_prompt = prompted[dirs]
    return SampleTable(
        uris=uris, names=name_column,
        frame_offsets=offsets_of(frame_counts), frame_codes=frame_codes, frame_vocab=tree.names,
        has_frames=np.ones(len(dirs), bool), frames_relative=True, prompts=prompts, prompt_vocab=prompt_vocab,
        prompt_uris=np.where(with_prompt, 0, -1).astype(np.int32), prompt_uri_vocab=[f"/{PROMPT_FILE}"],
        prompt_uri_relative=True, meta={"layout": layout, "name": None, "prompt_required": required,
                                        **_root_fps(listing)})


def _sample_dirs(listing: Listing, prompted: np.ndarray) -> np.ndarray:
    """The folders holding images, and those that should but hold none (the skip report lists them as "no
    frames"): a folder with a prompt.txt (`prompted`) and no image, or an empty folder as deep as a frame folder."""
    tree, frame_dirs = listing.tree, listing.frame_dir_ids
    framed = np.zeros(len(tree.dirs), bool)
    framed[frame_dirs] = True
    empty = np.diff(tree.offsets) == 0
    frameless = prompted & ~framed
    if not frame_dirs.size or not (empty.any() or frameless.any()):
        return frame_dirs
    depths, parents = set(), {""}  # the root, and a folder holding frame folders, is never a sample of its own
    for d in frame_dirs.tolist():
        rel = tree.dirs[d]
        if rel:
            depths.add(rel.count("/"))
        while "/" in rel and (rel := rel.rpartition("/")[0]) not in parents:
            parents.add(rel)
    for d in np.flatnonzero(empty).tolist():
        frameless[d] = tree.dirs[d].count("/") in depths
    frameless[[d for d in np.flatnonzero(frameless).tolist() if tree.dirs[d] in parents]] = False
    return np.union1d(frame_dirs, np.flatnonzero(frameless))


def _root_fps(listing: Listing) -> dict:
    """{"fps": rate} from <root>/fps.json (written by `vidgen prepare opv2v`: frame folders that know their
    rate, which then wins over data.source_fps), else {}."""
    uri = listing.root_files().get(FPS_FILE)
    if uri is None:
        return {}
    try:
        fps = json.loads(storage.read_bytes(uri).decode("utf-8-sig"))["fps"]
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0:
            raise ValueError(fps)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{uri}: expected {{\"fps\": <frames per second > 0>}} ({e})") from e
    return {"fps": float(fps)}


def _hotshot(listing: Listing, options: LayoutOptions) -> SampleTable:
    return _frame_samples(listing, "hotshot", required=True)


def _frames(listing: Listing, options: LayoutOptions) -> SampleTable:
    return _frame_samples(listing, "frames", required=False)


def _videos(listing: Listing, options: LayoutOptions) -> list[Sample]:
    sidecar = read_sidecar(listing)
    samples = []
    for uri in listing.videos:
        name = listing.rel(uri) or uri.rpartition("/")[2]  # the root may be a single video file
        text_uri = uri.rpartition(".")[0] + ".txt"
        samples.append(Sample(
            uri=uri,
            frame_uris=None,
            prompt=_lookup(sidecar, name) or _lookup(sidecar, name.rpartition(".")[0]),
            prompt_uri=text_uri if text_uri in listing.files else None,
            meta={"layout": "videos", "name": name, "prompt_required": False},
        ))
    return samples


LAYOUTS: dict[str, Callable[[Listing, LayoutOptions], list[Sample] | SampleTable]] = {
    "hotshot": _hotshot,
    "frames": _frames,
    "videos": _videos,
    "opv2v": opv2v.opv2v_samples,
    "sthv2": seer.seer_samples,
    "shards": shards.shard_samples,
}
_EXPECTS = {
    "hotshot": f"folders <root>/<sample>/ holding numbered .jpg/.png frames and {PROMPT_FILE}",
    "frames": "folders <root>/<video>/ holding numbered image frames",
    "videos": f"video files ({' '.join(VIDEO_SUFFIXES)}) under the root",
    "opv2v": opv2v.EXPECTED,
    "sthv2": seer.EXPECTED,
    "shards": shards.EXPECTED,
}
_EXPECTED = "expected one of: " + "; ".join(f"{k}: {v}" for k, v in _EXPECTS.items())


def read_sidecar(listing: Listing) -> dict[str, str]:
    """name -> prompt from <root>/prompts.jsonl or <root>/prompts.csv ({} when neither exists).

    jsonl: one object a line with a key field (name/video/folder/path/id/file) and a prompt field
    (prompt/caption/text). csv: a header row naming such fields, or two columns name,prompt.
    A malformed sidecar fails the whole read: it is one file the user can fix, not a bad sample.
    """
    at_root = listing.root_files()
    for sidecar in SIDECARS:
        uri = at_root.get(sidecar)
        if uri is None:
            continue
        try:
            text = storage.read_bytes(uri).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        table = _parse_jsonl(uri, text) if sidecar.endswith(".jsonl") else _parse_csv(uri, text)
        return {_norm(k): v for k, v in table.items()}
    return {}


def _parse_jsonl(uri: str, text: str) -> dict[str, str]:
    table = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri}:{lineno}: not valid JSON ({e.msg})") from e
        key = _first(record, _KEY_FIELDS) if isinstance(record, dict) else None
        prompt = _first(record, _PROMPT_FIELDS) if isinstance(record, dict) else None
        if key is None or prompt is None:
            raise DataError(f"{uri}:{lineno}: expected an object with one of {_KEY_FIELDS} and one of "
                            f"{_PROMPT_FIELDS}")
        table[str(key)] = str(prompt)
    return table


def _parse_csv(uri: str, text: str) -> dict[str, str]:
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        return {}
    header = [c.strip().lower() for c in rows[0]]
    key_col, prompt_col = 0, 1
    if any(h in _PROMPT_FIELDS for h in header):  # a header row names the columns
        prompt_col = next(i for i, h in enumerate(header) if h in _PROMPT_FIELDS)
        key_col = next((i for i, h in enumerate(header) if h in _KEY_FIELDS), 1 if prompt_col == 0 else 0)
        rows = rows[1:]
    table = {}
    for row in rows:
        if len(row) <= max(key_col, prompt_col):
            raise DataError(f"{uri}: row {row!r} has {len(row)} columns; expected name,prompt")
        table[row[key_col].strip()] = row[prompt_col].strip()
    return table


def _first(record: dict, fields: tuple[str, ...]):
    return next((record[f] for f in fields if f in record), None)


def _lookup(sidecar: dict[str, str], name: str) -> str | None:
    """By relative path first, then by the last path component (prompts keyed by folder name)."""
    if not sidecar:
        return None
    name = _norm(name)
    return sidecar.get(name) or sidecar.get(name.rpartition("/")[2]) or None


def _norm(key: str) -> str:
    key = key.strip().strip("/")
    return key.removeprefix("./")
