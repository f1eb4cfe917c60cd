"""Servers on loopback for tests (S3 API via moto, MLflow tracking). Owned by the storage/tracking work.

Session fixtures, each a real server in a subprocess on a free 127.0.0.1 port:

- `s3_server`: moto's server mode. Sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ("testing"),
  AWS_DEFAULT_REGION and VIDGEN_S3_ENDPOINT_URL for the session; `s3_server.bucket()` makes a fresh
  bucket and returns "s3://<name>". Processes started later (Ray workers) inherit the variables only
  if this fixture runs before they start.
- `mlflow_server`: `mlflow server` on a temporary sqlite store and artifact folder; yields its URL.
  It takes 5-30 s to start on a busy 2-core box, so it is launched as soon as collection shows that
  some test wants it, and boots while earlier tests run.

Every server runs in its own process group and is stopped (SIGTERM, then SIGKILL) at the end of the
session, whatever the tests did, and again at interpreter exit as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # the venv's bin/: moto_server and mlflow live beside python


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free 127.0.0.1 port for a server this process starts next, never one it gave before.

    Not bind(0)'s port: that one is free only until the kernel hands it to another process's bind(0) or connect(),
    and a Ray node binds its ports seconds after they are chosen while other tests (in another pytest-xdist process
    too) open connections and start Ray workers, any of which can take it first. Ports come from
    20000 up to the kernel's ephemeral range (32768 by default), above Ray's default worker ports (10002-19999); each
    pytest-xdist process draws from its own slice of that range, so two never pick the same port."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low, high = 20000, ephemeral if ephemeral > 21000 else 32768
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    size = (high - low) // count
    low += (int(worker) % count if worker.isdigit() else 0) * size
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randrange(low, low + size)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in 127.0.0.1:{low}-{low + size - 1}")


class ServerProcess:
    """A server subprocess in its own process group, with a log file and a readiness probe."""

    def __init__(self, name: str, argv: list[str], url: str, probe_path: str, workdir: str,
                 env: dict[str, str] | None = None):
        self.name, self.argv, self.url, self.probe_url = name, argv, url, url + probe_path
        self.workdir, self.env = workdir, env
        self.log_path = os.path.join(workdir, "server.log")
        self.proc: subprocess.Popen | None = None
        self.ready = self.stopped = False

    def start(self) -> None:
        if self.proc is not None:
            return
        with open(self.log_path, "wb") as log:
            # A new session, so that stop() can signal the whole group (mlflow server runs uvicorn as a child).
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env=self.env, start_new_session=True)
        _RUNNING.append(self)

    def wait_ready(self, timeout: float) -> None:
        self.start()
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not answer {self.probe_url} within {timeout:.0f} s:\n"
                            f"{self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.probe_url, timeout=2) as r:
                self.ready = r.status == 200
            if not self.ready:
                time.sleep(0.1)

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left after 3 s (their state is throwaway); idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc is not None:
            pgid = self.proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=3)
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.05)
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_RUNNING: list[ServerProcess] = []
_SERVERS: dict[str, ServerProcess] = {}


@atexit.register
def _stop_all() -> None:
    while _RUNNING:
        _RUNNING.pop().stop()


def _mlflow() -> ServerProcess:
    if "mlflow" not in _SERVERS:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="vidgen-mlflow-server-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No job runner (an extra huey process and seconds of start-up); no telemetry (no network here).
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
                   DO_NOT_TRACK="true")
        _SERVERS["mlflow"] = ServerProcess(
            "mlflow server",
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
             "--artifacts-destination", f"{workdir}/artifacts"],
            url=f"http://127.0.0.1:{port}", probe_path="/health", workdir=workdir, env=env,
        )
    return _SERVERS["mlflow"]


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI timeout, `timeout 600 pytest`) skips atexit: stop the servers first, then die as asked.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def on_sigterm(signum, frame):
            _stop_all()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Boot the slow MLflow server now, so that it starts while the tests before it run.
    if session.config.option.collectonly:
        return
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items):
        _mlflow().start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _stop_all()


class S3Server:
    """moto's S3 API on loopback; `bucket()` makes a fresh, empty bucket."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._names = itertools.count()
        self._prefix = f"vidgen-test-{uuid.uuid4().hex[:8]}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        name = f"{self._prefix}-{next(self._names)}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    server = ServerProcess("moto server", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                           url=f"http://127.0.0.1:{port}", probe_path="/moto-api/",
                           workdir=tempfile.mkdtemp(prefix="vidgen-moto-server-"))
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "VIDGEN_S3_ENDPOINT_URL": server.url}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    try:
        server.wait_ready(timeout=60)
        os.environ.update(env)
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):  # a developer's real credentials must not leak in
            os.environ.pop(k, None)
        yield S3Server(server.url)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """URL of a real `mlflow server` (sqlite store, proxied artifacts) for the whole session."""
    for attempt in range(3):
        server = _mlflow()
        try:
            server.wait_ready(timeout=180)
            break
        except pytest.fail.Exception:
            # The port picked at collection can be taken (Ray starts many listeners) before mlflow binds it:
            # a server that exited early gets a fresh port; one that hangs, or a third failure, fails the tests.
            if server.proc is None or server.proc.poll() is None or attempt == 2:
                server.stop()
                raise
            server.stop()
            _SERVERS.pop("mlflow", None)
    try:
        yield server.url
    finally:
        server.stop()


def mlflow_runs(db) -> list[tuple]:
    """(name, status) of every run in a sqlite MLflow store; none when the store was never made."""
    import sqlite3

    if not os.path.exists(db):
        return []
    with sqlite3.connect(db) as con:
        return con.execute("SELECT name, status FROM runs").fetchall()
