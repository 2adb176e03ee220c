"""Which URLs the platform may fetch: a document must not make weft call internal services.

By default only ``http``/``https`` URLs to public addresses are allowed; loopback, private,
link-local, multicast, reserved and unspecified addresses are refused, as are ``localhost`` names
and the legacy IPv4 spellings (``2130706433``, ``0x7f.1``) that resolvers accept. Hosts named in
``allowed_hosts`` (``"host"`` or ``"host:port"``) pass anyway: the sample world allows its own
loopback server this way, and it is the only exception the platform makes.

Two checks, one policy: :meth:`HostPolicy.refusal` judges a URL as written (before anything is fetched, and
again for every redirect target), :meth:`HostPolicy.address_refusal` judges the address a connection is about to
be made to, after DNS (with ``resolve_dns``, the default). The downloader connects to exactly the address it
checked (:mod:`pipelines.data.fetch_guard`), so a name cannot pass the check and then resolve elsewhere.
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
    resolve_dns: bool = True
    """Check the address every connection goes to, after DNS: a name that resolves to a non-public address is
    refused (off: names are judged as written, and ``vm`` -> 127.0.0.1 passes)."""
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
        return None

    def allows(self, url: str) -> bool:
        return self.refusal(url) is None

    def checks_addresses(self, host: str, port: int) -> bool:
        """Whether a connection to ``host:port`` (as written in the URL) must have its address checked."""
        host = host.rstrip(".").lower()
        allowed = host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts
        return self.resolve_dns and not self.allow_private and not allowed

    def address_refusal(self, host: str, address: str) -> str | None:
        """Why a connection for ``host`` may not go to IP ``address`` (what DNS gave), or ``None``."""
        reason = _non_public(ipaddress.ip_address(address.split("%", 1)[0]))
        if reason is None:
            return None
        return reason if _literal_address(host.rstrip(".").lower()) is not None else f"{host!r} resolves to {reason}"


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
