"""Tests for meshwright.relay.wgstun: the relays' answer to "where do you see my WireGuard
socket?", with every other mapping the relay's allocations confirmed for the same site."""

from __future__ import annotations

from meshwright.relay.wgstun import WgStunAnswerer, confirmed_addresses
from meshwright.wire import stun

KEY_A, KEY_B, KEY_C = "A" * 43 + "=", "B" * 43 + "=", "C" * 43 + "="
PEERS = {
    "10.99.0.2": (KEY_A, ("198.51.100.21", 51830)),
    "10.99.0.3": (KEY_B, ("203.0.113.22", 51820)),
    "10.99.0.4": (KEY_C, None),  # no endpoint yet
}
STATE = {
    "allocations": {
        "a--b": {
            "spec": ["198.51.100.10", [40020, 40021], [KEY_A, KEY_B]],
            "confirmed": [["198.51.100.21", 50655], ["203.0.113.22", 51820]],
        },
        "a--c": {
            "spec": ["198.51.100.10", [40022, 40023], [KEY_A, KEY_C]],
            "confirmed": [["198.51.100.21", 51830], None],
        },
        "broken": {"spec": "nonsense", "confirmed": [1, 2, 3]},
    }
}


def ask(answerer: WgStunAnswerer, source: str) -> stun.Message:
    request = stun.binding_request()
    answer = answerer.handle(request, (source, 40000))
    assert answer is not None
    message = stun.decode(answer)
    assert message.transaction_id == stun.decode(request).transaction_id
    return message


def test_answer_is_the_wireguard_endpoint_and_every_other_confirmed_mapping() -> None:
    answerer = WgStunAnswerer()
    answerer.update(PEERS, STATE)
    a = ask(answerer, "10.99.0.2")
    assert a.xor_mapped_address() == ("198.51.100.21", 51830)
    assert a.also_mapped() == (("198.51.100.21", 50655),)  # the endpoint is not repeated
    b = ask(answerer, "10.99.0.3")
    assert b.xor_mapped_address() == ("203.0.113.22", 51820)
    assert b.also_mapped() == ()
    assert answerer.counters["answered"] == 2


def test_a_site_without_an_endpoint_or_unknown_gets_404_and_garbage_is_dropped() -> None:
    answerer = WgStunAnswerer()
    answerer.update(PEERS, STATE)
    for source in ("10.99.0.4", "10.99.0.99"):
        request = stun.binding_request()
        answer = answerer.handle(request, (source, 1))
        assert answer is not None and stun.decode(answer).error_code() is not None
    assert answerer.handle(b"\x00\x01garbage", ("10.99.0.2", 1)) is None
    assert answerer.counters["dropped_malformed"] == 1


def test_confirmed_addresses_skips_what_it_cannot_read() -> None:
    assert confirmed_addresses(STATE) == {
        KEY_A: {("198.51.100.21", 50655), ("198.51.100.21", 51830)},
        KEY_B: {("203.0.113.22", 51820)},
    }
    assert confirmed_addresses({}) == {}
    assert confirmed_addresses({"allocations": []}) == {}


def test_also_mapped_is_comprehension_optional_and_round_trips() -> None:
    """Its type is in 0x8000-0xFFFF, so a STUN client that does not know it ignores it."""
    request = stun.decode(stun.binding_request())
    answer = stun.binding_success(
        request, ("198.51.100.21", 51830), also_mapped=[("198.51.100.21", 50655)]
    )
    message = stun.decode(answer)
    assert message.xor_mapped_address() == ("198.51.100.21", 51830)
    assert [a.type for a in message.attributes].count(stun.ALSO_MAPPED) == 1
    assert stun.ALSO_MAPPED >= 0x8000
