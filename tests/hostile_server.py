"""A loopback HTTP server that answers as a hostile web does: a decompression bomb, an endless body, redirects.

    with HostileServer() as server:
        server.url("/bomb.png")                   # a 20000 x 20000 RGB PNG of ~1.2 MB (1.2 GB decoded)
        server.url("/endless")                    # 200, no Content-Length, bytes until the client hangs up
        server.url("/redirect?to=http://...")     # 302 to ``to``
        server.url("/ok.png")                     # a small valid PNG
        server.requests["/ok.png"]                # requests per path
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

ENDLESS_SAFETY_BYTES = 3 << 30
"""Even an endless body ends somewhere: a client without a cap holds this much before the server stops."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid, all-black RGB PNG of ``width`` x ``height`` whose file is ~1000x smaller than its pixels.

    Every scanline is a zero filter byte and zero pixels, so the zlib stream is one compressed block of zeros
    repeated (each ends in a full flush, so the copies are independent) and the Adler-32 of n zeros is
    ``(n mod 65521) << 16 | 1``: built in milliseconds without ever holding the pixels."""
    raw_size = height * (1 + 3 * width)
    block = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    whole = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = raw_size % block
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    rest = compressor.compress(bytes(tail)) + compressor.flush(zlib.Z_FULL_FLUSH) if tail else b""
    final = b"\x01\x00\x00\xff\xff"  # an empty stored block marked last
    adler = ((raw_size % 65521) << 16) | 1
    stream = b"\x78\xda" + whole * (raw_size // block) + rest + final + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class HostileServer:
    """Threaded HTTP server on 127.0.0.1 (ephemeral port); a context manager."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.endless_bytes_sent = 0
        self._bodies = {"/ok.png": small_png()}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> "HostileServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def body(self, path: str) -> bytes | None:
        with self._lock:
            if path == "/bomb.png" and path not in self._bodies:
                self._bodies[path] = png_bomb()
            return self._bodies.get(path)


def _handler(server: HostileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the endless body is delimited by closing the connection

        def do_GET(self):  # noqa: N802 (http.server's naming)
            parts = urlsplit(self.path)
            with server._lock:
                server.requests[parts.path] += 1
            if parts.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", parse_qs(parts.query)["to"][0])
                self.end_headers()
                return
            if parts.path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                chunk = bytes(1 << 16)
                try:
                    while server.endless_bytes_sent < ENDLESS_SAFETY_BYTES:
                        self.wfile.write(chunk)
                        server.endless_bytes_sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: what a capped client does
                return
            body = server.body(parts.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            pass

    return Handler
