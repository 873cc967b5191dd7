"""Tests for meshwright.relay.forward: the relay's forwarding and address-learning rules.

Messages are built here in the real WireGuard formats (random bytes where the real ones are
encrypted) with mac1 computed independently of the module under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwright.relay.forward import (
    DROP_REASONS,
    MAX_PENDING,
    PENDING_TTL,
    REPLAY_WINDOW,
    Address,
    Allocation,
    Limits,
)

A1: Address = ("198.51.100.10", 51820)
A2: Address = ("198.51.100.77", 40001)
B1: Address = ("203.0.113.20", 51820)
B2: Address = ("203.0.113.99", 61000)
EVIL: Address = ("192.0.2.66", 6666)
EVIL2: Address = ("192.0.2.67", 7777)

_RNG = random.Random(20240601)


# -- message builders ----------------------------------------------------------------------------


def mac1(receiver_public_key: bytes, body: bytes) -> bytes:
    """WireGuard's mac1 over `body` (everything before mac1), for the given receiver."""
    key = hashlib.blake2s(b"mac1----" + receiver_public_key).digest()
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


def initiation(
    receiver_key: bytes, sender_index: int, rng: random.Random = _RNG, mac2: bytes = bytes(16)
) -> bytes:
    """Type 1: type, reserved, sender_index, ephemeral(32), static(48), timestamp(28), macs."""
    body = struct.pack("<BxxxI", 1, sender_index) + rng.randbytes(32 + 48 + 28)
    message = body + mac1(receiver_key, body) + mac2
    assert len(message) == 148
    return message


def response(
    receiver_key: bytes, sender_index: int, receiver_index: int, rng: random.Random = _RNG
) -> bytes:
    """Type 2: type, reserved, sender_index, receiver_index, ephemeral(32), empty(16), macs."""
    body = struct.pack("<BxxxII", 2, sender_index, receiver_index) + rng.randbytes(32 + 16)
    message = body + mac1(receiver_key, body) + bytes(16)
    assert len(message) == 92
    return message


def cookie_reply(receiver_index: int, rng: random.Random = _RNG) -> bytes:
    """Type 3: type, reserved, receiver_index, nonce(24), encrypted cookie(32)."""
    message = struct.pack("<BxxxI", 3, receiver_index) + rng.randbytes(24 + 32)
    assert len(message) == 64
    return message


def transport(
    receiver_index: int, counter: int = 0, payload: int = 16, rng: random.Random = _RNG
) -> bytes:
    """Type 4: type, reserved, receiver_index, counter(8), encrypted packet (payload + 16 tag).

    WireGuard pads to 16 bytes, but never beyond the MTU: a full-size packet need not be
    aligned (MTU 1420 gives 1420 + 16 + 16 = 1452 bytes)."""
    return struct.pack("<BxxxIQ", 4, receiver_index, counter) + rng.randbytes(payload)


def with_reserved(message: bytes, position: int, receiver_key: bytes | None) -> bytes:
    """`message` with reserved byte `position` set, and mac1 recomputed if it has one."""
    changed = bytearray(message)
    changed[position] = 0x80
    if receiver_key is not None:
        body = bytes(changed[: len(changed) - 32])
        changed[len(changed) - 32 : len(changed) - 16] = mac1(receiver_key, body)
    return bytes(changed)


def flip_bit(message: bytes, bit: int) -> bytes:
    changed = bytearray(message)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    """Side 0 is site A, side 1 is site B."""
    return os.urandom(32), os.urandom(32)


def established(keys: tuple[bytes, bytes], **kwargs: object) -> Allocation:
    """An allocation where A (at A1) and B (at B1) were both proven by a handshake."""
    key_a, key_b = keys
    allocation = Allocation(keys, **kwargs)  # type: ignore[arg-type]
    assert allocation.receive(0, A1, initiation(key_b, 0xA0), 0.0) is None
    assert allocation.receive(1, B1, initiation(key_a, 0xB0), 0.1) == A1
    assert allocation.receive(0, A1, response(key_b, 0xA1, 0xB0), 0.2) == B1
    assert allocation.receive(1, B1, transport(0xA1), 0.3) == A1
    assert allocation.confirmed == (A1, B1)
    return allocation


def dropped(allocation: Allocation) -> int:
    return sum(allocation.counters[f"dropped_{reason}"] for reason in DROP_REASONS)


# -- the handshake walk-through ------------------------------------------------------------------


