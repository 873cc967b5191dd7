"""Tests for meshwright.relay.stun_server: the pure responder, the rate limiter, and the real server
on loopback (127.0.0.1 and 127.0.0.2 only)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tls_harness import trickle_until_closed

from meshwright.relay.stun_server import (
    UNKNOWN_ATTRIBUTES,
    RateLimiter,
    StunResponder,
    StunServer,
    main,
)
from meshwright.wire import stun

A, B = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
PORT, ALT = 3478, 3479
CLIENT = ("198.51.100.7", 40000)
CLIENT6 = ("2001:db8:ffff::7", 40000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def responder(*addresses: str, **kwargs: object) -> StunResponder:
    return StunResponder(list(addresses or (A, B)), PORT, ALT, **kwargs)  # type: ignore[arg-type]


def request_with(*attributes: stun.Attribute, txid: bytes | None = None) -> bytes:
    message = stun.Message(
        stun.BINDING, stun.REQUEST, txid or stun.new_transaction_id(), tuple(attributes)
    )
    return stun.encode(message, fingerprint=True)


def unknown_attributes(message: stun.Message) -> list[int]:
    value = message.get(UNKNOWN_ATTRIBUTES)
    assert value is not None
    return [int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2)]


def wireguard_initiation() -> bytes:
    # Type 1, three reserved zero bytes, then 144 bytes: the size of a handshake initiation.
    return bytes([1, 0, 0, 0]) + random.Random(7).randbytes(144)


# --- responder ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "local", "client"),
    [((A, B), (A, PORT), CLIENT), ((A6, B6), (A6, ALT), CLIENT6)],
    ids=["ipv4", "ipv6"],
)
def test_success_carries_mapped_origin_software_and_fingerprint(
    addresses: tuple[str, str], local: tuple[str, int], client: tuple[str, int]
) -> None:
    r = responder(*addresses)
    txid = stun.new_transaction_id()
    outcome = r.handle(stun.binding_request(txid), client, local)

    assert outcome.reason == "success" and not outcome.dropped
    assert outcome.send_from == local
    assert outcome.response is not None
    assert stun.is_stun(outcome.response)
    reply = stun.decode(outcome.response)  # also checks the FINGERPRINT
    assert (reply.method, reply.cls, reply.transaction_id) == (
        stun.BINDING,
        stun.SUCCESS_RESPONSE,
        txid,
    )
    assert reply.xor_mapped_address() == client
    assert reply.mapped_address() == client
    assert reply.response_origin() == local
    assert reply.software() == "meshwright"
    assert reply.attributes[-1].type == stun.FINGERPRINT
    assert r.stats["received"] == 1 and r.stats["success"] == 1


def test_other_address_is_the_alternate_ip_and_port() -> None:
    r = responder(A, B)
    for local, other in [
        ((A, PORT), (B, ALT)),
        ((A, ALT), (B, PORT)),
        ((B, PORT), (A, ALT)),
        ((B, ALT), (A, PORT)),
    ]:
        outcome = r.handle(stun.binding_request(), CLIENT, local)
        assert outcome.response is not None
        assert stun.decode(outcome.response).other_address() == other


def test_one_address_sends_no_other_address() -> None:
    outcome = responder(A).handle(stun.binding_request(), CLIENT, (A, ALT))
    assert outcome.reason == "success" and outcome.response is not None
    reply = stun.decode(outcome.response)
    assert reply.other_address() is None
    assert reply.response_origin() == (A, ALT)


def test_addresses_pair_within_a_family_only() -> None:
    r = responder(A, A6, B)
    assert r.other_address((A, PORT)) == (B, ALT)
    assert r.other_address((B, ALT)) == (A, PORT)
    assert r.other_address((A6, PORT)) is None
    outcome = r.handle(stun.binding_request(change_port=True), CLIENT6, (A6, PORT))
    assert outcome.reason == "error_420"


@pytest.mark.parametrize(
    ("change_ip", "change_port", "local", "expected"),
    [
        (False, False, (A, PORT), (A, PORT)),
        (True, False, (A, PORT), (B, PORT)),
        (False, True, (A, PORT), (A, ALT)),
        (True, True, (A, PORT), (B, ALT)),
        (True, True, (B, ALT), (A, PORT)),
        (False, True, (B, ALT), (B, PORT)),
        (True, False, (A, ALT), (B, ALT)),
    ],
)
def test_change_request_picks_the_source_socket(
    change_ip: bool,
    change_port: bool,
    local: tuple[str, int],
    expected: tuple[str, int],
) -> None:
    r = responder(A, B)
    flags = (4 if change_ip else 0) | (2 if change_port else 0)
    # Build CHANGE-REQUEST by hand so the no-flags case is really sent, not omitted.
    data = request_with(stun.Attribute(stun.CHANGE_REQUEST, flags.to_bytes(4, "big")))
    outcome = r.handle(data, CLIENT, local)
    assert outcome.reason == "success"
    assert outcome.send_from == expected
    assert outcome.response is not None
    reply = stun.decode(outcome.response)
    assert reply.response_origin() == expected
    assert reply.xor_mapped_address() == CLIENT
    # OTHER-ADDRESS names the alternate of where the request arrived, whatever was asked.
    assert reply.other_address() == r.other_address(local)


@pytest.mark.parametrize("flags", [2, 4, 6])
def test_one_address_answers_a_change_it_cannot_make_with_420(flags: int) -> None:
    r = responder(A)
    txid = stun.new_transaction_id()
    data = request_with(stun.Attribute(stun.CHANGE_REQUEST, flags.to_bytes(4, "big")), txid=txid)
    outcome = r.handle(data, CLIENT, (A, PORT))
    assert outcome.reason == "error_420"
    assert outcome.send_from == (A, PORT)
    assert outcome.response is not None
    reply = stun.decode(outcome.response)
    assert (reply.cls, reply.transaction_id) == (stun.ERROR_RESPONSE, txid)
    assert reply.error_code() == (420, "Unknown Attribute")
    assert unknown_attributes(reply) == [stun.CHANGE_REQUEST]
    assert r.stats["error_420"] == 1 and r.stats["success"] == 0


def test_unknown_comprehension_required_attributes_get_420() -> None:
    r = responder(A, B)
    data = request_with(
        stun.Attribute(0x7F01, b"x"),
        # RFC 5780's PADDING, which this server does not implement (RESPONSE-PORT it does).
        stun.Attribute(stun.PADDING, b"\x00" * 8),
        stun.Attribute(0x7F01, b"again"),
        stun.Attribute(0xC0DE, b"optional, ignored"),
    )
    outcome = r.handle(data, CLIENT, (A, PORT))
    assert outcome.reason == "error_420" and outcome.response is not None
    reply = stun.decode(outcome.response)
    # Each unknown type once, in order; the odd count is padded and the padding ignored.
    value = reply.get(UNKNOWN_ATTRIBUTES)
    assert value == bytes.fromhex("7f01 0026")
    assert reply.software() == "meshwright"


def test_a_datagram_full_of_unknown_attributes_costs_linear_time() -> None:
    # Regression: the largest UDP datagram holds 16,371 distinct unknown comprehension-required
    # attributes, and checking each against the list of those already seen took about a second
    # of CPU per request. CPU time, not wall time, so that a loaded machine does not fail it.
    types = list(range(0x0030, 0x0030 + (65507 - 20) // 4))
    body = b"".join(struct.pack("!HH", t, 0) for t in types)
    data = struct.pack("!HHI12s", 0x0001, len(body), stun.MAGIC_COOKIE, bytes(12)) + body
    r = responder(A, B)
    started = time.process_time()
    outcome = r.handle(data, CLIENT, (A, PORT))
    elapsed = time.process_time() - started
    assert outcome.reason == "error_420" and outcome.response is not None
    assert unknown_attributes(stun.decode(outcome.response)) == types
    assert elapsed < 0.3, f"{elapsed:.2f} s of CPU for one request"


def test_unknown_optional_and_known_attributes_are_answered() -> None:
    data = request_with(
        stun.Attribute(stun.USERNAME, b"someone"),
        stun.Attribute(0xC0DE, b"optional"),
        stun.Attribute(stun.SOFTWARE, b"client"),
    )
    assert responder(A, B).handle(data, CLIENT, (A, PORT)).reason == "success"


def test_unknown_attribute_with_change_request_on_one_address_lists_both() -> None:
    data = request_with(
        stun.Attribute(stun.CHANGE_REQUEST, (6).to_bytes(4, "big")),
        stun.Attribute(0x7F01, b""),
    )
    outcome = responder(A).handle(data, CLIENT, (A, PORT))
    assert outcome.response is not None
    assert unknown_attributes(stun.decode(outcome.response)) == [0x7F01, stun.CHANGE_REQUEST]


def change_request(flags: int) -> stun.Attribute:
    # Built by hand so the no-flags case is really sent, not omitted.
    return stun.Attribute(stun.CHANGE_REQUEST, flags.to_bytes(4, "big"))


def response_port(port: int) -> stun.Attribute:
    return stun.Attribute(stun.RESPONSE_PORT, port.to_bytes(2, "big") + b"\x00\x00")


@pytest.mark.parametrize("addresses", [(A,), (A, B)], ids=["one-address", "two-addresses"])
def test_change_request_asking_for_no_change_is_served(addresses: tuple[str, ...]) -> None:
    """stund's client and others always send CHANGE-REQUEST; with no flag it asks for nothing
    we cannot do (RFC 5780 Table 1, row "none"), so it is served even with one address."""
    r = responder(*addresses)
    outcome = r.handle(request_with(change_request(0)), CLIENT, (A, PORT))
    assert outcome.reason == "success" and outcome.send_from == (A, PORT)
    assert outcome.response is not None
    reply = stun.decode(outcome.response)
    assert reply.xor_mapped_address() == reply.mapped_address() == CLIENT
    assert reply.response_origin() == (A, PORT)
    assert reply.other_address() == r.other_address((A, PORT))


@pytest.mark.parametrize("addresses", [(A,), (A, B)], ids=["one-address", "two-addresses"])
def test_over_tcp_no_change_is_served_and_a_change_gets_420(addresses: tuple[str, ...]) -> None:
    r = responder(*addresses)
    stream = (A, 443)
    served = r.handle(request_with(change_request(0)), CLIENT, (A, PORT), stream=stream)
    assert served.reason == "success" and served.send_from == stream
    assert served.response is not None
    reply = stun.decode(served.response)
    assert reply.response_origin() == stream and reply.other_address() is None
    for flags in (2, 4, 6):
        refused = r.handle(request_with(change_request(flags)), CLIENT, (A, PORT), stream=stream)
        assert refused.reason == "error_420" and refused.send_from == stream
        assert refused.response is not None
        assert unknown_attributes(stun.decode(refused.response)) == [stun.CHANGE_REQUEST]


@pytest.mark.parametrize("addresses", [(A,), (A, B)], ids=["one-address", "two-addresses"])
def test_response_port_over_udp_redirects_the_answer(addresses: tuple[str, ...]) -> None:
    """RFC 5780 7.5: the answer goes to the request's source IP at RESPONSE-PORT; the mapped
    address is still the request's source."""
    r = responder(*addresses)
    outcome = r.handle(request_with(response_port(40001)), CLIENT, (A, PORT))
    assert outcome.reason == "success" and outcome.response_port == 40001
    assert outcome.send_from == (A, PORT) and outcome.response is not None
    reply = stun.decode(outcome.response)
    assert reply.xor_mapped_address() == reply.mapped_address() == CLIENT
    assert reply.response_origin() == (A, PORT)


