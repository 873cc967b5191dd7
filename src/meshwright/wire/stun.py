"""A pure STUN message codec (RFC 8489), with the RFC 5780 attributes used for NAT probing.

No sockets and no I/O: this module turns bytes into a :class:`Message` and back. It is shipped
inside an Ansible module to hosts that only have Debian's python3, so it uses the standard
library only.

Every malformed input makes :func:`decode` raise :class:`StunError` and nothing else.

Classic RFC 3489 messages (no magic cookie; the 16 bytes after the length are all transaction
id) are accepted only where asked for (``decode(data, classic=True)``), since a server must
answer them (RFC 8489 section 11) but nothing else should take cookie-less bytes for STUN: a
:class:`Message` with a 16-byte transaction id is such a message, and :func:`encode` writes it
back without a cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import stringprep
import struct
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BINDING",
    "CHANGED_ADDRESS",
    "CHANGE_REQUEST",
    "CLASSIC_TRANSACTION_ID_SIZE",
    "ERROR_CODE",
    "ERROR_RESPONSE",
    "FINGERPRINT",
    "INDICATION",
    "MAGIC_COOKIE",
    "MAPPED_ADDRESS",
    "MAX_MESSAGE_SIZE",
    "MESSAGE_INTEGRITY",
    "MESSAGE_INTEGRITY_SHA256",
    "NONCE",
    "OTHER_ADDRESS",
    "PADDING",
    "REALM",
    "REQUEST",
    "RESPONSE_ORIGIN",
    "RESPONSE_PORT",
    "SOFTWARE",
    "SOURCE_ADDRESS",
    "SUCCESS_RESPONSE",
    "USERNAME",
    "XOR_MAPPED_ADDRESS",
    "Address",
    "Attribute",
    "Message",
    "StunError",
    "binding_error",
    "binding_request",
    "binding_success",
    "decode",
    "encode",
    "is_stun",
    "long_term_key",
    "new_transaction_id",
    "short_term_key",
    "verify_integrity",
    "verify_integrity_sha256",
]

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12
# RFC 3489 had no cookie: its transaction id is the 16 bytes where the cookie and id now are.
CLASSIC_TRANSACTION_ID_SIZE = 16
# The length field is 16 bits and must be a multiple of 4, so nothing valid is ever bigger.
MAX_MESSAGE_SIZE = HEADER_SIZE + 0xFFFC

# Message classes (RFC 8489 section 5).
REQUEST = 0b00
INDICATION = 0b01
SUCCESS_RESPONSE = 0b10
ERROR_RESPONSE = 0b11

# Methods.
BINDING = 0x001

# Attribute types (RFC 8489 section 18.3, RFC 5780 section 7).
MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003
# RFC 3489's names for what RFC 5780 calls RESPONSE-ORIGIN and OTHER-ADDRESS; classic clients
# know only these.
SOURCE_ADDRESS = 0x0004
CHANGED_ADDRESS = 0x0005
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
XOR_MAPPED_ADDRESS = 0x0020
PADDING = 0x0026
RESPONSE_PORT = 0x0027
SOFTWARE = 0x8022
FINGERPRINT = 0x8028
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C
# meshwright's own, comprehension-optional (0x8000-0xFFFF: other clients ignore it): another
# mapping the server has seen for the same client socket, XORed like XOR-MAPPED-ADDRESS; may
# repeat. WG-STUN uses it (meshwright.relay.wgstun).
ALSO_MAPPED = 0xFE57

_FINGERPRINT_XOR = 0x5354554E
_SHA1_SIZE = 20
_SHA256_MIN_SIZE = 16
_SHA256_SIZE = 32
# RFC 8489 section 14: SOFTWARE and reason phrases must stay under 763 bytes.
_MAX_TEXT_BYTES = 762

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_CHANGE_IP_FLAG = 0x04
_CHANGE_PORT_FLAG = 0x02

_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE_HEADER = struct.Struct("!HH")
_ADDRESS_HEADER = struct.Struct("!BBH")
_TRAILER_TYPES = frozenset({MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256, FINGERPRINT})
_ADDRESS_TYPES = frozenset(
    {
        MAPPED_ADDRESS,
        XOR_MAPPED_ADDRESS,
        RESPONSE_ORIGIN,
        OTHER_ADDRESS,
        ALSO_MAPPED,
        SOURCE_ADDRESS,
        CHANGED_ADDRESS,
    }
)
_TRANSACTION_ID_SIZES = (TRANSACTION_ID_SIZE, CLASSIC_TRANSACTION_ID_SIZE)
_CLASSIC_HEADER = struct.Struct("!HH16s")
_STRICT_TEXT_TYPES = frozenset({USERNAME, REALM, NONCE})

Address = tuple[str, int]


class StunError(ValueError):
    """The one error raised for any malformed STUN input or unencodable message."""


@dataclass(frozen=True)
class Attribute:
    """One attribute as on the wire: its type and its value without padding."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFFFF:
            raise StunError(f"attribute type {self.type!r} out of range")
        if not isinstance(self.value, bytes) or len(self.value) > 0xFFFF:
            raise StunError("attribute value must be bytes of at most 65535 bytes")


@dataclass(frozen=True)
class Message:
    """A STUN message. Attributes keep their wire order; accessors read the first occurrence,
    since RFC 8489 section 14 says only the first occurrence of an attribute matters.

    A 16-byte transaction id makes it a classic RFC 3489 message (see :attr:`classic`).
    """

    method: int
    cls: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.method <= 0xFFF:
            raise StunError(f"method {self.method!r} out of range")
        if self.cls not in (REQUEST, INDICATION, SUCCESS_RESPONSE, ERROR_RESPONSE):
            raise StunError(f"class {self.cls!r} out of range")
        if not isinstance(self.transaction_id, bytes) or (
            len(self.transaction_id) not in _TRANSACTION_ID_SIZES
        ):
            raise StunError("transaction id must be 12 bytes (or 16 for RFC 3489)")

    @property
    def classic(self) -> bool:
        """An RFC 3489 message: no magic cookie, a 16-byte transaction id."""
        return len(self.transaction_id) == CLASSIC_TRANSACTION_ID_SIZE

    def get(self, attribute_type: int) -> bytes | None:
        """The raw value of the first attribute of this type, or None."""
        for attribute in self.attributes:
            if attribute.type == attribute_type:
                return attribute.value
        return None

    def mapped_address(self) -> Address | None:
        value = self.get(MAPPED_ADDRESS)
        return None if value is None else _unpack_address(value)

    def xor_mapped_address(self) -> Address | None:
        value = self.get(XOR_MAPPED_ADDRESS)
        return None if value is None else _unpack_address(value, self.transaction_id)

    def also_mapped(self) -> tuple[Address, ...]:
        """Every ALSO-MAPPED address (meshwright's WG-STUN), in order."""
        return tuple(
            _unpack_address(a.value, self.transaction_id)
            for a in self.attributes
            if a.type == ALSO_MAPPED
        )

    def response_origin(self) -> Address | None:
        value = self.get(RESPONSE_ORIGIN)
        return None if value is None else _unpack_address(value)

    def other_address(self) -> Address | None:
        value = self.get(OTHER_ADDRESS)
        return None if value is None else _unpack_address(value)

    def source_address(self) -> Address | None:
        """RFC 3489 SOURCE-ADDRESS (RESPONSE-ORIGIN's predecessor)."""
        value = self.get(SOURCE_ADDRESS)
        return None if value is None else _unpack_address(value)

    def changed_address(self) -> Address | None:
        """RFC 3489 CHANGED-ADDRESS (OTHER-ADDRESS's predecessor)."""
        value = self.get(CHANGED_ADDRESS)
        return None if value is None else _unpack_address(value)

    def change_request(self) -> tuple[bool, bool] | None:
        """(change_ip, change_port), or None."""
        value = self.get(CHANGE_REQUEST)
        return None if value is None else _unpack_change_request(value)

    def response_port(self) -> int | None:
        """The port of RESPONSE-PORT (RFC 5780 section 7.5), or None."""
        value = self.get(RESPONSE_PORT)
        return None if value is None else _unpack_response_port(value)

    def software(self) -> str | None:
        value = self.get(SOFTWARE)
        return None if value is None else _lenient_text(value)

    def username(self) -> str | None:
        value = self.get(USERNAME)
        return None if value is None else _strict_text(value)

    def realm(self) -> str | None:
        value = self.get(REALM)
        return None if value is None else _strict_text(value)

    def nonce(self) -> str | None:
        value = self.get(NONCE)
        return None if value is None else _strict_text(value)

    def error_code(self) -> tuple[int, str] | None:
        """(code, reason phrase), or None."""
        value = self.get(ERROR_CODE)
        return None if value is None else _unpack_error_code(value)


