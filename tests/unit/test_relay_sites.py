"""Tests for meshwright.relay.sites: one relay port per site, sessions told apart by index.

Messages come from wg_messages (the real formats, mac1 computed independently of the module
under test) with real X25519 public keys.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wg_messages import cookie_reply, flip_bit, initiation, public_key, response, transport

from meshwright.relay.sites import (
    DROP_REASONS,
    MAPPING_KEEPALIVE,
    MAX_PENDING,
    PENDING_TTL,
    SESSION_TTL,
    SILENT_AFTER,
    Address,
    Delivery,
    Limits,
    Relay,
)

ADDRESS = {
    "a": ("198.51.100.10", 51820),
    "b": ("203.0.113.20", 51820),
    "c": ("198.51.100.30", 40000),
    "d": ("203.0.113.40", 1234),
}
A2: Address = ("198.51.100.77", 40001)
B2: Address = ("203.0.113.99", 61000)
EVIL: Address = ("192.0.2.66", 6666)

KEYS = {name: public_key() for name in ("a", "b", "c", "d")}


def drops(relay: Relay, reason: str, site: str | None = None) -> int:
    counters = relay.counters if site is None else relay.site_counters(site)
    return counters[f"dropped_{reason}"]


def handshake(
    relay: Relay, i: str, r: str, i_index: int, r_index: int, now: float, *, data: bool = True
) -> None:
    """A full handshake between confirmed-or-bootstrapped i (initiator) and r, at their
    ADDRESS, checking where each message goes; then i's first data, which proves r."""
    assert relay.receive(i, ADDRESS[i], initiation(KEYS[r], i_index), now) == Delivery(
        r, ADDRESS[r]
    )
    assert relay.receive(r, ADDRESS[r], response(KEYS[i], r_index, i_index), now + 0.01) == (
        Delivery(i, ADDRESS[i])
    )
    if data:
        assert relay.receive(i, ADDRESS[i], transport(r_index), now + 0.02) == Delivery(
            r, ADDRESS[r]
        )


def bootstrapped(names: str = "ab", **kwargs: object) -> Relay:
    """A relay serving `names`, with a and b proven by a bootstrap exchange."""
    relay = Relay({n: KEYS[n] for n in names}, **kwargs)  # type: ignore[arg-type]
    # a's first initiation finds b nowhere: dropped, but remembered as a's claim.
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 0xA0), 0.0) is None
    assert drops(relay, "no_destination", "a") == 1
    # b's goes to a's claim; a answers from there, which proves b; b's data proves a.
    assert relay.receive("b", ADDRESS["b"], initiation(KEYS["a"], 0xB0), 0.1) == Delivery(
        "a", ADDRESS["a"]
    )
    assert relay.confirmed == {}
    assert relay.receive("a", ADDRESS["a"], response(KEYS["b"], 0xA1, 0xB0), 0.2) == Delivery(
        "b", ADDRESS["b"]
    )
    assert relay.confirmed == {"b": ADDRESS["b"]}
    assert relay.receive("b", ADDRESS["b"], transport(0xA1), 0.3) == Delivery("a", ADDRESS["a"])
    assert relay.confirmed == {"a": ADDRESS["a"], "b": ADDRESS["b"]}
    return relay


def test_bootstrap_of_two_sites_then_data_both_ways() -> None:
    relay = bootstrapped()
    # The responder a sends data to b's index once b's data arrived.
    assert relay.receive("a", ADDRESS["a"], transport(0xB0, 1), 0.4) == Delivery("b", ADDRESS["b"])
    for k in range(10):
        assert relay.receive("b", ADDRESS["b"], transport(0xA1, k), 1 + k) == Delivery(
            "a", ADDRESS["a"]
        )
    counters = relay.counters
    assert counters["forwarded"] == 14
    assert sum(counters[f"dropped_{r}"] for r in DROP_REASONS) == 1  # the first initiation
    assert relay.sessions and {(o, p) for o, p, _ in relay.sessions} == {("a", "b"), ("b", "a")}


