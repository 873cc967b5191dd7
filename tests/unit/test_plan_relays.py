"""Relay allocations: one port per site, the nearest relay and a standby, spread, stable."""

from __future__ import annotations

import itertools
import random

import pytest

from meshwright.plan import DEFAULT_RELAY_FIRST_PORT as FIRST_PORT
from meshwright.plan.relays import (
    LOCAL_PORT_COUNT,
    LOCAL_PORT_FIRST,
    RelayPorts,
    allocate,
    local_ports,
)

RELAYS = {"r1": "198.51.100.10", "r2": "203.0.113.10"}


def pairs(names, kind="relay"):
    return [(a, b, kind) for a, b in itertools.combinations(sorted(names), 2)]


def previous_of(result):
    """The allocations as the next plan reads them from plan.json."""
    return [a.to_dict() for a in result.preferred.values()] + [
        a.to_dict() for a in result.standby.values()
    ]


def test_the_nearest_relay_carries_the_pair_and_the_other_stands_by():
    rtt = {"a": {"r1": 50.0, "r2": 5.0}, "b": {"r1": 40.0, "r2": 6.0}}
    result = allocate(pairs("ab"), RELAYS, rtt, public_keys={"a": "ka", "b": "kb"})
    (allocation,) = result.preferred.values()
    assert (allocation.relay, allocation.address) == ("r2", "203.0.113.10")
    assert allocation.ports == (FIRST_PORT, FIRST_PORT + 1)
    assert allocation.endpoint_of("a") == f"203.0.113.10:{FIRST_PORT}"
    assert allocation.endpoint_of("b") == f"203.0.113.10:{FIRST_PORT + 1}"
    (spare,) = result.standby.values()
    assert (spare.relay, spare.ports, spare.standby) == ("r1", allocation.ports, True)
    assert allocation.to_dict() == {
        "a": "a",
        "b": "b",
        "kind": "relay",
        "relay": "r2",
        "address": "203.0.113.10",
        "ports": [FIRST_PORT, FIRST_PORT + 1],
        "public_keys": ["ka", "kb"],
    }
    assert spare.to_dict()["standby"] is True


def test_relays_about_as_near_share_the_pairs():
    names = "abcdef"
    rtt = {n: {"r1": 10.0, "r2": 12.0} for n in names}
    result = allocate(pairs(names), RELAYS, rtt)
    load = {r: sum(a.relay == r for a in result.preferred.values()) for r in RELAYS}
    assert abs(load["r1"] - load["r2"]) <= 1


def test_a_far_relay_carries_no_pair_while_a_near_one_is_there():
    rtt = {n: {"r1": 10.0, "r2": 40.0, "r3": 12.0} for n in "abcdef"}
    relays = {**RELAYS, "r3": "192.0.2.30"}
    result = allocate(pairs("abcdef"), relays, rtt)
    assert {a.relay for a in result.preferred.values()} == {"r1", "r3"}
    # The standby is the best other relay: the other near one, never the far one.
    for key, spare in result.standby.items():
        assert spare.relay in {"r1", "r3"} - {result.preferred[key].relay}


def test_a_site_has_one_port_on_every_relay_for_all_its_pairs():
    result = allocate(pairs("abcdefghij"), RELAYS, {})
    port: dict[str, int] = {}
    for allocation in [*result.preferred.values(), *result.standby.values()]:
        for site, site_port in zip((allocation.a, allocation.b), allocation.ports, strict=True):
            assert port.setdefault(site, site_port) == site_port
    assert sorted(port.values()) == list(range(FIRST_PORT, FIRST_PORT + 10))
    assert result.port("c") == port["c"] and result.port("nosuch") is None


def test_every_kind_gets_an_allocation_and_a_standby():
    rtt = {n: {"r1": 5.0, "r2": 50.0} for n in "abcde"}
    kinds = [
        ("a", "b", "relay"),
        ("a", "c", "punch"),
        ("b", "c", "relay-tcp"),
        ("c", "d", "direct"),
        ("d", "e", "relay"),
    ]
    result = allocate(kinds, RELAYS, rtt)
    assert {key: a.kind for key, a in result.preferred.items()} == {
        (a, b): kind for a, b, kind in kinds
    }
    assert {a.relay for a in result.preferred.values()} == {"r1"}  # the near one
    # The TLS site's pair too: its carrier connects to both relays, WireGuard follows the peer.
    assert sorted(result.standby) == sorted(result.preferred)
    assert all(a.relay == "r2" and a.standby for a in result.standby.values())
    assert not any(a.standby for a in result.preferred.values())
    # One relay: nothing to fail over to.
    assert len(allocate(kinds, {"r1": RELAYS["r1"]}, rtt).standby) == 0
    # No relay: no allocation and no port.
    none = allocate(kinds, {}, rtt)
    assert len(none.preferred) == len(none.standby) == 0 and none.port("a") is None


def test_a_new_plan_keeps_every_allocation_and_port_still_in_use():
    first = allocate(pairs("abcd"), RELAYS, {})
    # RTTs changed, a pair is gone, a site is new: the remaining pairs keep relays and ports.
    rtt = {n: {"r1": 90.0, "r2": 1.0} for n in "abcde"}
    wanted = [p for p in pairs("abcde") if p[:2] != ("a", "b")]
    second = allocate(wanted, RELAYS, rtt, previous_of(first))
    for view in ("preferred", "standby"):
        old, new = getattr(first, view), getattr(second, view)
        for key, allocation in old.items():
            if key != ("a", "b"):
                assert new[key] == allocation
        assert ("a", "b") not in new
    new = [a for key, a in second.preferred.items() if "e" in key]
    assert new and all(a.relay == "r2" for a in new)
    assert second.port("e") == FIRST_PORT + 4