def test_full_exchange_learns_both_sites_and_forwards_both_ways(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = Allocation(keys)
    assert relay.confirmed == (None, None)

    # A initiates first: B is unknown, so there is nowhere to send it, but A's source is pending.
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.0) is None
    assert relay.counters["dropped_no_destination"] == 1

    # B's initiation goes to A's pending address; nothing is proven yet.
    b_init = initiation(key_a, 0xB0)
    assert relay.receive(1, B1, b_init, 1.0) == A1
    assert relay.confirmed == (None, None)

    # A answers B's initiation from the address it was delivered to: B is proven.
    assert relay.receive(0, A1, response(key_b, 0xA1, 0xB0), 1.1) == B1
    assert relay.confirmed == (None, B1)

    # A, the responder, is not proven yet: its transport data is dropped.
    assert relay.receive(0, A1, transport(0xB0), 1.15) is None
    assert relay.counters["dropped_unconfirmed_source"] == 1

    # B's first data (a keepalive) to A's response index proves A.
    keepalive = transport(0xA1, counter=0, payload=16)
    assert relay.receive(1, B1, keepalive, 1.2) == A1
    assert relay.confirmed == (A1, B1)

    # Transport flows both ways, to the right addresses.
    a_data = transport(0xB0, counter=0, payload=1280)
    b_data = transport(0xA1, counter=1, payload=64)
    assert relay.receive(0, A1, a_data, 1.3) == B1
    assert relay.receive(1, B1, b_data, 1.4) == A1

    # The other direction: A initiates with both confirmed; B answers, which re-proves A.
    assert relay.receive(0, A1, initiation(key_b, 0xA2), 130.0) == B1
    assert relay.receive(1, B1, response(key_a, 0xB3, 0xA2), 130.1) == A1
    assert relay.receive(0, A1, transport(0xB3), 130.2) == B1
    assert relay.receive(1, B1, transport(0xA2), 130.3) == A1
    assert relay.confirmed == (A1, B1)

    assert relay.counters["forwarded"] == 9
    sizes = [148, 92, 32, 1296, 80, 148, 92, 32, 32]
    assert relay.counters["forwarded_bytes"] == sum(sizes)
    assert dropped(relay) == 2


def test_initiator_is_proven_by_the_response_then_the_responder_by_its_data(
    keys: tuple[bytes, bytes],
) -> None:
    key_a, key_b = keys
    relay = Allocation(keys, confirmed=(None, B1))  # B known (restored), A not
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.0) == B1
    assert relay.confirmed == (None, B1)
    assert relay.receive(1, B1, response(key_a, 0xB1, 0xA0), 0.1) == A1
    assert relay.confirmed == (A1, B1)
    assert relay.receive(0, A1, transport(0xB1), 0.2) == B1


# -- junk ----------------------------------------------------------------------------------------


def _junk_cases(keys: tuple[bytes, bytes]) -> list[tuple[str, bytes, str]]:
    key_a, key_b = keys
    init = initiation(key_b, 0x1234)
    resp = response(key_b, 0x2345, 0xB0)
    data = transport(0xB0, payload=32)
    cases = [
        ("empty", b"", "malformed"),
        ("one byte", b"\x04", "malformed"),
        ("header only", b"\x04\x00\x00\x00", "malformed"),
        ("type 0", b"\x00\x00\x00\x00" + bytes(60), "malformed"),
        ("type 5", b"\x05\x00\x00\x00" + bytes(60), "malformed"),
        ("type 255", b"\xff" + bytes(147), "malformed"),
        ("init short", init[:-1], "malformed"),
        ("init long", init + b"\x00", "malformed"),
        ("response short", resp[:-16], "malformed"),
        ("response long", resp + bytes(16), "malformed"),
        ("cookie short", cookie_reply(0xB0)[:-1], "malformed"),
        ("cookie long", cookie_reply(0xB0) + bytes(16), "malformed"),
        ("transport 16", data[:16], "malformed"),
        ("transport 31", data[:31], "malformed"),
        ("init with response's size", init[:92], "malformed"),
        ("init mac1 for the sender's own key", initiation(key_a, 0x99), "bad_mac1"),
        ("init mac1 for a random key", initiation(os.urandom(32), 0x98), "bad_mac1"),
        ("response mac1 for the wrong key", response(key_a, 0x97, 0xB0), "bad_mac1"),
        ("init mac1 zero", init[:116] + bytes(32), "bad_mac1"),
        ("random bytes shaped like an init", b"\x01\x00\x00\x00" + os.urandom(144), "bad_mac1"),
        ("random bytes shaped like a response", b"\x02\x00\x00\x00" + os.urandom(88), "bad_mac1"),
    ]
    for position in (1, 2, 3):
        cases += [
            (f"init reserved {position}", with_reserved(init, position, key_b), "malformed"),
            (f"response reserved {position}", with_reserved(resp, position, key_b), "malformed"),
            (
                f"cookie reserved {position}",
                with_reserved(cookie_reply(1), position, None),
                "malformed",
            ),
            (f"transport reserved {position}", with_reserved(data, position, None), "malformed"),
        ]
    # Any flipped bit between the header and the end of mac1 breaks mac1.
    for bit in (32, 33, 64, 300, 8 * 115 + 7, 8 * 116, 8 * 131 + 7):
        cases.append((f"init bit {bit} flipped", flip_bit(init, bit), "bad_mac1"))
    for bit in (32, 64, 95, 8 * 59 + 7, 8 * 60, 8 * 75 + 7):
        cases.append((f"response bit {bit} flipped", flip_bit(resp, bit), "bad_mac1"))
    for bit in range(8):
        flipped = flip_bit(init, bit)  # the type byte: no longer a well-formed anything
        cases.append((f"init type bit {bit} flipped", flipped, "malformed"))
    return cases


