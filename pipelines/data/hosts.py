"""Which URLs the platform may fetch: a document must not make weft call internal services.

By default only ``http``/``https`` URLs to public addresses are allowed; loopback, private,
link-local, multicast, reserved and unspecified addresses are refused, as are ``localhost`` names
and the legacy IPv4 spellings (``2130706433``, ``0x7f.1``) that resolvers accept. Hosts named in
``allowed_hosts`` (``"host"`` or ``"host:port"``) pass anyway: the sample world allows its own
loopback server this way.

Limits (the downloader is img2dataset's urllib): names are checked as written unless
``resolve_dns`` is set, and a public server that redirects to an internal address is followed.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain")


@dataclass(frozen=True)
class HostPolicy:
    allow_private: bool = False
    """Allow every private/loopback/link-local address (a trusted intranet crawl)."""
    allowed_hosts: frozenset[str] = frozenset()
    """``host`` or ``host:port`` allowed even when private."""
    resolve_dns: bool = False
    """Also resolve host names and refuse any that map to a non-public address (slow; needs DNS)."""
    schemes: tuple[str, ...] = ("http", "https")

    @classmethod
    def allowing(cls, *base_urls: str) -> "HostPolicy":
        """The default policy plus the ``host:port`` of each given base URL (e.g. a loopback server)."""
        hosts = set()
        for url in base_urls:
            parts = urlsplit(url)
            hosts.add(f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}")
        return cls(allowed_hosts=frozenset(hosts))

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be fetched, or ``None`` when it may."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as err:
            return f"malformed url: {err}"
        if parts.scheme.lower() not in self.schemes:
            return f"scheme {parts.scheme!r} not allowed"
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            return "no host"
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        if host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts:
            return None
        if self.allow_private:
            return None
        address = _literal_address(host)
        if address is not None:
            return _non_public(address)
        if host == "localhost" or host.endswith(_LOCAL_SUFFIXES):
            return f"local host name {host!r}"
        if self.resolve_dns:
            try:
                infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
            except OSError as err:
                return f"cannot resolve {host!r}: {err}"
            for info in infos:
                reason = _non_public(ipaddress.ip_address(info[4][0].split("%", 1)[0]))
                if reason is not None:
                    return f"{host!r} resolves to {reason}"
        return None

    def allows(self, url: str) -> bool:
        return self.refusal(url) is None


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    # inet_aton accepts what C resolvers accept: 2130706433, 0x7f.1, 127.1, 0177.0.0.1.
    if all(c in "0123456789abcdefx." for c in host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for attribute in ("is_unspecified", "is_loopback", "is_link_local", "is_multicast", "is_reserved", "is_private"):
        if getattr(address, attribute):
            return f"{attribute[3:].replace('_', '-')} address {address}"
    return None
