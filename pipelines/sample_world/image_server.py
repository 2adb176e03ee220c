"""A loopback HTTP image server with deterministic fault injection.

Serves a mapping ``path → bytes`` on ``127.0.0.1`` at an ephemeral port, from a bounded pool of
threads, and fails some URLs the ways the web does. Which URL fails how is a pure function of
``(seed, path)``, so every run of a test sees the same faults; a ``transient`` share of the faulty
URLs fails only on first contact, so a retry pass can recover them.

    with ImageServer(world.routes(), FaultConfig(not_found=0.1, timeout=0.05)) as server:
        server.url("/images/p000001.jpg")   # http://127.0.0.1:PORT/images/p000001.jpg
        server.request_count                # every request so far
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from typing import Mapping

from PIL import Image

FAULTS = ("not_found", "server_error", "timeout", "truncated", "not_image", "oversized")


@dataclass(frozen=True)
class FaultConfig:
    """Rates of each fault over URLs (they must sum to <= 1), and how they behave."""

    not_found: float = 0.0
    """404."""
    server_error: float = 0.0
    """500."""
    timeout: float = 0.0
    """The response is held for ``delay_s`` (longer than the client's timeout)."""
    truncated: float = 0.0
    """Content-Length promises the whole image; half of it is sent and the connection closed."""
    not_image: float = 0.0
    """200 with an HTML body."""
    oversized: float = 0.0
    """200 with a valid image of ``oversized_px`` x ``oversized_px`` (a decompression hazard)."""
    transient: float = 0.0
    """Share of faulty URLs whose fault happens on the first request only."""
    seed: int = 0
    delay_s: float = 3.0
    oversized_px: int = 2048

    def __post_init__(self) -> None:
        rates = [getattr(self, f) for f in FAULTS]
        if any(r < 0 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {dict(zip(FAULTS, rates))}")
        if not 0 <= self.transient <= 1:
            raise ValueError("transient must be in [0, 1]")

    def _uniform(self, salt: str, path: str) -> float:
        digest = hashlib.sha256(f"{self.seed}:{salt}:{path}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def fault_for(self, path: str) -> str | None:
        """The fault planned for ``path`` (``None``: served normally). Pure function of seed and path."""
        u = self._uniform("fault", path)
        edge = 0.0
        for name in FAULTS:
            edge += getattr(self, name)
            if u < edge:
                return name
        return None

    def is_transient(self, path: str) -> bool:
        return self.fault_for(path) is not None and self._uniform("transient", path) < self.transient


class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address, handler, max_threads: int):
        # A deep accept backlog: a burst of clients waits for a free thread instead of timing out.
        self.request_queue_size = max(128, 4 * max_threads)
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_threads)

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ImageServer:
    """Threaded HTTP server on 127.0.0.1 (ephemeral port). Use as a context manager."""

    def __init__(self, routes: Mapping[str, bytes], faults: FaultConfig | None = None, *, max_threads: int = 32,
                 host: str = "127.0.0.1"):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"ImageServer binds loopback only, got host {host!r}")
        self.routes = routes
        self.faults = faults or FaultConfig()
        self.max_threads = max_threads
        self._host = host
        self._lock = threading.Lock()
        self._contacts: Counter[str] = Counter()
        self._served: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._oversized: bytes | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ImageServer":
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._httpd = _Server((self._host, 0), _make_handler(self), self.max_threads)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="weft-image-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses and counters
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def request_count(self) -> int:
        with self._lock:
            return sum(self._contacts.values())

    def requests_for(self, path: str) -> int:
        with self._lock:
            return self._contacts[path]

    def outcome_counts(self) -> dict[str, int]:
        """How each request was answered so far: ``ok`` or a fault name."""
        with self._lock:
            return dict(self._served)

    # ------------------------------------------------------------------ request handling
    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self._contacts[path] += 1
            contact = self._contacts[path]
        body = self.routes.get(path)
        fault = self.faults.fault_for(path) if body is not None else "not_found"
        if fault is not None and body is not None and contact > 1 and self.faults.is_transient(path):
            fault = None
        with self._lock:
            self._served[fault or "ok"] += 1
        if fault == "not_found":
            return _send(handler, 404, b"not found", "text/plain")
        if fault == "server_error":
            return _send(handler, 500, b"internal error", "text/plain")
        if fault == "timeout":
            # Sleep in slices so stopping the server is never held up by a slow response.
            deadline = time.monotonic() + self.faults.delay_s
            while time.monotonic() < deadline and not self._stopping.is_set():
                time.sleep(0.05)
            return _send(handler, 200, body, _content_type(path))
        if fault == "truncated":
            handler.send_response(200)
            handler.send_header("Content-Type", _content_type(path))
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.close_connection = True
            return None
        if fault == "not_image":
            return _send(handler, 200, b"<html><body>Sorry, this image moved.</body></html>", _content_type(path))
        if fault == "oversized":
            return _send(handler, 200, self._oversized_body(), "image/jpeg")
        return _send(handler, 200, body, _content_type(path))

    def _oversized_body(self) -> bytes:
        with self._lock:
            if self._oversized is None:
                side = self.faults.oversized_px
                buffer = io.BytesIO()
                Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="JPEG", quality=50)
                self._oversized = buffer.getvalue()
            return self._oversized


def _content_type(path: str) -> str:
    if path.endswith(".png"):
        return "image/png"
    return "image/jpeg"


def _send(handler: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up (its timeout); nothing left to answer


def _make_handler(server: ImageServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            server._respond(self)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            pass

    return Handler
