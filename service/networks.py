"""IP networks as the settings name them (comma-separated CIDRs) and as the code checks them."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """ValueError for a CIDR that is not one; host bits are allowed (10.0.0.1/8 means 10.0.0.0/8)."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)