# --- keys -------------------------------------------------------------------------------------


def _opaque_string(text: str) -> str:
    # The OpaqueString profile (RFC 8265) maps non-ASCII spaces to U+0020 and applies NFC.
    # We do not reject the code points PRECIS disallows: ASCII passwords, which is all we issue
    # and all the RFC 5769 short-term vectors use, pass through unchanged anyway.
    spaced = "".join(" " if stringprep.in_table_c12(char) else char for char in text)
    return unicodedata.normalize("NFC", spaced)


def short_term_key(password: str) -> bytes:
    """The short-term credential key: OpaqueString(password) as UTF-8 (RFC 8489 9.1.1)."""
    return _opaque_string(password).encode("utf-8")


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key: MD5(username ":" realm ":" password) (RFC 8489 9.2.2).

    RFC 5769 2.4 was computed with the RFC 5389 SASLprep rules, so pass the prepared password
    ("TheMatrIX") there; OpaqueString alone would not fold the vector's raw password to it.
    """
    joined = f"{username}:{_opaque_string(realm)}:{_opaque_string(password)}"
    # MD5 is what the protocol mandates; the flag keeps it working on FIPS-mode hosts.
    return hashlib.md5(joined.encode("utf-8"), usedforsecurity=False).digest()


def new_transaction_id() -> bytes:
    return os.urandom(TRANSACTION_ID_SIZE)


# --- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Located:
    """An attribute that counts, with the offset of its header in the raw message."""

    offset: int
    attribute: Attribute


def _split_type(message_type: int) -> tuple[int, int]:
    # The class bits C1 and C0 sit at bits 8 and 4, interleaved with the method bits.
    cls = ((message_type >> 7) & 0b10) | ((message_type >> 4) & 0b01)
    method = (
        (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    )
    return method, cls


def _join_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def is_stun(data: bytes, *, classic: bool = False) -> bool:
    """Cheap test for demultiplexing STUN from other traffic on one socket (RFC 7983).

    A WireGuard message also starts with two zero bits, but its bytes 2-3 are reserved zeros,
    so its STUN length would read 0 and never match its real size. ``classic`` also accepts a
    header without the magic cookie (RFC 3489), which only the length then vouches for.
    """
    if len(data) < HEADER_SIZE or len(data) > MAX_MESSAGE_SIZE or data[0] & 0xC0:
        return False
    length = (data[2] << 8) | data[3]
    cookie = int.from_bytes(data[4:8], "big")
    return (
        (classic or cookie == MAGIC_COOKIE)
        and length % 4 == 0
        and length == len(data) - HEADER_SIZE
    )


def _parse(data: bytes, classic: bool = False) -> tuple[int, int, bytes, list[_Located]]:
    """Check framing and return (method, class, transaction id, attributes that count).

    With ``classic``, a header without the magic cookie is an RFC 3489 one: the transaction id
    returned is then its 16 bytes.

    RFC 8489 section 14.5/14.6: anything after MESSAGE-INTEGRITY other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, and anything after MESSAGE-INTEGRITY-SHA256
    other than FINGERPRINT, is ignored. We drop such attributes from the result, but they must
    still be well-formed TLVs, since we cannot find FINGERPRINT without walking them.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StunError("STUN data must be bytes")
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise StunError("shorter than a STUN header")
    if len(data) > MAX_MESSAGE_SIZE:
        raise StunError("longer than any STUN message can be")
    message_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise StunError("the two leading bits are not zero")
    if cookie != MAGIC_COOKIE:
        if not classic:
            raise StunError("wrong magic cookie")
        transaction_id = data[4:HEADER_SIZE]
    if length % 4:
        raise StunError("message length is not a multiple of 4")
    if length != len(data) - HEADER_SIZE:
        raise StunError("message length does not match the data")
    method, cls = _split_type(message_type)

    located: list[_Located] = []
    seen_integrity = seen_integrity_sha256 = False
    offset = HEADER_SIZE
    while offset < len(data):
        # Length is a multiple of 4, so at least a whole 4-byte attribute header remains.
        attribute_type, value_length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        value_start = offset + 4
        value_end = value_start + value_length
        padded_end = value_start + ((value_length + 3) & ~3)
        if padded_end > len(data):
            raise StunError(f"attribute 0x{attribute_type:04x} overruns the message")
        attribute = Attribute(attribute_type, data[value_start:value_end])

        if attribute_type == FINGERPRINT:
            if padded_end != len(data):
                raise StunError("FINGERPRINT is not the last attribute")
            _check_fingerprint(data, offset, attribute.value)
            located.append(_Located(offset, attribute))
        elif attribute_type == MESSAGE_INTEGRITY_SHA256 and not seen_integrity_sha256:
            if not (_SHA256_MIN_SIZE <= value_length <= _SHA256_SIZE and value_length % 4 == 0):
                raise StunError("MESSAGE-INTEGRITY-SHA256 has a bad length")
            seen_integrity_sha256 = True
            located.append(_Located(offset, attribute))
        elif attribute_type == MESSAGE_INTEGRITY and not (seen_integrity or seen_integrity_sha256):
            if value_length != _SHA1_SIZE:
                raise StunError("MESSAGE-INTEGRITY is not 20 bytes")
            seen_integrity = True
            located.append(_Located(offset, attribute))
        elif not (seen_integrity or seen_integrity_sha256):
            _check_value(attribute, transaction_id)
            located.append(_Located(offset, attribute))
        offset = padded_end
    return method, cls, transaction_id, located