def test_response_port_with_change_request_on_two_addresses() -> None:
    # coturn's turnutils_stunclient sends exactly this as its second request.
    data = request_with(response_port(40001), change_request(6))
    outcome = responder(A, B).handle(data, CLIENT, (A, PORT))
    assert outcome.reason == "success"
    assert (outcome.send_from, outcome.response_port) == ((B, ALT), 40001)


def test_an_error_goes_to_the_response_port_too() -> None:
    """turnutils_stunclient -f waits only on its RESPONSE-PORT: a 420 sent to the source port
    would never reach it (it hung there before)."""
    data = request_with(response_port(40001), change_request(6))
    outcome = responder(A).handle(data, CLIENT, (A, PORT))
    assert outcome.reason == "error_420" and outcome.response_port == 40001
    assert outcome.response is not None
    assert unknown_attributes(stun.decode(outcome.response)) == [stun.CHANGE_REQUEST]


def test_response_port_zero_gets_400_at_the_source_port() -> None:
    r = responder(A, B)
    outcome = r.handle(request_with(response_port(0)), CLIENT, (A, PORT))
    assert outcome.reason == "error_400" and outcome.response_port is None
    assert outcome.send_from == (A, PORT) and outcome.response is not None
    reply = stun.decode(outcome.response)
    assert reply.error_code() == (400, "Bad Request")
    assert reply.software() == "meshwright"
    assert r.stats["error_400"] == 1 and r.stats["success"] == 0


