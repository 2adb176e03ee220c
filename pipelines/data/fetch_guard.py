"""What img2dataset's workers may fetch and keep: the host policy on every hop, a body cap and a pixel cap.

img2dataset fetches with ``urllib.request.urlopen`` (the process's installed opener) and decodes with OpenCV. Both
trust the web: redirects are followed wherever they point, host names resolve wherever DNS says, a body is read
to its end however long it is, and an image is decoded at whatever size its header claims. Here, per worker
process (img2dataset pickles its ``Downloader`` to each one, whichever distributor runs it):

- :class:`FetchGuard` is the policy: the :class:`~pipelines.data.hosts.HostPolicy`, ``max_body_bytes`` and
  ``max_image_area``;
- :func:`guarded_opener` is a urllib opener with no proxy, file, ftp or data handler whose connections check
  the address DNS gives against the policy and connect to exactly that address (no time-of-check/time-of-use gap,
  also on every redirect hop), whose redirects are checked as URLs first, and whose responses refuse a body past
  ``max_body_bytes`` while streaming (a ``Content-Length`` over it is refused before reading);
- :mod:`pipelines.data.img2dataset_guard` puts both into img2dataset: its resizer refuses an image over
  ``max_image_area`` from the header, before anything decodes it, and its downloader installs the opener in the
  worker before it downloads a shard.

A refusal is an error message starting with :data:`REFUSED`; the download stage records it per URL as status
``refused`` with the reason after the prefix, and never retries it.
"""

from __future__ import annotations

import functools
import http.client
import socket
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from pipelines.data.hosts import HostPolicy

REFUSED = "refused: "
"""Prefix of every refusal message (img2dataset records ``str(error)`` of a failed fetch)."""
READ_CHUNK = 1 << 16


class Refusal(ValueError):
    """A fetch or an image the guard refuses. A ``ValueError``, not an ``OSError``: urllib wraps OSErrors in
    ``URLError`` ("<urlopen error ...>"), this one reaches img2dataset's record as its plain message."""

    def __init__(self, reason: str) -> None:
        super().__init__(REFUSED + reason)


def refusal_reason(error: str | None) -> str | None:
    """The reason of a recorded refusal, or ``None`` when ``error`` is not one."""
    if error and error.startswith(REFUSED):
        return error[len(REFUSED):]
    return None


@dataclass(frozen=True)
class FetchGuard:
    """The bounds of one download (picklable: it travels to every worker)."""

    policy: HostPolicy
    max_body_bytes: int
    max_image_area: int


# ------------------------------------------------------------------------------ urllib opener


def _guarded_connection(host: str, port: int, timeout, source_address, *, policy: HostPolicy) -> socket.socket:
    """``socket.create_connection`` that resolves once, refuses the addresses the policy refuses and connects
    to the checked address itself."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, address in infos:
        reason = policy.address_refusal(host, address[0])
        if reason is not None:
            raise Refusal(reason)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # noqa: SLF001 (the stdlib's own sentinel)
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(address)
            return sock
        except OSError as err:
            sock.close()
            error = err
    raise error or OSError(f"no address for {host!r}")


class CappedResponse(http.client.HTTPResponse):
    """An HTTP response that refuses a body longer than ``max_bytes`` (declared or streamed)."""

    def __init__(self, sock, *args, max_bytes: int, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        self.max_bytes, self.bytes_read = max_bytes, 0

    def begin(self) -> None:
        super().begin()
        if self.length is not None and self.length > self.max_bytes:
            raise Refusal(f"Content-Length {self.length} over max_body_bytes {self.max_bytes}")

    def _count(self, n: int) -> int:
        self.bytes_read += n
        if self.bytes_read > self.max_bytes:
            self.close()
            raise Refusal(f"body over max_body_bytes {self.max_bytes} (stopped reading at {self.bytes_read} bytes)")
        return n

    def read(self, amt: int | None = None) -> bytes:
        if amt is None and self.length is not None:
            return super().read()  # declared, and within the cap (begin): the stdlib's read, IncompleteRead included
        if amt is not None:
            data = super().read(min(amt, self.max_bytes + 1))
            self._count(len(data))
            return data
        chunks = []
        while chunk := super().read(READ_CHUNK):
            self._count(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, buffer) -> int:
        return self._count(super().readinto(buffer))


class _GuardedConnectionMixin:
    guard: FetchGuard

    def _setup_guard(self, guard: FetchGuard) -> None:
        self.guard = guard
        self.response_class = functools.partial(CappedResponse, max_bytes=guard.max_body_bytes)
        if guard.policy.checks_addresses(self.host, self.port):
            self._create_connection = lambda address, timeout, source: _guarded_connection(
                *address, timeout, source, policy=guard.policy)


class GuardedHTTPConnection(_GuardedConnectionMixin, http.client.HTTPConnection):
    def __init__(self, host, *args, guard: FetchGuard, **kwargs) -> None:
        super().__init__(host, *args, **kwargs)
        self._setup_guard(guard)


class GuardedHTTPSConnection(_GuardedConnectionMixin, http.client.HTTPSConnection):
    def __init__(self, host, *args, guard: FetchGuard, **kwargs) -> None:
        super().__init__(host, *args, **kwargs)
        self._setup_guard(guard)


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: FetchGuard) -> None:
        super().__init__()
        self.guard = guard

    def http_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPConnection, guard=self.guard), req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: FetchGuard) -> None:
        super().__init__()
        self.guard = guard

    def https_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPSConnection, guard=self.guard), req, context=self._context)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the policy allows (its address is checked again when connecting)."""

    def __init__(self, policy: HostPolicy) -> None:
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urljoin(req.full_url, newurl)
        reason = self.policy.refusal(target)
        if reason is not None:
            raise Refusal(f"redirect to {urlsplit(target).netloc}: {reason}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(guard: FetchGuard) -> urllib.request.OpenerDirector:
    """An opener for http(s) only, under ``guard`` (no proxies from the environment: a proxy would be the
    connected address, and the target's address could not be checked)."""
    opener = urllib.request.OpenerDirector()
    for handler in (GuardedHTTPHandler(guard), GuardedHTTPSHandler(guard), GuardedRedirectHandler(guard.policy),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener
