"""Which addresses a webhook may reach: loopback, private, link-local and metadata are refused."""

from __future__ import annotations

import ipaddress

import pytest

from pgnotify_worker.core.netguard import blocked_reason, parse_networks

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("::ffff:10.1.2.3", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("::ffff:169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("fd00:ec2::254", "metadata"),  # AWS IPv6 metadata
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("fc00::1", "private"),
    ("64:ff9b::a9fe:a9fe", "NAT64"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.0.8", "IETF"),
    ("255.255.255.255", None),
    ("240.0.0.1", None),
    ("192.0.2.1", None),  # TEST-NET-1
    ("0.1.2.3", None),
]


@pytest.mark.parametrize(("address", "label"), BLOCKED)
def test_internal_addresses_are_blocked_with_a_reason(address: str, label: str | None) -> None:
    reason = blocked_reason(address)
    assert reason is not None
    assert reason  # non-empty, shown to the operator
    if label is not None:
        assert label in reason


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "2606:2800:220:1:248:1893:25c8:1946",
        "8.8.8.8",
        "1.1.1.1",
        "2001:4860:4860::8888",
        "::ffff:93.184.216.34",
        "100.128.0.1",  # just outside 100.64.0.0/10
        "172.32.0.1",  # just outside 172.16.0.0/12
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert blocked_reason(address) is None


def test_accepts_ip_address_objects() -> None:
    assert blocked_reason(ipaddress.ip_address("127.0.0.1")) == "loopback"
    assert blocked_reason(ipaddress.ip_address("93.184.216.34")) is None


ALLOWED = parse_networks("127.0.0.0/8, 10.0.0.0/8")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "10.1.2.3", "::ffff:127.0.0.1"])
def test_allowed_networks_let_those_addresses_through(address: str) -> None:
    assert blocked_reason(address, ALLOWED) is None


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "192.168.1.1", "172.16.0.1", "::1", "fd00:ec2::254", "100.64.0.1"],
)
def test_allowed_networks_do_not_open_anything_else(address: str) -> None:
    assert blocked_reason(address, ALLOWED) is not None


def test_metadata_address_needs_an_explicit_allowance() -> None:
    assert blocked_reason("169.254.169.254", ALLOWED) is not None
    explicit = parse_networks("169.254.169.254/32")
    assert blocked_reason("169.254.169.254", explicit) is None
    assert blocked_reason("169.254.169.253", explicit) is not None


def test_ipv6_allowance_does_not_match_ipv4() -> None:
    allowed = parse_networks("::/0")
    assert blocked_reason("::1", allowed) is None
    assert blocked_reason("127.0.0.1", allowed) is not None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.0/8, 10.0.0.0/8", ["127.0.0.0/8", "10.0.0.0/8"]),
        ("127.0.0.1", ["127.0.0.1/32"]),
        ("10.1.2.3/8", ["10.0.0.0/8"]),  # host bits are forgiven
        ("fd00::/8,", ["fd00::/8"]),
        (" , ,", []),
        ("", []),
        (["192.168.0.0/16", " ::1 "], ["192.168.0.0/16", "::1/128"]),
    ],
)
def test_parse_networks(spec: str | list[str], expected: list[str]) -> None:
    assert [str(n) for n in parse_networks(spec)] == expected


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("not-a-cidr", "not-a-cidr"),
        ("10.0.0.0/8, not-a-cidr", "not-a-cidr"),
        ("10.0.0.0/33", "10.0.0.0/33"),
        ("300.1.1.1", "300.1.1.1"),
        (["10.0.0.0/8", "example.com"], "example.com"),
    ],
)
def test_parse_networks_rejects_bad_entries_naming_them(spec: str | list[str], bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP network") as info:
        parse_networks(spec)
    assert repr(bad) in str(info.value)
