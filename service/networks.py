"""IP networks as the settings name them (comma-separated CIDRs) and as the code checks them."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """ValueError for a CIDR that is not one; host bits are allowed (10.0.0.1/8 means 10.0.0.0/8)."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def within(host: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether `host` is an IP address in one of `networks` (a name or nothing is in none)."""
    address = _address(host)
    return address is not None and any(address in network for network in networks)


def client_address(peer: str | None, forwarded_for: Iterable[str], proxies: tuple[IPNetwork, ...]) -> str | None:
    """The address of the client behind `proxies`: `peer` itself unless it is one of them.

    Each proxy appends the address it was connected from to X-Forwarded-For, so the list is read
    from the right and the first hop not in `proxies` is the client; whatever lies left of it was
    written by that client and proves nothing. A hop that is not an address ends the walk there.
    """
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    address = peer
    while within(address, proxies) and hops and _address(hops[-1]) is not None:
        address = hops.pop()
    return address


def _address(text: str | None) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text or "")
    except ValueError:
        return None
