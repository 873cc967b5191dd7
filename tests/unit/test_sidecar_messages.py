"""Tests for meshwright.site.sidecar.messages: control messages (JSON) and probes (binary, HMAC).

Everything that is not a well-formed, authentic message must raise MessageError and nothing
else: the daemon drops and counts exactly that exception, so any other one would be a crash
that a stranger can trigger with one datagram.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwright.site.sidecar.messages import (
    CONTROL_TYPES,
    KEY_SIZE,
    MAGIC,
    MAX_CANDIDATES,
    MAX_CONTROL_SIZE,
    PING,
    PONG,
    SESSION_SIZE,
    Control,
    MessageError,
    Probe,
    _mac,
    decode_control,
    decode_probe,
    encode_control,
    encode_probe,
    probe_session,
)

KEY = bytes(range(KEY_SIZE))
OTHER_KEY = bytes(range(1, KEY_SIZE + 1))
SESSION = bytes.fromhex("0011223344556677")

PING_PROBE = Probe(PING, SESSION, 7)
PONG4 = Probe(PONG, SESSION, 8, ("198.51.100.21", 51820))
PONG6 = Probe(PONG, SESSION, 0xFFFFFFFF, ("2001:db8::21", 65535))
PROBES = [PING_PROBE, PONG4, PONG6]

OFFER = Control(
    "offer",
    "easy1",
    SESSION,
    KEY,
    (("10.0.0.2", 51820), ("198.51.100.21", 51820), ("2001:db8::21", 51820)),
    1764526000.25,
)
ANSWER = Control("answer", "easy2", SESSION, candidates=(("203.0.113.5", 4500),))
NOMINATE = Control("nominate", "easy1", SESSION, use=("198.51.100.21", 61001))
NOMINATE6 = Control("nominate", "easy1", SESSION, use=("2001:db8::7", 51820))
FALLBACK = Control("fallback", "easy2", SESSION)
WATCH = Control("watch", "easy1", SESSION, KEY)  # a direct pair's session for check pings
CONTROLS = [OFFER, ANSWER, NOMINATE, NOMINATE6, FALLBACK, WATCH]


def signed(body: bytes, key: bytes = KEY) -> bytes:
    """A datagram with a valid MAC over ``body``: what a peer that has the key could send."""
    return body + _mac(key, body)


def control_dict(message: Control) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(encode_control(message))
    return data


def raw(data: object) -> bytes:
    return json.dumps(data).encode()


# --- probes --------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", PROBES, ids=["ping", "pong4", "pong6"])
def test_probe_round_trip(probe: Probe) -> None:
    datagram = encode_probe(probe, KEY)
    assert decode_probe(datagram, KEY) == probe
    assert probe_session(datagram) == SESSION


def test_probe_sizes() -> None:
    assert len(encode_probe(PING_PROBE, KEY)) == 4 + 1 + 1 + 8 + 4 + 16
    assert len(encode_probe(PONG4, KEY)) == 18 + 3 + 4 + 16
    assert len(encode_probe(PONG6, KEY)) == 18 + 3 + 16 + 16


def test_pong_observed_address_is_canonical() -> None:
    pong = Probe(PONG, SESSION, 1, ("2001:0db8:0000::0021", 51820))
    assert decode_probe(encode_probe(pong, KEY), KEY).observed == ("2001:db8::21", 51820)


def test_pong_needs_observed_address() -> None:
    with pytest.raises(ValueError):
        encode_probe(Probe(PONG, SESSION, 1), KEY)


@pytest.mark.parametrize("probe", PROBES, ids=["ping", "pong4", "pong6"])
def test_probe_with_wrong_key_is_refused(probe: Probe) -> None:
    with pytest.raises(MessageError):
        decode_probe(encode_probe(probe, KEY), OTHER_KEY)


@pytest.mark.parametrize("probe", PROBES, ids=["ping", "pong4", "pong6"])
def test_probe_with_any_bit_flipped_is_refused(probe: Probe) -> None:
    datagram = encode_probe(probe, KEY)
    for bit in range(len(datagram) * 8):
        forged = bytearray(datagram)
        forged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(MessageError):
            decode_probe(bytes(forged), KEY)


@pytest.mark.parametrize("probe", PROBES, ids=["ping", "pong4", "pong6"])
def test_truncated_or_extended_probe_is_refused(probe: Probe) -> None:
    datagram = encode_probe(probe, KEY)
    for size in range(len(datagram)):
        with pytest.raises(MessageError):
            decode_probe(datagram[:size], KEY)
    for extra in (b"\x00", b"\xff" * 16, datagram):
        with pytest.raises(MessageError):
            decode_probe(datagram + extra, KEY)


def test_bad_magic_is_refused_even_with_a_valid_mac() -> None:
    body = encode_probe(PING_PROBE, KEY)[:-16]
    for magic in (b"\xffMWQ", b"\x01\x00\x00\x00", b"MWP\xff"):
        forged = signed(magic + body[4:])
        with pytest.raises(MessageError):
            decode_probe(forged, KEY)
        assert probe_session(forged) is None


@pytest.mark.parametrize(
    "body",
    [
        MAGIC + bytes([3, 0]) + SESSION + bytes(4),  # unknown kind
        MAGIC + bytes([0, 0]) + SESSION + bytes(4),  # kind zero
        MAGIC + bytes([PING, 1]) + SESSION + bytes(4),  # the zero byte is not zero
        MAGIC + bytes([PING, 0]) + SESSION + bytes(4) + b"\x00",  # a ping with a tail
        MAGIC + bytes([PONG, 0]) + SESSION + bytes(4),  # a pong without address
        MAGIC + bytes([PONG, 0]) + SESSION + bytes(4) + b"\xca\x6c",  # short address
        MAGIC + bytes([PONG, 0]) + SESSION + bytes(4) + b"\xca\x6c\x05" + bytes(4),  # family 5
        MAGIC + bytes([PONG, 0]) + SESSION + bytes(4) + b"\xca\x6c\x04" + bytes(16),  # 4 w/ 16
        MAGIC + bytes([PONG, 0]) + SESSION + bytes(4) + b"\xca\x6c\x06" + bytes(4),  # 6 w/ 4
        MAGIC + bytes([PONG, 0]) + SESSION + bytes(4) + b"\xca\x6c\x04" + bytes(5),  # tail
        MAGIC + bytes([PONG, 0]) + SESSION + bytes(4) + b"\x00\x00\x04" + bytes(4),  # port 0
    ],
)
def test_authentic_but_malformed_probe_is_refused(body: bytes) -> None:
    """A MAC that verifies proves only who sent it, not that the rest makes sense."""
    with pytest.raises(MessageError):
        decode_probe(signed(body), KEY)


def test_probe_session_of_non_probes() -> None:
    assert probe_session(b"") is None
    assert probe_session(MAGIC + bytes(20)) is None  # too short for header and MAC
    assert probe_session(b"\x01\x00\x00\x00" + bytes(144)) is None  # handshake initiation
    assert probe_session(encode_probe(PONG6, KEY)) == SESSION


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from([PING, PONG]),
    session=st.binary(min_size=SESSION_SIZE, max_size=SESSION_SIZE),
    seq=st.integers(0, 0xFFFFFFFF),
    observed=st.one_of(
        st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
        st.tuples(st.ip_addresses(v=6).map(str), st.integers(1, 65535)),
    ),
    key=st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE),
)
def test_probe_round_trip_and_first_byte(
    kind: int, session: bytes, seq: int, observed: tuple[str, int], key: bytes
) -> None:
    probe = Probe(kind, session, seq, observed if kind == PONG else None)
    datagram = encode_probe(probe, key)
    assert decode_probe(datagram, key) == probe
    # Never a WireGuard message (type 1 to 4) nor STUN (first two bits zero) on the same port.
    assert datagram[0] not in (1, 2, 3, 4)
    assert datagram[0] >> 6 != 0
    assert datagram[:4] == MAGIC


@settings(max_examples=500, deadline=None)
@given(datagram=st.binary(max_size=80), key=st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE))
def test_random_bytes_are_never_anything_but_message_error(datagram: bytes, key: bytes) -> None:
    for candidate in (datagram, MAGIC + datagram):
        probe_session(candidate)  # never raises
        with pytest.raises(MessageError):
            decode_probe(candidate, key)


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(min_size=0, max_size=40))
def test_random_authentic_bodies_are_probes_or_message_errors(tail: bytes) -> None:
    """Even with the key, an arbitrary body decodes or raises MessageError, nothing else."""
    for kind in (PING, PONG, 0, 9):
        datagram = signed(MAGIC + bytes([kind, 0]) + SESSION + bytes(4) + tail)
        try:
            probe = decode_probe(datagram, KEY)
        except MessageError:
            continue
        assert encode_probe(probe, KEY) == datagram


# --- control messages ----------------------------------------------------------------------


@pytest.mark.parametrize("message", CONTROLS, ids=lambda m: f"{m.type}")
def test_control_round_trip(message: Control) -> None:
    assert decode_control(encode_control(message)) == message


def test_control_wire_format() -> None:
    data = control_dict(OFFER)
    assert data == {
        "v": 1,
        "type": "offer",
        "from": "easy1",
        "session": "0011223344556677",
        "key": KEY.hex(),
        "candidates": ["10.0.0.2:51820", "198.51.100.21:51820", "[2001:db8::21]:51820"],
        "start_at": 1764526000.25,
    }
    assert control_dict(NOMINATE6)["use"] == "[2001:db8::7]:51820"
    assert control_dict(FALLBACK) == {
        "v": 1,
        "type": "fallback",
        "from": "easy2",
        "session": "0011223344556677",
    }
    assert control_dict(WATCH) == {
        "v": 1,
        "type": "watch",
        "from": "easy1",
        "session": "0011223344556677",
        "key": KEY.hex(),
    }


def test_control_with_most_candidates_fits() -> None:
    candidates = tuple((f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}", 65535) for i in range(16))
    offer = Control("offer", "x" * 64, SESSION, KEY, candidates, 1764526000.123456)
    datagram = encode_control(offer)
    assert len(datagram) <= MAX_CONTROL_SIZE
    assert decode_control(datagram) == offer
    assert len(candidates) == MAX_CANDIDATES


def test_control_that_would_encode_over_the_limit_is_refused() -> None:
    # Regression: what decode_control accepts must re-encode to what it accepts. 3,980 bytes
    # of raw UTF-8 in "from" came in under the limit, but encode_control escapes each of those
    # 1,990 characters to 6 bytes, and its output was then refused as too large.
    hello: dict[str, Any] = {"v": 1, "type": "hello", "from": "é" * 1990, "session": SESSION.hex()}
    datagram = json.dumps(hello, ensure_ascii=False).encode()
    assert len(datagram) <= MAX_CONTROL_SIZE
    with pytest.raises(MessageError, match="too large"):
        decode_control(datagram)
    # Canonical addresses can grow too: a lone zero group is not "::" (RFC 5952 4.2.2).
    answer: dict[str, Any] = {**control_dict(ANSWER), "candidates": ["[1::1:1:1:1:1:1]:1"] * 16}

    def compact(data: dict[str, Any]) -> bytes:
        return json.dumps(data, separators=(",", ":")).encode()

    answer["from"] = "x" * (MAX_CONTROL_SIZE - len(compact({**answer, "from": ""})))
    assert len(compact(answer)) == MAX_CONTROL_SIZE
    with pytest.raises(MessageError, match="too large"):
        decode_control(compact(answer))
    # Non-ASCII that fits either way is accepted, and survives the round trip.
    hello["from"] = "é" * 100
    message = decode_control(json.dumps(hello, ensure_ascii=False).encode())
    assert decode_control(encode_control(message)) == message


def test_control_accepts_upper_case_hex() -> None:
    data = control_dict(OFFER)
    data["session"], data["key"] = data["session"].upper(), data["key"].upper()
    assert decode_control(raw(data)) == OFFER


def test_control_integer_start_at() -> None:
    data = control_dict(OFFER)
    data["start_at"] = 1764526000
    assert decode_control(raw(data)).start_at == 1764526000.0


def _changed(message: Control, **changes: Any) -> bytes:
    data = control_dict(message)
    for name, value in changes.items():
        if value is ...:
            data.pop(name, None)
        else:
            data[name] = value
    return raw(data)


BAD_CONTROLS: list[tuple[str, bytes]] = [
    ("not json", b"{not json"),
    ("empty", b""),
    ("bad utf-8", b'{"v": 1, "type": "\xff\xfe"}'),
    ("a list", raw([1, "offer"])),
    ("a string", raw("offer")),
    ("null", b"null"),
    ("too large", raw({**control_dict(FALLBACK), "pad": "x" * MAX_CONTROL_SIZE})),
    ("deeply nested", b"[" * 3000 + b"]" * 3000),
    ("deeply nested value", b'{"v": 1, "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
    ("no version", _changed(FALLBACK, v=...)),
    ("version 0", _changed(FALLBACK, v=0)),
    ("version 2", _changed(FALLBACK, v=2)),
    ("version text", _changed(FALLBACK, v="1")),
    ("version true", _changed(FALLBACK, v=True)),
    ("version float", _changed(FALLBACK, v=1.0)),
    ("no type", _changed(FALLBACK, type=...)),
    ("unknown type", _changed(FALLBACK, type="ping")),
    ("type upper case", _changed(FALLBACK, type="FALLBACK")),
    ("type not text", _changed(FALLBACK, type=["fallback"])),
    ("no from", _changed(FALLBACK, **{"from": ...})),
    ("empty from", _changed(FALLBACK, **{"from": ""})),
    ("from not text", _changed(FALLBACK, **{"from": 7})),
    ("no session", _changed(FALLBACK, session=...)),
    ("short session", _changed(FALLBACK, session="00112233445566")),
    ("long session", _changed(FALLBACK, session="001122334455667788")),
    ("session not hex", _changed(FALLBACK, session="00112233445566zz")),
    ("session with spaces", _changed(FALLBACK, session="0011 2233 445566")),
    ("session all spaces", _changed(FALLBACK, session=" " * 16)),
    ("session not text", _changed(FALLBACK, session=1234567812345678)),
    ("offer without key", _changed(OFFER, key=...)),
    ("watch without key", _changed(WATCH, key=...)),
    ("watch key short", _changed(WATCH, key=KEY.hex()[:-2])),
    ("key null", _changed(OFFER, key=None)),
    ("key short", _changed(OFFER, key=KEY.hex()[:-2])),
    ("key not hex", _changed(OFFER, key="g" * 64)),
    ("key with spaces", _changed(OFFER, key=" " * 64)),
    ("key with inner spaces", _changed(OFFER, key=KEY.hex()[:-4] + "  ff")),
    ("key with 0x", _changed(OFFER, key="0x" + KEY.hex()[2:])),
    ("key not text", _changed(OFFER, key=list(KEY))),
    ("offer without candidates", _changed(OFFER, candidates=...)),
    ("candidates not a list", _changed(OFFER, candidates="10.0.0.2:51820")),
    ("candidates a dict", _changed(OFFER, candidates={"10.0.0.2": 51820})),
    ("too many candidates", _changed(OFFER, candidates=[f"10.0.0.{i}:1" for i in range(17)])),
    ("candidate not text", _changed(OFFER, candidates=[["10.0.0.2", 51820]])),
    ("candidate without port", _changed(OFFER, candidates=["10.0.0.2"])),
    ("candidate port 0", _changed(OFFER, candidates=["10.0.0.2:0"])),
    ("candidate port too big", _changed(OFFER, candidates=["10.0.0.2:65536"])),
    ("candidate host name", _changed(OFFER, candidates=["relay.example:3478"])),
    ("candidate bare ipv6", _changed(OFFER, candidates=["2001:db8::1:51820"])),
    ("candidate bad ipv4", _changed(OFFER, candidates=["10.0.0.256:1"])),
    ("answer without candidates", _changed(ANSWER, candidates=...)),
    ("answer candidates null", _changed(ANSWER, candidates=None)),
    ("offer without start", _changed(OFFER, start_at=...)),
    ("start null", _changed(OFFER, start_at=None)),
    ("start text", _changed(OFFER, start_at="1764526000.25")),
    ("start bool", _changed(OFFER, start_at=True)),
    ("start NaN", _changed(OFFER, start_at=float("nan"))),
    ("start infinite", _changed(OFFER, start_at=float("inf"))),
    ("start minus infinite", _changed(OFFER, start_at=float("-inf"))),
    ("start too large", _changed(OFFER, start_at=10**400)),
    ("nominate without use", _changed(NOMINATE, use=...)),
    ("use null", _changed(NOMINATE, use=None)),
    ("use not an endpoint", _changed(NOMINATE, use="198.51.100.21")),
    ("use a list", _changed(NOMINATE, use=["198.51.100.21", 1])),
]


@pytest.mark.parametrize("datagram", [d for _, d in BAD_CONTROLS], ids=[n for n, _ in BAD_CONTROLS])
def test_malformed_control_is_refused(datagram: bytes) -> None:
    with pytest.raises(MessageError):
        decode_control(datagram)


def test_probe_is_not_a_control_message() -> None:
    with pytest.raises(MessageError):
        decode_control(encode_probe(PONG4, KEY))


def test_fields_of_other_types_are_ignored() -> None:
    """Forward compatibility: a field a type does not use is not read (nor trusted)."""
    data = control_dict(FALLBACK)
    data.update(key="zz", candidates="x", use=1, start_at="soon", extra={"a": 1})
    assert decode_control(raw(data)) == FALLBACK


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**400), 10**400),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.sampled_from(["", "0011223344556677", KEY.hex(), "10.0.0.2:51820", "[::1]:1"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=20), st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=25,
    )


@settings(max_examples=200, deadline=None)
@given(
    base=st.sampled_from(CONTROLS),
    field=st.sampled_from(["v", "type", "from", "session", "key", "candidates", "start_at", "use"]),
    value=_json_values(),
)
def test_control_with_any_field_value_decodes_or_raises_message_error(
    base: Control, field: str, value: Any
) -> None:
    data = control_dict(base)
    data[field] = value
    try:
        message = decode_control(json.dumps(data).encode())
    except MessageError:
        return
    assert message.type in CONTROL_TYPES
    assert len(message.session) == SESSION_SIZE
    assert message.key is None or len(message.key) == KEY_SIZE
    assert len(message.candidates) <= MAX_CANDIDATES
    if message.start_at is not None:
        assert message.start_at - message.start_at == 0.0  # finite


@settings(max_examples=500, deadline=None)
@given(datagram=st.binary(max_size=200))
def test_random_bytes_as_control_raise_only_message_error(datagram: bytes) -> None:
    for candidate in (datagram, b'{"v":1,' + datagram):
        with contextlib.suppress(MessageError):
            decode_control(candidate)


@settings(max_examples=150, deadline=None)
@given(value=_json_values())
def test_random_json_as_control_raises_only_message_error(value: Any) -> None:
    with contextlib.suppress(MessageError):
        decode_control(json.dumps(value).encode())


def test_offers_and_answers_may_name_the_senders_run() -> None:
    run = bytes(range(8))
    for kind in ("offer", "answer"):
        message = Control(
            kind, "alpha", b"\x01" * 8, b"\x02" * 32 if kind == "offer" else None,
            (("198.51.100.1", 51820),), 1.0, run=run,
        )  # fmt: skip
        assert decode_control(encode_control(message)).run == run
    bad = json.loads(encode_control(Control("answer", "alpha", b"\x01" * 8, run=run)))
    bad["run"] = "xyz"
    with pytest.raises(MessageError, match="run"):
        decode_control(json.dumps(bad).encode())
