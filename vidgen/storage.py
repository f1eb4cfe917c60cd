"""Files and object storage behind one small API: the only module in vidgen that opens files.

A location is a *URI*: a local path (`./work`, `/data/x.mp4`), `file://...`, `s3://bucket/key`,
`gs://bucket/key`, or any other fsspec protocol whose package is installed.

Rules every function here keeps:

- **Atomic writes.** A reader sees the old file or the complete new one, never a partial file, even
  when the writer is killed. Local files are written to a temporary file in the same directory,
  fsynced and moved into place with `os.replace`; remote files are uploaded only once they are
  complete, as one PUT (object stores publish an object only when its upload completes). Temporary
  names start with `.vidgen-tmp-`; listings skip them, so a killed writer's leftovers never look like
  outputs. `atomic_local` is the way to hand a real path to code that must write one itself (video
  encoders, `save_pretrained`); the path may become a file or a directory.
- **Retries.** Every remote operation goes through `retry`: up to 5 attempts with exponential
  backoff and jitter, on transient errors only (connection errors, timeouts, HTTP 5xx, throttling /
  SlowDown). Missing objects, 403s and other client errors fail at once. The retries inside
  botocore and s3fs are switched off so that attempts do not multiply and every retry is logged.
  Reads from an `open()` handle are not retried: use `read_bytes` for whole objects.
- **Errors.** Failures raise `vidgen.errors.StorageError` naming the URI and the operation:
  `s3://b/k: read failed after 5 attempts: ...`, `/data/x: not found`.
- **S3 endpoints.** `s3://` uses `$VIDGEN_S3_ENDPOINT_URL`, else `$AWS_ENDPOINT_URL_S3`, else
  `$AWS_ENDPOINT_URL` (MinIO, moto, other S3-compatible stores); credentials come from the usual
  AWS chain (env vars, profiles, instance roles).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import posixpath
import random
import shutil
import socket
import tempfile
import threading
import time
from array import array
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
import numpy as np
from fsspec.exceptions import FSTimeoutError

from vidgen.errors import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Read at call time, so a test (or an impatient user) can shorten the waits.
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 0.2
RETRY_MAX_DELAY = 5.0

S3_ENDPOINT_ENV_VARS = ("VIDGEN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
TMP_PREFIX = ".vidgen-tmp-"
LIST_THREADS = 32  # object-store LIST requests in flight while walking a tree (walk_tree)
COMPLETE_MARKER = ".complete"

_LOCAL_PROTOCOLS = ("file", "local")
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
    errno.EBUSY,  # s3fs turns SlowDown / 503 ServiceUnavailable into EBUSY
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "ProvisionedThroughputExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "OperationAborted",
}


# ---------------------------------------------------------------------------------------------- URIs


def _protocol(uri: str) -> str | None:
    if "::" in uri:  # fsspec chained URL (simplecache::s3://...): remote by construction
        return uri.split("::", 1)[0].lower()
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return None


def is_remote(uri: str) -> bool:
    """True for URIs that are not on the local filesystem (s3://, gs://, ...)."""
    return _protocol(uri) not in (None, *_LOCAL_PROTOCOLS)


def local_path(uri: str) -> str | None:
    """The absolute local path of a local path or file:// URI; None for remote URIs."""
    protocol = _protocol(uri)
    if protocol is None:
        return os.path.abspath(os.path.expanduser(uri))
    if protocol in _LOCAL_PROTOCOLS:
        return os.path.abspath(os.path.expanduser(uri.split("://", 1)[1]))
    return None


def join(uri: str, *parts: str) -> str:
    """`join("s3://b/x", "y/", "z.mp4") -> "s3://b/x/y/z.mp4"`; plain os.path.join for local paths."""
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if _protocol(uri) is None:
        return os.path.join(uri, *parts)
    return "/".join((uri.rstrip("/"), *parts)) if parts else uri


# --------------------------------------------------------------------------------------- filesystems

_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
_FS_LOCK = threading.Lock()


def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment, if any (see the module docstring)."""
    for name in S3_ENDPOINT_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _options(protocol: str) -> dict[str, Any]:
    if protocol not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {
        # `retry` is the one retry layer: botocore's own would multiply attempts and hide them.
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
        # Several processes write the same prefixes (Ray workers, the driver): never trust a stale listing.
        "use_listings_cache": False,
    }
    if endpoint := s3_endpoint():
        opts["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it.

    Instances are cached per process, protocol and options (the S3 endpoint is read from the
    environment each call, so changing it gives a new client).
    """
    protocol = _protocol(uri)
    if protocol is None or protocol in _LOCAL_PROTOCOLS:
        return fsspec.filesystem("file"), local_path(uri)  # type: ignore[return-value]
    options = _options(protocol)
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True))
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            try:
                fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
            except (ImportError, ValueError) as e:
                raise StorageError(f"{uri}: no filesystem for protocol {protocol!r} ({e})") from e
            if protocol in ("s3", "s3a"):
                fs.retries = 1  # s3fs's own retry loop, see above
            _FS_CACHE[key] = fs
    return fs, fs._strip_protocol(uri)


