"""What the test servers share of serving HTTP: a threading server that knows its open
connections, a quiet keep-alive handler, and starting and stopping it on its own thread.

Stopping cuts the connections still open (a client's keep-alive connection would otherwise
keep a handler thread reading after the server is gone). Standard library only.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar


class TrackedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that keeps the set of its open connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)


class TrackedHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 handler that registers its connection with the server and logs nothing."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out promptly: no 40 ms stalls
    sys_version = ""
    server: TrackedServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log
        pass


def serve(httpd: TrackedServer, name: str) -> threading.Thread:
    """Serve ``httpd`` on a daemon thread named ``name``; returns the thread, started."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name=name, daemon=True)
    thread.start()
    return thread


def stop_serving(httpd: TrackedServer, thread: threading.Thread | None) -> None:
    """Stop ``httpd``, close its socket, cut the connections still open, join ``thread``."""
    httpd.shutdown()
    httpd.server_close()
    with httpd.connections_lock:
        for connection in list(httpd.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    if thread:
        thread.join(timeout=5)


_S = TypeVar("_S", bound="Serving")


class Serving:
    """start/stop and ``with`` for a test server that serves on its own thread: the class
    sets ``_host``, ``_port``, ``_httpd`` (None), ``_thread`` (None) and ``_thread_name``, and
    builds its HTTP server in ``_make_httpd``."""

    _host: str
    _port: int
    _httpd: TrackedServer | None
    _thread: threading.Thread | None
    _thread_name = "test-server"

    def _make_httpd(self) -> TrackedServer:
        raise NotImplementedError

    def start(self: _S) -> _S:
        if self._httpd is None:
            self._httpd = self._make_httpd()
            self._thread = serve(self._httpd, self._thread_name)
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            stop_serving(httpd, self._thread)

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