def test_response_port_over_tcp_gets_420() -> None:
    # A connection has one destination; RFC 5780 section 5 tells clients to expect a 420.
    stream = (A, 443)
    outcome = responder(A, B).handle(
        request_with(response_port(40001)), CLIENT, (A, PORT), stream=stream
    )
    assert outcome.reason == "error_420" and outcome.response_port is None
    assert outcome.send_from == stream and outcome.response is not None
    assert unknown_attributes(stun.decode(outcome.response)) == [stun.RESPONSE_PORT]


def test_malformed_response_port_is_dropped() -> None:
    r = responder(A, B)
    data = request_with(stun.Attribute(stun.RESPONSE_PORT, b"\x12\x34"))
    assert r.handle(data, CLIENT, (A, PORT)).reason == "malformed"


CLASSIC_TXID = bytes(range(16))


def classic_request(*attributes: tuple[int, bytes], txid: bytes = CLASSIC_TXID) -> bytes:
    """An RFC 3489 Binding request as stund and pystun3 send it: no cookie, 16-byte id."""
    body = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in attributes)
    return struct.pack("!HH", 0x0001, len(body)) + txid + body


def _aligned(data: bytes) -> bool:
    """Every attribute a multiple of 4 bytes long, as RFC 3489 parsers need."""
    offset = stun.HEADER_SIZE
    while offset < len(data):
        _type, length = struct.unpack_from("!HH", data, offset)
        if length % 4:
            return False
        offset += 4 + length
    return offset == len(data)


