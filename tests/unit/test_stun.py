"""Tests for meshwright.wire.stun: RFC 5769 vectors, builders, validation, a deterministic fuzz."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import random
import struct
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwright.wire import stun
from meshwright.wire.stun import Attribute, Message, StunError

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "rfc5769.json").read_text("utf-8")
)
VECTOR_NAMES = ["sample_request", "ipv4_response", "ipv6_response", "long_term_request"]
SHORT_TERM_NAMES = VECTOR_NAMES[:3]
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def vector_bytes(name: str) -> bytes:
    return bytes.fromhex("".join(VECTORS[name]["hex"]))


def vector_key(name: str) -> bytes:
    vector = VECTORS[name]
    if name == "long_term_request":
        return stun.long_term_key(
            vector["username"], vector["realm"], vector["password_after_saslprep"]
        )
    return stun.short_term_key(vector["password"])


def fix_length(data: bytes | bytearray) -> bytearray:
    """Rewrite the header length to match the data, as a sloppy or hostile sender might."""
    fixed = bytearray(data)
    fixed[2:4] = ((len(fixed) - stun.HEADER_SIZE) & 0xFFFF).to_bytes(2, "big")
    return fixed


def refingerprint(data: bytes | bytearray) -> bytes:
    """Recompute a trailing FINGERPRINT so mutations get past the CRC and into the parser."""
    fixed = fix_length(data)
    if len(fixed) >= 28 and fixed[-8:-4] == b"\x80\x28\x00\x04":
        crc = zlib.crc32(bytes(fixed[:-8])) ^ 0x5354554E
        fixed[-4:] = crc.to_bytes(4, "big")
    return bytes(fixed)


def strip_fingerprint(data: bytes) -> bytes:
    assert data[-8:-4] == b"\x80\x28\x00\x04"
    return bytes(fix_length(data[:-8]))


def attribute_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, padded size) of each attribute of a well-formed message."""
    offsets = []
    offset = stun.HEADER_SIZE
    while offset < len(data):
        _type, length = struct.unpack_from("!HH", data, offset)
        size = 4 + ((length + 3) & ~3)
        offsets.append((offset, size))
        offset += size
    return offsets


def append_attribute(data: bytes, attribute_type: int, value: bytes) -> bytes:
    padded = value + b"\x00" * (-len(value) % 4)
    return bytes(fix_length(data + struct.pack("!HH", attribute_type, len(value)) + padded))


# --- RFC 5769 vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_vector_header_and_attribute_order(name: str) -> None:
    vector = VECTORS[name]
    message = stun.decode(vector_bytes(name))
    assert message.method == vector["method"] == stun.BINDING
    assert message.cls == vector["class"]
    assert message.transaction_id == bytes.fromhex(vector["transaction_id"])
    assert [a.type for a in message.attributes] == vector["attribute_types"]
    assert stun.is_stun(vector_bytes(name))
    assert message.get(stun.MESSAGE_INTEGRITY) == bytes.fromhex(vector["message_integrity"])
    fingerprint = vector["fingerprint"]
    expected_fingerprint = None if fingerprint is None else bytes.fromhex(fingerprint)
    assert message.get(stun.FINGERPRINT) == expected_fingerprint


def test_sample_request_fields() -> None:
    vector = VECTORS["sample_request"]
    message = stun.decode(vector_bytes("sample_request"))
    assert message.cls == stun.REQUEST
    assert message.software() == vector["software"] == "STUN test client"
    assert message.username() == vector["username"]
    # PRIORITY and ICE-CONTROLLED are ICE attributes this codec keeps as raw bytes.
    assert message.get(0x0024) == bytes.fromhex(vector["priority"])
    assert message.get(0x8029) == bytes.fromhex(vector["ice_controlled"])
    assert message.xor_mapped_address() is None
    assert message.mapped_address() is None
    assert message.change_request() is None
    assert message.error_code() is None
    assert message.realm() is None


@pytest.mark.parametrize("name", ["ipv4_response", "ipv6_response"])
def test_response_fields(name: str) -> None:
    vector = VECTORS[name]
    message = stun.decode(vector_bytes(name))
    assert message.cls == stun.SUCCESS_RESPONSE
    # The RFC's trailing space after "test vector" is padding, not part of the value.
    assert message.software() == vector["software"] == "test vector"
    assert message.xor_mapped_address() == tuple(vector["xor_mapped_address"])
    assert message.mapped_address() is None
    assert message.response_origin() is None
    assert message.other_address() is None
    assert message.username() is None


def test_ipv6_response_address_matches_the_rfc_text() -> None:
    message = stun.decode(vector_bytes("ipv6_response"))
    assert message.xor_mapped_address() == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert stun.decode(vector_bytes("ipv4_response")).xor_mapped_address() == (
        "192.0.2.1",
        32853,
    )