def test_three_sites_share_one_port_each_and_sessions_are_routed_by_index() -> None:
    relay = bootstrapped("abc")
    # c is unknown: its initiation to a goes to a's confirmed address, a's answer proves c.
    handshake(relay, "c", "a", 0xC0, 0xA2, 1.0)
    handshake(relay, "b", "c", 0xB2, 0xC2, 2.0)
    assert relay.confirmed == {n: ADDRESS[n] for n in "abc"}
    # a talks to b and c from one address and one port; the index tells the two apart.
    assert relay.receive("a", ADDRESS["a"], transport(0xB0), 3.0) == Delivery("b", ADDRESS["b"])
    assert relay.receive("a", ADDRESS["a"], transport(0xC0), 3.0) == Delivery("c", ADDRESS["c"])
    assert relay.receive("c", ADDRESS["c"], transport(0xA2), 3.0) == Delivery("a", ADDRESS["a"])
    assert relay.receive("c", ADDRESS["c"], transport(0xB2), 3.0) == Delivery("b", ADDRESS["b"])
    # An index c never was told (a's index for b) is not c's to use.
    assert relay.receive("c", ADDRESS["c"], transport(0xA1), 3.0) is None
    assert drops(relay, "unknown_index", "c") == 1


def test_the_same_index_of_two_sites_towards_different_peers_is_no_conflict() -> None:
    relay = Relay({n: KEYS[n] for n in "abcd"}, confirmed={n: ADDRESS[n] for n in "abcd"})
    # a and b both pick index 7, for sessions with c and with d.
    handshake(relay, "a", "c", 7, 0xC0, 1.0)
    handshake(relay, "b", "d", 7, 0xD0, 1.0)
    assert relay.receive("c", ADDRESS["c"], transport(7), 2.0) == Delivery("a", ADDRESS["a"])
    assert relay.receive("d", ADDRESS["d"], transport(7), 2.0) == Delivery("b", ADDRESS["b"])


def test_an_index_live_towards_a_peer_is_not_taken_over() -> None:
    relay = Relay({n: KEYS[n] for n in "abc"}, confirmed={n: ADDRESS[n] for n in "abc"})
    handshake(relay, "a", "c", 7, 0xC0, 1.0)
    # b (or anyone sending on b's port) announces index 7 to c as well: c's data for 7 would be
    # ambiguous, so the live session keeps it and the newcomer retries with a fresh index.
    assert relay.receive("b", ADDRESS["b"], initiation(KEYS["c"], 7), 2.0) is None
    assert drops(relay, "duplicate_index", "b") == 1
    assert relay.receive("c", ADDRESS["c"], transport(7), 2.0) == Delivery("a", ADDRESS["a"])
    handshake(relay, "b", "c", 8, 0xC1, 7.0)


def test_replayed_handshakes_are_dropped_and_teach_nothing() -> None:
    relay = bootstrapped()
    captured = initiation(KEYS["b"], 0xA5)
    assert relay.receive("a", ADDRESS["a"], captured, 1.0) == Delivery("b", ADDRESS["b"])
    assert relay.receive("a", EVIL, captured, 1.1) is None
    assert drops(relay, "replay", "a") == 1
    answer = response(KEYS["a"], 0xB5, 0xA5)
    assert relay.receive("b", ADDRESS["b"], answer, 1.2) == Delivery("a", ADDRESS["a"])
    assert relay.receive("b", EVIL, answer, 1.3) is None
    assert drops(relay, "replay", "b") == 1
    assert relay.confirmed == {"a": ADDRESS["a"], "b": ADDRESS["b"]}


def test_a_reused_sender_index_is_dropped() -> None:
    relay = bootstrapped()
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 0xA7), 1.0) is not None
    # A different initiation (fresh mac1) with the same index, from elsewhere: a forgery that
    # would steal the answer.
    assert relay.receive("a", EVIL, initiation(KEYS["b"], 0xA7), 1.1) is None
    assert drops(relay, "duplicate_index", "a") == 1


