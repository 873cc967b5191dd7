"""Relay allocations: nearest relay, spread, stable across plans, distinct ports."""

from __future__ import annotations

import itertools

from meshwright.plan.relays import FIRST_PORT, allocate

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
