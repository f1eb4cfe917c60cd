"""What every layout shares: the `Sample` it produces, the one `Listing` of a root it reads, its options, and
`SampleTable`, the samples of a listing held column by column (what `list_samples` returns).

Kept apart from `layouts` so that dataset-specific layout modules (opv2v, seer, shards) can import
these types while `layouts` imports their builders into its registry, without an import cycle.
"""

from __future__ import annotations

import functools
import operator
import string
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from vidgen import storage
from vidgen.data.decode import is_image_name
from vidgen.data.video import VIDEO_SUFFIXES
from vidgen.errors import ConfigError

DEFAULT_PROMPT_TEMPLATE = "a front camera driving video, {scenario}"
TEMPLATE_FIELDS = ("scenario", "split", "cav")


@dataclass
class Sample:
    """One video: a folder of frames (frame_uris in play order) or a video file (frame_uris None).

    prompt: known at discovery (sidecar, template, annotation); prompt_uri: a file the worker reads
    (wins over prompt). meta: layout, name (path relative to the root), prompt_required, and per
    layout: fps (the source frame rate when the layout knows it, e.g. OPV2V's 10 Hz), shard/row
    (packed shards), dataset (sthv2 | bridge | epic-kitchens), camera, split, scenario, cav.
    """

    uri: str
    frame_uris: list[str] | None
    prompt: str | None
    prompt_uri: str | None
    meta: dict = field(default_factory=dict)


class Listing:
    """Every file under a root (one `storage.walk_tree`), with the views layouts need.

    The vectorised views (`num_frame_dirs`, `frame_dir_rels`, `image_name_counts`, `prompt_dirs`) cost
    nothing per file and serve detection and the frame-folder layouts at any size. `frame_dirs`, `videos`
    and `files` spell out one URI per file (built on first use), for the dataset layouts whose trees
    are small (opv2v, sthv2, shards, videos).
    """

    def __init__(self, root: str, tree: storage.FileTree):
        self.root, self.tree = root, tree
        names = tree.names
        self.is_image = np.fromiter((is_image_name(n) for n in names), bool, len(names))
        self.is_video = np.fromiter((not n.startswith(".") and n.lower().endswith(VIDEO_SUFFIXES) for n in names),
                                    bool, len(names))
        self._file_dirs: np.ndarray | None = None

    def rel(self, uri: str) -> str:
        return relative(uri, self.root)

    @property
    def file_dirs(self) -> np.ndarray:
        """int32 [files]: each file's folder index in `tree.dirs`."""
        if self._file_dirs is None:
            self._file_dirs = self.tree.file_dirs()
        return self._file_dirs

    def dirs_with(self, name_mask: np.ndarray) -> np.ndarray:
        """bool [folders]: which folders hold a file whose name code is set in `name_mask` [names]."""
        hits = self.file_dirs[name_mask[self.tree.codes]]
        return np.bincount(hits, minlength=len(self.tree.dirs)).astype(bool)

    @functools.cached_property
    def frame_dir_ids(self) -> np.ndarray:
        """int64: the folders holding at least one image."""
        return np.flatnonzero(self.dirs_with(self.is_image))

    @property
    def num_frame_dirs(self) -> int:
        return len(self.frame_dir_ids)

    @functools.cached_property
    def num_videos(self) -> int:
        return int(self.is_video[self.tree.codes].sum())

    def frame_dir_rels(self) -> list[str]:
        """The frame folders' paths relative to the root ("" for the root itself)."""
        return [self.tree.dirs[d] for d in self.frame_dir_ids.tolist()]

    def image_name_counts(self) -> dict[str, int]:
        """Image base name -> how many frame folders hold it."""
        counts = np.bincount(self.tree.codes, minlength=len(self.tree.names))
        return {self.tree.names[c]: int(counts[c]) for c in np.flatnonzero(self.is_image & (counts > 0)).tolist()}

    def prompt_dirs(self, file_name: str) -> np.ndarray:
        """bool [folders]: which folders hold a file named `file_name`."""
        return self.dirs_with(np.array([n == file_name for n in self.tree.names], dtype=bool))

    def root_files(self) -> dict[str, str]:
        """Files directly under the root: name -> URI."""
        tree = self.tree
        if tree.is_file:
            return {}
        out = {}
        for d, rel in enumerate(tree.dirs):
            if rel == "":
                for c in tree.codes[tree.offsets[d]:tree.offsets[d + 1]].tolist():
                    out[tree.names[c]] = tree.file_uri(d, tree.names[c])
        return out

    # ---- one URI per file, for the small layouts ----

    @functools.cached_property
    def _uris(self) -> list[str]:
        return self.tree.uris()

    @functools.cached_property
    def frame_dirs(self) -> dict[str, list[str]]:
        """Folder URI -> its image URIs (sorted), folders in the order of their first image's URI."""
        frame_dirs: dict[str, list[str]] = defaultdict(list)
        for uri in self._uris:
            parent, _, base = uri.rpartition("/")
            if is_image_name(base):
                frame_dirs[parent].append(uri)
        return dict(frame_dirs)

    @functools.cached_property
    def videos(self) -> list[str]:
        return [u for u in self._uris if (b := u.rpartition("/")[2]) and not b.startswith(".")
                and b.lower().endswith(VIDEO_SUFFIXES)]

    @functools.cached_property
    def files(self) -> set[str]:
        return set(self._uris)