def test_forged_initiations_reach_at_most_a_pending_claim_and_confirm_nothing() -> None:
    relay = bootstrapped("abc")
    # Bad mac1: verifies for no site.
    assert relay.receive("a", EVIL, flip_bit(initiation(KEYS["b"], 1), 8 * 120), 1.0) is None
    assert drops(relay, "bad_mac1", "a") == 1
    # mac1 for a's own key: an initiation to oneself is no initiation.
    assert relay.receive("a", EVIL, initiation(KEYS["a"], 2), 1.0) is None
    assert drops(relay, "bad_mac1", "a") == 2
    # A valid mac1 (the attacker knows b's public key) from EVIL on a's port: forwarded to b,
    # but b's WireGuard rejects it and never answers, so EVIL is never a's address.
    assert relay.receive("a", EVIL, initiation(KEYS["b"], 3), 1.0) == Delivery("b", ADDRESS["b"])
    # A response from EVIL claiming to be b's answer proves nothing either (wrong source).
    assert relay.receive("b", EVIL, response(KEYS["a"], 0xBB, 3), 1.1) == Delivery(
        "a", ADDRESS["a"]
    )
    assert relay.confirmed == {"a": ADDRESS["a"], "b": ADDRESS["b"]}
    # Transport data from EVIL is dropped, before and after.
    assert relay.receive("a", EVIL, transport(0xB0), 2.0) is None
    assert drops(relay, "unconfirmed_source", "a") == 1
    # Flooding a's claims with forgeries keeps at most MAX_PENDING of them.
    for k in range(3 * MAX_PENDING):
        relay.receive("a", EVIL, initiation(KEYS["c"], 100 + k), 3.0)
    assert relay.stats()["pending"] <= MAX_PENDING + 1  # a's, plus b's EVIL response claim
    # And every claim is gone after PENDING_TTL.
    relay.receive("a", ADDRESS["a"], transport(0xB0), 3.0 + PENDING_TTL + 1)
    assert relay.stats()["pending"] == 0
    assert relay.stats()["tentative"] == 0


def test_junk_of_every_kind_is_counted_by_reason() -> None:
    relay = bootstrapped()
    cases = {
        b"": "malformed",
        b"\x04\x00\x00\x00" + bytes(8): "malformed",  # too short for transport data
        b"\x05" + bytes(40): "malformed",
        b"\x01\x01\x00\x00" + bytes(144): "malformed",  # reserved byte set
        initiation(KEYS["b"], 9)[:-1]: "malformed",
        cookie_reply(0x1234): "unknown_index",
        response(KEYS["a"], 1, 0xDEAD): "unknown_index",
    }
    for datagram, reason in cases.items():
        before = drops(relay, reason)
        assert relay.receive("b", ADDRESS["b"], datagram, 1.0) is None
        assert drops(relay, reason) == before + 1, datagram[:8]


def test_roaming_site_is_followed_after_its_next_handshake() -> None:
    relay = bootstrapped()
    # a's NAT gives it a new mapping: its data from A2 is dropped until a handshake from A2 is
    # answered through the relay.
    assert relay.receive("a", A2, transport(0xB0), 5.0) is None
    assert relay.receive("a", A2, initiation(KEYS["b"], 0xA9), 5.1) == Delivery("b", ADDRESS["b"])
    assert relay.confirmed["a"] == ADDRESS["a"]
    assert relay.receive("b", ADDRESS["b"], response(KEYS["a"], 0xB9, 0xA9), 5.2) == Delivery(
        "a", A2
    )
    assert relay.confirmed["a"] == A2
    assert relay.receive("a", A2, transport(0xB9), 5.3) == Delivery("b", ADDRESS["b"])
    assert relay.receive("b", ADDRESS["b"], transport(0xA9), 5.4) == Delivery("a", A2)