def test_long_term_request_fields() -> None:
    vector = VECTORS["long_term_request"]
    message = stun.decode(vector_bytes("long_term_request"))
    assert message.username() == vector["username"] == "マトリックス"
    assert message.nonce() == vector["nonce"]
    assert message.realm() == vector["realm"]
    assert message.software() is None


def test_long_term_password_is_the_saslprep_output() -> None:
    vector = VECTORS["long_term_request"]
    raw = vector["password"]
    # SASLprep maps the soft hyphen to nothing and NFKC folds U+00AA and U+2168.
    assert unicodedata.normalize("NFKC", raw.replace("\u00ad", "")) == "TheMatrIX"
    data = vector_bytes("long_term_request")
    assert stun.verify_integrity(data, vector_key("long_term_request"))
    # RFC 8489's OpaqueString keeps those code points, so the raw password gives another key.
    raw_key = stun.long_term_key(vector["username"], vector["realm"], raw)
    assert not stun.verify_integrity(data, raw_key)


def test_long_term_key_is_md5_of_the_joined_credentials() -> None:
    key = stun.long_term_key("user", "realm", "pass")
    assert key == hashlib.md5(b"user:realm:pass").digest()


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_vector_integrity_verifies_with_the_right_key_only(name: str) -> None:
    data = vector_bytes(name)
    assert stun.verify_integrity(data, vector_key(name))
    assert not stun.verify_integrity(data, vector_key(name) + b"x")
    assert not stun.verify_integrity(data, b"")
    assert not stun.verify_integrity_sha256(data, vector_key(name))


@pytest.mark.parametrize("name", SHORT_TERM_NAMES)
def test_integrity_does_not_cover_a_later_fingerprint(name: str) -> None:
    # MESSAGE-INTEGRITY's length adjustment must exclude FINGERPRINT (RFC 8489 14.5).
    assert stun.verify_integrity(strip_fingerprint(vector_bytes(name)), vector_key(name))


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_every_bit_flip_fails_integrity(name: str) -> None:
    # Without FINGERPRINT, so that it is MESSAGE-INTEGRITY that has to catch the flip.
    data = vector_bytes(name)
    if VECTORS[name]["fingerprint"]:
        data = strip_fingerprint(data)
    key = vector_key(name)
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            verified = stun.verify_integrity(bytes(mutated), key)
        except StunError:
            continue  # the flip broke the framing: rejected just as well
        assert not verified, f"bit {bit}"


def test_flipped_nonce_bit_fails_integrity_without_breaking_framing() -> None:
    data = bytearray(vector_bytes("long_term_request"))
    nonce_start = data.index(b"f//499k954d6")
    data[nonce_start] ^= 0x01
    assert stun.decode(bytes(data)).nonce() == "g//499k954d6OL34oL9FSTvy64sA"
    assert not stun.verify_integrity(bytes(data), vector_key("long_term_request"))


@pytest.mark.parametrize("name", SHORT_TERM_NAMES)
def test_every_bit_flip_breaks_the_fingerprint(name: str) -> None:
    data = vector_bytes(name)
    fingerprint_type_bytes = range(len(data) - 8, len(data) - 6)
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        if bit // 8 in fingerprint_type_bytes:
            # The flip turns FINGERPRINT into an unknown attribute after MESSAGE-INTEGRITY,
            # which is ignored: the result is a valid message with no FINGERPRINT at all.
            assert stun.decode(bytes(mutated)).get(stun.FINGERPRINT) is None
            continue
        with pytest.raises(StunError):
            stun.decode(bytes(mutated))


def test_fingerprint_mismatch_message() -> None:
    data = bytearray(vector_bytes("sample_request"))
    data[-1] ^= 0x01
    with pytest.raises(StunError, match="FINGERPRINT"):
        stun.decode(bytes(data))


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_reencoding_reproduces_the_vector_byte_for_byte(name: str) -> None:
    vector = VECTORS[name]
    data = vector_bytes(name)
    decoded = stun.decode(data)
    trailers = {stun.MESSAGE_INTEGRITY, stun.FINGERPRINT}
    body = dataclasses.replace(
        decoded, attributes=tuple(a for a in decoded.attributes if a.type not in trailers)
    )
    encoded = stun.encode(
        body,
        integrity_key=vector_key(name),
        fingerprint=vector["fingerprint"] is not None,
        pad_byte=vector["pad_byte"],
    )
    assert encoded == data
    # Verbatim attributes round trip too.
    assert stun.encode(decoded, pad_byte=vector["pad_byte"]) == data


