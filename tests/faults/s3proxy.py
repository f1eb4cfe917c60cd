"""A fault-injecting HTTP proxy in front of the loopback S3 server (moto): errors on demand, error windows,
dropped connections. Storage talks to it through VIDGEN_S3_ENDPOINT_URL."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FlakyProxy:
    """A threaded HTTP proxy on loopback in front of the moto server that fails requests on demand."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.failures: list[tuple[int, str]] = []
        self.fail_until = 0.0  # monotonic time before which every request gets `window_status`
        self.window_status = 503
        self.drops = 0  # requests to answer by closing the connection, no reply
        self.injected = 0
        self.requests: list[tuple[str, int]] = []  # (method, status answered)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_next(self, n: int, status: int = 503, code: str = "SlowDown") -> None:
        with self.lock:
            self.failures = [(status, code)] * n
            self.requests.clear()

    def fail_for(self, seconds: float, status: int = 503) -> None:
        """Every request for `seconds` gets `status` (500: InternalError, 503: SlowDown)."""
        with self.lock:
            self.fail_until, self.window_status = time.monotonic() + seconds, status

    def drop_next(self, n: int) -> None:
        """The next n requests lose their connection: read, then closed without a reply."""
        with self.lock:
            self.drops = n

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def statuses(self) -> list[int]:
        return [s for _, s in self.requests]


def _handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date", "expect"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers botocore's `Expect: 100-continue` before it sends a body

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Content-Length"):
                return self.rfile.read(int(self.headers["Content-Length"]))
            body = b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while n := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(n)
                    self.rfile.readline()
                self.rfile.readline()
            return body

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, length: str | None = None):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", length or str(len(body)))
            self.send_header("Connection", "close")  # one request per connection: no stale keep-alives
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_any(self):
            body = self._body()
            with proxy.lock:
                failure = proxy.failures.pop(0) if proxy.failures else None
                if failure is None and time.monotonic() < proxy.fail_until:
                    failure = (proxy.window_status, "SlowDown" if proxy.window_status == 503 else "InternalError")
                drop = failure is None and proxy.drops > 0
                proxy.drops -= drop
                proxy.injected += bool(failure) or drop
            if drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the connection reset mid-request
                with proxy.lock:
                    proxy.requests.append((self.command, 0))
                return
            if failure:
                status, code = failure
                xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message>"
                headers, data, length = [("Content-Type", "application/xml")], (xml + "</Error>").encode(), None
            else:
                conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
                resp = conn.getresponse()
                status, data = resp.status, resp.read()
                conn.close()
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in hop]
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            with proxy.lock:  # before replying: the client's next request may overtake this thread
                proxy.requests.append((self.command, status))
            self._reply(status, headers, data, length)

        upstream_host, upstream_port = proxy.upstream.hostname, proxy.upstream.port
        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_any

    return Handler