@pytest.mark.parametrize(
    ("flags", "local", "expected"),
    [(0, (A, PORT), (A, PORT)), (6, (A, PORT), (B, ALT)), (2, (B, ALT), (B, PORT))],
)
def test_classic_client_gets_mapped_source_and_changed_address(
    flags: int, local: tuple[str, int], expected: tuple[str, int]
) -> None:
    r = responder(A, B)
    data = classic_request((stun.CHANGE_REQUEST, flags.to_bytes(4, "big")))
    outcome = r.handle(data, CLIENT, local)
    assert outcome.reason == "success" and outcome.send_from == expected
    assert outcome.response is not None
    # RFC 8489 section 11: the 16 bytes echoed, MAPPED-ADDRESS instead of XOR-MAPPED-ADDRESS.
    assert outcome.response[4:20] == CLASSIC_TXID
    reply = stun.decode(outcome.response, classic=True)
    assert reply.classic and reply.cls == stun.SUCCESS_RESPONSE
    assert reply.mapped_address() == CLIENT
    assert reply.get(stun.XOR_MAPPED_ADDRESS) is None
    assert reply.source_address() == expected
    assert reply.changed_address() == r.other_address(local)
    assert reply.get(stun.SOFTWARE) is None and reply.get(stun.FINGERPRINT) is None
    assert _aligned(outcome.response)
    assert r.stats["classic"] == 1 and r.stats["success"] == 1


def test_classic_client_on_one_address() -> None:
    r = responder(A)
    served = r.handle(classic_request(), CLIENT, (A, PORT))
    assert served.reason == "success" and served.response is not None
    reply = stun.decode(served.response, classic=True)
    assert reply.mapped_address() == CLIENT and reply.changed_address() is None
    refused = r.handle(
        classic_request((stun.CHANGE_REQUEST, b"\x00\x00\x00\x04")), CLIENT, (A, PORT)
    )
    assert refused.reason == "error_420" and refused.response is not None
    error = stun.decode(refused.response, classic=True)
    assert error.classic and error.error_code() == (420, "Unknown Attribute   ")
    # RFC 3489 11.2.10: an odd count is filled by repeating a type, not by padding.
    assert unknown_attributes(error) == [stun.CHANGE_REQUEST, stun.CHANGE_REQUEST]
    assert _aligned(refused.response)


def test_classic_response_address_is_refused() -> None:
    # RESPONSE-ADDRESS sends the answer anywhere: a reflection tool, which RFC 8489 section 11
    # says a server treats as unknown.
    data = classic_request((0x0002, b"\x00\x01\x12\x34\xc6\x33\x64\x63"))
    outcome = responder(A, B).handle(data, CLIENT, (A, PORT))
    assert outcome.reason == "error_420" and outcome.send_from == (A, PORT)
    assert outcome.response is not None
    assert unknown_attributes(stun.decode(outcome.response, classic=True)) == [0x0002, 0x0002]