# ------------------------------------------------------------------------------------------- retries


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _client_error(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, error code) of a botocore ClientError anywhere in the chain, else (None, "")."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return status, str(response["Error"].get("Code", ""))
    return None, ""


@functools.cache
def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import HTTPClientError  # lazy: optional (s3fs brings it)

        types.append(HTTPClientError)  # EndpointConnectionError, ReadTimeoutError, ConnectionClosedError
    with contextlib.suppress(ImportError):
        from aiohttp import ClientConnectionError, ClientPayloadError  # lazy: optional (s3fs, gcsfs bring it)

        types += [ClientConnectionError, ClientPayloadError]
    types.append(FSTimeoutError)
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """True when trying again may succeed: network trouble, 5xx, throttling. Never 403/404."""
    status, code = _client_error(exc)
    if status is not None or code:  # the server answered: its answer decides
        return code in _TRANSIENT_CODES or status == 429 or (status is not None and status >= 500
                                                               and status != 501)
    if any(isinstance(e, FileNotFoundError | PermissionError) for e in _chain(exc)):
        return False
    network = _network_error_types()
    for e in _chain(exc):
        if isinstance(e, network):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def retry(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 5.0,
          what: str = "storage operation") -> T:
    """Call `fn` until it succeeds, at most `attempts` times, retrying transient errors only.

    Waits grow as base_delay * 2**k, capped at max_delay, with jitter (half fixed, half random) so
    that many workers hitting one throttled bucket do not retry in lock step. Each retry logs a
    warning; the last error is re-raised unchanged.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            cap = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay = cap / 2 + random.uniform(0, cap / 2)
            log.warning("%s: attempt %d/%d failed (%s: %s); retrying in %.2f s",
                        what, attempt, attempts, type(e).__name__, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


NO_CREDENTIALS = ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                  "(~/.aws/credentials), or use an instance role; for an S3-compatible server (MinIO) also set "
                  "VIDGEN_S3_ENDPOINT_URL")


def _error(op: str, uri: str, exc: BaseException, retried: bool) -> StorageError:
    if any(type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError") for e in _chain(exc)):
        return StorageError(f"{uri}: {op} failed: {NO_CREDENTIALS}")
    status, code = _client_error(exc)
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404") or any(
            isinstance(e, FileNotFoundError) for e in _chain(exc)):
        return StorageError(f"{uri}: not found")
    if status == 403 or any(isinstance(e, PermissionError) for e in _chain(exc)):
        return StorageError(f"{uri}: {op} failed: permission denied ({exc})")
    if retried and is_transient(exc):
        return StorageError(f"{uri}: {op} failed after {RETRY_ATTEMPTS} attempts: {exc}")
    return StorageError(f"{uri}: {op} failed: {exc}")


def _run(op: str, uri: str, fn: Callable[[], T]) -> T:
    """Run one operation on `uri`: with retries when remote; any failure becomes a StorageError."""
    remote = is_remote(uri)
    try:
        if remote:
            return retry(fn, attempts=RETRY_ATTEMPTS, base_delay=RETRY_BASE_DELAY, max_delay=RETRY_MAX_DELAY,
                         what=f"{uri}: {op}")
        return fn()
    except StorageError:
        raise
    except Exception as e:
        raise _error(op, uri, e, remote) from e


# ------------------------------------------------------------------------------------ reading, listing


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _run("exists", uri, lambda: fs.exists(path))


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _run("isdir", uri, lambda: fs.isdir(path))


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(_run("size", uri, lambda: fs.size(path)))


def _hidden(rel: str) -> bool:
    return any(part.startswith(TMP_PREFIX) for part in rel.split("/"))


def listdir(uri: str) -> list[str]:
    """Full URIs of the direct children of directory `uri`, sorted."""
    fs, path = filesystem(uri)
    if not isdir(uri):
        if exists(uri):
            raise StorageError(f"{uri}: list failed: not a directory")
        raise StorageError(f"{uri}: not found")
    root = path.rstrip("/")
    entries = _run("list", uri, lambda: fs.ls(path, detail=False))
    names = {posixpath.basename(p.rstrip("/")) for p in entries if p.rstrip("/") != root}
    return sorted(join(uri, n) for n in names if n and not _hidden(n))


def _relative_files(uri: str) -> list[str]:
    """Paths (with '/') of every file under `uri`, relative to it; [""] when `uri` is a file."""
    fs, path = filesystem(uri)
    root = path.rstrip("/")
    if not is_remote(uri):
        if os.path.isfile(root):
            return [""]
        if not os.path.isdir(root):
            raise StorageError(f"{uri}: not found")
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            out += [f if rel_dir == "." else f"{rel_dir}/{f}" for f in filenames if not f.startswith(TMP_PREFIX)]
        return out
    found = _run("list", uri, lambda: fs.find(path, withdirs=False))
    if not found and not exists(uri):
        raise StorageError(f"{uri}: not found")
    if found == [root]:
        return [""]
    return [rel for p in found if p.startswith(root + "/") and (rel := p[len(root) + 1:])
            and not rel.endswith("/") and not _hidden(rel)]


def walk_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Full URIs of every file under `uri` (recursive), sorted; `suffixes` filters, ignoring case."""
    rels = _relative_files(uri)
    if suffixes:
        wanted = tuple(s.lower() for s in suffixes)
        rels = [r for r in rels if (r or uri).lower().endswith(wanted)]
    return sorted(join(uri, r) if r else uri for r in rels)


