"""A Ray cluster of several nodes on this machine, for tests/test_multinode.py.

Each node is one `ray start --block` subprocess in a session of its own (its raylet, agents and the workers the
raylet forks stay in that session), so a test can lose a whole node at once by SIGKILLing that session's
processes, as a machine that dies would. Every node has its own --temp-dir and explicit ports, so the cluster
never meets another Ray on the machine (the pytest process's own session Ray included). Nodes get their
environment (S3 credentials and endpoint) from the `ray start` command, never from a Ray runtime env.

The pytest process never connects to this cluster: `Cluster.query` runs a short Python snippet in a subprocess
that connects, prints one JSON value, and exits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from servers import free_port

BIN = Path(sys.executable).parent


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (from /proc). A node's `ray start` leads a session of its own; the raylet
    gives every worker a process group of its own, but they all stay in that session."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] not in "ZX":
            pids.append(int(entry))
    return pids


def kill_session(sid: int, sig: int = signal.SIGKILL) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, however it dies (Ray's own processes fate-share with their
    `ray start --block`), so a killed pytest leaves no node behind."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Node:
    name: str
    resources: dict[str, float]
    proc: subprocess.Popen
    log_path: Path
    temp_dir: Path

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid)

    def processes_named(self, needle: str) -> list[int]:
        return [p for p in self.pids() if needle in cmdline(p)]


class Cluster:
    """Head + worker nodes, each a `ray start --block` session; `env` is every node's environment."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.nodes: dict[str, Node] = {}
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"

    # -- nodes ---------------------------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], resources: dict[str, float], num_cpus: int,
               attempts: int = 3, timeout: float = 240) -> Node:
        """Starts a node and returns once its `ray start` reports it running. Ray gives a node's raylet a hard-coded
        30 s to register with the GCS, and on a loaded machine (another test process busy on both cores) a node
        can miss that: its `ray start` then exits ("timed out during startup"), its processes are killed and it
        starts again, up to `attempts` times. The node's log keeps every attempt."""
        for attempt in range(1, attempts + 1):
            log_path = self._log_path(name)
            offset = log_path.stat().st_size if log_path.exists() else 0  # this attempt's output starts there
            node = self._launch(name, args, resources, num_cpus)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and node.proc.poll() is None:
                if "Ray runtime started." in node.log_path.read_text(errors="replace")[offset:]:
                    return node
                time.sleep(0.5)
            kill_session(node.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
            with open(node.log_path, "a") as log:
                log.write(f"\n[test harness] node {name}: attempt {attempt} of {attempts} did not start "
                          f"(exit {node.proc.returncode})\n")
        raise RuntimeError(f"node {name} did not start in {attempts} attempts:\n{self.log_tail(node)}")

    def _log_path(self, name: str) -> Path:
        return self.root / f"node-{name}.log"

    def _launch(self, name: str, args: list[str], resources: dict[str, float], num_cpus: int) -> Node:
        # Ray's socket paths must stay short: a temp dir under /tmp, not under pytest's tmp_path.
        temp_dir = Path(tempfile.mkdtemp(prefix=f"rmn{name[:2]}", dir="/tmp"))
        log_path = self._log_path(name)
        argv = [str(BIN / "ray"), "start", "--block", *args, f"--temp-dir={temp_dir}",
                f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
                "--object-store-memory=100000000", "--disable-usage-stats",
                "--min-worker-port=0", "--max-worker-port=0",  # OS-assigned: never the range of another Ray
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        node = self.nodes[name] = Node(name, resources, proc, log_path, temp_dir)
        return node

    def start_head(self, resources: dict[str, float], num_cpus: int) -> Node:
        return self._start("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                                    f"--ray-client-server-port={free_port()}", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"],
                           resources, num_cpus)

    def add_worker(self, name: str, resources: dict[str, float], num_cpus: int) -> Node:
        return self._start(name, [f"--address={self.address}", "--node-ip-address=127.0.0.1"], resources, num_cpus)

    def wait_for_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        """Until `n` nodes are alive; returns them (NodeID, Resources, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes.values():
                if node.proc.poll() is not None:
                    raise RuntimeError(f"node {node.name} exited ({node.proc.returncode}):\n{self.log_tail(node)}")
            try:
                alive = [x for x in self.query("ray.nodes()", timeout=60) if x["Alive"]]
            except RuntimeError:
                alive = []
            if len(alive) >= n:
                return alive
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(alive)} of {n} nodes alive after {timeout:.0f} s")
            time.sleep(0.5)

    def kill_node(self, name: str) -> None:
        """Lose a node at once, as a machine that dies: SIGKILL to every process of its session (`ray start`, the
        raylet, its agents, the workers it forked)."""
        node = self.nodes[name]
        for _ in range(3):  # again, for anything forked while the first signals went out
            kill_session(node.proc.pid)
        node.proc.wait()

    def shutdown(self) -> None:
        """SIGTERM to every node's processes (workers first, the head last), SIGKILL to whatever is left after 5 s
        (the cluster's state is throwaway); then its temp dirs go."""
        order = sorted(self.nodes.values(), key=lambda n: n.name == "head")
        for node in order:
            kill_session(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(n.pids() for n in order):
            time.sleep(0.1)
        for node in order:
            kill_session(node.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=5)
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def log_tail(self, node: Node, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return node.log_path.read_text(errors="replace")[-n:]
        return ""

    # -- looking at the cluster from outside ---------------------------------------------------------------------

    def query(self, expr: str, timeout: float = 60, setup: str = "") -> object:
        """Evaluate `expr` in a fresh process connected to the cluster; its JSON value."""
        code = textwrap.dedent(f"""
            import json, logging, sys
            import ray
            ray.init(address={self.address!r}, log_to_driver=False, logging_level=logging.ERROR)
            {setup}
            sys.stdout.write("\\n@@" + json.dumps({expr}, default=str))
        """)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env,
                           timeout=timeout, cwd=self.root)
        if p.returncode != 0 or "\n@@" not in p.stdout:
            raise RuntimeError(f"query {expr!r} failed ({p.returncode}): {p.stderr[-2000:]}")
        # The value's line only: Ray may print errors published to every driver after it (a node that died: then
        # wait_for_nodes sees its `ray start --block` exit and reports that node's log).
        return json.loads(p.stdout.split("\n@@", 1)[1].split("\n", 1)[0])


class S3Gate:
    """An HTTP proxy on loopback in front of the S3 test server that can freeze a training run at a known point.

    `freeze_after_first_checkpoint(prefix)`, with `prefix` the run's folder as a path on the server
    ("/<bucket>/<storage path>/<run.name>/"): writes into any checkpoint folder of the run but the first are held
    (not forwarded, not answered) until Ray Train has written its checkpoint manager's snapshot, which it does once it
    has registered that first checkpoint; from then on every request is held, until `release()`. So at the moment
    `frozen` is set, checkpoint 1 is registered and checkpoint 2 cannot be, however fast or slow the machine: a test
    can do something to the cluster there, then let the run go on. Held requests go through after `hold_limit`
    seconds whatever happens, so a failing test never hangs on the gate."""

    def __init__(self, upstream: str, hold_limit: float = 180):
        self.upstream = urlsplit(upstream)
        self.hold_limit = hold_limit
        self.released = threading.Event()  # held requests go on
        self.released.set()
        self.frozen = threading.Event()  # every request is held
        self.prefix: str | None = None
        self.first: str | None = None  # the run's first checkpoint folder
        self.lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), _gate_handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def freeze_after_first_checkpoint(self, prefix: str) -> None:
        with self.lock:
            self.prefix, self.first = prefix, None
            self.frozen.clear()
            self.released.clear()

    def release(self) -> None:
        with self.lock:
            self.prefix = None
            self.released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def _hold(self, path: str) -> bool:
        with self.lock:
            if self.released.is_set():
                return False
            hold = self.frozen.is_set()
            if not hold and self.prefix and path.startswith(self.prefix):
                folder = path[len(self.prefix):].split("/", 1)[0]
                if re.match(r"checkpoint_\d", folder):  # Ray's checkpoint_<timestamp>
                    self.first = self.first or folder
                    hold = folder != self.first
            return hold

    def _after(self, method: str, target: str) -> None:
        """After the server answered `method target`: freeze once the snapshot is written (one PUT, or the POST
        that completes a multipart upload; not the POST that starts one, nor a part)."""
        path, _, query = target.partition("?")
        written = (method == "PUT" and "partNumber=" not in query) or (method == "POST" and "uploadId=" in query)
        with self.lock:
            if self.prefix and written and path == self.prefix + "checkpoint_manager_snapshot.json":
                self.frozen.set()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that died while its request was held (its node was killed): nothing to report


def _gate_handler(gate: S3Gate) -> type[BaseHTTPRequestHandler]:
    hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date", "expect"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # lets BaseHTTPRequestHandler answer botocore's `Expect: 100-continue`

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Content-Length"):
                return self.rfile.read(int(self.headers["Content-Length"]))
            body = b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            return body

        def do_any(self) -> None:
            body = self._body()
            path = self.path.split("?", 1)[0]
            if gate._hold(path):
                gate.released.wait(gate.hold_limit)
            conn = http.client.HTTPConnection(gate.upstream.hostname, gate.upstream.port, timeout=60)
            conn.request(self.command, self.path, body=body,
                         headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            gate._after(self.command, self.path)  # before the reply: the writer's next request is already held
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in hop:
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.close_connection = True

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_any

    return Handler