@pytest.mark.parametrize("name", SHORT_TERM_NAMES)
def test_zero_padding_changes_only_padding_and_trailers(name: str) -> None:
    decoded = stun.decode(vector_bytes(name))
    body = dataclasses.replace(
        decoded,
        attributes=tuple(
            a
            for a in decoded.attributes
            if a.type not in (stun.MESSAGE_INTEGRITY, stun.FINGERPRINT)
        ),
    )
    encoded = stun.encode(body, integrity_key=vector_key(name), fingerprint=True)
    assert encoded != vector_bytes(name)
    again = stun.decode(encoded)
    assert again.attributes[:-2] == body.attributes
    assert stun.verify_integrity(encoded, vector_key(name))


def test_encode_refuses_a_second_trailer() -> None:
    decoded = stun.decode(vector_bytes("sample_request"))
    with pytest.raises(StunError):
        stun.encode(decoded, fingerprint=True)
    with pytest.raises(StunError):
        stun.encode(decoded, integrity_key=b"k")


# --- builders ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mapped", "origin", "other"),
    [
        (("198.51.100.7", 51820), ("192.0.2.10", 3478), ("192.0.2.11", 3479)),
        (("2001:db8::7", 51820), ("2001:db8::10", 3478), ("2001:db8::11", 3479)),
        (("203.0.113.1", 0), ("2001:db8::10", 65535), ("192.0.2.11", 1)),
    ],
)
def test_binding_success_round_trip(
    mapped: tuple[str, int], origin: tuple[str, int], other: tuple[str, int]
) -> None:
    request = stun.decode(stun.binding_request(software="meshwright"))
    data = stun.binding_success(
        request, mapped=mapped, response_origin=origin, other_address=other, software="srv"
    )
    assert stun.is_stun(data)
    message = stun.decode(data)
    assert (message.method, message.cls) == (stun.BINDING, stun.SUCCESS_RESPONSE)
    assert message.transaction_id == request.transaction_id
    assert message.xor_mapped_address() == mapped
    assert message.response_origin() == origin
    assert message.other_address() == other
    assert message.software() == "srv"
    assert message.mapped_address() is None
    assert message.attributes[-1].type == stun.FINGERPRINT