@pytest.mark.parametrize("source", [A1, B1, EVIL])
def test_junk_is_dropped_counted_and_teaches_nothing(
    keys: tuple[bytes, bytes], source: Address
) -> None:
    relay = established(keys)
    for name, datagram, reason in _junk_cases(keys):
        before = relay.counters.copy()
        assert relay.receive(0, source, datagram, 1.0) is None, name
        delta = relay.counters - before
        assert delta == {f"dropped_{reason}": 1}, name
        assert relay.confirmed == (A1, B1), name
    # Still working: nothing above disturbed what was learned.
    assert relay.receive(0, A1, transport(0xB0), 2.0) == B1
    assert relay.receive(1, B1, transport(0xA1), 2.0) == A1


def test_random_datagrams_from_anywhere_change_nothing(keys: tuple[bytes, bytes]) -> None:
    relay = established(keys)
    rng = random.Random(7)
    for _ in range(5000):
        size = rng.choice([0, 1, 4, 31, 32, 48, 64, 92, 148, rng.randrange(0, 2000)])
        datagram = bytes([rng.randrange(1, 5), 0, 0, 0]) + rng.randbytes(size)
        datagram = datagram[:size] if rng.random() < 0.5 else datagram
        source = rng.choice([EVIL, EVIL2, A2, B2])
        assert relay.receive(rng.randrange(2), source, datagram, 1.0) is None
    assert relay.confirmed == (A1, B1)
    assert relay.counters["forwarded"] == 3  # only the three of established()


@settings(max_examples=500, deadline=None)
@given(
    side=st.sampled_from([0, 1]),
    source=st.one_of(
        st.sampled_from([A1, B1, EVIL]),
        st.tuples(st.text(max_size=40), st.integers()),
        st.none(),
        st.tuples(),
    ),
    datagram=st.one_of(
        st.binary(max_size=2000),
        st.builds(
            lambda kind, rest: bytes([kind, 0, 0, 0]) + rest,
            st.integers(0, 5),
            st.binary(max_size=200),
        ),
    ),
    now=st.floats(allow_nan=True, allow_infinity=True),
)
def test_receive_never_raises(side: int, source: Address, datagram: bytes, now: float) -> None:
    relay = Allocation((b"\x01" * 32, b"\x02" * 32), confirmed=(A1, B1))
    destination = relay.receive(side, source, datagram, now)
    # Without a valid mac1 nothing is learned; only transport from the confirmed source passes.
    assert relay.confirmed == (A1, B1)
    if destination is not None:
        assert source == (A1, B1)[side]
        assert destination == (B1, A1)[side]
    assert sum(relay.counters[k] for k in relay.counters if k != "forwarded_bytes") == 1


_KINDS = ["init", "response", "cookie", "transport", "wrong_key", "replay"]


@settings(max_examples=300, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0, 1]),
            st.sampled_from([A1, A2, B1, B2, EVIL]),
            st.sampled_from(_KINDS),
            st.integers(1, 3),
            st.integers(1, 3),
            # Mostly quick exchanges (so handshakes get answered), sometimes past expiry.
            st.one_of(st.floats(0.0, 2.0), st.just(PENDING_TTL + 1)),
        ),
        max_size=60,
    ),
)
def test_relay_only_ever_sends_to_addresses_that_sent_a_valid_handshake(
    rng: random.Random, steps: list[tuple[int, Address, str, int, int, float]]
) -> None:
    """Whatever mix of valid, forged, replayed and junk messages arrives from whoever."""
    keys = (hashlib.blake2s(b"A").digest(), hashlib.blake2s(b"B").digest())
    relay = Allocation(keys)
    heard: tuple[set[Address], set[Address]] = (set(), set())  # valid handshakes, per side
    history: list[bytes] = []
    now = 0.0
    for side, source, kind, index, other_index, delta in steps:
        now += delta
        receiver_key = keys[1 - side]
        if kind == "init":
            datagram = initiation(receiver_key, index, rng)
        elif kind == "response":
            datagram = response(receiver_key, index, other_index, rng)
        elif kind == "cookie":
            datagram = cookie_reply(index, rng)
        elif kind == "transport":
            datagram = transport(index, payload=16 * other_index, rng=rng)
        elif kind == "wrong_key":
            datagram = initiation(keys[side], index, rng)
        else:
            datagram = history[index % len(history)] if history else b""
        history.append(datagram)
        before = relay.confirmed
        # What a side's valid handshake could teach, as far as the test can tell from outside.
        if datagram[:1] in (b"\x01", b"\x02") and datagram[-32:-16] == mac1(
            receiver_key, datagram[:-32]
        ):
            heard[side].add(source)

        destination = relay.receive(side, source, datagram, now)

        if destination is not None:
            assert destination in heard[1 - side]
        if datagram[:1] == b"\x04" and source != before[side]:
            assert destination is None
        for s in (0, 1):
            assert relay.confirmed[s] is None or relay.confirmed[s] in heard[s]


