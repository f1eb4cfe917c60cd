"""vidgen.storage on local disk and on a real S3 API (moto on loopback): round trips, listings,
atomic writes (also under SIGKILL), the directory cache, and retries against a flaky endpoint."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults.s3proxy import FlakyProxy
from servers import free_port

from vidgen import storage
from vidgen.errors import StorageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """An empty directory: under tmp_path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_server").bucket() + "/store"


def all_files(root: str) -> list[str]:
    """Every file under `root`, temporaries included (storage's own listings hide those)."""
    local = storage.local_path(root)
    if local is not None:
        return sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
    import boto3

    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["VIDGEN_S3_ENDPOINT_URL"])
    keys = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return sorted(k["Key"][len(prefix) + 1:] for k in keys)


# ------------------------------------------------------------------------------------------ URIs


def test_join_and_paths():
    assert storage.join("s3://bkt", "a/", "/b.mp4") == "s3://bkt/a/b.mp4"
    assert storage.join("s3://bkt/x/", "y") == "s3://bkt/x/y"
    assert storage.join("gs://bkt") == "gs://bkt"
    assert storage.join("/data/run", "out", "v.mp4") == "/data/run/out/v.mp4"
    assert storage.join("file:///data", "v.mp4") == "file:///data/v.mp4"
    assert [storage.is_remote(u) for u in ("s3://b/k", "gs://b", "/x", "file:///x", "rel/x")] == [
        True, True, False, False, False]
    assert storage.local_path("file:///data/x.mp4") == "/data/x.mp4"
    assert storage.local_path("rel/x") == os.path.abspath("rel/x")
    assert storage.local_path("s3://b/k") is None


def test_s3_endpoint_precedence(monkeypatch):
    for name in storage.S3_ENDPOINT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert storage.s3_endpoint() is None
    for name, url in [("AWS_ENDPOINT_URL", "http://a:1"), ("AWS_ENDPOINT_URL_S3", "http://b:2"),
                      ("VIDGEN_S3_ENDPOINT_URL", "http://c:3")]:
        monkeypatch.setenv(name, url)
        fs, path = storage.filesystem("s3://bkt/key/x.mp4")
        assert (storage.s3_endpoint(), fs.endpoint_url, path) == (url, url, "bkt/key/x.mp4")
    assert storage.filesystem("s3://bkt/other")[0] is fs  # cached per endpoint
    with pytest.raises(StorageError, match="nosuchproto://x: no filesystem for protocol 'nosuchproto'"):
        storage.filesystem("nosuchproto://x")


def test_transient_error_classification():
    from botocore.exceptions import ClientError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    def translated(cause: BaseException, exc: BaseException) -> BaseException:
        exc.__cause__ = cause  # what s3fs raises: an OSError caused by the botocore error
        return exc

    assert storage.is_transient(client_error(503, "SlowDown"))
    assert storage.is_transient(translated(client_error(503, "SlowDown"), OSError(errno.EBUSY, "slow down")))
    assert storage.is_transient(client_error(500, "InternalError"))
    assert storage.is_transient(ConnectionResetError())
    assert storage.is_transient(TimeoutError())
    assert not storage.is_transient(client_error(403, "AccessDenied"))
    assert not storage.is_transient(translated(client_error(404, "NoSuchKey"), FileNotFoundError("k")))
    assert not storage.is_transient(ValueError("bad"))


# ---------------------------------------------------------------------------------- local and S3


def test_round_trip(root):
    payload = bytes(range(256)) * 100
    uri = storage.join(root, "a", "b.bin")
    storage.write_bytes(uri, payload)
    assert storage.read_bytes(uri) == payload
    assert storage.size(uri) == len(payload)
    assert storage.exists(uri) and not storage.isdir(uri) and storage.isdir(storage.join(root, "a"))
    with storage.open(uri) as f:
        assert f.read(3) == payload[:3]
    with pytest.raises(ValueError, match="read-only"):
        storage.open(uri, "wb")

    storage.write_text(storage.join(root, "t.txt"), "héllo\n")
    assert storage.read_text(storage.join(root, "t.txt")) == "héllo\n"
    storage.write_json(storage.join(root, "j.json"), {"a": [1, 2]})
    assert json.loads(storage.read_text(storage.join(root, "j.json"))) == {"a": [1, 2]}

    storage.remove(uri)
    assert not storage.exists(uri)
    for call in (storage.read_bytes, storage.size, storage.remove, storage.listdir):
        with pytest.raises(StorageError, match=f"^{re.escape(uri)}: not found$"):
            call(uri)
    assert all_files(root) == ["j.json", "t.txt"]