def test_binding_success_xor_really_xors() -> None:
    data = stun.binding_success(TXID, mapped=("2001:db8::1", 32853), fingerprint=False)
    value = stun.decode(data).get(stun.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert b"\x20\x01\x0d\xb8" not in value
    # Same bytes as the RFC 5769 2.3 vector for the same transaction id and port.
    assert value[:4] == bytes.fromhex("0002a147")


@pytest.mark.parametrize(
    ("change_ip", "change_port"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_binding_request_round_trip(change_ip: bool, change_port: bool) -> None:
    data = stun.binding_request(
        transaction_id=TXID, change_ip=change_ip, change_port=change_port, software="mw 1.0"
    )
    message = stun.decode(data)
    assert (message.method, message.cls, message.transaction_id) == (
        stun.BINDING,
        stun.REQUEST,
        TXID,
    )
    expected = (change_ip, change_port) if change_ip or change_port else None
    assert message.change_request() == expected
    assert message.software() == "mw 1.0"
    assert message.get(stun.FINGERPRINT) is not None


def test_binding_request_defaults() -> None:
    first, second = stun.binding_request(), stun.binding_request()
    assert first[8:20] != second[8:20]
    assert len(stun.binding_request(fingerprint=False)) == stun.HEADER_SIZE
    assert stun.decode(first).attributes[-1].type == stun.FINGERPRINT


def test_binding_error_round_trip() -> None:
    data = stun.binding_error(TXID, 420, "Unknown Attribute", software="mw")
    message = stun.decode(data)
    assert message.cls == stun.ERROR_RESPONSE
    assert message.error_code() == (420, "Unknown Attribute")
    assert message.software() == "mw"
    value = message.get(stun.ERROR_CODE)
    assert value is not None
    assert value[:4] == b"\x00\x00\x04\x14"


@pytest.mark.parametrize("code", [299, 700, -1])
def test_binding_error_rejects_bad_codes(code: int) -> None:
    with pytest.raises(StunError):
        stun.binding_error(TXID, code, "x")


@pytest.mark.parametrize(
    "address",
    [("not-an-ip", 1), ("192.0.2.1", 65536), ("192.0.2.1", -1), (3232235521, 1), ("1.2.3.4",)],
)
def test_builders_reject_bad_addresses(address: Any) -> None:
    with pytest.raises(StunError):
        stun.binding_success(TXID, mapped=address)


def test_builders_reject_bad_transaction_ids_and_text() -> None:
    with pytest.raises(StunError):
        stun.binding_request(transaction_id=b"short")
    with pytest.raises(StunError):
        stun.binding_success(b"x" * 20, mapped=("192.0.2.1", 1))
    with pytest.raises(StunError):
        stun.binding_request(software="x" * 763)


def test_all_trailers_together() -> None:
    message = Message(stun.BINDING, stun.REQUEST, TXID, (Attribute(stun.USERNAME, b"a:b"),))
    data = stun.encode(message, integrity_key=b"k1", integrity_sha256_key=b"k2", fingerprint=True)
    decoded = stun.decode(data)
    assert [a.type for a in decoded.attributes] == [
        stun.USERNAME,
        stun.MESSAGE_INTEGRITY,
        stun.MESSAGE_INTEGRITY_SHA256,
        stun.FINGERPRINT,
    ]
    assert stun.verify_integrity(data, b"k1")
    assert stun.verify_integrity_sha256(data, b"k2")
    assert not stun.verify_integrity(data, b"k2")
    assert not stun.verify_integrity_sha256(data, b"k1")
    # Each MAC covers only what precedes it, with the length adjusted for it.
    assert stun.verify_integrity_sha256(strip_fingerprint(data), b"k2")


def test_truncated_integrity_sha256_verifies() -> None:
    body = stun.encode(Message(stun.BINDING, stun.REQUEST, TXID))
    signed = bytearray(body)
    signed[2:4] = (4 + 16).to_bytes(2, "big")
    mac = hmac.new(b"key", bytes(signed), "sha256").digest()[:16]
    data = append_attribute(body, stun.MESSAGE_INTEGRITY_SHA256, mac)
    assert stun.verify_integrity_sha256(data, b"key")
    assert not stun.verify_integrity_sha256(data, b"other")


def test_attributes_after_integrity_are_ignored() -> None:
    key = b"secret"
    signed = stun.encode(Message(stun.BINDING, stun.REQUEST, TXID), integrity_key=key)
    smuggled = append_attribute(signed, stun.SOFTWARE, b"injected")
    smuggled = append_attribute(smuggled, stun.USERNAME, b"\xff\xfe")  # even invalid ones
    message = stun.decode(smuggled)
    assert message.software() is None
    assert message.username() is None
    assert [a.type for a in message.attributes] == [stun.MESSAGE_INTEGRITY]
    assert stun.verify_integrity(smuggled, key)
    # FINGERPRINT is still honoured after ignored attributes.
    message = stun.decode(refingerprint(append_attribute(smuggled, stun.FINGERPRINT, b"0000")))
    assert [a.type for a in message.attributes] == [stun.MESSAGE_INTEGRITY, stun.FINGERPRINT]


def test_second_integrity_is_ignored_and_first_counts() -> None:
    signed = stun.encode(Message(stun.BINDING, stun.REQUEST, TXID), integrity_key=b"a")
    doubled = append_attribute(signed, stun.MESSAGE_INTEGRITY, b"\x00" * 20)
    assert len(stun.decode(doubled).attributes) == 1
    assert stun.verify_integrity(doubled, b"a")


def test_accessors_return_the_first_occurrence() -> None:
    message = Message(
        stun.BINDING,
        stun.INDICATION,
        TXID,
        (Attribute(stun.SOFTWARE, b"first"), Attribute(stun.SOFTWARE, b"second")),
    )
    assert stun.decode(stun.encode(message)).software() == "first"


def test_message_type_bits_round_trip_for_every_method_and_class() -> None:
    for method in range(0x1000):
        for cls in range(4):
            data = stun.encode(Message(method, cls, TXID))
            decoded = stun.decode(data)
            assert (decoded.method, decoded.cls) == (method, cls)
    # Well-known wire values.
    assert stun.encode(Message(stun.BINDING, stun.SUCCESS_RESPONSE, TXID))[:2] == b"\x01\x01"
    assert stun.encode(Message(stun.BINDING, stun.ERROR_RESPONSE, TXID))[:2] == b"\x01\x11"
    assert stun.encode(Message(stun.BINDING, stun.INDICATION, TXID))[:2] == b"\x00\x11"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": 0x1000, "cls": 0, "transaction_id": TXID},
        {"method": 1, "cls": 4, "transaction_id": TXID},
        {"method": 1, "cls": 0, "transaction_id": b"\x00" * 11},
    ],
)
def test_message_rejects_bad_fields(kwargs: dict[str, Any]) -> None:
    with pytest.raises(StunError):
        Message(**kwargs)


def test_accessors_raise_stun_error_on_hand_built_garbage() -> None:
    message = Message(
        stun.BINDING,
        stun.SUCCESS_RESPONSE,
        TXID,
        (Attribute(stun.XOR_MAPPED_ADDRESS, b"\x00\x03\x00\x00"),),
    )
    with pytest.raises(StunError):
        message.xor_mapped_address()


# --- decode validation ------------------------------------------------------------------------


def _header(length: int, first: int = 0x00, cookie: int = stun.MAGIC_COOKIE) -> bytes:
    return struct.pack("!BBHI", first, 0x01, length, cookie) + TXID


def _with_attribute(attribute_type: int, value: bytes) -> bytes:
    return append_attribute(_header(0), attribute_type, value)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (_header(0)[:19], "short header"),
        (_header(0, first=0x40), "leading bits"),
        (_header(0, first=0x80), "leading bits"),
        (_header(0, cookie=0x2112A443), "cookie"),
        (_header(4) + b"\x00\x01\x00", "length not multiple of 4"),
        (_header(8) + b"\x80\x22\x00\x00", "length beyond data"),
        (_header(0) + b"\x80\x22\x00\x00", "data beyond length"),
        (_header(4) + b"\x80\x22\x00\x01", "value overruns"),
        (_header(4) + b"\x80\x22\xff\xff", "value overruns"),
        (_header(8) + b"\x80\x22\x00\x05abcd", "padding overruns"),
        (_with_attribute(stun.MESSAGE_INTEGRITY, b"\x00" * 16), "short MI"),
        (_with_attribute(stun.MESSAGE_INTEGRITY_SHA256, b"\x00" * 12), "short MI-SHA256"),
        (_with_attribute(stun.MESSAGE_INTEGRITY_SHA256, b"\x00" * 36), "long MI-SHA256"),
        (_with_attribute(stun.MESSAGE_INTEGRITY_SHA256, b"\x00" * 18), "odd MI-SHA256"),
        (refingerprint(_with_attribute(stun.FINGERPRINT, b"\x00" * 8)), "long FINGERPRINT"),
        (
            append_attribute(
                stun.binding_request(transaction_id=TXID), stun.SOFTWARE, b"after fingerprint"
            ),
            "FINGERPRINT not last",
        ),
        (_with_attribute(stun.XOR_MAPPED_ADDRESS, b"\x00\x03\x00\x01\x01\x02\x03\x04"), "family"),
        (_with_attribute(stun.MAPPED_ADDRESS, b"\x00\x01\x00\x01\x01\x02\x03"), "v4 size"),
        (_with_attribute(stun.MAPPED_ADDRESS, b"\x00\x02\x00\x01" + b"\x00" * 4), "v6 size"),
        (_with_attribute(stun.OTHER_ADDRESS, b"\x00\x01"), "address too short"),
        (_with_attribute(stun.CHANGE_REQUEST, b"\x00\x00\x06"), "change-request size"),
        (_with_attribute(stun.ERROR_CODE, b"\x00\x00\x02\x00"), "error class 2"),
        (_with_attribute(stun.ERROR_CODE, b"\x00\x00\x04\x64"), "error number 100"),
        (_with_attribute(stun.ERROR_CODE, b"\x00\x00"), "error code short"),
        (_with_attribute(stun.USERNAME, b"\xc3\x28"), "bad UTF-8 username"),
        (_header(0) + b"\x00" * (stun.MAX_MESSAGE_SIZE - 19), "too big"),
    ],
)
def test_decode_rejects(data: bytes, why: str) -> None:
    with pytest.raises(StunError):
        stun.decode(data)
    with pytest.raises(StunError):
        stun.verify_integrity(data, b"k")


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(StunError):
        stun.decode("not bytes")  # type: ignore[arg-type]