# -- replays, forgeries, unconfirmed sources -----------------------------------------------------


def test_captured_initiation_replayed_from_elsewhere_is_dropped(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = established(keys)
    captured = initiation(key_b, 0xA5)
    assert relay.receive(0, A1, captured, 200.0) == B1

    # Replayed from another address, or from the same one, or with mac2 changed: never forwarded.
    assert relay.receive(0, EVIL, captured, 200.1) is None
    assert relay.receive(0, A1, captured, 200.2) is None
    assert relay.receive(0, EVIL, captured[:-16] + os.urandom(16), 200.3) is None
    assert relay.counters["dropped_replay"] == 3
    # On the other port it is checked against the other key.
    assert relay.receive(1, EVIL, captured, 200.4) is None
    assert relay.counters["dropped_bad_mac1"] == 1

    # B's response still goes to the real A, and nothing moved.
    assert relay.receive(1, B1, response(key_a, 0xB5, 0xA5), 200.5) == A1
    assert relay.confirmed == (A1, B1)


def test_captured_response_replayed_is_dropped(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = Allocation(keys, confirmed=(None, B1))
    captured_init = initiation(key_b, 0xA0)
    assert relay.receive(0, A1, captured_init, 0.0) == B1
    captured = response(key_a, 0xB1, 0xA0)
    assert relay.receive(1, B1, captured, 0.1) == A1
    assert relay.receive(1, EVIL, captured, 0.2) is None
    assert relay.receive(1, B1, captured, 0.3) is None
    assert relay.counters["dropped_replay"] == 2
    assert relay.confirmed == (A1, B1)


def test_old_replays_are_forgotten_after_the_window(keys: tuple[bytes, bytes]) -> None:
    key_b = keys[1]
    relay = Allocation(keys, confirmed=(A1, B1))
    old = initiation(key_b, 0x1)
    assert relay.receive(0, A1, old, 0.0) == B1
    assert relay.receive(0, A1, old, 50.0) is None  # a replay, within the window
    for index in range(2, REPLAY_WINDOW + 2):
        assert relay.receive(0, A1, initiation(key_b, index), 100.0) == B1
    # Bounded memory: it has been pushed out by newer handshakes (WireGuard's own timestamp
    # check makes such an old initiation useless at the receiver anyway).
    assert relay.receive(0, A1, old, 200.0) == B1


def test_transport_from_unconfirmed_addresses_is_dropped(keys: tuple[bytes, bytes]) -> None:
    relay = established(keys)
    assert relay.receive(0, EVIL, transport(0xB0), 1.0) is None
    assert relay.receive(0, A2, transport(0xB0), 1.0) is None
    assert relay.receive(0, B1, transport(0xB0), 1.0) is None  # B's address on A's port
    assert relay.receive(1, A1, transport(0xA1), 1.0) is None  # and the other way round
    assert relay.counters["dropped_unconfirmed_source"] == 4
    assert relay.confirmed == (A1, B1)


def test_forged_answer_from_another_address_proves_nothing(keys: tuple[bytes, bytes]) -> None:
    """Someone with both public keys can forge mac1; the answer must come from where the
    initiation was delivered to prove anything."""
    key_a, key_b = keys
    relay = established(keys)
    # A forged initiation as A from EVIL: mac1 is valid, so it is forwarded to B (who drops it).
    assert relay.receive(0, EVIL, initiation(key_b, 0xE1), 10.0) == B1
    # A forged response as B, from EVIL2, "answering" it: not from B1, so EVIL is not proven,
    # and it goes to the confirmed A (who drops it).
    assert relay.receive(1, EVIL2, response(key_a, 0xE2, 0xE1), 10.1) == A1
    assert relay.confirmed == (A1, B1)
    # Data following it from either forger goes nowhere.
    assert relay.receive(0, EVIL, transport(0xE2), 10.2) is None
    assert relay.receive(1, EVIL2, transport(0xE1), 10.3) is None
    assert relay.confirmed == (A1, B1)


def test_forged_response_cannot_prove_a_responder_either(keys: tuple[bytes, bytes]) -> None:
    key_a = keys[0]
    relay = established(keys)
    # A forged response as B from EVIL, to nothing pending: it goes to A, and EVIL is pending
    # for B with index 0xE3...
    assert relay.receive(1, EVIL, response(key_a, 0xE3, 0x777), 10.0) == A1
    # ...but the real A never sends data to 0xE3; a forged one from EVIL2 is not from A1.
    assert relay.receive(0, EVIL2, transport(0xE3), 10.1) is None
    assert relay.confirmed == (A1, B1)


def test_transport_proves_only_a_handshake_delivered_to_its_sender(
    keys: tuple[bytes, bytes],
) -> None:
    key_a, key_b = keys
    relay = Allocation(keys)
    # A forged initiation as A from EVIL while B is unknown: delivered nowhere, but pending.
    assert relay.receive(0, EVIL, initiation(key_b, 0x5), 0.0) is None
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.1) is None
    assert relay.receive(1, B1, initiation(key_a, 0xB0), 0.2) == A1
    assert relay.receive(0, A1, response(key_b, 0xA1, 0xB0), 0.3) == B1
    assert relay.confirmed == (None, B1)
    # Data from B naming EVIL's index (B never saw it): it proves nothing, and A is unknown.
    assert relay.receive(1, B1, transport(0x5), 0.4) is None
    assert relay.confirmed == (None, B1)
    assert relay.receive(1, B1, transport(0xA1), 0.5) == A1
    assert relay.confirmed == (A1, B1)


def test_reused_sender_index_is_dropped(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = Allocation(keys, confirmed=(None, B1))
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.0) == B1
    # Someone who saw it sends a different initiation with the same index from elsewhere.
    assert relay.receive(0, EVIL, initiation(key_b, 0xA0), 0.1) is None
    assert relay.counters["dropped_duplicate_index"] == 1
    assert relay.receive(1, B1, response(key_a, 0xB1, 0xA0), 0.2) == A1
    assert relay.confirmed == (A1, B1)
    # An index stays taken while it is pending, and may come again once it has expired.
    assert relay.receive(0, A1, initiation(key_b, 0xA3), 1.0) == B1
    assert relay.receive(0, A1, initiation(key_b, 0xA3), 2.0) is None
    assert relay.counters["dropped_duplicate_index"] == 2
    assert relay.receive(0, A1, initiation(key_b, 0xA3), 1.0 + PENDING_TTL) == B1


# -- roaming -------------------------------------------------------------------------------------


def test_initiator_roams_and_is_followed_after_its_handshake(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = established(keys)
    # A moved to A2: its data is dropped until a handshake from there is answered.
    assert relay.receive(0, A2, transport(0xB0, counter=5), 10.0) is None
    assert relay.receive(1, B1, transport(0xA1, counter=5), 10.0) == A1  # still to the old one
    assert relay.receive(0, A2, initiation(key_b, 0xA7), 15.0) == B1
    assert relay.confirmed == (A1, B1)
    assert relay.receive(1, B1, response(key_a, 0xB7, 0xA7), 15.1) == A2
    assert relay.confirmed == (A2, B1)
    assert relay.receive(0, A2, transport(0xB7), 15.2) == B1
    assert relay.receive(1, B1, transport(0xA7), 15.3) == A2
    assert relay.receive(0, A1, transport(0xB7, counter=1), 15.4) is None  # the old address


def test_responder_roams_and_is_followed_after_its_handshake(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = established(keys)
    # B moved to B2. A's initiation still goes to B1 (and is lost there).
    assert relay.receive(1, B2, transport(0xA1, counter=9), 10.0) is None
    assert relay.receive(0, A1, initiation(key_b, 0xA8), 12.0) == B1
    # B's own initiation from B2 gets answered by A: that proves B2.
    assert relay.receive(1, B2, initiation(key_a, 0xB8), 14.0) == A1
    assert relay.receive(0, A1, response(key_b, 0xA9, 0xB8), 14.1) == B2
    assert relay.confirmed == (A1, B2)
    assert relay.receive(1, B2, transport(0xA9), 14.2) == A1
    assert relay.receive(0, A1, transport(0xB8), 14.3) == B2


def test_both_sides_moved_meet_through_the_copy_to_the_newest_handshake(
    keys: tuple[bytes, bytes],
) -> None:
    """Both NAT mappings towards the relay changed (a conntrack flush, a new listen port): each
    side's confirmed address is stale. Once B's confirmed address has been silent longer than a
    keepalive, A's initiation also goes where B's newest handshake came from; without that
    copy neither side's handshake would ever reach the other."""
    key_a, key_b = keys
    relay = established(keys)  # the last datagrams at about t = 0.3
    # B, from B2: its initiation goes to A's stale A1 (lost there), and stays pending.
    assert relay.receive(1, B2, initiation(key_a, 0xB5), 10.0) == A1
    assert relay.also is None
    # A, from A2, while B1 has been heard recently: no copy yet.
    assert relay.receive(0, A2, initiation(key_b, 0xA4), 11.0) == B1
    assert relay.also is None
    # B's newest handshake is fresh, B1 silent for more than SILENT_AFTER: a copy to B2.
    assert relay.receive(1, B2, initiation(key_a, 0xB6), 40.0) == A1
    assert relay.receive(0, A2, initiation(key_b, 0xA5), 41.0) == B1
    assert relay.also == B2
    # B answers from B2, where the copy went: that proves A2.
    assert relay.receive(1, B2, response(key_a, 0xB7, 0xA5), 41.1) == A2
    assert relay.also is None
    assert relay.confirmed == (A2, B1)
    # B's next initiation reaches A2 and A's answer proves B2.
    assert relay.receive(1, B2, initiation(key_a, 0xB8), 45.0) == A2
    assert relay.receive(0, A2, response(key_b, 0xA8, 0xB8), 45.1) == B2
    assert relay.confirmed == (A2, B2)


def test_a_forged_handshake_diverts_nothing_while_the_site_is_heard(
    keys: tuple[bytes, bytes],
) -> None:
    """Anyone can make a valid mac1 (it is keyed by a public key). While B's confirmed address
    keeps sending (keepalives), a forged initiation from C gets no copy of A's handshakes."""
    key_a, key_b = keys
    relay = established(keys)
    stranger = ("192.0.2.99", 4444)
    for second in range(10, 100, 20):
        assert relay.receive(1, B1, transport(0xA1, counter=second), float(second)) == A1
        assert relay.receive(1, stranger, initiation(key_a, 0xC0 + second), second + 1.0) == A1
        assert relay.receive(0, A1, initiation(key_b, 0xA0 + second), second + 2.0) == B1
        assert relay.also is None
    assert relay.confirmed == (A1, B1)


# -- pending state -------------------------------------------------------------------------------


def test_pending_sources_expire(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    fresh = Allocation(keys)
    assert fresh.receive(0, A1, initiation(key_b, 0xA0), 0.0) is None
    assert fresh.receive(1, B1, initiation(key_a, 0xB0), PENDING_TTL - 1) == A1

    stale = Allocation(keys)
    assert stale.receive(0, A1, initiation(key_b, 0xA0), 0.0) is None
    assert stale.receive(1, B1, initiation(key_a, 0xB0), PENDING_TTL + 1) is None
    assert stale.counters["dropped_no_destination"] == 2


def test_an_answer_after_expiry_proves_nothing(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = Allocation(keys, confirmed=(None, B1))
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.0) == B1
    assert relay.receive(1, B1, response(key_a, 0xB1, 0xA0), PENDING_TTL + 1) is None
    assert relay.confirmed == (None, B1)


def test_pending_keeps_only_the_newest_entries(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = Allocation(keys, confirmed=(None, B1))
    sources = [("198.51.100.1", 1000 + n) for n in range(MAX_PENDING + 1)]
    for n, source in enumerate(sources):
        assert relay.receive(0, source, initiation(key_b, n), 0.0) == B1
    # The oldest was evicted: its answer has nowhere to go (A is not confirmed).
    assert relay.receive(1, B1, response(key_a, 0xB0, 0), 0.1) is None
    assert relay.counters["dropped_no_destination"] == 1
    assert relay.receive(1, B1, response(key_a, 0xB1, 1), 0.2) == sources[1]
    assert relay.confirmed == (sources[1], B1)


def test_bootstrap_initiation_goes_to_the_most_recent_pending_source(
    keys: tuple[bytes, bytes],
) -> None:
    key_a, key_b = keys
    relay = Allocation(keys)
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.0) is None
    assert relay.receive(0, A2, initiation(key_b, 0xA1), 5.0) is None
    assert relay.receive(1, B1, initiation(key_a, 0xB0), 6.0) == A2


# -- cookie replies ------------------------------------------------------------------------------


def test_cookie_reply_goes_back_to_the_pending_initiator(keys: tuple[bytes, bytes]) -> None:
    key_b = keys[1]
    relay = Allocation(keys, confirmed=(None, B1))
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.0) == B1
    # B is under load and answers with a cookie reply to A's index.
    assert relay.receive(1, B1, cookie_reply(0xA0), 0.1) == A1
    # From an address that is neither confirmed nor pending for B: dropped.
    assert relay.receive(1, EVIL, cookie_reply(0xA0), 0.2) is None
    assert relay.counters["dropped_unconfirmed_source"] == 1
    # For an index nobody is waiting on, and A unknown: nowhere to go.
    assert relay.receive(1, B1, cookie_reply(0x999), 0.3) is None
    assert relay.counters["dropped_no_destination"] == 1
    assert relay.confirmed == (None, B1)


def test_cookie_reply_from_a_pending_source(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = Allocation(keys)
    assert relay.receive(0, A1, initiation(key_b, 0xA0), 0.0) is None
    assert relay.receive(1, B1, initiation(key_a, 0xB0), 0.1) == A1
    # A (pending, not confirmed) is under load and sends B a cookie for B's initiation.
    assert relay.receive(0, A1, cookie_reply(0xB0), 0.2) == B1
    assert relay.confirmed == (None, None)


# -- limits --------------------------------------------------------------------------------------


def test_packet_rate_limit_drops_and_refills(keys: tuple[bytes, bytes]) -> None:
    relay = Allocation(keys, Limits(packets_per_second=10), confirmed=(A1, B1))
    # Both directions share one budget; the burst is one second's worth.
    results = [relay.receive(n % 2, (A1, B1)[n % 2], transport(n), 0.0) for n in range(11)]
    assert results[:10] == [B1, A1] * 5
    assert results[10] is None
    assert relay.counters["dropped_rate_limited"] == 1
    # Half a second later, five more.
    results = [relay.receive(0, A1, transport(n), 0.5) for n in range(6)]
    assert results == [B1] * 5 + [None]
    # A long pause refills up to the burst, not beyond.
    results = [relay.receive(1, B1, transport(n), 1000.0) for n in range(11)]
    assert results == [A1] * 10 + [None]
    assert relay.counters["dropped_rate_limited"] == 3
    assert relay.counters["forwarded"] == 25


def test_byte_rate_limit_drops_and_refills(keys: tuple[bytes, bytes]) -> None:
    relay = Allocation(keys, Limits(bytes_per_second=1000), confirmed=(A1, B1))
    big = transport(1, payload=480)  # 496 bytes
    assert relay.receive(0, A1, big, 0.0) == B1
    assert relay.receive(1, B1, big, 0.0) == A1
    assert relay.receive(0, A1, big, 0.0) is None  # 8 bytes left
    assert relay.receive(0, A1, transport(1), 0.0) is None  # 32 > 8
    assert relay.receive(0, A1, transport(1), 0.024) == B1  # 8 + 24 = 32
    assert relay.receive(0, A1, big, 1.0) == B1
    assert relay.counters["dropped_rate_limited"] == 2
    assert relay.counters["forwarded_bytes"] == 496 * 3 + 32


def test_rate_limited_handshake_teaches_nothing(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    relay = Allocation(keys, Limits(packets_per_second=1), confirmed=(None, B1))
    assert relay.receive(1, B1, cookie_reply(5), 0.0) is None  # no destination: takes no token
    first = initiation(key_b, 0xA0)
    assert relay.receive(0, A1, first, 0.0) == B1  # takes the only token
    second = initiation(key_b, 0xA1)
    assert relay.receive(0, A2, second, 0.1) is None
    assert relay.counters["dropped_rate_limited"] == 1
    # Not remembered: B's answer to it does not prove A2, and it is no replay later.
    assert relay.receive(1, B1, response(key_a, 0xB1, 0xA1), 1.1) is None
    assert relay.confirmed == (None, B1)
    assert relay.receive(0, A2, second, 2.1) == B1


def test_junk_takes_no_tokens(keys: tuple[bytes, bytes]) -> None:
    key_a = keys[0]
    relay = Allocation(keys, Limits(packets_per_second=2), confirmed=(A1, B1))
    for n in range(100):
        relay.receive(0, EVIL, transport(n), 0.0)
        relay.receive(0, EVIL, initiation(key_a, n), 0.0)
        relay.receive(1, B1, os.urandom(64), 0.0)
    assert relay.receive(0, A1, transport(1), 0.0) == B1
    assert relay.receive(1, B1, transport(1), 0.0) == A1
    assert relay.receive(1, B1, transport(2), 0.0) is None


# -- restart, construction -----------------------------------------------------------------------


def test_restored_confirmed_addresses_let_transport_flow_at_once(
    keys: tuple[bytes, bytes],
) -> None:
    before = established(keys)
    saved = json.dumps(before.confirmed)  # how a relay would persist it
    relay = Allocation(keys, confirmed=json.loads(saved))
    assert relay.confirmed == (A1, B1)
    assert relay.receive(0, A1, transport(0xB0, counter=10), 0.0) == B1
    assert relay.receive(1, B1, transport(0xA1, counter=10), 0.0) == A1
    assert relay.receive(0, EVIL, transport(0xB0, counter=11), 0.0) is None


def test_one_side_restored_has_nowhere_to_send_transport(keys: tuple[bytes, bytes]) -> None:
    relay = Allocation(keys, confirmed=(A1, None))
    assert relay.receive(0, A1, transport(1), 0.0) is None
    assert relay.counters == Counter(dropped_no_destination=1)


@pytest.mark.parametrize(
    "public_keys",
    [
        (bytes(31), bytes(32)),
        (bytes(32), bytes(33)),
        (b"", bytes(32)),
        ("A" * 43 + "=", bytes(32)),  # base64, not raw
        (None, bytes(32)),
        (bytes(32),),
        (bytes(32), b"\x01" * 32, b"\x02" * 32),
        (bytes(32), bytes(32)),  # the same key on both sides
        bytes(64),
        None,
    ],
)
def test_bad_public_keys_raise_value_error(public_keys: object) -> None:
    with pytest.raises(ValueError):
        Allocation(public_keys)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "confirmed",
    [
        (A1,),
        (A1, B1, None),
        ("198.51.100.10", 51820),
        ((None, 1), None),
        (("h", "51820"), None),
        (("h", 70000), None),
        (("h", -1), None),
        (("h", 1, 0, 0), None),
        None,
    ],
)
def test_bad_confirmed_raises_value_error(keys: tuple[bytes, bytes], confirmed: object) -> None:
    with pytest.raises(ValueError):
        Allocation(keys, confirmed=confirmed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"packets_per_second": 0},
        {"packets_per_second": -1.0},
        {"bytes_per_second": math.nan},
        {"bytes_per_second": math.inf},
        {"bytes_per_second": "1000"},
    ],
)
def test_bad_limits_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("side", [2, -1, 0.5, None, "0"])
def test_side_other_than_0_or_1_raises(keys: tuple[bytes, bytes], side: object) -> None:
    relay = Allocation(keys, confirmed=(A1, B1))
    with pytest.raises(ValueError):
        relay.receive(side, A1, transport(1), 0.0)  # type: ignore[arg-type]


def test_counters_name_every_reason_and_take_the_callers_own(keys: tuple[bytes, bytes]) -> None:
    relay = Allocation(keys, confirmed=(A1, B1))
    assert relay.counters == Counter()  # every key present, at zero
    assert set(relay.counters) == {"forwarded", "forwarded_bytes"} | {
        f"dropped_{reason}" for reason in DROP_REASONS
    }
    assert relay.receive(0, A1, transport(1), 0.0) == B1
    assert relay.receive(0, EVIL, transport(1), 0.0) is None
    assert relay.counters == Counter(forwarded=1, forwarded_bytes=32, dropped_unconfirmed_source=1)
    # The caller's own counts (a failed send, say) live alongside, and it may reset them all.
    relay.counters["dropped_send_error"] += 1
    assert relay.receive(1, B1, transport(2, payload=32), 1.0) == A1
    assert relay.counters == Counter(
        forwarded=2, forwarded_bytes=80, dropped_unconfirmed_source=1, dropped_send_error=1
    )
    relay.counters.clear()
    assert relay.receive(1, B1, transport(3), 2.0) == A1
    assert relay.counters == Counter(forwarded=1, forwarded_bytes=32)


def test_full_mtu_transport_is_forwarded(keys: tuple[bytes, bytes]) -> None:
    """A full-size packet at MTU 1420 is 1452 bytes: not a multiple of 16, still WireGuard."""
    relay = Allocation(keys, confirmed=(A1, B1))
    for size in (1420, 1421, 1433):
        datagram = transport(0xA1, counter=size, payload=size + 16)
        assert len(datagram) == size + 32
        assert relay.receive(0, A1, datagram, 1.0) == B1


def test_a_sidecars_mapping_keepalive_is_counted_never_forwarded(
    keys: tuple[bytes, bytes],
) -> None:
    from meshwright.relay.forward import KEEPALIVES, MAPPING_KEEPALIVE

    relay = established(keys)
    assert relay.receive(0, A1, MAPPING_KEEPALIVE, 10.0) is None
    assert relay.receive(1, ("192.0.2.7", 9), MAPPING_KEEPALIVE, 10.0) is None
    assert relay.counters[KEEPALIVES] == 2
    assert relay.counters["dropped_malformed"] == 0
    assert relay.confirmed == (A1, B1)


def test_a_rotated_key_keeps_the_running_session_and_checks_new_handshakes(
    keys: tuple[bytes, bytes],
) -> None:
    key_a, key_b = keys
    relay = established(keys)
    new_a = os.urandom(32)
    relay.rekey((new_a, key_b))
    assert relay.confirmed == (A1, B1)
    # The session running before the rotation still flows, both ways.
    assert relay.receive(0, A1, transport(0xB0, counter=9), 1.0) == B1
    assert relay.receive(1, B1, transport(0xA1, counter=9), 1.0) == A1
    # B's initiation to A is now checked against A's new key: the old one's mac1 is junk.
    before = dropped(relay)
    assert relay.receive(1, B1, initiation(key_a, 0xB8), 2.0) is None
    assert dropped(relay) == before + 1
    assert relay.receive(1, B1, initiation(new_a, 0xB9), 2.1) == A1
    assert relay.receive(0, A1, response(key_b, 0xA9, 0xB9), 2.2) == B1
    # Keys that cannot be change nothing.
    with pytest.raises(ValueError):
        relay.rekey((key_b, key_b))
    assert relay.receive(1, B1, initiation(new_a, 0xBA), 3.0) == A1