def test_file_uri_round_trip(tmp_path):
    uri = (tmp_path / "x" / "v.bin").as_uri()
    storage.write_bytes(uri, b"abc")
    assert (tmp_path / "x" / "v.bin").read_bytes() == b"abc"
    assert storage.listdir((tmp_path / "x").as_uri()) == [uri]
    assert storage.read_bytes(str(tmp_path / "x" / "v.bin")) == b"abc"


def test_listing(root):
    rels = ["b/2.mp4", "a.txt", "b/1.MP4", "b/sub/3.mp4", "c/x.json"]
    for rel in rels:
        storage.write_bytes(storage.join(root, rel), rel.encode())

    def j(*parts: str) -> str:
        return storage.join(root, *parts)

    assert storage.listdir(root) == [j("a.txt"), j("b"), j("c")]
    assert storage.listdir(j("b")) == [j("b", "1.MP4"), j("b", "2.mp4"), j("b", "sub")]
    assert storage.walk_files(root) == sorted(j(r) for r in rels)
    assert storage.walk_files(root, (".mp4",)) == [j("b", "1.MP4"), j("b", "2.mp4"), j("b", "sub", "3.mp4")]
    assert storage.walk_files(j("a.txt")) == [j("a.txt")]
    for call in (storage.listdir, storage.walk_files):
        with pytest.raises(StorageError, match=f"^{re.escape(j('nope'))}: not found$"):
            call(j("nope"))
    with pytest.raises(StorageError, match="not a directory"):
        storage.listdir(j("a.txt"))
    with pytest.raises(StorageError, match=f"{re.escape(j('b'))}: remove failed: is a directory"):
        storage.remove(j("b"))
    storage.remove(j("b"), recursive=True)
    assert storage.walk_files(root) == [j("a.txt"), j("c", "x.json")]


def test_failed_write_leaves_nothing(root):
    uri = storage.join(root, "out", "v.mp4")
    with pytest.raises(RuntimeError, match="encoder crashed"), storage.atomic_local(uri, ".mp4") as path:
        assert path.endswith(".mp4") and not os.path.exists(path)
        Path(path).write_bytes(b"half a video")
        raise RuntimeError("encoder crashed")
    assert not os.path.exists(os.path.dirname(path)), "temporary directory left behind"
    assert not storage.exists(uri) and all_files(root) == []

    storage.write_bytes(uri, b"good video")
    with pytest.raises(RuntimeError), storage.atomic_local(uri, ".mp4") as path:
        Path(path).write_bytes(b"bad")
        raise RuntimeError("encoder crashed")
    assert storage.read_bytes(uri) == b"good video"
    assert all_files(root) == ["out/v.mp4"]

    with storage.atomic_local(uri, ".mp4") as path:
        Path(path).write_bytes(b"new video")
    assert storage.read_bytes(uri) == b"new video" and all_files(root) == ["out/v.mp4"]

    with pytest.raises(StorageError, match="nothing was written"), storage.atomic_local(storage.join(root, "e")):
        pass
    assert all_files(root) == ["out/v.mp4"]


def test_atomic_local_directory(root):
    """What save_pretrained does: the yielded path becomes a directory."""
    uri = storage.join(root, "model")
    with storage.atomic_local(uri) as path:
        os.makedirs(os.path.join(path, "unet"))
        Path(path, "unet", "w.bin").write_bytes(b"w")
        Path(path, "config.json").write_text("{}")
    assert storage.walk_files(uri) == [storage.join(uri, "config.json"), storage.join(uri, "unet", "w.bin")]
    assert all_files(root) == ["model/config.json", "model/unet/w.bin"]
    if not storage.is_remote(root):  # locally a rewrite replaces the whole directory
        with storage.atomic_local(uri) as path:
            os.makedirs(path)
            Path(path, "other.bin").write_bytes(b"o")
        assert all_files(root) == ["model/other.bin"]


