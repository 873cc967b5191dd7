"""Tests for meshwright.relay.wgstun: the relays' answer to "where do you see my WireGuard
socket?", with the other mapping the relay service confirmed for the same site."""

from __future__ import annotations

import json
import os
from pathlib import Path

from meshwright.relay import wgstun
from meshwright.relay.wgstun import RELAY_SILENT_AFTER, WgStunAnswerer, confirmed_addresses
from meshwright.wire import stun

KEY_A, KEY_B, KEY_C = "A" * 43 + "=", "B" * 43 + "=", "C" * 43 + "="
PEERS = {
    "10.99.0.2": (KEY_A, ("198.51.100.21", 51830)),
    "10.99.0.3": (KEY_B, ("203.0.113.22", 51820)),
    "10.99.0.4": (KEY_C, None),  # no endpoint yet
}
STATE = {
    "address": "198.51.100.10",
    "sites": {
        "a": {"port": 40020, "public_key": KEY_A, "confirmed": ["198.51.100.21", 50655]},
        "b": {"port": 40021, "public_key": KEY_B, "confirmed": ["203.0.113.22", 51820]},
        "c": {"port": 40022, "public_key": KEY_C, "confirmed": None},
        "blocked": {"port": 40023, "public_key": "D" * 43 + "=", "confirmed": ["tls:x", 1]},
        "broken": {"public_key": "nonsense", "confirmed": [1, 2, 3]},
    },
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
        KEY_A: {("198.51.100.21", 50655)},
        KEY_B: {("203.0.113.22", 51820)},
    }
    assert confirmed_addresses({}) == {}
    assert confirmed_addresses({"sites": []}) == {}


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


def test_nothing_is_answered_while_the_relay_service_is_silent() -> None:
    answerer = WgStunAnswerer()
    answerer.update(PEERS, STATE)
    answerer.relay_alive = False
    for source in ("10.99.0.2", "10.99.0.99"):  # known or not: no answer, not even a 404
        assert answerer.handle(stun.binding_request(), (source, 1)) is None
    assert answerer.counters["dropped_relay_silent"] == 2
    answerer.relay_alive = True
    assert ask(answerer, "10.99.0.2").xor_mapped_address() == ("198.51.100.21", 51830)


def test_silent_while_the_relay_state_file_is_stale_or_missing_answering_once_fresh(
    tmp_path: Path,
) -> None:
    """The relay service's loop touches its state file every second: a file older than
    RELAY_SILENT_AFTER, or none, is a relay service down or hung, which sites must see."""
    state = tmp_path / "state.json"
    logs: list[str] = []
    answerer = WgStunAnswerer()
    t = 1_700_000_000.0  # the wall clock, injected

    def refresh_at(now: float) -> stun.Message | None:
        wgstun.refresh(answerer, "mesh0", lambda _: PEERS, str(state), now, logs.append)
        answer = answerer.handle(stun.binding_request(), ("10.99.0.2", 1))
        return None if answer is None else stun.decode(answer)

    # No relay service yet.
    assert refresh_at(t) is None
    assert len(logs) == 1 and "not answering" in logs[0]
    # It started: answers again, with what its file confirmed.
    state.write_text(json.dumps(STATE))
    os.utime(state, (t, t))
    answer = refresh_at(t + 0.5)
    assert answer is not None and answer.also_mapped() == (("198.51.100.21", 50655),)
    assert len(logs) == 2 and "answering again" in logs[1]
    # Touched every second: still answering, and nothing more to say.
    for second in range(1, 6):
        os.utime(state, (t + second, t + second))
        assert refresh_at(t + second + 0.9) is not None
    # It hung after its last touch at t + 5: silent once the file is RELAY_SILENT_AFTER old.
    assert refresh_at(t + 5 + RELAY_SILENT_AFTER - 0.1) is not None
    for wait in (0.0, 0.5, 10.0):
        assert refresh_at(t + 5 + RELAY_SILENT_AFTER + wait) is None
    assert len(logs) == 3 and "not answering" in logs[2]
    # Back: one touch and it answers again.
    os.utime(state, (t + 20, t + 20))
    assert refresh_at(t + 20.2) is not None
    # The file removed: silent. A clock stepped back an hour makes a file from the future,
    # which proves nothing either.
    state.unlink()
    assert refresh_at(t + 21) is None
    state.write_text(json.dumps(STATE))
    os.utime(state, (t + 22, t + 22))
    assert refresh_at(t + 22 - 3600) is None
    assert answerer.counters["dropped_relay_silent"] == 6
    assert len(logs) == 5 and "answering again" in logs[3] and "not answering" in logs[4]
