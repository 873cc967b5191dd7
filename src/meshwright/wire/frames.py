"""Framing for the relay's TLS service: WireGuard datagrams over one TCP stream. No I/O.

A site whose network blocks UDP (a ``relay-tcp`` pair) reaches its side of an allocation over one
TLS connection to the relay's TCP port 443; its sidecar carries WireGuard's datagrams in frames::

    +----------------+----------------+---------------------+
    | port (2 bytes) | length (2)     | payload (length)    |
    +----------------+----------------+---------------------+

both big-endian. ``port`` is the allocation port the datagram belongs to (the site's own side), and
``length`` is 1..:data:`MAX_PAYLOAD`. WireGuard datagrams are at most about 1500 bytes, so a
bigger length can only be a corrupt or hostile stream; so is 0. A byte stream cannot be
resynchronised after that, so :class:`FrameDecoder` raises :class:`FrameError` and the caller
closes the connection.

Port 0 (:data:`KEEPALIVE_PORT`), which is never an allocation port, carries keepalives: the
sidecar sends one every :data:`KEEPALIVE_INTERVAL` seconds so an idle WireGuard tunnel does not
look like a dead connection, and the relay answers each one, which tells the sidecar the relay
accepted its certificate and is still there.

Port 443 is shared with STUN over TCP (RFC 8489 section 6.2.2): :func:`looks_like_tls` and
:func:`looks_like_stun` tell the two apart from a connection's first bytes.

Standard library only: this file is copied to relays and sites that have Debian's python3.
"""

from __future__ import annotations

import hashlib
import re
import struct

__all__ = [
    "HEADER_SIZE",
    "KEEPALIVE",
    "KEEPALIVE_INTERVAL",
    "KEEPALIVE_PAYLOAD",
    "KEEPALIVE_PORT",
    "MAX_PAYLOAD",
    "READ_ROOM",
    "FrameDecoder",
    "FrameError",
    "append",
    "could_be_tls",
    "encode",
    "fingerprint",
    "looks_like_stun",
    "looks_like_tls",
    "normalize_fingerprint",
]

HEADER_SIZE = 4
MAX_PAYLOAD = 2048
KEEPALIVE_PORT = 0
KEEPALIVE_INTERVAL = 30.0
# What the decoder has room for per read: one TLS record's plaintext (16 KiB), and some.
READ_ROOM = 16 * 1024 + 256
_HEADER = struct.Struct(">HH")
# A keepalive frame carries one byte: a zero length is malformed by definition.
KEEPALIVE_PAYLOAD = b"\x00"
KEEPALIVE = _HEADER.pack(KEEPALIVE_PORT, 1) + KEEPALIVE_PAYLOAD
_STUN_COOKIE = b"\x21\x12\xa4\x42"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class FrameError(ValueError):
    """The stream is malformed; close the connection, it cannot be resynchronised.

    ``frames`` holds the well-formed frames that came before the bad one in the same
    :meth:`FrameDecoder.feed` call, in order, so the caller may still deliver them.
    """

    def __init__(self, message: str, frames: list[tuple[int, bytes]] | None = None) -> None:
        super().__init__(message)
        self.frames: list[tuple[int, bytes]] = frames or []


def encode(port: int, payload: bytes) -> bytes:
    """One frame: ``payload`` (1..MAX_PAYLOAD bytes) for allocation ``port``; ValueError if not."""
    size = len(payload)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..65535, not {port!r}")
    if not 0 < size <= MAX_PAYLOAD:
        raise ValueError(f"a frame's payload must be 1..{MAX_PAYLOAD} bytes, not {size}")
    return _HEADER.pack(port, size) + bytes(payload)


def append(out: bytearray, port: int, payload: bytes | bytearray | memoryview) -> None:
    """Append the frame of :func:`encode` to ``out``, unchecked (the caller checked the port
    and size): the per-datagram path, with no frame built apart and copied again."""
    out += _HEADER.pack(port, len(payload))
    out += payload


