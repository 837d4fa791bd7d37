"""IP networks as the settings name them."""

from __future__ import annotations

import ipaddress

import pytest

from service.networks import client_address, parse_networks, within


def test_cidrs_of_both_families_with_host_bits_and_spaces():
    assert parse_networks([" 10.1.2.3/8", "2001:db8::1/32 ", "127.0.0.1"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    assert parse_networks([]) == ()


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "example.com", ""])
def test_what_is_not_a_network_is_a_value_error(cidr):
    with pytest.raises(ValueError):
        parse_networks([cidr])


def test_within_takes_addresses_only():
    networks = parse_networks(["10.0.0.0/8", "::1/128"])
    assert within("10.1.2.3", networks) and within("::1", networks)
    assert not any(within(host, networks) for host in ("11.0.0.1", "localhost", "", None))


PROXIES = parse_networks(["10.0.0.0/8"])


@pytest.mark.parametrize("peer, forwarded, client", [
    ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # not a proxy: its header is the client's own say
    ("10.0.0.2", [], "10.0.0.2"),
    ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
    # The client wrote the left part itself; the proxies appended the right part.
    ("10.0.0.2", ["1.2.3.4, 198.51.100.1, 10.0.0.3"], "198.51.100.1"),
    ("10.0.0.2", ["1.2.3.4", "198.51.100.1"], "198.51.100.1"),  # repeated headers are one list
    ("10.0.0.2", ["10.0.0.9, 10.0.0.3"], "10.0.0.9"),  # proxies all the way: the leftmost
    ("10.0.0.2", ["198.51.100.1, not-an-address"], "10.0.0.2"),
    (None, ["198.51.100.1"], None),
])
def test_the_client_is_the_first_hop_from_the_right_that_is_no_trusted_proxy(peer, forwarded, client):
    assert client_address(peer, forwarded, PROXIES) == client