def test_decode_accepts_bytearray_and_the_largest_message() -> None:
    largest = append_attribute(_header(0), 0x8000, b"\x00" * (0xFFFC - 4))
    assert len(largest) == stun.MAX_MESSAGE_SIZE
    assert stun.decode(bytearray(largest)).get(0x8000) == b"\x00" * (0xFFFC - 4)


def test_lenient_software_tolerates_bad_utf8() -> None:
    message = stun.decode(_with_attribute(stun.SOFTWARE, b"caf\xe9"))
    assert message.software() == "caf\ufffd"


def test_ipv4_mapped_and_plain_addresses() -> None:
    value = b"\x00\x01\x12\x34" + bytes([192, 0, 2, 5])
    assert stun.decode(_with_attribute(stun.MAPPED_ADDRESS, value)).mapped_address() == (
        "192.0.2.5",
        0x1234,
    )


# --- is_stun ----------------------------------------------------------------------------------


def wireguard_initiation(rng: random.Random) -> bytes:
    # Type 1, three reserved zero bytes, then sender index, ephemeral key, etc.: 148 bytes.
    return b"\x01\x00\x00\x00" + rng.randbytes(144)


def test_is_stun_on_stun() -> None:
    for name in VECTOR_NAMES:
        assert stun.is_stun(vector_bytes(name))
    assert stun.is_stun(stun.binding_request())