@dataclass
class FileTree:
    """Every file under a root, grouped by folder, without a URI string per file (see `walk_tree`).

    Folder d (`dirs[d]`, relative to the root with '/'; "" is the root) holds the files
    `names[c] for c in codes[offsets[d]:offsets[d + 1]]`: base names are stored once each, since frame
    names repeat from folder to folder. A root that is itself a file is `is_file`: one folder "" holding it.
    Folders and files are in no particular order; a local folder holding nothing at all is listed, with no file
    (object storage has no empty folders).
    """

    uri: str
    dirs: list[str]
    offsets: np.ndarray  # int64 [len(dirs) + 1]
    codes: np.ndarray  # int32 [files]: index into names
    names: list[str]
    is_file: bool = False

    def __len__(self) -> int:
        return len(self.codes)

    def file_uri(self, d: int, name: str) -> str:
        """The URI of file `name` in folder d, spelled as `walk_files` spells it."""
        if self.is_file:
            return self.uri
        return join(self.uri, f"{self.dirs[d]}/{name}" if self.dirs[d] else name)

    def dir_uri(self, d: int) -> str:
        """The URI of folder d: the parent part of its files' URIs."""
        return self.file_uri(d, "x").rpartition("/")[0]

    def file_dirs(self) -> np.ndarray:
        """int32 [files]: each file's folder index."""
        return np.repeat(np.arange(len(self.dirs), dtype=np.int32), np.diff(self.offsets))

    def uris(self) -> list[str]:
        """Every file's URI, sorted: what `walk_files` returns (for small trees: one string per file)."""
        dirs = self.file_dirs()
        return sorted(self.file_uri(int(d), self.names[c]) for d, c in zip(dirs.tolist(), self.codes.tolist()))


