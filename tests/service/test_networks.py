"""IP networks as the settings name them."""

from __future__ import annotations

import ipaddress

import pytest

from service.networks import parse_networks


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