KILLED_WRITER = """
import sys, time
from vidgen import storage
with storage.atomic_local(sys.argv[1], ".mp4") as path:
    with open(path, "wb") as f:
        f.write(b"partial" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


def test_killed_writer_leaves_no_partial_file(root):
    done, fresh = storage.join(root, "done.mp4"), storage.join(root, "fresh.mp4")
    storage.write_bytes(done, b"complete")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for uri in (done, fresh):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, uri], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline() == b"writing\n"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
    assert storage.read_bytes(done) == b"complete"
    assert not storage.exists(fresh)
    assert storage.walk_files(root) == [done] and storage.listdir(root) == [done]
    # Locally the killed writers' temporaries remain, hidden, beside the target; S3 never saw them.
    leftovers = [f for f in all_files(root) if f != "done.mp4"]
    if storage.is_remote(root):
        assert leftovers == []
    else:
        assert len(leftovers) == 2 and all(f.startswith(storage.TMP_PREFIX) for f in leftovers)


def test_cached_local_dir_copies_once(s3_server, tmp_path):
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "config.json").write_text('{"layers": 2}')
    (src / "unet" / "weights.bin").write_bytes(os.urandom(4096))
    uri = s3_server.bucket() + "/models/tiny"
    storage.upload_dir(str(src), uri)
    assert storage.walk_files(uri) == [uri + "/config.json", uri + "/unet/weights.bin"]

    cache = tmp_path / "cache"
    first = Path(storage.cached_local_dir(uri, str(cache)))
    assert first == cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    assert (first / "unet" / "weights.bin").read_bytes() == (src / "unet" / "weights.bin").read_bytes()
    assert (first / storage.COMPLETE_MARKER).exists()
    mtime = (first / "unet" / "weights.bin").stat().st_mtime_ns

    storage.remove(uri, recursive=True)  # the second call must not need the remote copy at all
    assert not storage.exists(uri)
    assert storage.cached_local_dir(uri, str(cache)) == str(first)
    assert (first / "unet" / "weights.bin").stat().st_mtime_ns == mtime
    assert (first / "config.json").read_text() == '{"layers": 2}'

    with pytest.raises(StorageError, match=f"^{re.escape(uri)}-v2: not found$"):
        storage.cached_local_dir(uri + "-v2", str(cache))
    assert [n for n in os.listdir(cache) if not n.endswith(".lock")] == [first.name]  # no half-finished copy
    assert storage.cached_local_dir(str(src), str(cache)) == str(src)  # local: as is


COPIER = """
import os, sys, time
from vidgen import storage
uri, cache, log, go, hang = sys.argv[1:6]
real = storage.download_dir
def counted(u, d):  # one line per download started, then slow enough that every process is in the race
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    print("downloading", flush=True)
    time.sleep(60 if hang == "1" else 1.0)
    real(u, d)
