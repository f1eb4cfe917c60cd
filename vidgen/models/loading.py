"""Where a family's pretrained weights come from: a local directory, or a URI copied once into a local cache.

vidgen never downloads from a model hub; an error says so and names the path and the subfolders expected.
`read_configs` reads just the config.json files (what `vidgen plan` builds meta-device models from).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vidgen import storage
from vidgen.errors import ConfigError, ModelError


def missing_weights(path: str, why: str, what: str, subfolders: tuple[str, ...]) -> ModelError:
    """`what`: the kind of directory expected (e.g. "diffusers-format SVD"), `subfolders`: what it holds."""
    return ModelError(
        f"{path}: {why}. vidgen never downloads weights from a hub: copy a {what} directory "
        f"(with {', '.join(subfolders)}/) to local disk or object storage and pass model.path=<that dir>"
    )


def resolve_model_dir(path: str, cache_dir: str, what: str, subfolders: tuple[str, ...]) -> Path:
    """A local directory for `path`: local paths as is, remote URIs copied once into `cache_dir`."""
    if "://" in path and not path.startswith("file://"):
        try:
            if not storage.isdir(path):
                raise missing_weights(path, "no such directory", what, subfolders)
            return Path(storage.cached_local_dir(path, os.path.expanduser(cache_dir)))
        except ModelError:
            raise
        except Exception as e:  # storage errors name the URI already
            raise missing_weights(path, f"cannot copy it ({e})", what, subfolders) from None
    local = Path(path.removeprefix("file://")).expanduser()
    if not local.is_dir():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        why = "not a local directory (hub ids are not fetched)" if looks_like_hub_id else "no such directory"
        raise missing_weights(path, why, what, subfolders)
    return local


# -- configs only, for vidgen plan (no weight is read) --


def read_configs(path: str | None, parts: tuple[str, ...]) -> tuple[dict[str, dict] | None, str]:
    """Config dicts from a local diffusers directory (`part/config.json`; part "" is the directory's own), or
    None (remote URIs are not read: no network)."""
    if not path or ("://" in path and not path.startswith("file://")):
        return None, "remote model.path not read"
    root = Path(path.removeprefix("file://")).expanduser()
    found = {}
    for part in parts:
        f = root / part / "config.json"
        if f.is_file():
            try:
                found[part] = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{f}: not a readable JSON config ({e})") from None
    return (found, f"config.json files under {root}") if found else (None, f"no config.json under {root}")


def configs_source(flavor: str, path: str | None, parts: tuple[str, ...], built_in: str):
    """(config dicts read under a local model.path or None, what the model's shapes come from)."""
    if flavor == "full":
        return None, f"{built_in} (model.flavor=full: random init)"
    read, source = read_configs(path, parts)
    return read, source if read is not None else f"{built_in} ({source})"