def _check_fingerprint(data: bytes, offset: int, value: bytes) -> None:
    if len(value) != 4:
        raise StunError("FINGERPRINT is not 4 bytes")
    # The length field already covers FINGERPRINT, as it is the last attribute.
    expected = (zlib.crc32(data[:offset]) ^ _FINGERPRINT_XOR).to_bytes(4, "big")
    if not hmac.compare_digest(expected, value):
        raise StunError("FINGERPRINT does not match")


def _check_value(attribute: Attribute, transaction_id: bytes) -> None:
    # Validate known attribute values up front, so accessors on a decoded Message never fail.
    if attribute.type in _ADDRESS_TYPES:
        _unpack_address(attribute.value, transaction_id)
    elif attribute.type == CHANGE_REQUEST:
        _unpack_change_request(attribute.value)
    elif attribute.type == RESPONSE_PORT:
        _unpack_response_port(attribute.value)
    elif attribute.type == ERROR_CODE:
        _unpack_error_code(attribute.value)
    elif attribute.type in _STRICT_TEXT_TYPES:
        _strict_text(attribute.value)


def decode(data: bytes, *, classic: bool = False) -> Message:
    """Parse and validate one STUN message; raise StunError for anything malformed.

    ``classic`` also accepts an RFC 3489 message (no magic cookie), which decodes to a Message
    with a 16-byte transaction id.
    """
    method, cls, transaction_id, located = _parse(data, classic)
    return Message(method, cls, transaction_id, tuple(item.attribute for item in located))


def _strict_text(value: bytes) -> str:
    # USERNAME, REALM and NONCE feed authentication, so bad UTF-8 there is an error.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise StunError("attribute is not valid UTF-8") from error


def _lenient_text(value: bytes) -> str:
    # SOFTWARE and reason phrases are informational: a sloppy peer should not make us drop
    # an otherwise good response.
    return value.decode("utf-8", errors="replace")


