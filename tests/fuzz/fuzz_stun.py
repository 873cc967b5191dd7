"""Fuzz target: the STUN codec (meshwright.wire.stun) and the relay's STUN responder
(meshwright.relay.stun_server.StunResponder), which answers from it.

    .venv/bin/python tests/fuzz/fuzz_stun.py CORPUS_DIR [libFuzzer flags]

Input: one flags byte, then the datagram. Flags bits 0-2 repair the datagram (magic cookie,
length field, FINGERPRINT: see harness.repair_stun) so that mutations get past framing; bit 3
decodes it as RFC 3489 may be (``classic=True``); bits 4-7 pick the responder (one address per
family or two), the family, the local port and whether it came over TCP.

Invariants, on every input:

* decode raises StunError and nothing else; what it accepts is_stun accepts, and decoding it
  with ``classic=True`` gives the same message; every accessor and integrity check then works;
* the accepted message minus its trailers re-encodes to bytes that decode to the same message,
  and with MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT added they verify with their key;
* the responder never raises; it answers exactly the well-formed Binding requests and drops the
  rest under the reason that matches; an answer decodes, carries the request's transaction id,
  the source as (XOR-)MAPPED-ADDRESS on success, comes from one of the server's sockets (or the
  TCP connection), and is never more than 256 bytes plus half the request (no amplification);
  exactly one outcome counter moves.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["meshwright"]):
    from meshwright.relay.stun_server import DROP_REASONS, StunResponder
    from meshwright.wire import stun

from harness import fuzz, repair_stun

KEY = b"fuzz key"
TRAILERS = frozenset({stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256, stun.FINGERPRINT})
PORT, ALT = 3478, 3479
TCP_PORT = 443
SOURCES = {4: ("198.51.100.7", 40000), 6: ("2001:db8:ffff::7", 40001)}
ADDRESSES = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}


def _responder(count: int) -> StunResponder:
    addresses = [a for family in (4, 6) for a in ADDRESSES[family][:count]]
    # No rate limiting to speak of: every input should reach the parser. A fixed clock keeps
    # the responder deterministic.
    return StunResponder(addresses, PORT, ALT, rate=1e12, burst=1e12, clock=lambda: 0.0)


RESPONDERS = (_responder(1), _responder(2))


def check_decode(data: bytes, classic: bool) -> stun.Message | None:
    try:
        message = stun.decode(data, classic=classic)
    except stun.StunError:
        return None
    assert stun.is_stun(data, classic=classic)
    assert message.classic == (classic and data[4:8] != stun.MAGIC_COOKIE.to_bytes(4, "big"))
    if not message.classic:
        assert stun.decode(data, classic=True) == message
    for accessor in (
        message.mapped_address,
        message.xor_mapped_address,
        message.also_mapped,
        message.response_origin,
        message.other_address,
        message.source_address,
        message.changed_address,
        message.change_request,
        message.response_port,
        message.software,
        message.username,
        message.realm,
        message.nonce,
        message.error_code,
    ):
        accessor()
    for verify in (stun.verify_integrity, stun.verify_integrity_sha256):
        try:
            assert verify(data, KEY) in (True, False)
        except stun.StunError:
            # Integrity is checked on RFC 8489 messages only: RFC 3489 has no such attribute.
            assert message.classic

    plain = stun.Message(
        message.method,
        message.cls,
        message.transaction_id,
        tuple(a for a in message.attributes if a.type not in TRAILERS),
    )
    encoded = stun.encode(plain)
    assert stun.decode(encoded, classic=plain.classic) == plain
    if not plain.classic and len(encoded) + 24 + 36 + 8 <= stun.MAX_MESSAGE_SIZE:
        signed = stun.encode(plain, integrity_key=KEY, integrity_sha256_key=KEY, fingerprint=True)
        assert stun.verify_integrity(signed, KEY)
        assert stun.verify_integrity_sha256(signed, KEY)
        assert not stun.verify_integrity(signed, KEY + b"x")
        trailers = [a.type for a in stun.decode(signed).attributes[len(plain.attributes) :]]
        assert trailers == [stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256, stun.FINGERPRINT]
    return message


def check_responder(flags: int, data: bytes) -> None:
    responder = RESPONDERS[flags >> 4 & 1]
    family = 6 if flags & 0x20 else 4
    local = (ADDRESSES[family][0], ALT if flags & 0x40 else PORT)
    stream = (local[0], TCP_PORT) if flags & 0x80 else None
    source = SOURCES[family]
    before = dict(responder.stats)

    outcome = responder.handle(data, source, local, stream=stream)

    moved = {k: v - before[k] for k, v in responder.stats.items() if v != before.get(k)}
    classic_moved = moved.pop("classic", 0)
    assert moved.pop("received") == 1
    assert moved == {(f"dropped_{outcome.reason}" if outcome.dropped else outcome.reason): 1}
    request = check_decode(data, classic=stream is None)
    if request is None:
        assert outcome.reason in ("not_stun", "malformed"), outcome
        return
    if request.cls != stun.REQUEST:
        assert outcome.reason == "not_request", outcome
        return
    if request.method != stun.BINDING:
        assert outcome.reason == "not_binding", outcome
        return
    assert outcome.reason in ("success", "error_420", "error_400"), outcome
    assert outcome.reason not in DROP_REASONS
    assert classic_moved == request.classic
    assert outcome.response is not None
    assert len(outcome.response) <= 256 + len(data) // 2, "amplification"
    if stream is None:
        assert outcome.send_from in responder.listen_addresses
        assert outcome.send_from[0] in ADDRESSES[family]
        assert outcome.response_port in (None, request.response_port())
    else:
        assert outcome.send_from == stream and outcome.response_port is None

    answer = stun.decode(outcome.response, classic=True)
    assert answer.transaction_id == request.transaction_id
    assert answer.classic == request.classic
    assert answer.method == stun.BINDING
    if outcome.reason == "success":
        assert answer.cls == stun.SUCCESS_RESPONSE
        assert answer.mapped_address() == source
        if not request.classic:
            assert answer.xor_mapped_address() == source
    else:
        assert answer.cls == stun.ERROR_RESPONSE
        code = answer.error_code()
        assert code is not None and code[0] == int(outcome.reason[-3:])
    # RFC 3489 has no FINGERPRINT; every RFC 8489 answer ends with one that matches.
    last = answer.attributes[-1].type if answer.attributes else None
    assert (last == stun.FINGERPRINT) != request.classic


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    flags, message = data[0], repair_stun(data[0], data[1:])
    check_decode(message, classic=bool(flags & 8))
    check_responder(flags, message)


if __name__ == "__main__":
    fuzz(TestOneInput)
