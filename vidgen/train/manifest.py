"""Manifests: every file of a directory with its size and sha256, checked before the directory is trusted.

    write_manifest(d)               # after the last file of d is written: d/vidgen-manifest.json
    problems = verify_manifest(d)   # [] when every listed file is there, whole, with its hash, and nothing else

A directory written by several processes into one place (Ray Train merges the ranks' checkpoint directories
into one) gets one manifest per writer: `write_manifest(d, part=r, parts=n)` writes
`vidgen-manifest.<r>-of-<n>.json` listing only what that writer wrote. `verify_manifest` checks the union of
the parts and reports a missing part, so a writer that died before its manifest is caught too.

A manifest is written last, so its presence means its writer finished. It guards against truncation,
lost files and bit rot, not against someone who can rewrite the manifest with the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST = "vidgen-manifest.json"
_PART = re.compile(r"^vidgen-manifest\.(\d+)-of-(\d+)\.json$")
IGNORED = {".metadata.json"}  # Ray's own checkpoint metadata, if a caller ever sets some
VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_manifest(name: str) -> bool:
    return name == MANIFEST or _PART.match(name) is not None


def _files(directory: Path) -> list[str]:
    """Relative posix paths of the regular files under `directory`, manifests and IGNORED excepted."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = Path(root, name).relative_to(directory).as_posix()
            if not (_is_manifest(rel) or rel in IGNORED):
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str | os.PathLike, files: list[str] | None = None, part: int = 0,
                   parts: int = 1, meta: dict | None = None) -> Path:
    """Record `files` (relative paths; default: every file under `directory`) and return the manifest's path.
    Written to a temporary name and renamed, so a reader never sees half a manifest."""
    d = Path(directory)
    listed = sorted(files) if files is not None else _files(d)
    entries = {rel: {"size": (d / rel).stat().st_size, "sha256": sha256_file(d / rel)} for rel in listed}
    name = MANIFEST if parts == 1 else f"vidgen-manifest.{part}-of-{parts}.json"
    doc = {"version": VERSION, "part": part, "parts": parts, "files": entries, **({"meta": meta} if meta else {})}
    tmp = d / f".{name}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, d / name)
    return d / name


def read_manifests(directory: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """The union of the manifests' entries, and the problems found reading them (unreadable, missing part)."""
    d = Path(directory)
    if not d.is_dir():
        return {}, [f"{d}: not a directory"]
    names = sorted(n for n in os.listdir(d) if _is_manifest(n))
    if not names:
        return {}, [f"{d}: no {MANIFEST} (the writer did not finish, or wrote no manifest)"]
    entries: dict[str, dict] = {}
    problems: list[str] = []
    expected: set[tuple[int, int]] = set()
    seen: set[tuple[int, int]] = set()
    for name in names:
        try:
            doc = json.loads((d / name).read_text())
            files, part, parts = doc["files"], int(doc["part"]), int(doc["parts"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{d / name}: unreadable manifest ({type(e).__name__}: {e})")
            continue
        expected |= {(p, parts) for p in range(parts)}
        seen.add((part, parts))
        entries.update(files)
    for part, parts in sorted(expected - seen):
        problems.append(f"{d}: manifest part {part} of {parts} is missing (vidgen-manifest.{part}-of-{parts}.json)")
    return entries, problems


def verify_manifest(directory: str | os.PathLike, allow_extra: bool = False) -> list[str]:
    """Every problem with `directory` against its manifest(s), one line each, naming the file and what was
    expected; [] when it checks out. Sizes are compared before hashes, so truncation is named as such."""
    d = Path(directory)
    entries, problems = read_manifests(d)
    if not entries and problems:
        return problems
    for rel, want in sorted(entries.items()):
        path = d / rel
        if not path.is_file():
            problems.append(f"{path}: missing (expected {want['size']} bytes)")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, expected {want['size']} (truncated or rewritten)")
        elif (digest := sha256_file(path)) != want["sha256"]:
            problems.append(f"{path}: sha256 {digest[:12]}..., expected {want['sha256'][:12]}... (corrupted)")
    if not allow_extra:
        problems += [f"{d / rel}: not in the manifest (a stray or stale file)" for rel in _files(d)
                     if rel not in entries]
    return problems