def _xor(raw_address: bytes, transaction_id: bytes) -> bytes:
    # RFC 8489 14.2: IPv4 is XORed with the cookie, IPv6 with the cookie then transaction id.
    # RFC 3489 has no XOR attributes; a classic message's are XORed the same way, which keeps
    # their decoding total (the mask is long enough for either id).
    mask = (MAGIC_COOKIE.to_bytes(4, "big") + transaction_id)[: len(raw_address)]
    mixed = int.from_bytes(raw_address, "big") ^ int.from_bytes(mask, "big")
    return mixed.to_bytes(len(raw_address), "big")


def _unpack_address(value: bytes, transaction_id: bytes | None = None) -> Address:
    """Decode a (XOR-)MAPPED-ADDRESS style value; a transaction id means it is XORed."""
    if len(value) < 4:
        raise StunError("address attribute too short")
    _reserved, family, port = _ADDRESS_HEADER.unpack_from(value)
    raw = value[4:]
    if family == _FAMILY_IPV4:
        size = 4
    elif family == _FAMILY_IPV6:
        size = 16
    else:
        raise StunError(f"unknown address family 0x{family:02x}")
    if len(raw) != size:
        raise StunError("address length does not match its family")
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = _xor(raw, transaction_id)
    ip = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
    return str(ip), port


def _unpack_change_request(value: bytes) -> tuple[bool, bool]:
    if len(value) != 4:
        raise StunError("CHANGE-REQUEST is not 4 bytes")
    flags = value[3]
    return bool(flags & _CHANGE_IP_FLAG), bool(flags & _CHANGE_PORT_FLAG)


def _unpack_response_port(value: bytes) -> int:
    # A 16-bit port, then 2 bytes of padding inside the value (RFC 5780 section 7.5).
    if len(value) != 4:
        raise StunError("RESPONSE-PORT is not 4 bytes")
    return int.from_bytes(value[:2], "big")


def _unpack_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("ERROR-CODE too short")
    error_class, number = value[2] & 0x07, value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunError("ERROR-CODE out of range")
    return error_class * 100 + number, _lenient_text(value[4:])


# --- integrity --------------------------------------------------------------------------------


def _signed_prefix(data: bytes, offset: int, value_length: int) -> bytes:
    # RFC 8489 14.5/14.6: hash the message up to the attribute, with the header length
    # rewritten as if that attribute were the last one.
    adjusted_length = offset + 4 + value_length - HEADER_SIZE
    return data[:2] + adjusted_length.to_bytes(2, "big") + data[4:offset]


def _verify(data: bytes, key: bytes, attribute_type: int, digest: str) -> bool:
    _method, _cls, _transaction_id, located = _parse(data)
    for item in located:
        if item.attribute.type == attribute_type:
            received = item.attribute.value
            prefix = _signed_prefix(bytes(data), item.offset, len(received))
            expected = hmac.new(key, prefix, digest).digest()[: len(received)]
            return hmac.compare_digest(expected, received)
    return False


def verify_integrity(data: bytes, key: bytes) -> bool:
    """True if the raw message carries a MESSAGE-INTEGRITY that matches key.

    False if it has none or it does not match; StunError if data is not a valid message.
    """
    return _verify(data, key, MESSAGE_INTEGRITY, "sha1")


def verify_integrity_sha256(data: bytes, key: bytes) -> bool:
    """As verify_integrity, for MESSAGE-INTEGRITY-SHA256 (possibly truncated, RFC 8489 14.6)."""
    return _verify(data, key, MESSAGE_INTEGRITY_SHA256, "sha256")


# --- encoding ---------------------------------------------------------------------------------


def _append_attribute(buffer: bytearray, attribute_type: int, value: bytes, pad_byte: int) -> None:
    buffer += _ATTRIBUTE_HEADER.pack(attribute_type, len(value))
    buffer += value
    buffer += bytes([pad_byte]) * (-len(value) % 4)


def _set_length(buffer: bytearray, length: int) -> None:
    if length > MAX_MESSAGE_SIZE - HEADER_SIZE:
        raise StunError("message too long to encode")
    buffer[2:4] = length.to_bytes(2, "big")