class _TreeBuilder:
    def __init__(self, uri: str):
        self.uri, self.dirs, self.counts, self.codes = uri, [], array("q"), array("i")
        self.index: dict[str, int] = NameCodes()

    def add(self, rel_dir: str, names: Iterable[str], keep: bool = False) -> None:
        start = len(self.codes)
        self.codes.extend(map(self.index.__getitem__, names))
        if len(self.codes) > start or keep:
            self.dirs.append(rel_dir)
            self.counts.append(len(self.codes) - start)

    def build(self, is_file: bool = False) -> FileTree:
        offsets = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.counts, dtype=np.int64), out=offsets[1:])
        return FileTree(self.uri, self.dirs, offsets, np.frombuffer(self.codes, dtype=np.int32).copy(),
                        list(self.index), is_file)


class NameCodes(dict):
    """name -> code, handing out the next code to a name it has not seen."""

    def __missing__(self, key: str) -> int:
        code = self[key] = len(self)
        return code


def walk_tree(uri: str, threads: int | None = None) -> FileTree:
    """Every file under `uri` (recursive), grouped by folder: what `walk_files` lists, in a compact form.

    Local trees are walked with os.scandir, one folder at a time (no stat per file). Object storage is
    listed in parallel: the root's top level with a delimiter, then each top-level prefix recursively,
    `threads` (default LIST_THREADS) LIST requests at a time, each retried like every remote call. Skips
    what walk_files skips (names starting with TMP_PREFIX); StorageError when `uri` does not exist.
    """
    if is_remote(uri):
        return _remote_tree(uri, threads or LIST_THREADS)
    root = local_path(uri)
    builder = _TreeBuilder(uri)
    if os.path.isfile(root):
        builder.add("", [os.path.basename(root)])
        return builder.build(is_file=True)
    if not os.path.isdir(root):
        raise StorageError(f"{uri}: not found")
    stack = [""]
    while stack:  # depth first, as os.walk; symlinked folders are not entered (os.walk's default)
        rel = stack.pop()
        try:
            entries = os.scandir(os.path.join(root, rel) if rel else root)
        except OSError as e:
            if not rel:
                raise _error("list", uri, e, False) from e
            continue  # os.walk skips folders it cannot read
        files, subdirs = [], 0
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith(TMP_PREFIX):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    files.append(name)
                elif not entry.is_symlink():
                    stack.append(f"{rel}/{name}" if rel else name)
                    subdirs += 1
        builder.add(rel, files, keep=bool(rel) and not subdirs)  # an empty leaf folder is listed, holding nothing
    return builder.build()


def _remote_tree(uri: str, threads: int) -> FileTree:
    fs, path = filesystem(uri)
    root = path.rstrip("/")
    builder = _TreeBuilder(uri)
    top = _run("list", uri, lambda: fs.ls(root, detail=True))
    entries = [(e["name"].rstrip("/"), e.get("type")) for e in top]
    if len(entries) == 1 and entries[0][0] == root and entries[0][1] != "directory":
        builder.add("", [root.rpartition("/")[2]])
        return builder.build(is_file=True)
    names = [(p[len(root) + 1:], kind) for p, kind in entries if p.startswith(root + "/")]
    builder.add("", sorted(n for n, kind in names if kind != "directory" and n and not _hidden(n)))
    prefixes = sorted(n for n, kind in names if kind == "directory" and n and not _hidden(n))

    def subtree(prefix: str) -> dict[str, list[str]]:
        found = _run("list", join(uri, prefix), lambda: fs.find(f"{root}/{prefix}", withdirs=False))
        grouped: dict[str, list[str]] = defaultdict(list)
        for p in found:
            rel = p[len(root) + 1:] if p.startswith(root + "/") else ""
            if rel and not rel.endswith("/") and not _hidden(rel):
                parent, _, name = rel.rpartition("/")
                grouped[parent].append(name)
        return grouped

    for grouped in _ordered_map(subtree, prefixes, threads):
        for rel_dir, files in grouped.items():
            builder.add(rel_dir, files)
    return builder.build()