def test_a_responder_that_roamed_is_proven_by_the_initiators_data() -> None:
    relay = bootstrapped()
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 0xA3), 5.0) is not None
    # b answers from a new address: the response goes to a, b's claim waits for a's data.
    assert relay.receive("b", B2, response(KEYS["a"], 0xB3, 0xA3), 5.1) == Delivery(
        "a", ADDRESS["a"]
    )
    assert relay.confirmed["b"] == ADDRESS["b"]
    assert relay.receive("a", ADDRESS["a"], transport(0xB3), 5.2) == Delivery("b", B2)
    assert relay.confirmed["b"] == B2


def test_both_sides_moved_gets_an_initiation_copy_to_the_fresh_claim() -> None:
    relay = bootstrapped()
    # Both NATs flushed: each side's handshakes go to the other's stale address.
    later = 0.3 + SILENT_AFTER + 1
    assert relay.receive("b", B2, initiation(KEYS["a"], 0xB4), later) == Delivery("a", ADDRESS["a"])
    # a's initiation goes to b's stale confirmed address and, since that one is silent, also
    # to b's fresh claim; b answers from B2, which proves A2 (and b's data then proves B2).
    delivery = relay.receive("a", A2, initiation(KEYS["b"], 0xA4), later + 0.1)
    assert delivery == Delivery("b", ADDRESS["b"], B2)
    assert relay.receive("b", B2, response(KEYS["a"], 0xB6, 0xA4), later + 0.2) == Delivery("a", A2)
    assert relay.receive("a", A2, transport(0xB6), later + 0.3) == Delivery("b", B2)
    assert relay.confirmed == {"a": A2, "b": B2}


def test_no_copy_while_the_confirmed_address_is_heard() -> None:
    relay = bootstrapped()
    assert relay.receive("b", EVIL, initiation(KEYS["a"], 0xEE), 10.0) is not None
    relay.receive("b", ADDRESS["b"], transport(0xA1), 10.0)  # b is alive
    delivery = relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 0xA8), 10.5)
    assert delivery == Delivery("b", ADDRESS["b"])


def test_the_scan_budget_bounds_full_scans_and_the_cache_skips_them() -> None:
    names = "abcd"
    relay = Relay(
        {n: KEYS[n] for n in names},
        confirmed={n: ADDRESS[n] for n in names},
        scans_per_second=2.0,
    )
    # Two full scans fit in the burst; junk initiations (valid shape, bad mac1) spend them.
    for k in range(2):
        assert relay.receive("a", EVIL, flip_bit(initiation(KEYS["b"], k), 8 * 100), 1.0) is None
    assert drops(relay, "bad_mac1") == 2
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 10), 1.0) is None
    assert drops(relay, "scan_budget", "a") == 1
    # A second later the budget has refilled; the scan finds b and remembers it for a.
    handshake(relay, "a", "b", 11, 0xB1, 2.0)
    for k in range(2):
        relay.receive("c", EVIL, flip_bit(initiation(KEYS["b"], k), 8 * 100), 2.5)
    # No budget left, but b is among a's recent peers (and a among b's): no scan needed.
    handshake(relay, "a", "b", 12, 0xB2, 2.6)
    handshake(relay, "b", "a", 0xB3, 13, 2.7)
    assert drops(relay, "scan_budget") == 1


def test_sessions_expire_and_keep_memory_bounded() -> None:
    relay = bootstrapped()
    assert relay.stats()["sessions"] == 2
    # An initiation nobody answers lives PENDING_TTL in the table.
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 0xA6), 1.0) is not None
    assert relay.stats()["sessions"] == 3
    relay.receive("b", ADDRESS["b"], transport(0xA1), 1.0 + PENDING_TTL + 1)
    assert relay.stats()["sessions"] == 2
    # A proven session lives SESSION_TTL from its handshake (no key pair is used longer).
    assert relay.receive("b", ADDRESS["b"], transport(0xA1), SESSION_TTL - 1) is not None
    assert relay.receive("b", ADDRESS["b"], transport(0xA1), SESSION_TTL + 1) is None
    assert drops(relay, "unknown_index", "b") == 1
    assert relay.stats()["sessions"] == 0
    assert relay.stats()["replay_window"] == 0
    # The addresses stay proven: the next handshake needs no bootstrap.
    handshake(relay, "a", "b", 0xA7, 0xB7, SESSION_TTL + 2)


