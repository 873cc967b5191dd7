"""meshwright.wire.endpoint: the one endpoint parser and formatter."""

from __future__ import annotations

import ipaddress

import pytest

from meshwright.wire.endpoint import Endpoint, EndpointError, format_endpoint, parse_endpoint


@pytest.mark.parametrize(
    ("text", "host", "port", "canonical"),
    [
        ("198.51.100.1:51820", "198.51.100.1", 51820, "198.51.100.1:51820"),
        ("[2001:db8::1]:51820", "2001:db8::1", 51820, "[2001:db8::1]:51820"),
        ("[2001:DB8:0::1]:1", "2001:db8::1", 1, "[2001:db8::1]:1"),
        ("[::ffff:198.51.100.1]:65535", "::ffff:c633:6401", 65535, "[::ffff:c633:6401]:65535"),
        ("[fe80::1%eth0]:51820", "fe80::1%eth0", 51820, "[fe80::1%eth0]:51820"),
        ("127.0.0.1:40000", "127.0.0.1", 40000, "127.0.0.1:40000"),
    ],
)
def test_addresses_parse_and_format_canonically(text, host, port, canonical):
    endpoint = parse_endpoint(text)
    assert endpoint == Endpoint(host, port)
    assert str(endpoint) == canonical
    assert parse_endpoint(canonical) == endpoint
    assert endpoint.address == ipaddress.ip_address(host)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "want ip:port"),
        ("198.51.100.1", "no port"),
        ("198.51.100.1:", "port '' is not 1-65535"),
        ("198.51.100.1:0", "port '0' is not 1-65535"),
        ("198.51.100.1:65536", "port '65536' is not 1-65535"),
        ("198.51.100.1:-1", "port '-1' is not 1-65535"),
        ("198.51.100.1:5x", "port '5x' is not 1-65535"),
        ("198.51.100.1:\u0661", "port '\u0661' is not 1-65535"),  # a non-ASCII digit
        ("2001:db8::1:51820", "needs brackets"),
        ("[2001:db8::1]", "want [ipv6]:port"),
        ("[2001:db8::1]51820", "want [ipv6]:port"),
        ("[198.51.100.1]:5", "in brackets is not an IPv6 address"),
        ("[host]:5", "in brackets is not an IPv6 address"),
        ("host:1", "'host' is not an IP address"),
        ("198.51.100.300:1", "is not an IP address"),
        (" 198.51.100.1:1", "is not an IP address"),
    ],
)
def test_bad_endpoints_are_refused_naming_the_value(text, reason):
    with pytest.raises(EndpointError) as caught:
        parse_endpoint(text)
    assert caught.value.value == text
    assert reason in caught.value.reason
    assert str(caught.value) == f"endpoint {text!r} is not valid: {caught.value.reason}"
    assert isinstance(caught.value, ValueError)


def test_a_non_string_is_refused():
    with pytest.raises(EndpointError, match="endpoint 51820 is not valid"):
        parse_endpoint(51820)  # type: ignore[arg-type]


def test_names_only_when_asked():
    assert parse_endpoint("Relay1.Example.net:443", names=True) == Endpoint(
        "relay1.example.net", 443
    )
    assert parse_endpoint("relay1.example.net:443", names=True).address is None
    assert str(parse_endpoint("relay1:443", names=True)) == "relay1:443"
    # Addresses are still addresses with names allowed.
    assert parse_endpoint("[2001:db8::1]:5", names=True) == Endpoint("2001:db8::1", 5)
    for bad in ("-relay:1", "re lay:1", "a..b:1", "198.51.100.300:1", "x" * 64 + ":1"):
        with pytest.raises(EndpointError, match="neither an IP address nor a host name"):
            parse_endpoint(bad, names=True)


def test_format_brackets_ipv6_and_never_raises():
    assert format_endpoint("2001:db8:0::1", 5) == "[2001:db8::1]:5"
    assert format_endpoint(ipaddress.ip_address("2001:db8::1"), 5) == "[2001:db8::1]:5"
    assert format_endpoint(ipaddress.ip_address("198.51.100.1"), 5) == "198.51.100.1:5"
    assert format_endpoint("relay1", 443) == "relay1:443"
    assert format_endpoint("not an address", 1) == "not an address:1"


def test_of_builds_from_an_address_and_refuses_names():
    assert Endpoint.of(ipaddress.ip_address("2001:db8::1"), 7) == Endpoint("2001:db8::1", 7)
    assert Endpoint.of("198.51.100.1", 7) == parse_endpoint("198.51.100.1:7")
    with pytest.raises(EndpointError):
        Endpoint.of("relay1", 7)
    with pytest.raises(EndpointError):
        Endpoint.of("198.51.100.1", 0)


def test_endpoints_sort_and_hash():
    a, b = parse_endpoint("198.51.100.1:2"), parse_endpoint("198.51.100.1:10")
    assert {a, b, parse_endpoint("198.51.100.1:2")} == {a, b}
    assert sorted([b, a]) == [a, b]  # by host, then port as a number
