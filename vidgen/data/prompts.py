"""Prompt sources for generation: one row per prompt, then one row per (prompt, sample) with its seed and name.

Sources (generation.md 1.9, 2.1, 4.1-4.3, 5.3):
- jsonl: {"image", "prompt"?, "seed"?, "id"?} per line (the original vidgen format), image paths relative to the
  file;
- text: one prompt per non-blank line; with `augmented` (VBench augmented_prompts, line-aligned) the video is
  sampled with the augmented prompt and named by the original;
- vbench: VBench_full_info.json, filtered by dimension, duplicates merged (946 entries, 944 prompts);
- i2v: `image_path;prompt` lines split at the first `;` (a prompt may hold more), paths relative to the file;
- opv2v: a folder of scene folders (frames `N.jpg`/`N.png` + prompt.txt); the first frame conditions.

Files are UTF-8, with or without a byte-order mark. `auto` tells the formats apart by name (.jsonl, .json, a
folder) and a text file's lines (all `image.png;prompt`: i2v). Relative image paths resolve from the prompt
file's folder in every format, so a prompt file and its images move together.

A row: {id, prompt (names the video), sample_prompt (conditions the model), image (URI or ""), seed, vbench}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re

from vidgen import storage
from vidgen.data.decode import is_image_name, natural_key
from vidgen.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 240  # VBench prompts reach 210 bytes; "-{i}.json" still fits the usual 255-byte limit
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def _slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:limit]
    return s or "prompt"


def safe_stem(text: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file-name stem for `text`: itself when already safe (VBench prompts are), else a cleaned, shortened
    form plus `~` and 8 hex of the text's hash, so different texts never share a name. Never contains a path
    separator, never starts with '.', so `{stem}-{i}.mp4` stays inside the folder it is joined to."""
    clean = _UNSAFE.sub("_", text)
    if clean.startswith("."):
        clean = "_" + clean[1:]
    if clean == text and text and len(text.encode()) <= max_bytes:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    cut = clean.encode()[: max_bytes - 9].decode("utf-8", errors="ignore")
    return f"{cut}~{digest}"


def vbench_name(prompt: str, sample: int) -> str:
    """`{prompt}-{i}.mp4` (VBench's layout), with `safe_stem` applied to the prompt."""
    return f"{safe_stem(prompt)}-{sample}.mp4"


def _text(uri: str) -> str:
    return storage.read_text(uri).removeprefix("\ufeff")  # editors on Windows write a BOM


def _lines(uri: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(_text(uri).splitlines(), start=1) if line.strip()]


def _row(prompt: str, image: str = "", seed: int | None = None, id_: str | None = None,
         sample_prompt: str | None = None, vbench: bool = False) -> dict:
    return {"id": id_ or _slug(prompt), "prompt": prompt, "sample_prompt": prompt if sample_prompt is None
            else sample_prompt, "image": image, "seed": seed, "vbench": vbench}


def read_jsonl(uri: str) -> list[dict]:
    """Rows of a JSONL prompt file; each needs `image`. Defaults: seed = line number - 1, id from the image."""
    rows = []
    for n, line in _lines(uri):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri}:{n}: not a JSON object ({e.msg})") from None
        control = row.get("control") if isinstance(row, dict) else None
        if control is not None and (not isinstance(control, str) or not control):
            raise DataError(f"{uri}:{n}: \"control\" must be a frame folder or video path, got {json.dumps(control)}")
        if not isinstance(row, dict) or not (isinstance(row.get("image"), str) and row["image"] or control):
            raise DataError(f"{uri}:{n}: expected an object with an \"image\" URI (or, for ControlNet generation, "
                            f"a \"control\" clip), got {line[:80]}")
        prompt, seed = row.get("prompt", ""), row.get("seed", n - 1)
        if not isinstance(prompt, str) or isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            field = "prompt" if not isinstance(prompt, str) else "seed"
            want = "a string" if field == "prompt" else "an integer >= 0"
            raise DataError(f"{uri}:{n}: \"{field}\" must be {want}, got {json.dumps(row[field])[:80]}")
        stem = (row.get("image") or control).rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        id_ = str(row.get("id") or re.sub(r"[^A-Za-z0-9_.-]+", "_", stem))
        rows.append(_row(prompt, resolve_relative(row["image"], uri) if row.get("image") else "", seed, id_))
        if control:
            rows[-1]["control"] = resolve_relative(control, uri)
    return rows


def read_text(uri: str, augmented: str | None = None) -> list[dict]:
    prompts = [line for _, line in _lines(uri)]
    if not augmented:
        return [_row(p) for p in prompts]
    aug = [line for _, line in _lines(augmented)]
    if len(aug) != len(prompts):
        raise DataError(f"{augmented}: {len(aug)} prompts, expected one per prompt of {uri} ({len(prompts)}), "
                        "line-aligned")
    return [_row(p, sample_prompt=a, vbench=True) for p, a in zip(prompts, aug, strict=True)]


def read_vbench(uri: str, dimensions: list[str] | None = None) -> list[dict]:
    try:
        entries = json.loads(_text(uri))
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "prompt_en" in e for e in entries):
        raise DataError(f"{uri}: expected VBench_full_info.json: a list of {{prompt_en, dimension}} objects")
    known = {d for e in entries for d in e.get("dimension", [])}
    unknown = sorted(set(dimensions or []) - known)
    if unknown:
        raise ConfigError(f"generate.dimensions: {', '.join(unknown)} not in {uri}; known: {', '.join(sorted(known))}")
    keep = [e for e in entries if not dimensions or set(e.get("dimension", [])) & set(dimensions)]
    return [_row(e["prompt_en"], vbench=True) for e in keep]