def test_is_stun_rejects_wireguard_even_with_a_cookie_where_stuns_is() -> None:
    rng = random.Random(5389)
    for _ in range(1000):
        packet = wireguard_initiation(rng)
        assert len(packet) == 148
        assert not stun.is_stun(packet)
        # A sender index that happens to equal the cookie is still not STUN: length reads 0.
        planted = packet[:4] + struct.pack("!I", stun.MAGIC_COOKIE) + packet[8:]
        assert not stun.is_stun(planted)


def test_is_stun_rejects_random_data_and_junk() -> None:
    rng = random.Random(8489)
    for _ in range(10_000):
        assert not stun.is_stun(rng.randbytes(rng.randrange(0, 300)))
    assert not stun.is_stun(b"")
    assert not stun.is_stun(_header(0, first=0x40))
    assert not stun.is_stun(_header(4) + b"\x00\x00")


# --- fuzz -------------------------------------------------------------------------------------


def _seed_messages() -> list[bytes]:
    seeds = [vector_bytes(name) for name in VECTOR_NAMES]
    seeds.append(strip_fingerprint(vector_bytes("ipv6_response")))
    seeds.append(stun.binding_request(transaction_id=TXID, change_ip=True, software="fuzz"))
    for mapped in (("198.51.100.7", 51820), ("2001:db8::7", 1)):
        seeds.append(
            stun.binding_success(
                TXID,
                mapped=mapped,
                response_origin=("2001:db8::10", 3478),
                other_address=("192.0.2.11", 3479),
                software="meshwright",
                fingerprint=False,
            )
        )
    seeds.append(stun.binding_error(TXID, 487, "Role Conflict", fingerprint=False))
    body = Message(
        stun.BINDING,
        stun.REQUEST,
        TXID,
        (
            Attribute(stun.USERNAME, b"u:v"),
            Attribute(stun.REALM, b"r"),
            Attribute(stun.NONCE, b"n0nce"),
            Attribute(stun.MAPPED_ADDRESS, b"\x00\x01\x00\x50\x7f\x00\x00\x01"),
            Attribute(stun.CHANGE_REQUEST, b"\x00\x00\x00\x06"),
        ),
    )
    seeds.append(stun.encode(body, integrity_key=b"k", integrity_sha256_key=b"k"))
    return seeds


FUZZ_ATTRIBUTE_TYPES = (
    stun.XOR_MAPPED_ADDRESS,
    stun.MAPPED_ADDRESS,
    stun.ERROR_CODE,
    stun.USERNAME,
    stun.CHANGE_REQUEST,
    stun.OTHER_ADDRESS,
    stun.MESSAGE_INTEGRITY,
    stun.MESSAGE_INTEGRITY_SHA256,
    stun.FINGERPRINT,
)


