"""Relay allocations: nearest relay, spread, stable across plans, distinct ports."""

from __future__ import annotations

import itertools

import pytest

from meshwright.plan import DEFAULT_RELAY_FIRST_PORT as FIRST_PORT
from meshwright.plan.relays import RelayPorts, allocate, allocate_with_standby

RELAYS = {"r1": "198.51.100.10", "r2": "203.0.113.10"}


def pairs(names):
    return [(a, b, "relay") for a, b in itertools.combinations(sorted(names), 2)]


def test_the_nearest_relay_carries_the_pair():
    rtt = {"a": {"r1": 50.0, "r2": 5.0}, "b": {"r1": 40.0, "r2": 6.0}}
    (allocation,) = allocate(pairs("ab"), RELAYS, rtt).values()
    assert (allocation.relay, allocation.address, allocation.slot) == ("r2", "203.0.113.10", 0)
    assert allocation.ports == (FIRST_PORT, FIRST_PORT + 1)
    assert allocation.endpoint_of("a") == f"203.0.113.10:{FIRST_PORT}"
    assert allocation.endpoint_of("b") == f"203.0.113.10:{FIRST_PORT + 1}"


def test_relays_about_as_near_share_the_pairs():
    names = "abcdef"
    rtt = {n: {"r1": 10.0, "r2": 12.0} for n in names}
    result = allocate(pairs(names), RELAYS, rtt)
    load = {r: sum(a.relay == r for a in result.values()) for r in RELAYS}
    assert abs(load["r1"] - load["r2"]) <= 1


def test_no_two_allocations_share_a_port_on_a_relay():
    result = allocate(pairs("abcdefghij"), RELAYS, {})
    seen = set()
    for allocation in result.values():
        for port in allocation.ports:
            assert (allocation.relay, port) not in seen
            seen.add((allocation.relay, port))


def test_a_new_plan_keeps_every_allocation_still_in_use():
    first = allocate(pairs("abcd"), RELAYS, {})
    previous = [a.to_dict() for a in first.values()]
    # RTTs changed, a pair is gone, a site is new: the remaining pairs keep relay and ports.
    rtt = {n: {"r1": 90.0, "r2": 1.0} for n in "abcde"}
    second = allocate([p for p in pairs("abcde") if p[:2] != ("a", "b")], RELAYS, rtt, previous)
    for key, allocation in first.items():
        if key != ("a", "b"):
            assert second[key] == allocation
    assert ("a", "b") not in second
    new = [a for key, a in second.items() if "e" in key]
    assert all(a.relay == "r2" for a in new)


def test_same_input_same_allocations():
    rtt = {n: {"r1": 10.0 + i, "r2": 12.0} for i, n in enumerate("abcdef")}
    assert allocate(pairs("abcdef"), RELAYS, rtt) == allocate(pairs("abcdef"), RELAYS, rtt)


def test_each_relay_allocates_from_its_own_port_range():
    ports = {"r1": RelayPorts(50000, 50009), "r2": RelayPorts(41000, 41001)}
    rtt = {n: {"r1": 10.0, "r2": 10.0} for n in "abcd"}
    result = allocate(pairs("abcd"), RELAYS, rtt, ports=ports)
    on = {r: sorted(a.ports for a in result.values() if a.relay == r) for r in RELAYS}
    # r2 holds one port pair: once it is full, the next pairs go to r1 however near r2 is.
    assert on["r2"] == [(41000, 41001)]
    assert on["r1"] == [
        (50000, 50001),
        (50002, 50003),
        (50004, 50005),
        (50006, 50007),
        (50008, 50009),
    ]


def test_ports_are_unique_across_relays_with_overlapping_ranges():
    # A UDP-blocked site binds its side of every allocation on its own loopback.
    ports = {"r1": RelayPorts(40000, 40099), "r2": RelayPorts(40001, 40100)}
    result = allocate(pairs("abcdefgh"), RELAYS, {}, ports=ports)
    every = [port for a in result.values() for port in a.ports]
    assert len(every) == len(set(every)) == 2 * len(result)