def resolve_relative(uri: str, base_file: str) -> str:
    """`uri` as is when absolute or a URI, else relative to the folder of `base_file`, which it may not leave:
    a prompt file passed around with a benchmark must not reach files beside it (`../../home/...`) by itself;
    an absolute path or URI says so on purpose."""
    if storage.is_remote(uri) or uri.startswith("/") or "://" in uri:
        return uri
    if ".." in uri.replace("\\", "/").split("/"):
        raise DataError(f"{base_file}: image path {uri!r} leaves the prompt file's folder; give an absolute path "
                        "or URI for images elsewhere")
    folder = base_file.rsplit("/", 1)[0] if "/" in base_file else "."
    return storage.join(folder, uri) if storage.is_remote(folder) else posixpath.normpath(posixpath.join(folder, uri))


def read_i2v(uri: str) -> list[dict]:
    rows = []
    for n, line in _lines(uri):
        image, sep, prompt = line.partition(";")
        if not sep or not image.strip():
            raise DataError(f"{uri}:{n}: expected `image_path;prompt`, got {line[:80]!r}")
        image = resolve_relative(image.strip(), uri)
        stem = image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        rows.append(_row(prompt.strip(), image, id_=_slug(stem)))
    return rows


def read_opv2v_scenes(root: str) -> list[dict]:
    """One row per scene folder under `root` holding prompt.txt: its first frame (numeric order) conditions."""
    files = storage.walk_files(root)
    scenes: dict[str, list[str]] = {}
    for f in files:
        folder, _, name = f.rpartition("/")
        scenes.setdefault(folder, []).append(name)
    rows = []
    for folder in sorted(scenes):
        names = scenes[folder]
        if "prompt.txt" not in names:
            continue
        frames = sorted((n for n in names if is_image_name(n)), key=natural_key)
        if not frames:
            log.warning("%s: scene folder without frames, skipped", folder)
            continue
        prompt = storage.read_text(storage.join(folder, "prompt.txt")).strip()
        rel = folder[len(root.rstrip("/")):].strip("/") or folder.rsplit("/", 1)[-1]
        row = _row(prompt, storage.join(folder, frames[0]), id_=_slug(rel.replace("/", "_"), 80))
        row["frames"] = folder  # the clip: the control source of ControlNet generation (generate.control.source=clip)
        rows.append(row)
    if not rows:
        raise DataError(f"{root}: no scene folders with prompt.txt and frames")
    return rows


def _is_i2v_line(line: str) -> bool:
    image, sep, _ = line.partition(";")
    return bool(sep) and is_image_name(image.strip())


def detect_format(uri: str) -> str:
    if uri.endswith(".jsonl"):
        return "jsonl"
    if uri.endswith(".json"):
        return "vbench"
    if storage.isdir(uri):
        return "opv2v"
    lines = [line for _, line in _lines(uri)]
    return "i2v" if lines and all(_is_i2v_line(line) for line in lines) else "text"


def load_rows(uri: str, fmt: str = "auto", augmented: str | None = None, dimensions: list[str] | None = None,
              images: str | None = None) -> list[dict]:
    """Prompt rows of a source, duplicates (same prompt, sample prompt and image) merged, in file order."""
    if not uri:
        raise ConfigError("generate.prompts: required (a prompt file, VBench JSON or OPV2V scene folder)")
    pinned, fmt = fmt != "auto", detect_format(uri) if fmt == "auto" else fmt
    if augmented and fmt != "text":
        raise ConfigError(f"generate.augmented_prompts: needs a text prompts file, got prompt_format={fmt}")
    reader = {"jsonl": read_jsonl, "text": lambda u: read_text(u, augmented),
              "vbench": lambda u: read_vbench(u, dimensions), "i2v": read_i2v, "opv2v": read_opv2v_scenes}[fmt]
    try:
        rows = reader(uri)
    except DataError as e:
        looks = detect_format(uri) if pinned else fmt
        if looks in (fmt, "text"):  # anything reads as text: only a recognisable other format is worth naming
            raise
        raise DataError(f"{e} (read as generate.prompt_format={fmt}, which the config pins; the file looks like "
                        f"{looks}: set generate.prompt_format=auto or {looks})") from None
    if images:
        for r in rows:
            r["image"] = r["image"] or images
    seen, out = set(), []
    for r in rows:
        key = (r["prompt"], r["sample_prompt"], r["image"], r["seed"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    if len(out) < len(rows):
        log.info("%s: %d duplicate prompts merged", uri, len(rows) - len(out))
    if not out:
        raise DataError(f"{uri}: no prompt rows")
    return out


def expand_samples(rows: list[dict], samples: int, seed: int = 0, seeds: list[int] | None = None) -> list[dict]:
    """One row per (prompt, sample i): seed = seeds[i], else the row's own seed (JSONL) or `seed`, plus i."""
    out = []
    for r in rows:
        base = r["seed"] if r.get("seed") is not None else seed
        for i in range(samples):
            out.append({**r, "sample": i, "seed": int(seeds[i]) if seeds else int(base) + i})
    return out
