"""A run's checkpoints as they are on disk: which are complete, which one a rerun resumes from, which are kept.

Ray Train keeps `<storage>/<run.name>/checkpoint_<timestamp>/` folders and a registry of them
(`checkpoint_manager_snapshot.json`). The registry can lag the folders: a run stopped by Ctrl-C or SIGTERM, or whose
driver died, leaves checkpoints written after the registry's last update, which a rerun would neither resume from
nor ever delete. So vidgen decides from the folders themselves:

- complete: every rank's manifest (vidgen/train/manifest.py; each rank writes its own last, atomically) is there
  and readable, and every file they list is there with its listed size. An upload cut short fails that.
- a rerun resumes from the complete checkpoint of the highest step (`newest_complete`), whatever Ray's registry
  says; `reset` removes that registry so that Ray starts a fresh one, and removes incomplete folders.
- retention: `prune` keeps the `keep` complete checkpoints of the highest steps and deletes the others.

The workers still check every file's hash before loading (loop.valid_checkpoint) and fall back to an older one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from vidgen import storage
from vidgen.errors import StorageError
from vidgen.train.manifest import _PART, MANIFEST

log = logging.getLogger(__name__)

RAY_REGISTRY = "checkpoint_manager_snapshot.json"  # Ray Train V2: CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
FOLDER = re.compile(r"^checkpoint_\d")  # Ray's checkpoint_<timestamp>, not its checkpoint_manager_snapshot.json


@dataclass(frozen=True)
class Found:
    uri: str
    step: int | None  # from the manifests; None when incomplete
    problem: str | None = None  # why it is incomplete

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


def _sizes(uri: str) -> dict[str, int]:
    """Relative path -> size of every file under directory `uri`, in one listing."""
    fs, path = storage.filesystem(uri)
    root = path.rstrip("/")
    found = fs.find(root, detail=True)
    return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(root + "/")}


def inspect(uri: str) -> Found:
    """Whether the checkpoint folder `uri` is complete, and its step."""
    sizes = _sizes(uri)
    names = [n for n in sizes if n == MANIFEST or _PART.match(n)]
    if not names:
        return Found(uri, None, "no manifest (its writers did not finish)")
    listed: dict[str, dict] = {}
    steps, expected, seen = set(), set(), set()
    for name in names:
        try:
            doc = json.loads(storage.read_text(storage.join(uri, name)))
            listed |= doc["files"]
            part, parts = int(doc["part"]), int(doc["parts"])
        except (ValueError, KeyError, TypeError, StorageError) as e:  # StorageError: deleted meanwhile (by Ray)
            return Found(uri, None, f"{name}: unreadable ({type(e).__name__})")
        steps.add(doc.get("meta", {}).get("step"))
        expected |= {(p, parts) for p in range(parts)}
        seen.add((part, parts))
    if missing := sorted(expected - seen):
        return Found(uri, None, f"manifest part {missing[0][0]} of {missing[0][1]} is missing")
    for rel, want in sorted(listed.items()):
        if sizes.get(rel) != want["size"]:
            return Found(uri, None, f"{rel}: {sizes.get(rel, 'missing')}, expected {want['size']} bytes")
    if len(steps) != 1 or not isinstance(step := next(iter(steps)), int):
        return Found(uri, None, f"the manifests disagree on the step ({sorted(map(str, steps))})")
    return Found(uri, step)


def scan(run_dir: str) -> list[Found]:
    """Every checkpoint folder of the run, complete ones first by step then name (the newest last), then the
    incomplete ones."""
    if not storage.isdir(run_dir):
        return []
    found = [inspect(u) for u in storage.listdir(run_dir) if FOLDER.match(u.rstrip("/").rsplit("/", 1)[-1])]
    return sorted(found, key=lambda f: (not f.complete, f.step or 0, f.name))


def newest_complete(found: list[Found]) -> Found | None:
    complete = [f for f in found if f.complete]
    return complete[-1] if complete else None


def prune(run_dir: str, keep: int, incomplete: bool = False) -> list[Found]:
    """Delete all but the `keep` complete checkpoints of the highest steps (and, with `incomplete`, every incomplete
    folder: only when nothing is writing one). Returns what was deleted."""
    found = scan(run_dir)
    complete = [f for f in found if f.complete]
    doomed = complete[:-keep] if keep > 0 else []
    if incomplete:
        doomed += [f for f in found if not f.complete]
    for f in doomed:
        log.info("deleting checkpoint %s (%s)", f.uri, f"step {f.step}" if f.complete else f"incomplete: {f.problem}")
        try:
            storage.remove(f.uri, recursive=True)
        except StorageError:
            if storage.exists(f.uri):  # not Ray's own retention deleting it at the same time
                raise
    return doomed


def reset(run_dir: str, keep: int) -> Found | None:
    """Before a fit: delete incomplete folders and the checkpoints beyond `keep`, drop Ray's registry, and return
    the checkpoint to resume from (None: start at step 0)."""
    deleted = prune(run_dir, keep, incomplete=True)
    for f in deleted:
        if not f.complete:
            log.warning("checkpoint %s is incomplete (%s): deleted", f.uri, f.problem)
    registry = storage.join(run_dir, RAY_REGISTRY)
    if storage.exists(registry):
        storage.remove(registry)
    return newest_complete(scan(run_dir))
