"""What every layout shares: the `Sample` it produces, the one `Listing` of a root it reads, its options.

Kept apart from `layouts` so that dataset-specific layout modules (opv2v, seer, shards) can import
these types while `layouts` imports their builders into its registry, without an import cycle.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

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


@dataclass
class Listing:
    """Every file under a root, grouped the way layouts need them."""

    root: str
    frame_dirs: dict[str, list[str]]  # folder URI -> its image URIs (unsorted)
    videos: list[str]
    files: set[str]

    def rel(self, uri: str) -> str:
        return relative(uri, self.root)


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