@dataclass(frozen=True)
class LayoutOptions:
    """Layout knobs that change which samples exist or what their prompts are (not how clips are cut).

    camera: OPV2V camera index (0 front, 1 right-rear, 2 left-rear, 3 back).
    prompt_template: OPV2V prompt, formatted with {scenario}, {split}, {cav} per sample.
    """

    camera: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        if not 0 <= self.camera <= 9:
            raise ConfigError(f"data.camera: expected a camera index 0-9 (OPV2V has 0-3), got {self.camera}")
        check_template(self.prompt_template)


def check_template(template: str) -> None:
    """ConfigError unless `template` is a str.format template using only {scenario}, {split}, {cav}."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"data.prompt_template: {template!r} is not a valid template ({e})") from e
    unknown = sorted(n for n in names if n not in TEMPLATE_FIELDS)
    if unknown:
        fields = ", ".join("{" + n + "}" for n in unknown)
        raise ConfigError(f"data.prompt_template: unknown field(s) {fields} "
                          f"in {template!r}; expected only {{scenario}}, {{split}}, {{cav}}")


def relative(uri: str, root: str) -> str:
    """`uri` relative to `root`, tolerating a listing that spells the root differently
    (file:// prefix, trailing slash)."""
    for prefix in (root.rstrip("/"), root.rstrip("/").removeprefix("file://")):
        for candidate in (uri, uri.removeprefix("file://")):
            if candidate.startswith(prefix + "/"):
                return candidate[len(prefix) + 1:]
            if candidate == prefix:
                return ""
    return uri.rpartition("/")[2]


# ---- the samples of a listing, column by column --------------------------------------------------------------


class SampleTable:
    """A listing's samples as columns, one `Sample` made on demand: `table[i]`, `table[a:b]`, `take`, iteration.

    A million frame folders take ~100 MB here instead of ~2 KB each as `Sample`s holding a URI per frame, and
    pickle as a few arrays (Ray ships the table to its data workers once). Columns: sample URIs and names as
    UTF-8 blobs; frames as one flat array of codes into a table of distinct names (relative to the sample URI
    when every frame lies directly in it) with offsets; prompts and prompt files as codes into their distinct
    values (-1 = None); meta as one dict shared by all samples but for their "name" (the frame-folder and
    video layouts), else one dict per sample (`from_samples` on the dataset layouts).
    """

    def __init__(self, *, uris: Strings, names: Strings, frame_offsets: np.ndarray, frame_codes: np.ndarray,
                 frame_vocab: list[str], has_frames: np.ndarray, frames_relative: bool, prompts: np.ndarray,
                 prompt_vocab: list[str], prompt_uris: np.ndarray, prompt_uri_vocab: list[str],
                 prompt_uri_relative: bool, meta: dict | None, metas: list[dict] | None = None):
        self.uris, self.names, self.frame_offsets, self.frame_codes = uris, names, frame_offsets, frame_codes
        self.frame_vocab, self.has_frames, self.frames_relative = frame_vocab, has_frames, frames_relative
        self.prompts, self.prompt_vocab = prompts, prompt_vocab
        self.prompt_uris, self.prompt_uri_vocab, self.prompt_uri_relative = prompt_uris, prompt_uri_vocab, \
            prompt_uri_relative
        self.meta, self.metas = meta, metas  # meta: shared, its "name" filled per sample; else metas [n]

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> SampleTable:
        """The table holding exactly `samples` (in that order): table[i] == samples[i]."""
        samples = list(samples)
        relative = all(s.frame_uris is None or all(
            f.startswith(s.uri + "/") and "/" not in f[len(s.uri) + 1:] for f in s.frame_uris) for s in samples)
        frames: dict[str, int] = storage.NameCodes()
        codes: list[int] = []
        counts = np.zeros(len(samples), np.int64)
        for i, s in enumerate(samples):
            cut = len(s.uri) + 1 if relative else 0
            codes += [frames[f[cut:]] for f in s.frame_uris or ()]
            counts[i] = len(s.frame_uris or ())
        prompts, prompt_vocab = encode_codes(s.prompt for s in samples)
        prompt_uris, prompt_uri_vocab = encode_codes(s.prompt_uri for s in samples)
        first = samples[0].meta if samples else {}
        shared = "name" in first and all(
            list(s.meta) == list(first) and isinstance(s.meta["name"], str)
            and all(type(s.meta[k]) is type(v) and s.meta[k] == v for k, v in first.items() if k != "name")
            for s in samples)
        return cls(uris=Strings.of(s.uri for s in samples),
                   names=Strings.of(str(s.meta.get("name", "")) for s in samples),
                   frame_offsets=offsets_of(counts), frame_codes=np.array(codes, np.int32), frame_vocab=list(frames),
                   has_frames=np.array([s.frame_uris is not None for s in samples], bool), frames_relative=relative,
                   prompts=prompts, prompt_vocab=prompt_vocab, prompt_uris=prompt_uris,
                   prompt_uri_vocab=prompt_uri_vocab, prompt_uri_relative=False,
                   meta={**first, "name": None} if shared else None,
                   metas=None if shared else [dict(s.meta) for s in samples])

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self), dtype=np.int64)[i])
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i %= len(self)
        uri = self.uris[i]
        frame_uris = None
        if self.has_frames[i]:
            vocab, codes = self.frame_vocab, self.frame_codes[self.frame_offsets[i]:self.frame_offsets[i + 1]].tolist()
            frame_uris = [f"{uri}/{vocab[c]}" for c in codes] if self.frames_relative else [vocab[c] for c in codes]
        p, q = int(self.prompts[i]), int(self.prompt_uris[i])
        prompt_uri = None if q < 0 else (uri + self.prompt_uri_vocab[q] if self.prompt_uri_relative
                                          else self.prompt_uri_vocab[q])
        if self.metas is not None:
            meta = dict(self.metas[i])
        else:
            meta = dict(self.meta or {})
            meta["name"] = self.names[i]
        return Sample(uri=uri, frame_uris=frame_uris, prompt=None if p < 0 else self.prompt_vocab[p],
                      prompt_uri=prompt_uri, meta=meta)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} samples, {len(self.frame_codes)} frames)"

    def uri(self, i: int) -> str:
        return self.uris[i]

    def take(self, indices) -> SampleTable:
        """The samples at `indices` (ints, in that order; negative ones count from the end)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"take: index out of range for {len(self)} samples")
        idx = idx % max(1, len(self))
        flat, frame_offsets = _gather(self.frame_offsets, idx)
        return SampleTable(
            uris=self.uris.take(idx), names=self.names.take(idx), frame_offsets=frame_offsets,
            frame_codes=self.frame_codes[flat], frame_vocab=self.frame_vocab, has_frames=self.has_frames[idx],
            frames_relative=self.frames_relative, prompts=self.prompts[idx], prompt_vocab=self.prompt_vocab,
            prompt_uris=self.prompt_uris[idx], prompt_uri_vocab=self.prompt_uri_vocab,
            prompt_uri_relative=self.prompt_uri_relative, meta=self.meta,
            metas=None if self.metas is None else [self.metas[i] for i in idx.tolist()])


def as_table(samples: SampleTable | Iterable[Sample]) -> SampleTable:
    return samples if isinstance(samples, SampleTable) else SampleTable.from_samples(samples)


class Strings:
    """Strings as one UTF-8 blob (surrogateescape: local names that are not UTF-8 survive) + int64 offsets:
    about len + 8 bytes each, where a Python str costs ~50 more. Each string reads back with `prefix` before it
    (URIs that share the root's spelling share the names' bytes)."""

    def __init__(self, blob: bytes, offsets: np.ndarray, prefix: str = ""):
        self.blob, self.offsets, self.prefix = blob, offsets, prefix

    @classmethod
    def of(cls, strings: Iterable[str]) -> Strings:
        strings = list(strings)
        text = "".join(strings)
        blob = text.encode("utf-8", "surrogateescape")
        if len(blob) == len(text):  # ASCII: character lengths are byte lengths, no bytes object per string
            return cls(blob, offsets_of(np.fromiter(map(len, strings), np.int64, len(strings))))
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        return cls(b"".join(encoded), offsets_of(np.fromiter(map(len, encoded), np.int64, len(encoded))))

    def with_prefix(self, prefix: str) -> Strings:
        return Strings(self.blob, self.offsets, prefix)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.prefix + self.blob[self.offsets[i]:self.offsets[i + 1]].decode("utf-8", "surrogateescape")

    def take(self, idx: np.ndarray) -> Strings:
        o = self.offsets
        if len(idx) and np.all(np.diff(idx) == 1):  # a slice: one copy
            a, b = int(idx[0]), int(idx[-1]) + 1
            return Strings(self.blob[o[a]:o[b]], o[a:b + 1] - o[a], self.prefix)
        starts, ends = o[idx].tolist(), o[idx + 1].tolist()
        parts = [self.blob[s:e] for s, e in zip(starts, ends)]
        return Strings(b"".join(parts), offsets_of(np.fromiter(map(len, parts), np.int64, len(parts))), self.prefix)

    def tolist(self) -> list[str]:
        return [self[i] for i in range(len(self))]


def offsets_of(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _gather(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat positions, new offsets) of ranges idx of a ragged array given by `offsets`."""
    starts = offsets[idx]
    new = offsets_of(offsets[idx + 1] - starts)
    return np.repeat(starts - new[:-1], np.diff(new)) + np.arange(new[-1], dtype=np.int64), new


def encode_codes(values: Iterable[str | None]) -> tuple[np.ndarray, list[str]]:
    """(int32 codes, distinct values): code -1 for None."""
    codes: dict[str, int] = storage.NameCodes()
    out = np.array([-1 if v is None else codes[v] for v in values], np.int32)
    return out, list(codes)