def _ordered_map(fn: Callable[[Any], T], items: Iterable[Any], threads: int) -> Iterator[T]:
    """fn over items in a pool of `threads`, results in order, at most 4 x threads calls queued (so a
    million items never become a million futures)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return _run("read", uri, lambda: fs.cat_file(path))


def read_text(uri: str, encoding: str = "utf-8") -> str:
    data = read_bytes(uri)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise StorageError(f"{uri}: read failed: not {encoding} text ({e})") from e


def open(uri: str, mode: str = "rb") -> IO:  # shadows builtins.open on purpose: storage.open(uri)
    """A file object for reading. Writes go through write_* or atomic_local, which are atomic."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"{uri}: storage.open is read-only (mode {mode!r}); write with write_bytes, "
                         "write_text, write_json or atomic_local")
    fs, path = filesystem(uri)
    return _run("open", uri, lambda: fs.open(path, mode))


# ------------------------------------------------------------------------------------------- writing


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    _run("makedirs", uri, lambda: fs.makedirs(path, exist_ok=True))


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file, or a directory with recursive=True; a missing `uri` is an error."""
    fs, path = filesystem(uri)
    if not exists(uri):
        raise StorageError(f"{uri}: not found")
    if not recursive and isdir(uri):
        raise StorageError(f"{uri}: remove failed: is a directory (pass recursive=True)")
    if not is_remote(uri):
        _run("remove", uri, lambda: shutil.rmtree(path) if os.path.isdir(path) else os.remove(path))
    else:
        _run("remove", uri, lambda: fs.rm(path, recursive=recursive))


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems (and directories on them) cannot fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit_local(tmp: str, target: str, scratch: str) -> None:
    """Move finished `tmp` (file or directory) to `target`; `scratch` is a dir on the same filesystem."""
    if os.path.isdir(tmp):
        for dirpath, _, filenames in os.walk(tmp):
            for f in filenames:
                _fsync(os.path.join(dirpath, f))
        if os.path.lexists(target):  # rename() cannot replace a non-empty directory: move the old one aside
            os.replace(target, os.path.join(scratch, TMP_PREFIX + "old"))
        os.replace(tmp, target)
    else:
        _fsync(tmp)
        os.replace(tmp, target)
    _fsync(os.path.dirname(target))


@contextlib.contextmanager
def atomic_local(uri: str, suffix: str = "") -> Iterator[str]:
    """Yield a local path that does not exist yet; on clean exit its contents appear at `uri` at once.

    Write a file (or create a directory) at the yielded path. The path ends with `suffix` so that
    encoders can pick a format from it (`atomic_local(uri, ".mp4")`). On an exception nothing is
    written to `uri`, an existing object there stays as it was, and the temporary files are removed.
    A local directory replaces the old one whole; a remote directory is uploaded file by file (each
    file is atomic, the directory as a whole is not, and files already under `uri` stay).
    """
    name = posixpath.basename(uri.rstrip("/").replace(os.sep, "/"))
    if not name:
        raise StorageError(f"{uri}: write failed: the URI names no file")
    target = local_path(uri)
    if target is not None:
        parent = os.path.dirname(target)
        _run("makedirs", parent, lambda: os.makedirs(parent, exist_ok=True))
        scratch = _run("write", uri, lambda: tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    else:
        scratch = tempfile.mkdtemp(prefix=TMP_PREFIX)
    tmp = os.path.join(scratch, name if name.endswith(suffix) else name + suffix)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise StorageError(f"{uri}: write failed: nothing was written to the temporary path {tmp}")
        if target is not None:
            _run("write", uri, lambda: _commit_local(tmp, target, scratch))
        elif os.path.isdir(tmp):
            upload_dir(tmp, uri)
        else:
            fs, path = filesystem(uri)
            _run("write", uri, lambda: fs.put_file(tmp, path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (see the module docstring)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        _run("write", uri, lambda: fs.pipe_file(path, bytes(data)))
        return
    with atomic_local(uri) as tmp, builtins.open(tmp, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def write_json(uri: str, obj: Any, indent: int | None = 2) -> None:
    write_text(uri, json.dumps(obj, indent=indent) + "\n")


# ----------------------------------------------------------------------------------------- directories


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under local directory `local_dir` to `uri` (each file written atomically)."""
    src = local_path(local_dir)
    if src is None or not os.path.isdir(src):
        raise StorageError(f"{local_dir}: upload failed: not a local directory")
    for rel in _relative_files(src):
        dest = join(uri, rel)
        if is_remote(dest):
            fs, path = filesystem(dest)
            _run("upload", dest, functools.partial(fs.put_file, os.path.join(src, rel), path))
        else:
            with atomic_local(dest) as tmp:
                shutil.copyfile(os.path.join(src, rel), tmp)