def test_classic_request_over_tcp_is_not_stun() -> None:
    # RFC 3489 defined Binding over UDP only: on a stream only the cookie marks STUN.
    outcome = responder(A, B).handle(classic_request(), CLIENT, (A, PORT), stream=(A, 443))
    assert outcome.reason == "not_stun"


def _corrupt_fingerprint(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_stun"),
        (b"hello, world, this is not STUN", "not_stun"),
        (wireguard_initiation(), "not_stun"),
        (random.Random(1).randbytes(200), "not_stun"),
        # RFC 3489 style (no magic cookie), but its length says 4 and there are none.
        (b"\x00\x01\x00\x04" + bytes(16), "not_stun"),
        # RFC 3489 style with a 2-byte CHANGE-REQUEST value.
        (b"\x00\x01\x00\x08" + bytes(16) + b"\x00\x03\x00\x02\x00\x06\x00\x00", "malformed"),
        (_corrupt_fingerprint(stun.binding_request()), "malformed"),
        # Framing is fine but the CHANGE-REQUEST value is 2 bytes long.
        (
            b"\x00\x01\x00\x08\x21\x12\xa4\x42" + bytes(12) + b"\x00\x03\x00\x02\x00\x06\x00\x00",
            "malformed",
        ),
        (stun.binding_success(bytes(12), CLIENT), "not_request"),
        (stun.binding_error(bytes(12), 400, "Bad Request"), "not_request"),
        (
            stun.encode(stun.Message(stun.BINDING, stun.INDICATION, bytes(12)), fingerprint=True),
            "not_request",
        ),
        # Allocate (0x003), a TURN method this server does not serve.
        (stun.encode(stun.Message(0x003, stun.REQUEST, bytes(12))), "not_binding"),
    ],
    ids=[
        "empty",
        "text",
        "wireguard",
        "random",
        "rfc3489-length",
        "rfc3489-bad-attribute",
        "bad-fingerprint",
        "bad-attribute",
        "success",
        "error",
        "indication",
        "allocate",
    ],
)
def test_anything_but_a_binding_request_is_dropped_and_counted(data: bytes, reason: str) -> None:
    r = responder(A, B)
    outcome = r.handle(data, CLIENT, (A, PORT))
    assert outcome.dropped and outcome.response is None and outcome.send_from is None
    assert outcome.reason == reason
    assert r.stats[f"dropped_{reason}"] == 1
    assert r.stats["received"] == 1
    assert r.stats["success"] == r.stats["error_420"] == 0


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200),
    st.sampled_from(["none", "modern", "classic"]),
    st.sampled_from([(A,), (A, B)]),
    st.booleans(),
)
def test_arbitrary_bytes_never_raise(
    data: bytes, header: str, addresses: tuple[str, ...], over_tcp: bool
) -> None:
    if header != "none":
        # Make the framing pass so the attribute walk gets exercised too.
        body = data[: len(data) - len(data) % 4]
        cookie = b"\x21\x12\xa4\x42" if header == "modern" else b"\x01\x02\x03\x04"
        data = b"\x00\x01" + len(body).to_bytes(2, "big") + cookie + bytes(12) + body
    stream = (A, 443) if over_tcp else None
    outcome = responder(*addresses).handle(data, CLIENT, (A, PORT), stream=stream)
    assert outcome.reason in {
        "success",
        "error_420",
        "error_400",
        "not_stun",
        "malformed",
        "not_request",
        "not_binding",
    }
    if outcome.response is not None and header != "none":
        assert stun.decode(outcome.response, classic=True).classic == (header == "classic")


def test_unknown_local_address_is_a_programming_error() -> None:
    r = responder(A, B)
    with pytest.raises(ValueError):
        r.handle(stun.binding_request(), CLIENT, ("192.0.2.3", PORT))
    with pytest.raises(ValueError):
        r.handle(stun.binding_request(), CLIENT, (A, 9999))
    # Another spelling of one of our addresses is fine.
    r6 = responder(A6)
    assert r6.handle(stun.binding_request(), CLIENT6, ("2001:0db8::0001", PORT)).reason == "success"