def test_pairs_count_what_was_forwarded_between_two_sites_either_way() -> None:
    relay = bootstrapped("abc")  # a and b: b's initiation, a's response, b's data
    handshake(relay, "c", "a", 0xC0, 0xA2, 1.0)
    for _ in range(3):
        relay.receive("a", ADDRESS["a"], transport(0xB0, 1), 2.0)
        relay.receive("a", ADDRESS["a"], transport(0xC0, 1), 2.0)
    relay.receive("a", ADDRESS["a"], transport(0xC1), 2.0)  # dropped: counts for no pair
    pairs = relay.pair_counters()
    # a shares its one port with both pairs, which count apart; b and c never met.
    assert list(pairs) == [("a", "b"), ("a", "c")]
    assert pairs[("a", "b")] == {
        "forwarded": 6,
        "forwarded_bytes": 148 + 92 + 4 * len(transport(1, 1)),
        "kernel_forwarded": 0,
    }
    assert pairs[("a", "c")]["forwarded"] == 6
    # Together they are what the sites sent.
    for counter in ("forwarded", "forwarded_bytes"):
        assert sum(p[counter] for p in pairs.values()) == relay.counters[counter]
    # The kernel's share is added by whoever reads the kernel's counters.
    relay.count_kernel("c", "a", 5, 500)
    relay.count_kernel("a", "gone", 5, 500)  # a site the relay does not serve: ignored
    assert relay.pair_counters()[("a", "c")] == {
        "forwarded": 11,
        "forwarded_bytes": pairs[("a", "c")]["forwarded_bytes"] + 500,
        "kernel_forwarded": 5,
    }
    # A pair is known while a session of it is in the index table, and forgotten after.
    relay.forget_idle_pairs()
    assert list(relay.pair_counters()) == [("a", "b"), ("a", "c")]
    handshake(relay, "a", "b", 0xA5, 0xB5, SESSION_TTL + 2)  # a-c's sessions expired
    assert list(relay.pair_counters()) == [("a", "b"), ("a", "c")]  # until forgotten
    relay.forget_idle_pairs()
    assert relay.pair_counters() == {
        ("a", "b"): {
            "forwarded": 9,
            "forwarded_bytes": 2 * (148 + 92) + 5 * 32,
            "kernel_forwarded": 0,
        }
    }
    # It counts from zero when it meets again.
    handshake(relay, "c", "a", 0xC6, 0xA6, SESSION_TTL + 3)
    assert relay.pair_counters()[("a", "c")]["forwarded"] == 3


def test_a_site_owns_at_most_sessions_per_site_entries() -> None:
    relay = Relay(
        {n: KEYS[n] for n in "ab"}, confirmed={n: ADDRESS[n] for n in "ab"}, sessions_per_site=3
    )
    for k in range(3):
        relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], k), 1.0)
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 3), 1.0) is None
    assert drops(relay, "session_limit", "a") == 1


def test_mapping_keepalives_are_counted_never_forwarded() -> None:
    relay = bootstrapped()
    assert relay.receive("a", ADDRESS["a"], MAPPING_KEEPALIVE, 1.0) is None
    assert relay.receive("a", EVIL, MAPPING_KEEPALIVE, 1.0) is None
    assert relay.site_counters("a")["keepalives"] == 2
    assert relay.counters["dropped_malformed"] == 0


