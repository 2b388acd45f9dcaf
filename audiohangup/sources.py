# -*- test-case-name: tests.test_security,tests.test_listeners -*-
"""
Where a connection comes from, for the AudioSocket listeners and the HTTP
site alike: source address lists, the source a connection counts under for
the caps. Pure, no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """
    C{"10.0.0.0/8,::1"}: networks (IPv4 or IPv6, a bare address is a /32 or
    /128), or a ValueError naming the entry that is not one.
    """
    networks = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IPv4 or IPv6 address or network (CIDR)") from None
    if not networks:
        raise ValueError("no network given")
    return tuple(networks)


def address_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    An address as Twisted or X-Forwarded-For gives it, or None: an IPv6 zone
    dropped, a dual-stack socket's IPv4-mapped client as the IPv4 address.
    """
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class SourceACL:
    """The networks a listener accepts connections from; None accepts every source."""

    networks: tuple[IPNetwork, ...] | None = None

    def allows(self, host: str | None) -> bool:
        """
        C{host} is an IP address as Twisted gives it; None (a UNIX socket)
        is always allowed: its file's permissions say who may connect.
        """
        if self.networks is None or host is None:
            return True
        address = address_of(host)
        return address is not None and any(address in network for network in self.networks)


def is_loopback(host: str) -> bool:
    """True for a loopback address or C{localhost}; False for all interfaces ('', 0.0.0.0, ::)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def host_of(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4 address, or an IPv6 address's /64: what one host or site holds whole."""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def source_of(address: object) -> str | None:
    """
    The source a connection counts under for the caps on connections (an
    C{IAddress}): its IPv4 address (a dual-stack socket's IPv4 client too),
    or its IPv6 /64. Unlike L{audiohangup.http.access.source_key}, loopback addresses stay apart.
    None for a UNIX socket, whose file's mode already says who may connect.
    """
    host = getattr(address, "host", None)  # IPv4Address, IPv6Address; a UNIXAddress has none
    if not isinstance(host, str):
        return None
    ip = address_of(host)
    return host if ip is None else host_of(ip)