def encode(
    message: Message,
    *,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
    fingerprint: bool = False,
    pad_byte: int = 0,
) -> bytes:
    """Serialise message, appending MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
    in that order when asked to.

    Attributes are written as given. Asking for a trailer that message already carries is an
    error, since the result would have two. pad_byte fills padding: RFC 8489 says receivers
    ignore it and zero is usual, but RFC 5769 pads with spaces.
    """
    wants_trailer = fingerprint or integrity_key is not None or integrity_sha256_key is not None
    if wants_trailer and any(a.type in _TRAILER_TYPES for a in message.attributes):
        raise StunError("message already has an integrity or fingerprint attribute")
    if not 0 <= pad_byte <= 0xFF:
        raise StunError("pad_byte must be a byte value")

    message_type = _join_type(message.method, message.cls)
    if message.classic:
        # RFC 8489 section 11: echo the classic client's 16 bytes where the cookie would be.
        buffer = bytearray(_CLASSIC_HEADER.pack(message_type, 0, message.transaction_id))
    else:
        buffer = bytearray(_HEADER.pack(message_type, 0, MAGIC_COOKIE, message.transaction_id))
    for attribute in message.attributes:
        _append_attribute(buffer, attribute.type, attribute.value, pad_byte)
    _set_length(buffer, len(buffer) - HEADER_SIZE)

    for attribute_type, key, digest, size in (
        (MESSAGE_INTEGRITY, integrity_key, "sha1", _SHA1_SIZE),
        (MESSAGE_INTEGRITY_SHA256, integrity_sha256_key, "sha256", _SHA256_SIZE),
    ):
        if key is not None:
            # The length field must already count the attribute being computed.
            _set_length(buffer, len(buffer) + 4 + size - HEADER_SIZE)
            _append_attribute(buffer, attribute_type, hmac.new(key, buffer, digest).digest(), 0)
    if fingerprint:
        _set_length(buffer, len(buffer) + 8 - HEADER_SIZE)
        crc = zlib.crc32(buffer) ^ _FINGERPRINT_XOR
        _append_attribute(buffer, FINGERPRINT, crc.to_bytes(4, "big"), 0)
    return bytes(buffer)


def _pack_address(address: Address, transaction_id: bytes | None = None) -> bytes:
    """Encode an (ip, port) pair; a transaction id means XOR it (XOR-MAPPED-ADDRESS)."""
    try:
        ip_text, port = address
        # ip_address() would also take an int, which is never what a caller meant.
        ip = ipaddress.ip_address(ip_text) if isinstance(ip_text, str) else None
    except (TypeError, ValueError) as error:
        raise StunError(f"not an (ip, port) address: {address!r}") from error
    if ip is None:
        raise StunError(f"not an (ip, port) address: {address!r}")
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise StunError(f"port out of range: {port!r}")
    raw = ip.packed
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = _xor(raw, transaction_id)
    return _ADDRESS_HEADER.pack(0, family, port) + raw


def _text(value: str) -> bytes:
    encoded = value.encode("utf-8")
    if len(encoded) > _MAX_TEXT_BYTES:
        raise StunError(f"text attribute longer than {_MAX_TEXT_BYTES} bytes")
    return encoded


def _transaction_id_of(request_or_txid: Message | bytes) -> bytes:
    if isinstance(request_or_txid, Message):
        return request_or_txid.transaction_id
    if isinstance(request_or_txid, bytes) and len(request_or_txid) in _TRANSACTION_ID_SIZES:
        return request_or_txid
    raise StunError("expected a request Message or a 12-byte (16 for RFC 3489) transaction id")


def _classic_text(value: str) -> bytes:
    # RFC 3489 has no padding: its text values are a multiple of 4 bytes long, and its parsers
    # (stund's, pystun3's) step over attributes by their length alone. Pad with spaces.
    encoded = _text(value)
    return encoded + b" " * (-len(encoded) % 4)


