"""Where a family's pretrained weights come from: a local directory, or a URI copied once into a local cache.

vidgen never downloads from a model hub; an error says so and names the path and the subfolders expected.
`read_configs` reads just the config.json files (what `vidgen plan` builds meta-device models from).

Driver-side checks (before any Ray actor loads a model): `check_model_dir` (a diffusers model directory: config.json
of the expected class, weights whose headers read), `weights_header` (a safetensors file's tensor names and shapes,
from its header alone), `read_state_dict` (a PyTorch file, tensors only, memory-mapped when local) and `key_report`
(missing, unexpected and wrong-shape keys in one phrase). Each error names the config field, the path and what was
expected. `file_digest`: what identifies a weights file (its sha256), read once per process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from vidgen import storage
from vidgen.errors import ConfigError, ModelError, VidgenError, brief


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


def file_digest(path: str, field: str, advice: str = "") -> str:
    """"sha256:<hex>" of the file's bytes, read in 16 MiB chunks and memoised in this process per (path,
    modification time, size): a job looks its weights id up more than once (a cache key, the logged params), and a
    4 GB file is read once. Errors name `field` and the path, then `advice`."""
    try:
        local = storage.local_path(path)
        key = (path, os.stat(local).st_mtime_ns if local is not None else None, storage.size(path))
        if key not in _DIGESTS:
            digest = hashlib.sha256()
            with storage.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            _DIGESTS[key] = "sha256:" + digest.hexdigest()
    except Exception as e:
        raise ModelError(f"{field}={path}: cannot read it ({brief(e)}). {advice}".rstrip()) from None
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


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


# -- driver-side checks: every weights path a job will load, opened and validated before any actor starts --


def key_report(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]]) -> str:
    """Missing, unexpected and wrong-shape keys of a state dict in one phrase ("" when it fits)."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != tuple(given[k]))
    problems = [f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
    problems += [f"{len(wrong)} keys with the wrong shape (e.g. {wrong[0]}: file {tuple(given[wrong[0]])}, expected "
                 f"{tuple(expected[wrong[0]])})"] if wrong else []
    return "; ".join(problems)


@contextmanager
def naming(field: str) -> Iterator[None]:
    """Errors raised inside name the config field they come from (prefixed when their message lacks it)."""
    try:
        yield
    except VidgenError as e:
        if field in str(e):
            raise
        raise type(e)(f"{field}: {e}") from None


MAX_HEADER = 100 << 20  # safetensors' own limit on a header's JSON


def weights_header(path: str, field: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file, from its header alone (no tensor data is read). The header must
    be JSON whose data offsets end exactly at the end of the file: a truncated copy fails here."""
    def bad(why: str) -> ModelError:
        return ModelError(f"{field}={path}: not a readable safetensors file ({why})")

    try:
        total = storage.size(path)
        with storage.open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, total - 8):
                raise bad(f"{total} bytes, header length {n}" if n >= 0 else f"{total} bytes")
            header = json.loads(f.read(n))
    except ModelError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {brief(e)}") from None
    except Exception as e:  # a missing file or a storage error, already naming the path
        raise ModelError(f"{field}={path}: cannot read it ({brief(e)})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    shapes, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name] = tuple(int(s) for s in info["shape"])
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise bad(f"tensor {name!r} has no shape and data_offsets") from None
    if 8 + n + end != total:
        raise bad(f"the header describes {8 + n + end} bytes, the file has {total}: truncated or padded")
    if not shapes:
        raise bad("no tensors")
    return shapes


def read_state_dict(path: str, field: str, unwrap: tuple[str, ...] = ()) -> dict:
    """The tensors of a PyTorch file (torch.save of a state dict), loaded with weights_only (a pickle that would
    run code is refused) and memory-mapped when local and in the zip format (nothing is read until touched).
    `unwrap`: entries holding the state dict when the file is a wrapper (e.g. "model")."""
    import torch  # lazy: heavy; this module is read by `vidgen plan` before torch is needed

    try:
        local = storage.local_path(path)
        if local is not None:
            with open(local, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            state = torch.load(local, map_location="cpu", weights_only=True, mmap=zipped)
        else:
            state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, zero bytes, another format, a pickle with code in it
        why = (e.strerror or brief(e)) if isinstance(e, OSError) else brief(e)
        if "Weights only load failed" in why:  # torch's advice (weights_only=False) would run the file's code
            why = "it holds Python objects besides tensors, which vidgen never unpickles"
        raise ModelError(f"{field}={path}: not a PyTorch state dict of tensors ({why})") from None
    if isinstance(state, dict):
        state = next((state[k] for k in unwrap if k in state), state)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"{field}={path}: expected a state dict (tensor names to tensors), got "
                         f"{type(state).__name__}{' (empty)' if isinstance(state, dict) and not state else ''}")
    return state


def weights_shapes(path: str, field: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a weights file: a safetensors header, or a PyTorch file (.bin, .pt, .pth)."""
    if path.endswith(".safetensors"):
        return weights_header(path, field)
    return {k: tuple(v.shape) for k, v in read_state_dict(path, field).items()}


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_subfolders(path: str, parts: tuple[str, ...], what: str) -> None:
    """model.path on the driver: a readable directory holding every one of `parts` (a pretrained pipeline's)."""
    try:
        found = {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(path)} if storage.isdir(path) else None
    except Exception as e:
        raise ModelError(f"model.path={path}: cannot read it ({brief(e)}); expected {what}") from None
    if found is None:
        raise ModelError(f"model.path={path}: no such directory; expected {what} (vidgen never downloads weights)")
    missing = [s for s in parts if s not in found]
    if missing:
        raise ModelError(f"model.path={path}: missing subfolder(s) {', '.join(missing)}; expected {what}")


def check_model_dir(path: str, field: str, classes: tuple[str, ...], what: str) -> tuple[dict, dict]:
    """(config.json, {tensor name: shape} over its weight files) of a diffusers model directory (local or URI),
    checked: a directory, a JSON config whose `_class_name` is one of `classes`, weight files whose headers read.
    `what` names the kind of directory expected in the messages."""
    try:
        is_dir = storage.isdir(path)
        found = {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(path)} if is_dir else set()
    except Exception as e:
        raise ModelError(f"{field}={path}: cannot read it ({brief(e)}); expected {what}") from None
    if not is_dir:
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and "://" not in path
        why = ("not a local directory (hub ids are not fetched)" if looks_like_hub_id else
               "a file, not a directory" if storage.exists(path) else "no such directory")
        raise ModelError(f"{field}={path}: {why}; expected {what}")
    if "config.json" not in found:
        raise ModelError(f"{field}={path}: no config.json there; expected {what}")
    try:
        config = json.loads(storage.read_text(storage.join(path, "config.json")))
    except Exception as e:
        raise ModelError(f"{field}={path}: config.json is not readable JSON ({brief(e)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{field}={path}: config.json holds a {type(config).__name__}, expected a JSON object")
    if classes and config.get("_class_name") not in classes:
        raise ModelError(f"{field}={path}: config.json's _class_name is {config.get('_class_name')!r}; expected "
                         f"{what} ({' or '.join(classes)})")
    weights = sorted(n for n in found if n.endswith(WEIGHT_SUFFIXES))
    if any(n.endswith(".safetensors") for n in weights):  # diffusers prefers them; .bin files beside are unused
        weights = [n for n in weights if n.endswith(".safetensors")]
    if not weights:
        raise ModelError(f"{field}={path}: no weights file (*.safetensors or *.bin) beside config.json; expected "
                         f"{what}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in weights:
        shapes.update(weights_shapes(storage.join(path, name), field))
    return config, shapes