class FrameDecoder:
    """Turns a byte stream into ``(port, payload)`` frames, buffering partial ones.

    Reads can go straight into the decoder's own buffer, with no copy of the chunk: write at
    most ``len(space())`` bytes at the start of :meth:`space`, then :meth:`commit` that many.
    :meth:`feed` does that for bytes that are already somewhere else. The buffer never holds
    more than one partial frame and ``room`` free bytes after it (allocated at the first use).

    Once :meth:`feed` or :meth:`commit` has raised :class:`FrameError` every later call raises
    it again.
    """

    __slots__ = ("_buffer", "_end", "_error", "_view", "max_payload", "room")

    def __init__(self, max_payload: int = MAX_PAYLOAD, room: int = READ_ROOM) -> None:
        self.max_payload = max_payload
        self.room = room
        self._buffer = bytearray()
        self._view = memoryview(self._buffer)
        self._end = 0  # bytes held: the start of a frame that has not arrived completely yet
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that has not arrived completely yet."""
        return self._end

    def space(self) -> memoryview:
        """Where the next bytes go: at least ``room`` bytes after the partial frame held."""
        if not self._buffer:
            # A partial frame is shorter than a whole one, so this much always leaves `room`.
            self._buffer = bytearray(self.room + HEADER_SIZE + self.max_payload)
            self._view = memoryview(self._buffer)
        return self._view[self._end :]

    def commit(self, size: int) -> list[tuple[int, bytes]]:
        """The frames completed by the ``size`` bytes just written at the start of
        :meth:`space`, in stream order; FrameError on a malformed stream."""
        if self._error is not None:
            raise FrameError(self._error)
        end = self._end + size
        buffer, view = self._buffer, self._view
        frames: list[tuple[int, bytes]] = []
        position = 0
        unpack = _HEADER.unpack_from
        limit = self.max_payload
        while end - position >= HEADER_SIZE:
            port, length = unpack(buffer, position)
            if length == 0 or length > limit:
                self._error = f"a frame's length must be 1..{limit}, not {length}"
                self._end = 0
                raise FrameError(self._error, frames)
            start = position + HEADER_SIZE
            if end - start < length:
                break
            frames.append((port, view[start : start + length].tobytes()))
            position = start + length
        tail = end - position
        if position and tail:
            # The partial frame moves to the front: a short copy (less than one frame), made
            # apart first because the two ranges may overlap.
            buffer[:tail] = view[position:end].tobytes()
        self._end = tail
        return frames

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """The frames completed by ``data``, in stream order; FrameError on a malformed stream."""
        if self._error is not None:
            raise FrameError(self._error)
        frames: list[tuple[int, bytes]] = []
        with memoryview(data) as source:
            offset, total = 0, len(source)
            while True:
                space = self.space()
                size = min(len(space), total - offset)
                space[:size] = source[offset : offset + size]
                offset += size
                try:
                    frames += self.commit(size)
                except FrameError as exc:
                    raise FrameError(str(exc), frames + exc.frames) from None
                if offset >= total:
                    return frames


def looks_like_tls(first_bytes: bytes) -> bool:
    """Whether a stream starts with a TLS handshake record header (0x16, version 0x0301..0x0304).

    Needs the first three bytes; fewer give False.
    """
    return (
        len(first_bytes) >= 3
        and first_bytes[0] == 0x16
        and first_bytes[1] == 0x03
        and 0x01 <= first_bytes[2] <= 0x04
    )


def could_be_tls(first_bytes: bytes) -> bool:
    """Whether the bytes received so far (maybe fewer than three) can still start a TLS record."""
    if len(first_bytes) >= 3:
        return looks_like_tls(first_bytes)
    return first_bytes[:1] in (b"", b"\x16") and first_bytes[1:2] in (b"", b"\x03")


def looks_like_stun(first_bytes: bytes) -> bool:
    """Whether a stream starts with a STUN header: two zero bits, then the magic cookie at 4..8."""
    return len(first_bytes) >= 8 and first_bytes[0] & 0xC0 == 0 and first_bytes[4:8] == _STUN_COOKIE


def fingerprint(der_cert: bytes) -> str:
    """``"sha256:"`` and the lowercase hex SHA-256 of a DER certificate: how pins are written."""
    return "sha256:" + hashlib.sha256(der_cert).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """A pin in the form :func:`fingerprint` returns, from that form or from what
    ``openssl x509 -noout -fingerprint -sha256`` prints (``SHA256 Fingerprint=AB:CD:...``).

    ValueError when it is not a SHA-256 fingerprint.
    """
    value = text.strip()
    if "=" in value:
        value = value.split("=", 1)[1]
    lowered = value.lower()
    if lowered.startswith("sha256:"):
        lowered = lowered[len("sha256:") :]
    digest = lowered.replace(":", "")
    if not _FINGERPRINT.fullmatch(digest):
        raise ValueError(f"not a SHA-256 certificate fingerprint: {text!r}")
    return "sha256:" + digest