def test_same_input_same_allocations():
    rtt = {n: {"r1": 10.0 + i, "r2": 12.0} for i, n in enumerate("abcdef")}
    one, two = allocate(pairs("abcdef"), RELAYS, rtt), allocate(pairs("abcdef"), RELAYS, rtt)
    assert one.preferred == two.preferred and one.standby == two.standby


def test_site_ports_come_from_the_range_every_relay_has():
    ports = {"r1": RelayPorts(50000, 50009), "r2": RelayPorts(50005, 50100)}
    result = allocate(pairs("abcd"), RELAYS, {}, ports=ports)
    assert result.preferred[("a", "b")].ports == (50005, 50006)
    assert result.preferred[("c", "d")].ports == (50007, 50008)


def test_a_relays_own_wireguard_port_is_never_allocated():
    ports = {"r1": RelayPorts(51819, 51823, reserved=51820)}
    result = allocate(pairs("abc"), {"r1": "198.51.100.10"}, {}, ports=ports)
    assert [a.ports for a in result.preferred.values()] == [
        (51819, 51821),
        (51819, 51822),
        (51821, 51822),
    ]


def test_too_few_ports_for_the_sites_is_an_error_naming_the_remedy():
    ports = {"r1": RelayPorts(40000, 40001)}
    with pytest.raises(ValueError) as raised:
        allocate(pairs("abc"), {"r1": "198.51.100.10"}, {}, ports=ports)
    assert str(raised.value) == (
        "no free relay port for c: the ports every relay has (40000-40001) are fewer than the 3"
        " sites with relay paths; widen relay_first_port to relay_last_port"
    )


def test_a_site_port_outside_a_narrowed_range_moves_and_the_others_stay():
    first = allocate(pairs("abc"), RELAYS, {})
    ports = {"r1": RelayPorts(FIRST_PORT + 1, FIRST_PORT + 5)}
    second = allocate(pairs("abc"), RELAYS, {}, previous_of(first), ports=ports)
    assert second.preferred[("b", "c")] == first.preferred[("b", "c")]
    assert second.preferred[("a", "b")].ports == (FIRST_PORT + 3, FIRST_PORT + 1)
    assert [a.relay for a in second.preferred.values()] == [
        a.relay for a in first.preferred.values()
    ]


def test_a_previous_plan_of_the_per_pair_form_is_read_without_harm():
    """Before per-site ports every allocation had a slot and a port pair of its own: its relay
    is kept, and a site keeps its first port there when it is a valid site port."""
    old = [
        {"a": "a", "b": "b", "kind": "relay", "relay": "r2", "address": "203.0.113.10",
         "slot": 0, "ports": [FIRST_PORT, FIRST_PORT + 1], "public_keys": ["", ""]},
        {"a": "a", "b": "c", "kind": "relay", "relay": "r1", "address": "198.51.100.10",
         "slot": 1, "ports": [FIRST_PORT + 2, FIRST_PORT + 3], "public_keys": ["", ""]},
        {"a": "b", "b": "c", "kind": "relay", "relay": "r2", "address": "203.0.113.10",
         "slot": 2, "ports": [70000, "x"], "public_keys": ["", ""]},
        {"a": "b", "b": "c", "kind": "relay", "relay": "r1", "slot": 5, "ports": [1, 2],
         "standby": True},
        {"a": "x"},
    ]  # fmt: skip
    result = allocate(pairs("abc"), RELAYS, {}, old)
    assert [(key, a.relay) for key, a in result.preferred.items()] == [
        (("a", "b"), "r2"),
        (("a", "c"), "r1"),
        (("b", "c"), "r2"),
    ]
    assert result.standby[("b", "c")].relay == "r1"
    assert (result.port("a"), result.port("b")) == (FIRST_PORT, FIRST_PORT + 1)
    assert result.port("c") == FIRST_PORT + 3  # its first valid port there


def test_an_ipv6_relay_address_is_written_in_brackets():
    (allocation,) = allocate(pairs("ab"), {"r1": "2001:db8::10"}, {}).preferred.values()
    assert allocation.endpoint_of("a") == f"[2001:db8::10]:{FIRST_PORT}"


def test_local_ports_are_distinct_deterministic_and_stable_as_relays_come():
    names = [f"relay{k}" for k in range(40)]
    ports = local_ports(names)
    assert len(set(ports.values())) == len(names)
    assert all(LOCAL_PORT_FIRST <= p < LOCAL_PORT_FIRST + LOCAL_PORT_COUNT for p in ports.values())
    assert local_ports(reversed(names)) == ports
    grown = local_ports([*names, "zz-new"])
    assert {name: grown[name] for name in names} == ports
    # The site's own WireGuard port is never one of them.
    taken = ports["relay3"]
    assert local_ports(names, avoid=(taken,))["relay3"] != taken


def test_two_relays_choose_as_the_general_rule_does():
    """Two relays have a fast path of their own; a third relay that is never near makes the
    general rule run, and it chooses the same preferred relays."""
    rng = random.Random(7)
    names = [f"s{k:02d}" for k in range(30)]
    rtt = {
        n: {"r1": round(rng.uniform(2, 40), 1), "r2": round(rng.uniform(2, 40), 1)} for n in names
    }
    two = allocate(pairs(names), RELAYS, rtt)
    far = {n: {**r, "r3": 5000.0} for n, r in rtt.items()}
    three = allocate(pairs(names), {**RELAYS, "r3": "192.0.2.3"}, far)
    assert [a.relay for a in two.preferred.values()] == [a.relay for a in three.preferred.values()]
    assert {a.relay for a in two.preferred.values()} == {"r1", "r2"}  # both near for some
