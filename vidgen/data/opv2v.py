"""OPV2V (OpenCOOD) camera frames as a layout: listing and reading the tree for `vidgen.data.layouts`.

Source tree (shared/reference/generation.md section 5):
    <root>/{train,validate,test,test_culvercity}/<scenario>/<cav_id>/<timestamp>_camera<k>.png
plus <timestamp>.pcd / .yaml and data_protocol.yaml, which are ignored here. Recorded at 10 Hz;
camera0 is the front camera. Timestamps are parsed as integers whatever their width (the docs show
`00069`, the annotation doc `000069`), and frames play in timestamp order, never in listing order.
The root may also be one split folder (then the split is "").

Prompts: `<root>/prompts.json` mapping "<split>/<scenario>" or "<scenario>" to a prompt, else
`prompt_template` formatted with {scenario}, {split}, {cav}.

Cutting the camera sequences into Hotshot scene folders (`vidgen prepare opv2v`) lives in
`vidgen.data.opv2v_prepare`, which builds on this layout; this module imports nothing of it.
"""

from __future__ import annotations

import json
import logging
import re

from vidgen import storage
from vidgen.data.listing import LayoutOptions, Listing, Sample
from vidgen.errors import DataError

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
    samples, cameras = [], set()
    for folder, frames in listing.frame_dirs.items():
        parsed = [(m, u) for u in frames if (m := _FRAME.match(u.rpartition("/")[2]))]
        if not parsed:
            continue  # not a camera folder (a stray image elsewhere in the tree)
        cameras.update(int(m.group(2)) for m, _ in parsed)
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
    if cameras and options.camera not in cameras:  # else every sample would be empty, and no clip come out
        raise DataError(f"{listing.root}: camera {options.camera} (data.camera / --camera): this OPV2V tree has "
                        f"no camera{options.camera} frames; cameras found: {', '.join(map(str, sorted(cameras)))}")
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