def binding_request(
    transaction_id: bytes | None = None,
    change_ip: bool = False,
    change_port: bool = False,
    software: str | None = None,
    fingerprint: bool = True,
) -> bytes:
    """An encoded Binding request; CHANGE-REQUEST (RFC 5780) is sent only if a flag is set."""
    attributes: list[Attribute] = []
    if software is not None:
        attributes.append(Attribute(SOFTWARE, _text(software)))
    if change_ip or change_port:
        flags = (_CHANGE_IP_FLAG if change_ip else 0) | (_CHANGE_PORT_FLAG if change_port else 0)
        attributes.append(Attribute(CHANGE_REQUEST, flags.to_bytes(4, "big")))
    txid = new_transaction_id() if transaction_id is None else transaction_id
    message = Message(BINDING, REQUEST, txid, tuple(attributes))
    return encode(message, fingerprint=fingerprint)


def binding_success(
    request_or_txid: Message | bytes,
    mapped: Address,
    response_origin: Address | None = None,
    other_address: Address | None = None,
    software: str | None = None,
    fingerprint: bool = True,
    also_mapped: Sequence[Address] = (),
) -> bytes:
    """An encoded Binding success response carrying XOR-MAPPED-ADDRESS (and ALSO-MAPPED).

    Plain MAPPED-ADDRESS is left out: RFC 8489 only wants it for RFC 3489 clients. For those
    (a classic request or a 16-byte transaction id) the answer is instead what RFC 3489 and
    RFC 8489 section 11 ask: MAPPED-ADDRESS, and RFC 3489's SOURCE-ADDRESS and CHANGED-ADDRESS
    for response_origin and other_address; no SOFTWARE or FINGERPRINT, which RFC 3489 does not
    have (and a SOFTWARE of unaligned length would derail its parsers); no ALSO-MAPPED, an XOR
    attribute.
    """
    txid = _transaction_id_of(request_or_txid)
    if len(txid) == CLASSIC_TRANSACTION_ID_SIZE:
        if also_mapped:
            raise StunError("an RFC 3489 answer has no XOR attributes, so no ALSO-MAPPED")
        classic = [Attribute(MAPPED_ADDRESS, _pack_address(mapped))]
        for attribute_type, address in (
            (SOURCE_ADDRESS, response_origin),
            (CHANGED_ADDRESS, other_address),
        ):
            if address is not None:
                classic.append(Attribute(attribute_type, _pack_address(address)))
        return encode(Message(BINDING, SUCCESS_RESPONSE, txid, tuple(classic)))
    attributes = [Attribute(XOR_MAPPED_ADDRESS, _pack_address(mapped, txid))]
    attributes += [Attribute(ALSO_MAPPED, _pack_address(a, txid)) for a in also_mapped]
    if response_origin is not None:
        attributes.append(Attribute(RESPONSE_ORIGIN, _pack_address(response_origin)))
    if other_address is not None:
        attributes.append(Attribute(OTHER_ADDRESS, _pack_address(other_address)))
    if software is not None:
        attributes.append(Attribute(SOFTWARE, _text(software)))
    message = Message(BINDING, SUCCESS_RESPONSE, txid, tuple(attributes))
    return encode(message, fingerprint=fingerprint)


def binding_error(
    request_or_txid: Message | bytes,
    code: int,
    reason: str,
    software: str | None = None,
    fingerprint: bool = True,
) -> bytes:
    """An encoded Binding error response with ERROR-CODE (code 300-699).

    To an RFC 3489 client (a 16-byte transaction id) the reason is padded with spaces to a
    multiple of 4 bytes, as RFC 3489 requires, and SOFTWARE and FINGERPRINT are left out.
    """
    if not isinstance(code, int) or not 300 <= code <= 699:
        raise StunError(f"error code out of range: {code!r}")
    txid = _transaction_id_of(request_or_txid)
    header = bytes([0, 0, code // 100, code % 100])
    if len(txid) == CLASSIC_TRANSACTION_ID_SIZE:
        error = Attribute(ERROR_CODE, header + _classic_text(reason))
        return encode(Message(BINDING, ERROR_RESPONSE, txid, (error,)))
    value = header + _text(reason)
    attributes = [Attribute(ERROR_CODE, value)]
    if software is not None:
        attributes.append(Attribute(SOFTWARE, _text(software)))
    message = Message(BINDING, ERROR_RESPONSE, txid, tuple(attributes))
    return encode(message, fingerprint=fingerprint)