def _mutate(rng: random.Random, seed: bytes, offsets: list[tuple[int, int]]) -> bytes:
    """One random edit of seed; offsets are its attributes, or [] if it is not well-formed."""
    if not seed:
        return rng.randbytes(rng.randrange(0, 60))
    data = bytearray(seed)
    kind = rng.randrange(8)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data) * 8)
            data[position // 8] ^= 1 << (position % 8)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:
        data += rng.randbytes(rng.randrange(1, 40))
    elif kind == 3 and len(data) >= 4:
        near = (len(data) - 20 + rng.choice([-8, -4, -1, 1, 4, 8])) & 0xFFFF
        data[2:4] = rng.choice([rng.randrange(0x10000), near]).to_bytes(2, "big")
    elif kind == 4 and offsets:
        offset, _size = rng.choice(offsets)
        length = rng.choice([0, 1, 3, 4, 19, 20, 21, 32, 0xFFFF, rng.randrange(0x10000)])
        data[offset + 2 : offset + 4] = length.to_bytes(2, "big")
    elif kind == 5 and offsets:
        # Duplicate one attribute at some attribute boundary.
        offset, size = rng.choice(offsets)
        insert_at, _ = rng.choice([*offsets, (len(data), 0)])
        data[insert_at:insert_at] = data[offset : offset + size]
    elif kind == 6 and offsets:
        # Retype one attribute and scribble on its value, keeping the framing intact.
        offset, size = rng.choice(offsets)
        for _ in range(rng.randint(0, 3)):
            if size > 4:
                data[offset + 4 + rng.randrange(size - 4)] = rng.randrange(256)
        new_type = rng.choice([*FUZZ_ATTRIBUTE_TYPES, rng.randrange(0x10000)])
        data[offset : offset + 2] = new_type.to_bytes(2, "big")
    else:
        data[rng.randrange(len(data))] = rng.randrange(256)
    # Half the time, repair the length and CRC so the mutation reaches the attribute parser.
    if rng.random() < 0.5 and len(data) >= 20:
        return refingerprint(data)
    return bytes(data)


def _random_input(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randrange(0, 120))
    # Random attributes behind a valid header, so the walk itself gets exercised.
    body = rng.randbytes(rng.randrange(0, 25) * 4)
    return _header(len(body), first=rng.randrange(4)) + body


def _check(data: bytes) -> bool:
    """Decode must return a Message or raise StunError; on success everything else works."""
    try:
        message = stun.decode(data)
    except StunError:
        return False
    assert stun.is_stun(data)
    message.mapped_address()
    message.xor_mapped_address()
    message.response_origin()
    message.other_address()
    message.change_request()
    message.software()
    message.username()
    message.realm()
    message.nonce()
    message.error_code()
    stun.verify_integrity(data, b"k")
    stun.verify_integrity_sha256(data, b"k")
    return True


def test_fuzz_decode_only_raises_stun_error() -> None:
    rng = random.Random(20240517)
    seeds = [(seed, attribute_offsets(seed)) for seed in _seed_messages()]
    for seed, _ in seeds:
        assert _check(seed)
    started = time.perf_counter()
    accepted = total = 0
    for _ in range(120_000):
        if rng.random() < 0.3:
            data = _random_input(rng)
        else:
            seed, offsets = rng.choice(seeds)
            data = _mutate(rng, seed, offsets)
            if rng.random() < 0.2:
                data = _mutate(rng, data, [])
        accepted += _check(data)
        total += 1
    elapsed = time.perf_counter() - started
    assert total >= 100_000
    # Both outcomes must be common, or the fuzz is not reaching the parser.
    assert 0.05 < accepted / total < 0.95, (accepted, total, elapsed)


# --- property ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    ip=st.ip_addresses(),
    port=st.integers(0, 0xFFFF),
    txid=st.binary(min_size=12, max_size=12),
    software=st.text(max_size=60),
    fingerprint=st.booleans(),
)
def test_property_binding_success_round_trip(
    ip: Any, port: int, txid: bytes, software: str, fingerprint: bool
) -> None:
    data = stun.binding_success(
        txid, mapped=(str(ip), port), software=software, fingerprint=fingerprint
    )
    message = stun.decode(data)
    assert message.transaction_id == txid
    assert message.xor_mapped_address() == (str(ip), port)
    assert message.software() == software
    request = stun.decode(stun.binding_request(txid, software=software))
    assert (request.transaction_id, request.software()) == (txid, software)


# --- classic RFC 3489 messages and RESPONSE-PORT ----------------------------------------------

CLASSIC_TXID = bytes.fromhex("0123456789abcdef0011223344556677")


def classic_request(*attributes: tuple[int, bytes], txid: bytes = CLASSIC_TXID) -> bytes:
    """An RFC 3489 Binding request as stund and pystun3 send it: no cookie, 16-byte id."""
    body = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in attributes)
    return struct.pack("!HH", 0x0001, len(body)) + txid + body


def test_classic_request_decodes_only_when_asked() -> None:
    data = classic_request((stun.CHANGE_REQUEST, b"\x00\x00\x00\x00"))
    # Everywhere else cookie-less bytes are not STUN (the demultiplexers rely on it).
    assert not stun.is_stun(data)
    with pytest.raises(StunError, match="cookie"):
        stun.decode(data)
    assert stun.is_stun(data, classic=True)
    message = stun.decode(data, classic=True)
    assert message.classic
    assert (message.method, message.cls) == (stun.BINDING, stun.REQUEST)
    assert message.transaction_id == CLASSIC_TXID
    assert message.change_request() == (False, False)
    # A modern message is still a modern one when classic ones are allowed.
    modern = stun.decode(stun.binding_request(TXID), classic=True)
    assert not modern.classic and modern.transaction_id == TXID


def test_classic_message_encodes_without_a_cookie() -> None:
    message = Message(stun.BINDING, stun.REQUEST, CLASSIC_TXID)
    data = stun.encode(message)
    assert data == b"\x00\x01\x00\x00" + CLASSIC_TXID
    assert stun.decode(data, classic=True) == message


def test_classic_binding_success_is_what_rfc_3489_clients_parse() -> None:
    request = stun.decode(classic_request(), classic=True)
    data = stun.binding_success(
        request,
        mapped=("198.51.100.7", 40000),
        response_origin=("192.0.2.1", 3478),
        other_address=("192.0.2.2", 3479),
        software="ignored for RFC 3489",
    )
    # RFC 8489 section 11: the classic client's 16 bytes are echoed where the cookie would be.
    assert data[4:20] == CLASSIC_TXID
    reply = stun.decode(data, classic=True)
    assert reply.classic and reply.cls == stun.SUCCESS_RESPONSE
    assert [a.type for a in reply.attributes] == [
        stun.MAPPED_ADDRESS,
        stun.SOURCE_ADDRESS,
        stun.CHANGED_ADDRESS,
    ]
    assert reply.mapped_address() == ("198.51.100.7", 40000)
    assert reply.source_address() == ("192.0.2.1", 3478)
    assert reply.changed_address() == ("192.0.2.2", 3479)
    # RFC 3489 parsers step over attributes by their length alone: all of them are aligned.
    assert all(length % 4 == 0 for _, length in _attribute_lengths(data))