@pytest.mark.parametrize(
    ("addresses", "port", "alt_port"),
    [
        ([], PORT, ALT),
        ([A, A], PORT, ALT),
        ([A, "192.0.2.01"], PORT, ALT),
        (["0.0.0.0"], PORT, ALT),
        (["::"], PORT, ALT),
        (["224.0.0.1"], PORT, ALT),
        (["not-an-ip"], PORT, ALT),
        ([A], PORT, PORT),
        ([A], 0, ALT),
        ([A], PORT, 70000),
    ],
)
def test_bad_configuration_is_rejected(addresses: list[str], port: int, alt_port: int) -> None:
    with pytest.raises(ValueError):
        StunResponder(addresses, port, alt_port)


# --- rate limiting ------------------------------------------------------------------------


def test_rate_limit_drops_past_the_burst_and_recovers() -> None:
    clock = FakeClock()
    r = responder(A, B, rate=2.0, burst=3, clock=clock)
    send = lambda source: r.handle(stun.binding_request(), source, (A, PORT)).reason  # noqa: E731

    assert [send(CLIENT) for _ in range(5)] == ["success"] * 3 + ["rate_limited"] * 2
    assert r.stats["dropped_rate_limited"] == 2
    # Other sources have their own bucket.
    assert send(("198.51.100.8", 1)) == "success"
    # Half a second at 2/s refills one token, and only one.
    clock.now += 0.5
    assert [send(CLIENT) for _ in range(2)] == ["success", "rate_limited"]
    # The bucket never holds more than the burst, however long the source was quiet.
    clock.now += 3600
    assert [send(CLIENT) for _ in range(4)] == ["success"] * 3 + ["rate_limited"]


def test_rate_limit_counts_garbage_too() -> None:
    r = responder(A, B, rate=1.0, burst=2, clock=FakeClock())
    reasons = [r.handle(b"junk", CLIENT, (A, PORT)).reason for _ in range(3)]
    assert reasons == ["not_stun", "not_stun", "rate_limited"]


def test_rate_limiter_table_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, max_sources=3, clock=clock)
    for i in range(100):
        assert limiter.allow(f"10.0.0.{i}")
        assert len(limiter) <= 3
    assert limiter.evictions == 97
    # The most recent sources are still remembered (and empty); evicted ones start afresh.
    assert not limiter.allow("10.0.0.99")
    assert limiter.allow("10.0.0.0")


def test_rate_limiter_keys_ipv6_by_64() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, clock=FakeClock())
    assert limiter.allow("2001:db8:1:2::1")
    assert limiter.allow("2001:db8:1:2:ffff::9")
    assert not limiter.allow("2001:db8:1:2::abcd")
    assert limiter.allow("2001:db8:1:3::1")


def test_evictions_show_in_stats() -> None:
    r = responder(A, B, max_sources=1, clock=FakeClock())
    for i in range(3):
        r.handle(stun.binding_request(), (f"10.0.0.{i}", 1), (A, PORT))
    assert r.stats["rate_limit_evictions"] == 2


@pytest.mark.parametrize("kwargs", [{"rate": 0}, {"rate": -1}, {"burst": 0.5}, {"max_sources": 0}])
def test_rate_limiter_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


# --- real sockets on loopback -------------------------------------------------------------