def test_a_relays_own_wireguard_port_is_never_allocated():
    ports = {"r1": RelayPorts(51816, 51823, reserved=51820)}
    result = allocate(pairs("abc"), {"r1": "198.51.100.10"}, {}, ports=ports)
    assert [a.ports for a in result.values()] == [(51816, 51817), (51818, 51819), (51822, 51823)]


def test_no_free_port_pair_is_an_error_naming_the_pair_and_the_remedy():
    ports = {"r1": RelayPorts(40000, 40003)}
    with pytest.raises(ValueError) as raised:
        allocate(pairs("abc"), {"r1": "198.51.100.10"}, {}, ports=ports)
    assert str(raised.value) == (
        "no free port pair for b and c: every relay's allocation ports are taken (2 relayed"
        " pairs; widen relay_first_port to relay_last_port, or add a relay)"
    )


def test_an_allocation_outside_a_narrowed_range_moves():
    first = allocate(pairs("abc"), RELAYS, {})
    assert [(a.relay, a.slot) for a in first.values()] == [("r1", 0), ("r2", 1), ("r1", 2)]
    # r1 now holds two port pairs: its slot 2 is gone, and only r2 still has one free.
    ports = {
        "r1": RelayPorts(FIRST_PORT, FIRST_PORT + 3),
        "r2": RelayPorts(FIRST_PORT, FIRST_PORT + 5),
    }
    second = allocate(pairs("abc"), RELAYS, {}, [a.to_dict() for a in first.values()], ports=ports)
    assert second[("a", "b")] == first[("a", "b")] and second[("a", "c")] == first[("a", "c")]
    assert (second[("b", "c")].relay, second[("b", "c")].ports) == (
        "r2",
        (FIRST_PORT + 4, FIRST_PORT + 5),
    )


def test_an_ipv6_relay_address_is_written_in_brackets():
    (allocation,) = allocate(pairs("ab"), {"r1": "2001:db8::10"}, {}).values()
    assert allocation.endpoint_of("a") == f"[2001:db8::10]:{FIRST_PORT}"


# --- standby allocations (relay failover) ---------------------------------------------------


def test_every_udp_relayed_pair_has_a_standby_on_another_relay():
    rtt = {n: {"r1": 5.0, "r2": 50.0} for n in "abcd"}
    kinds = [("a", "b", "relay"), ("a", "c", "punch"), ("b", "c", "relay-tcp"), ("c", "d", "relay")]
    preferred, standby = allocate_with_standby(kinds, RELAYS, rtt)
    assert {a.relay for a in preferred.values()} == {"r1"}  # the near one
    # The TLS site's pair follows its connection: no standby.
    assert sorted(standby) == [("a", "b"), ("a", "c"), ("c", "d")]
    assert all(a.relay == "r2" and a.standby for a in standby.values())
    assert all(not a.standby for a in preferred.values())
    assert standby[("a", "b")].to_dict()["standby"] is True
    ports = [p for a in [*preferred.values(), *standby.values()] for p in a.ports]
    assert len(ports) == len(set(ports))  # unique across relays, preferred and standby alike
    # One relay: nothing to fail over to.
    assert allocate_with_standby(kinds, {"r1": RELAYS["r1"]}, rtt)[1] == {}


def test_standby_allocations_are_kept_by_the_next_plan():
    rtt = {n: {"r1": 5.0, "r2": 50.0} for n in "abcd"}
    first = allocate_with_standby(pairs("abcd"), RELAYS, rtt)
    previous = [a.to_dict() for a in first[0].values()]
    previous_standby = [a.to_dict() for a in first[1].values()]
    flipped = {n: {"r1": 50.0, "r2": 5.0} for n in "abcd"}
    second = allocate_with_standby(
        pairs("abcd"), RELAYS, flipped, previous, None, None, previous_standby
    )
    assert second == first