def test_classic_binding_success_without_alternate_and_with_a_bare_txid() -> None:
    reply = stun.decode(stun.binding_success(CLASSIC_TXID, ("192.0.2.9", 1)), classic=True)
    assert [a.type for a in reply.attributes] == [stun.MAPPED_ADDRESS]
    with pytest.raises(StunError, match="ALSO-MAPPED"):
        stun.binding_success(CLASSIC_TXID, ("192.0.2.9", 1), also_mapped=[("192.0.2.9", 2)])


def test_classic_binding_error_pads_its_reason() -> None:
    data = stun.binding_error(CLASSIC_TXID, 420, "Unknown Attribute", software="x")
    reply = stun.decode(data, classic=True)
    assert [a.type for a in reply.attributes] == [stun.ERROR_CODE]
    # RFC 3489 11.2.9: the reason phrase is a multiple of 4 bytes; spaces fill it.
    assert reply.error_code() == (420, "Unknown Attribute   ")
    assert all(length % 4 == 0 for _, length in _attribute_lengths(data))


def _attribute_lengths(data: bytes) -> list[tuple[int, int]]:
    return [struct.unpack_from("!HH", data, offset) for offset, _size in attribute_offsets(data)]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (classic_request()[:19], "short header"),
        (b"\x40" + classic_request()[1:], "leading bits"),
        (classic_request() + b"\x00\x00\x00\x00", "data beyond length"),
        (classic_request((stun.CHANGE_REQUEST, b"\x00\x06")), "change-request size"),
        (classic_request((stun.SOURCE_ADDRESS, b"\x00\x03\x00\x01\x01\x02\x03\x04")), "family"),
        (classic_request((stun.CHANGED_ADDRESS, b"\x00\x01\x00\x01\x01\x02")), "v4 size"),
        (classic_request((stun.RESPONSE_PORT, b"\x12\x34")), "response-port size"),
    ],
)
def test_classic_decode_rejects(data: bytes, why: str) -> None:
    with pytest.raises(StunError):
        stun.decode(data, classic=True)


@pytest.mark.parametrize("size", [0, 11, 13, 15, 17, 20])
def test_message_takes_12_or_16_byte_transaction_ids_only(size: int) -> None:
    with pytest.raises(StunError):
        Message(stun.BINDING, stun.REQUEST, b"\x00" * size)
    assert not Message(stun.BINDING, stun.REQUEST, TXID).classic
    assert Message(stun.BINDING, stun.REQUEST, CLASSIC_TXID).classic


def test_response_port_accessor() -> None:
    data = _with_attribute(stun.RESPONSE_PORT, b"\x12\x34\x00\x00")
    assert stun.decode(data).response_port() == 0x1234
    assert stun.decode(stun.binding_request()).response_port() is None
    with pytest.raises(StunError, match="RESPONSE-PORT"):
        stun.decode(_with_attribute(stun.RESPONSE_PORT, b"\x12\x34\x00"))


def test_is_stun_classic_still_rejects_wireguard_and_junk() -> None:
    rng = random.Random(3489)
    for _ in range(1000):
        # WireGuard's reserved zero bytes read as length 0, which never matches its size.
        assert not stun.is_stun(wireguard_initiation(rng), classic=True)
    assert not stun.is_stun(classic_request()[:19], classic=True)
    assert not stun.is_stun(b"\x80" + classic_request()[1:], classic=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 0x3FFF), st.binary(min_size=16, max_size=16))
def test_property_classic_decode_only_raises_stun_error(
    body: bytes, message_type: int, txid: bytes
) -> None:
    body = body[: len(body) - len(body) % 4]
    data = struct.pack("!HH", message_type, len(body)) + txid + body
    try:
        message = stun.decode(data, classic=True)
    except StunError:
        return
    assert stun.is_stun(data, classic=True)
    # Everything on a decoded message works, the XOR accessors included.
    for accessor in (
        message.mapped_address,
        message.xor_mapped_address,
        message.source_address,
        message.changed_address,
        message.change_request,
        message.response_port,
        message.error_code,
        message.also_mapped,
    ):
        accessor()
    assert stun.decode(stun.encode(message), classic=True).attributes == message.attributes