storage.download_dir = counted
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
print(storage.cached_local_dir(uri, cache), flush=True)
"""


def test_cached_local_dir_one_copy_per_node(s3_server, tmp_path):
    """A node's workers share one copy: one process downloads while the others wait for it, and a copier
    killed mid-download (holding the lock) blocks nobody: the next process makes the copy."""
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "config.json").write_text('{"layers": 2}')
    (src / "unet" / "weights.bin").write_bytes(os.urandom(1 << 16))
    uri = s3_server.bucket() + "/models/big"
    storage.upload_dir(str(src), uri)
    cache, env = tmp_path / "cache", {**os.environ, "PYTHONPATH": str(REPO)}

    def start(log: Path, go: Path, hang: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", COPIER, uri, str(cache), str(log), str(go), str(int(hang))],
                                stdout=subprocess.PIPE, env=env, text=True)

    killed = start(tmp_path / "killed.log", tmp_path / "go0", hang=True)
    (tmp_path / "go0").touch()
    try:
        assert killed.stdout.readline() == "downloading\n"  # it holds the lock now
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        killed.stdout.close()

    log, go = tmp_path / "downloads.log", tmp_path / "go"
    procs = [start(log, go, hang=False) for _ in range(4)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.ready-*"))) < len(procs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a copier did not start"
            time.sleep(0.05)
        go.touch()  # all four ask for the same URI at the same moment
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 4
    dirs = {out.strip().splitlines()[-1] for out in outs}
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    assert dirs == {str(dest)}
    assert len(log.read_text().splitlines()) == 1  # exactly one download on this "node"
    assert (dest / "unet" / "weights.bin").read_bytes() == (src / "unet" / "weights.bin").read_bytes()
    assert (dest / "config.json").read_text() == '{"layers": 2}' and (dest / storage.COMPLETE_MARKER).exists()
    assert sorted(os.listdir(cache)) == sorted([dest.name, dest.name + ".lock"])  # the killed copy's scratch went


# -------------------------------------------------------------------------------------- retries


@pytest.fixture
def flaky(s3_server, monkeypatch) -> Iterator[tuple[FlakyProxy, str]]:
    """(proxy, bucket): storage talks to moto through the proxy for this test."""
    bucket = s3_server.bucket()
    proxy = FlakyProxy(s3_server.endpoint)
    monkeypatch.setenv("VIDGEN_S3_ENDPOINT_URL", proxy.url)
    yield proxy, bucket
    proxy.server.shutdown()
    proxy.server.server_close()


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vidgen.storage" and "retrying" in r.getMessage()]


def test_transient_errors_are_retried(flaky, caplog):
    proxy, bucket = flaky
    uri = bucket + "/clips/c.bin"
    caplog.set_level(logging.WARNING, logger="vidgen.storage")

    proxy.fail_next(2, 500, "InternalError")
    storage.write_bytes(uri, b"clip bytes")
    assert proxy.requests == [("PUT", 500), ("PUT", 500), ("PUT", 200)]

    proxy.fail_next(3, 503, "SlowDown")
    caplog.clear()
    assert storage.read_bytes(uri) == b"clip bytes"
    # Each attempt fails at its first request (s3fs sends HEAD for the size, then GET); the fourth succeeds.
    assert proxy.statuses()[:3] == [503] * 3 and set(proxy.statuses()[3:]) == {200}
    assert proxy.requests[-1] == ("GET", 200)
    warnings = retry_warnings(caplog)
    assert len(warnings) == 3 and all(w.startswith(f"{uri}: read: attempt") for w in warnings)


def test_retries_give_up_with_storage_error(flaky, caplog, monkeypatch):
    proxy, bucket = flaky
    uri = bucket + "/c.bin"
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY", 0.001)
    proxy.fail_next(100)
    with pytest.raises(StorageError, match=f"^{re.escape(uri)}: read failed after 5 attempts: "):
        storage.read_bytes(uri)
    assert proxy.statuses() == [503] * 5

    monkeypatch.setenv("VIDGEN_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="vidgen.storage")
    with pytest.raises(StorageError, match=f"^{re.escape(uri)}: read failed after 5 attempts: Could not connect"):
        storage.read_bytes(uri)
    assert len(retry_warnings(caplog)) == 4


def test_client_errors_are_not_retried(flaky, caplog):
    proxy, bucket = flaky
    caplog.set_level(logging.WARNING, logger="vidgen.storage")
    proxy.fail_next(0)
    with pytest.raises(StorageError, match=f"^{re.escape(bucket)}/missing.bin: not found$"):
        storage.read_bytes(bucket + "/missing.bin")
    assert proxy.statuses().count(404) == 1  # one attempt (s3fs may list the prefix after the 404)

    proxy.fail_next(1, 403, "AccessDenied")
    with pytest.raises(StorageError, match=f"^{re.escape(bucket)}/secret.bin: read failed: permission denied"):
        storage.read_bytes(bucket + "/secret.bin")
    assert proxy.statuses() == [403]
    assert retry_warnings(caplog) == []