def test_rate_limits_are_per_sending_site() -> None:
    limits = Limits(packets_per_second=5, bytes_per_second=1e9)
    relay = bootstrapped("abc", limits=limits)
    handshake(relay, "c", "a", 0xC0, 0xA2, 1.0)
    sent = [relay.receive("b", ADDRESS["b"], transport(0xA1), 2.0) for _ in range(10)]
    assert sum(d is not None for d in sent) == 5
    assert drops(relay, "rate_limited", "b") == 5
    # c's share is its own.
    assert relay.receive("c", ADDRESS["c"], transport(0xA2), 2.0) == Delivery("a", ADDRESS["a"])
    # b's refills.
    assert relay.receive("b", ADDRESS["b"], transport(0xA1), 3.0) is not None


def test_new_limits_apply_to_every_site_at_once() -> None:
    relay = bootstrapped()
    relay.update_limits(Limits(packets_per_second=2, bytes_per_second=1e9))
    sent = [relay.receive("b", ADDRESS["b"], transport(0xA1), 2.0) for _ in range(4)]
    assert sum(d is not None for d in sent) == 2
    with pytest.raises(ValueError):
        relay.update_limits("fast")  # type: ignore[arg-type]


def test_a_site_heard_by_another_path_is_not_silent() -> None:
    """The kernel forwards a's data without the code seeing it: heard() says a is alive, so a
    forged claim for a gets no copy of b's initiation."""
    relay = bootstrapped()
    assert relay.receive("a", EVIL, initiation(KEYS["b"], 0xEE), 40.0) is not None  # a claim
    relay.heard("a", 40.0)
    relay.heard("nobody", 40.0)  # a name the relay does not serve: ignored
    delivery = relay.receive("b", ADDRESS["b"], initiation(KEYS["a"], 0xB8), 41.0)
    assert delivery == Delivery("a", ADDRESS["a"])
    # Without it, a counts as silent after SILENT_AFTER, and the claim gets a copy.
    quiet = bootstrapped()
    assert quiet.receive("a", EVIL, initiation(KEYS["b"], 0xEE), 40.0) is not None
    delivery = quiet.receive("b", ADDRESS["b"], initiation(KEYS["a"], 0xB8), 41.0)
    assert delivery == Delivery("a", ADDRESS["a"], EVIL)


def test_a_cookie_reply_goes_back_to_the_handshake_it_answers() -> None:
    relay = bootstrapped()
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 0xAC), 1.0) is not None
    # b is under load: it answers with a cookie reply to a's index.
    assert relay.receive("b", ADDRESS["b"], cookie_reply(0xAC), 1.1) == Delivery("a", ADDRESS["a"])
    assert relay.receive("b", EVIL, cookie_reply(0xAC), 1.1) is None
    assert drops(relay, "unconfirmed_source", "b") == 1


def test_restart_restores_addresses_and_sessions() -> None:
    relay = bootstrapped()
    state = json.loads(json.dumps({"confirmed": relay.confirmed, "sessions": relay.sessions}))
    restarted = Relay(
        {n: KEYS[n] for n in "ab"},
        confirmed=state["confirmed"],
        sessions=[tuple(s) for s in state["sessions"]],
    )
    assert restarted.confirmed == relay.confirmed
    # Running sessions carry on at once, from the new incarnation's own clock.
    assert restarted.receive("b", ADDRESS["b"], transport(0xA1), 5000.0) == Delivery(
        "a", ADDRESS["a"]
    )
    assert restarted.receive("a", ADDRESS["a"], transport(0xB0), 5000.0) == Delivery(
        "b", ADDRESS["b"]
    )
    # Without sessions the data waits for the next handshake, which needs no bootstrap.
    bare = Relay({n: KEYS[n] for n in "ab"}, confirmed=state["confirmed"])
    assert bare.receive("b", ADDRESS["b"], transport(0xA1), 1.0) is None
    handshake(bare, "a", "b", 0xA9, 0xB9, 2.0)