def download_dir(uri: str, local_dir: str) -> None:
    """Copy every file under `uri` into local directory `local_dir` (each file written atomically)."""
    dest_root = local_path(local_dir)
    if dest_root is None:
        raise StorageError(f"{local_dir}: download failed: not a local path")
    for rel in _relative_files(uri):
        if not rel:
            raise StorageError(f"{uri}: download failed: a file, not a directory")
        src = join(uri, rel)
        with atomic_local(os.path.join(dest_root, *rel.split("/"))) as tmp:
            if is_remote(src):
                fs, path = filesystem(src)
                _run("download", src, functools.partial(fs.get_file, path, tmp))
            else:
                shutil.copyfile(local_path(src), tmp)  # type: ignore[arg-type]


@contextlib.contextmanager
def _file_lock(path: str, what: str) -> Iterator[bool]:
    """Hold an exclusive inter-process lock (flock) on the file `path` for the block; `what` names it in logs.

    The kernel releases a flock when its holder exits or is killed, so a dead holder never blocks the next
    process; the lock file itself stays (unlinking it would let two processes lock two different files).
    Yields True; on a filesystem without flock (ENOLCK, EOPNOTSUPP) the block runs unlocked and gets False."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process on this node is copying it; waiting for that copy", what)
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("%s: waited %.1f s for the other process's copy", what, time.monotonic() - start)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: no file locks on this filesystem (%s); copying without one", path, e)
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def cached_local_dir(uri: str, cache_dir: str) -> str:
    """A local directory holding the files of directory `uri`.

    Local paths come back as they are. A remote directory is copied once into
    `cache_dir/<sha256(uri)[:16]>`: into a temporary directory first, then renamed into place with
    a `.complete` marker, so a half-finished copy is never reused; later calls reuse the copy without
    touching the remote store. The processes sharing `cache_dir` (a node's workers) make one copy between
    them: a flock on `<dest>.lock` lets one download while the others wait for it, then reuse it; a killed
    copier's lock is released by the kernel, and the next process starts a fresh copy.
    """
    local = local_path(uri)
    if local is not None:
        if not os.path.isdir(local):
            raise StorageError(f"{uri}: not found" if not os.path.exists(local) else f"{uri}: not a directory")
        return local
    cache = local_path(cache_dir)
    if cache is None:
        raise StorageError(f"{cache_dir}: cache_dir must be a local directory")
    dest = os.path.join(cache, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(dest, COMPLETE_MARKER)):
        return dest
    os.makedirs(cache, exist_ok=True)
    # scratch copies are named by destination and host, so a later holder of the lock can remove what a killed
    # copier on this host left (gigabytes); another host's copy is never touched (its flock may not reach here)
    mine = f"{TMP_PREFIX}{os.path.basename(dest)}-{socket.gethostname()}-"
    with _file_lock(dest + ".lock", uri) as locked:
        if os.path.exists(os.path.join(dest, COMPLETE_MARKER)):  # copied by the process this one waited for
            return dest
        if locked:  # no live process on this host copies this URI now
            for stale in os.listdir(cache):
                if stale.startswith(mine):
                    shutil.rmtree(os.path.join(cache, stale), ignore_errors=True)
        scratch = tempfile.mkdtemp(prefix=mine, dir=cache)
        try:
            start = time.monotonic()
            download_dir(uri, scratch)
            with builtins.open(os.path.join(scratch, COMPLETE_MARKER), "w") as f:
                json.dump({"uri": uri}, f)
            try:
                os.rename(scratch, dest)
            except OSError:  # only without working locks: another process may have renamed its copy first
                if os.path.exists(os.path.join(dest, COMPLETE_MARKER)):
                    return dest
                shutil.rmtree(dest, ignore_errors=True)  # a stray, unfinished copy
                os.rename(scratch, dest)
            log.info("copied %s to %s in %.1f s", uri, dest, time.monotonic() - start)
            return dest
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