LOOPBACK = ["127.0.0.1", "127.0.0.2"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_server(**kwargs: object) -> StunServer:
    # Ports free on 127.0.0.1 may be taken on 127.0.0.2 (or by a racing test): retry.
    last_error: OSError | None = None
    for _ in range(20):
        port, alt = _free_port(), _free_port()
        if port == alt:
            continue
        try:
            return StunServer(LOOPBACK, port, alt, **kwargs)  # type: ignore[arg-type]
        except OSError as error:
            last_error = error
    raise AssertionError(f"no free loopback ports: {last_error}")


@pytest.fixture
def running_server() -> Iterator[StunServer]:
    server = _start_server(rate=1000.0, burst=1000)
    thread = threading.Thread(target=server.serve_forever, name="stun-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=5)
        alive = thread.is_alive()
        server.close()
        assert not alive, "server thread did not stop"


@pytest.fixture
def client() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield sock


def _exchange(
    client: socket.socket, data: bytes, to: tuple[str, int]
) -> tuple[stun.Message, tuple[str, int]]:
    client.sendto(data, to)
    response, source = client.recvfrom(2048)
    return stun.decode(response), source


def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_real_sockets_answer_and_change_source(
    running_server: StunServer, client: socket.socket
) -> None:
    server = running_server
    port, alt = server.responder.port, server.responder.alt_port
    assert sorted(server.listen_addresses) == sorted((a, p) for a in LOOPBACK for p in (port, alt))
    me = client.getsockname()

    txid = stun.new_transaction_id()
    reply, source = _exchange(client, stun.binding_request(txid), ("127.0.0.1", port))
    assert reply.transaction_id == txid and reply.cls == stun.SUCCESS_RESPONSE
    assert reply.xor_mapped_address() == me
    assert reply.mapped_address() == me
    assert source == ("127.0.0.1", port) == reply.response_origin()
    assert reply.other_address() == ("127.0.0.2", alt)

    reply, source = _exchange(
        client, stun.binding_request(change_ip=True, change_port=True), ("127.0.0.1", port)
    )
    assert source == ("127.0.0.2", alt) == reply.response_origin()
    assert reply.xor_mapped_address() == me

    reply, source = _exchange(client, stun.binding_request(change_port=True), ("127.0.0.2", alt))
    assert source == ("127.0.0.2", port) == reply.response_origin()
    assert reply.other_address() == ("127.0.0.1", port)


def test_real_sockets_deliver_to_the_response_port(
    running_server: StunServer, client: socket.socket
) -> None:
    port, alt = running_server.responder.port, running_server.responder.alt_port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        target = listener.getsockname()[1]
        # The RFC 5780 section 4.6 shape: sent from one socket, answered at another's port.
        data = request_with(response_port(target), change_request(6))
        client.sendto(data, ("127.0.0.1", port))
        response, source = listener.recvfrom(2048)
    reply = stun.decode(response)
    assert source == ("127.0.0.2", alt) == reply.response_origin()
    assert reply.xor_mapped_address() == client.getsockname()
    client.settimeout(0.2)
    with pytest.raises(TimeoutError):
        client.recvfrom(2048)


def test_real_sockets_answer_a_classic_client(
    running_server: StunServer, client: socket.socket
) -> None:
    port, alt = running_server.responder.port, running_server.responder.alt_port
    client.sendto(classic_request(), ("127.0.0.1", port))
    response, source = client.recvfrom(2048)
    assert source == ("127.0.0.1", port) and response[4:20] == CLASSIC_TXID
    reply = stun.decode(response, classic=True)
    assert reply.mapped_address() == client.getsockname()
    assert reply.changed_address() == ("127.0.0.2", alt)


def test_real_sockets_survive_and_count_garbage(
    running_server: StunServer, client: socket.socket
) -> None:
    server = running_server
    port = server.responder.port
    garbage = [
        os.urandom(64),
        wireguard_initiation(),
        b"",
        _corrupt_fingerprint(stun.binding_request()),
        stun.binding_success(bytes(12), ("127.0.0.1", 1)),
    ]
    for data in garbage:
        client.sendto(data, ("127.0.0.1", port))
    # A request sent after the garbage on the same socket is answered after it was handled.
    reply, _ = _exchange(client, stun.binding_request(), ("127.0.0.1", port))
    assert reply.xor_mapped_address() == client.getsockname()
    stats = server.stats
    _wait_for(lambda: stats["received"] == len(garbage) + 1)
    assert stats["dropped_not_stun"] == 3
    assert stats["dropped_malformed"] == 1
    assert stats["dropped_not_request"] == 1
    assert stats["success"] == 1
    assert stats["send_errors"] == stats["internal_errors"] == 0


def test_real_sockets_rate_limit() -> None:
    server = _start_server(rate=0.001, burst=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
            target = ("127.0.0.1", server.responder.port)
            for _ in range(2):
                _exchange(sock, stun.binding_request(), target)
            for _ in range(3):
                sock.sendto(stun.binding_request(), target)
            _wait_for(lambda: server.stats["dropped_rate_limited"] == 3)
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recvfrom(2048)
    finally:
        server.stop()
        thread.join(timeout=5)
        server.close()
    assert not thread.is_alive()


def test_bind_failure_closes_everything() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.2", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            StunServer(LOOPBACK, port, _free_port())


def test_main_serves_until_sigterm_and_logs_stats() -> None:
    for _ in range(10):
        port, alt = _free_port(), _free_port()
        if port == alt:
            continue
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from meshwright.node import main; sys.exit(main(sys.argv[1:]))",
                "stun-server",
                "--address",
                "127.0.0.1",
                "--port",
                str(port),
                "--alt-port",
                str(alt),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        first = process.stderr.readline()
        if "listening" in first:
            break
        process.wait(timeout=5)
    else:
        raise AssertionError("could not start the server on free ports")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
            reply, _ = _exchange(sock, stun.binding_request(), ("127.0.0.1", port))
            assert reply.other_address() is None
            # One address: RFC 5780 says 420 for any CHANGE-REQUEST.
            reply, _ = _exchange(sock, stun.binding_request(change_port=True), ("127.0.0.1", alt))
            assert reply.error_code() is not None and reply.error_code()[0] == 420
        process.send_signal(signal.SIGUSR1)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert '"success": 1' in rest and '"error_420": 1' in rest


def test_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["--address", "0.0.0.0"],
        ["--address", "127.0.0.1", "--port", "0"],
        ["--address", "127.0.0.1", "--port", "3478", "--alt-port", "3478"],
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2


@pytest.fixture
def tcp_server() -> Iterator[tuple[StunServer, int]]:
    """A STUN server on 127.0.0.1 with a TCP listener, serving in a thread: (server, TCP port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        tcp_port = probe.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
    alt_port = port + 1 if port < 65535 else port - 1
    server = StunServer(["127.0.0.1"], port, alt_port, tcp_port=tcp_port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, tcp_port
    finally:
        server.stop()
        thread.join(5)
        server.close()


def test_stun_over_tcp_answers_on_the_connection_and_survives_garbage(tcp_server):
    """A UDP-blocked site reaches the relay over TCP: the server answers binding requests
    there (RFC 8489 section 6.2.2), refuses to reframe garbage, and keeps serving."""
    server, tcp_port = tcp_server
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=3) as conn:
        request = stun.binding_request()
        conn.sendall(request[:7])  # split across segments: framing by the length field
        conn.sendall(request[7:])
        reply = stun.decode(conn.recv(2048))
        assert reply.xor_mapped_address() == conn.getsockname()
        assert reply.transaction_id == stun.decode(request).transaction_id
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=3) as bad:
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert bad.recv(2048) == b""  # closed, not answered
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=3) as again:
        again.sendall(stun.binding_request())
        assert stun.decode(again.recv(2048)).xor_mapped_address() == again.getsockname()
        # On one connection: a CHANGE-REQUEST asking for no change is served, one asking
        # for a change and RESPONSE-PORT get 420 (one address, and a stream anyway).
        again.sendall(request_with(change_request(0)))
        assert stun.decode(again.recv(2048)).mapped_address() == again.getsockname()
        for attribute in (change_request(2), response_port(40001)):
            again.sendall(request_with(attribute))
            reply = stun.decode(again.recv(2048))
            assert reply.error_code() == (420, "Unknown Attribute")
            assert unknown_attributes(reply) == [attribute.type]
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=3) as classic:
        classic.sendall(classic_request())
        assert classic.recv(2048) == b""  # no cookie: not STUN on a stream
    assert server.stats["tcp_dropped"] == 2


def test_stun_over_tcp_bounds_each_source_and_each_slow_connection(tcp_server):
    """One source holds at most 8 connections, and a connection that trickles bytes without
    completing a request is closed on time: neither starves other clients."""
    server, tcp_port = tcp_server
    address = ("127.0.0.1", tcp_port)
    flood: list[socket.socket] = []
    try:
        for _ in range(12):
            flood.append(socket.create_connection(address, 3, source_address=("127.0.0.2", 0)))
        refused = 0
        for sock in flood:
            sock.settimeout(0.1)
            with contextlib.suppress(TimeoutError):
                refused += sock.recv(16) == b""
        assert refused == 4
        assert server.stats["tcp_refused_source"] == 4
        server._streams.answer_seconds = 0.5  # for the connections from here on
        # Another source is served while the flooder holds its 8.
        with socket.create_connection(address, timeout=3) as client:
            client.sendall(stun.binding_request())
            assert stun.decode(client.recv(2048)).xor_mapped_address() == client.getsockname()
            # An answered request gives the connection a new window; trickling bytes do not.
            client.sendall(stun.binding_request()[:5])
            closed_after = trickle_until_closed(client, b"\x00", 0.1, give_up=5.0)
        assert closed_after is not None and closed_after < 0.5 + 1.5
        assert server.stats["tcp_timeouts"] >= 1
    finally:
        for sock in flood:
            sock.close()