def test_update_sites_rotates_keys_adds_and_removes_sites() -> None:
    relay = bootstrapped("abc")
    handshake(relay, "c", "a", 0xC0, 0xA2, 0.5)
    forwarded = relay.counters["forwarded"]
    rotated = public_key()
    relay.update_sites({"a": rotated, "b": KEYS["b"], "d": KEYS["d"]})
    assert relay.sites == ("a", "b", "d")
    assert relay.confirmed == {"a": ADDRESS["a"], "b": ADDRESS["b"]}
    # The running session keeps flowing; handshakes to a are checked against the new key.
    assert relay.receive("b", ADDRESS["b"], transport(0xA1), 1.0) == Delivery("a", ADDRESS["a"])
    assert relay.receive("b", ADDRESS["b"], initiation(KEYS["a"], 0xB8), 1.0) is None
    assert drops(relay, "bad_mac1", "b") == 1
    assert relay.receive("b", ADDRESS["b"], initiation(rotated, 0xB9), 1.1) == Delivery(
        "a", ADDRESS["a"]
    )
    with pytest.raises(ValueError):
        relay.receive("c", ADDRESS["c"], transport(1), 1.0)
    # A bad update changes nothing.
    with pytest.raises(ValueError):
        relay.update_sites({"a": rotated, "b": rotated})
    assert relay.sites == ("a", "b", "d")
    # The removed site's counts stay in the totals; its sessions are gone.
    assert relay.counters["forwarded"] == forwarded + 2
    assert {o for o, _, _ in relay.sessions} | {p for _, p, _ in relay.sessions} == {"a", "b"}


def test_constructor_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Relay({"a": b"short"})
    with pytest.raises(ValueError):
        Relay({"a": KEYS["a"], "b": KEYS["a"]})
    with pytest.raises(ValueError):
        Relay({"a": KEYS["a"]}, confirmed={"a": ("host", "port")})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        Relay({"a": KEYS["a"]}, limits="fast")  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------------------

_SITES = st.sampled_from("abc")
_SOURCES = st.sampled_from([*ADDRESS.values(), A2, EVIL])


@st.composite
def _datagrams(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["init", "resp", "cookie", "data", "junk", "keepalive"]))
    index = draw(st.sampled_from([0xA1, 0xB0, 7, 8]))
    receiver = KEYS[draw(st.sampled_from("abc"))]
    if kind == "init":
        return initiation(receiver, index, random.Random(draw(st.integers(0, 3))))
    if kind == "resp":
        return response(receiver, draw(st.sampled_from([7, 8, 9])), index)
    if kind == "cookie":
        return cookie_reply(index)
    if kind == "data":
        return transport(index)
    if kind == "keepalive":
        return MAPPING_KEEPALIVE
    return draw(st.binary(max_size=200))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_SITES, _SOURCES, _datagrams(), st.floats(0, 3)), max_size=40))
def test_never_raises_and_only_sends_to_addresses_that_sent_a_valid_handshake(
    steps: list[tuple[str, Address, bytes, float]],
) -> None:
    relay = Relay({n: KEYS[n] for n in "abc"})
    now = 0.0
    handshake_sources: set[Address] = set()
    pairs: dict[tuple[str, str], int] = {}
    for site, source, datagram, step in steps:
        now += step
        delivery = relay.receive(site, source, datagram, now)
        if datagram[:1] in (b"\x01", b"\x02") and len(datagram) in (148, 92):
            handshake_sources.add(source)
        if delivery is not None:
            assert delivery.address in handshake_sources
            assert delivery.site != site
            pair = (min(site, delivery.site), max(site, delivery.site))
            pairs[pair] = pairs.get(pair, 0) + 1
        for address in relay.confirmed.values():
            assert address in handshake_sources
    assert relay.stats()["pending"] <= 3 * MAX_PENDING
    # Every delivery counted for its pair (none forgotten: forget_idle_pairs was not called).
    counted = {k: c["forwarded"] for k, c in relay.pair_counters().items() if c["forwarded"]}
    assert counted == pairs
