"""A real HTTP file server on 127.0.0.1 for the remote-shard tests, with faults injected per request.

`serve(root)` serves the files under `root` from a thread; `server.fault(path, "drop" | "corrupt" |
"missing", times=1)` makes the next `times` GETs of `path` break the connection half-way, flip one byte,
or answer 404; `server.requests[path]` counts the GETs each file received.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter, defaultdict
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.loader import serving


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests[self.path] += 1
            pending = server.faults[self.path]
            fault = pending.pop(0) if pending else None
        if fault == "missing":
            self.send_error(404)
            return
        file = Path(self.directory) / self.path.lstrip("/")
        if fault is None or not file.is_file():
            super().do_GET()
            return
        data = bytearray(file.read_bytes())
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "corrupt":
            data[len(data) // 2] ^= 0xFF
            self.wfile.write(bytes(data))
            return
        self.wfile.write(bytes(data[: len(data) // 2]))  # "drop": half the body, then the connection dies
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.faults: dict[str, list[str]] = defaultdict(list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault(self, path: str, kind: str, times: int = 1) -> None:
        with self.lock:
            self.faults[path] += [kind] * times


def serve(root: Path):
    """`with serve(root) as server:` the files under `root` on http://127.0.0.1:PORT (`server.url`)."""
    return serving(_Server(Path(root)))
