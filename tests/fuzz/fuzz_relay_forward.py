"""Fuzz target: the relay's WireGuard message handling (meshwright.relay.forward.Allocation).

    .venv/bin/python tests/fuzz/fuzz_relay_forward.py CORPUS_DIR [libFuzzer flags]

Input: one setup byte (bits 0-1: limits, bits 2-3: which addresses start confirmed), then
operations until the input runs out. Each operation is one byte, bit 0 the side (the relay
port it arrives on), bits 1-3 the source (one of eight addresses, both families), bits 4-6
what to send, bit 7 a time step (the next byte, in quarter seconds) before it:

    0 raw bytes (a length byte, then that many)     4 transport data (receiver index, size)
    1 initiation with a good mac1 (sender index)     5 a handshake whose mac1 is keyed wrong
    2 response with a good mac1 (sender, receiver)   6 the sidecar's mapping keepalive
    3 cookie reply (receiver index)                  7 the last good handshake again, a bit
                                                       flipped or not

Indices are one byte (0-15) so that they collide with pending ones; built messages take one
more byte, repeated to fill what the relay cannot read (keys, ciphertext). A random mutator alone
would never forge a mac1, so operations 1, 2 and 7 build the handshakes that the relay's
address learning turns on; mac1 is computed here, independently of the module.

Invariants, after every datagram:

* receive returns an address or None and raises nothing;
* it forwards (forwarded +1, forwarded_bytes +size) or drops under exactly one counter;
* it only ever sends to an address that sent the *other* side a handshake with a good mac1
  (or was confirmed at the start), and so does the copy it asks for (``also``);
* a confirmed address changes only for the other side, only to such an address, and only on a
  good handshake or on transport data from the arriving side's confirmed address: random
  garbage (raw bytes, bad macs, keepalives, cookie replies) never changes one;
* pending handshakes and the replay window stay within MAX_PENDING and REPLAY_WINDOW.
"""

from __future__ import annotations

import hashlib
import struct

import atheris

with atheris.instrument_imports(include=["meshwright"]):
    from meshwright.relay.forward import (
        MAPPING_KEEPALIVE,
        MAX_PENDING,
        REPLAY_WINDOW,
        Address,
        Allocation,
        Limits,
    )

from harness import fuzz

KEYS = (bytes(range(32)), bytes(range(100, 132)))  # side 0's public key, side 1's
SOURCES: tuple[Address, ...] = (
    ("198.51.100.10", 51820),  # site A
    ("198.51.100.77", 40001),  # site A, roamed
    ("203.0.113.20", 51820),  # site B
    ("203.0.113.99", 61000),  # site B, roamed
    ("192.0.2.66", 6666),  # a stranger
    ("192.0.2.66", 6667),
    ("2001:db8::66", 6666),
    ("2001:db8::a", 51820),
)
LIMITS = (
    Limits(),
    Limits(packets_per_second=3.0, bytes_per_second=1_000.0),
    Limits(packets_per_second=1e9, bytes_per_second=150.0),  # only small datagrams pass
    Limits(packets_per_second=1.0, bytes_per_second=1e9),
)
STARTS: tuple[tuple[Address | None, Address | None], ...] = (
    (None, None),
    (SOURCES[0], SOURCES[2]),
    (SOURCES[0], None),
    (None, SOURCES[3]),
)
INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE, RESPONSE_SIZE = 148, 92


def mac1_key(public_key: bytes) -> bytes:
    return hashlib.blake2s(b"mac1----" + public_key).digest()


MAC1_KEYS = (mac1_key(KEYS[0]), mac1_key(KEYS[1]))


def with_mac1(receiver: int, body: bytes) -> bytes:
    """WireGuard's mac1 for the receiving side's key, then an all-zero mac2."""
    mac = hashlib.blake2s(body, key=MAC1_KEYS[receiver], digest_size=16).digest()
    return body + mac + bytes(16)


def good_handshake(side: int, datagram: bytes) -> bool:
    """A handshake from ``side`` whose mac1 verifies with the other side's key."""
    size = len(datagram)
    if not (
        (size == INITIATION_SIZE and datagram[:4] == b"\x01\x00\x00\x00")
        or (size == RESPONSE_SIZE and datagram[:4] == b"\x02\x00\x00\x00")
    ):
        return False
    body, mac = datagram[:-32], datagram[-32:-16]
    return hashlib.blake2s(body, key=MAC1_KEYS[1 - side], digest_size=16).digest() == mac


class Reader:
    """Takes bytes off the front of the input; past its end, zeros."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def more(self) -> bool:
        return self.position < len(self.data)

    def byte(self) -> int:
        value = self.data[self.position] if self.position < len(self.data) else 0
        self.position += 1
        return value

    def take(self, size: int) -> bytes:
        chunk = self.data[self.position : self.position + size]
        self.position += size
        return chunk + bytes(size - len(chunk))


def index(reader: Reader) -> bytes:
    return struct.pack("<I", reader.byte() & 0x0F)


def fill(reader: Reader, size: int) -> bytes:
    # What the relay cannot read (keys, ciphertext) is one input byte, repeated: inputs stay
    # short, and that byte still tells a new handshake from a replay.
    return bytes([reader.byte()]) * size


def build(kind: int, side: int, reader: Reader, last: list[bytes]) -> bytes:
    if kind == 0:
        return reader.take(reader.byte())
    if kind == 1:
        body = struct.pack("<Bxxx", INITIATION) + index(reader) + fill(reader, 108)
        return with_mac1(1 - side, body)
    if kind == 2:
        body = struct.pack("<Bxxx", RESPONSE) + index(reader) + index(reader) + fill(reader, 48)
        return with_mac1(1 - side, body)
    if kind == 3:
        return struct.pack("<Bxxx", COOKIE_REPLY) + index(reader) + fill(reader, 56)
    if kind == 4:
        receiver = index(reader)
        return struct.pack("<Bxxx", TRANSPORT) + receiver + fill(reader, 24 + reader.byte())
    if kind == 5:
        if reader.byte() & 1:
            body = struct.pack("<Bxxx", INITIATION) + index(reader) + fill(reader, 108)
        else:
            body = struct.pack("<Bxxx", RESPONSE) + index(reader) + index(reader) + fill(reader, 48)
        return with_mac1(side, body)  # keyed for the sender itself: never valid
    if kind == 6:
        return MAPPING_KEEPALIVE
    if not last:
        return b""
    flip = reader.byte()
    datagram = bytearray(last[-1])
    if flip & 1:
        bit = (flip >> 1) * 8 + reader.byte() % 8
        datagram[bit // 8 % len(datagram)] ^= 1 << (bit % 8)
    return bytes(datagram)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    reader = Reader(data)
    setup = reader.byte()
    start = STARTS[setup >> 2 & 3]
    allocation = Allocation(KEYS, LIMITS[setup & 3], start)
    # Per side: the addresses that sent a good handshake for it, and what it started with.
    proven: tuple[set[Address | None], set[Address | None]] = ({start[0]}, {start[1]})
    last: list[bytes] = []
    now = 1000.0
    while reader.more():
        op = reader.byte()
        side, source, kind = op & 1, SOURCES[op >> 1 & 7], op >> 4 & 7
        if op & 0x80:
            now += reader.byte() / 4
        datagram = build(kind, side, reader, last)
        other = 1 - side
        good = good_handshake(side, datagram)
        if good:
            proven[side].add(source)
            last.append(datagram)
        before = allocation.confirmed
        counted = dict(allocation.counters)

        destination = allocation.receive(side, source, datagram, now)

        after = allocation.confirmed
        moved = {k: v - counted.get(k, 0) for k, v in allocation.counters.items()}
        moved = {k: v for k, v in moved.items() if v}
        if destination is None:
            assert len(moved) == 1, moved
            ((reason, count),) = moved.items()
            assert count == 1 and (reason.startswith("dropped_") or reason == "mapping_keepalives")
            assert allocation.also is None
        else:
            assert moved == {"forwarded": 1, "forwarded_bytes": len(datagram)}, moved
            assert destination in proven[other], (destination, proven)
            if allocation.also is not None:
                assert good and datagram[0] == INITIATION
                assert allocation.also in proven[other] and allocation.also != destination
        assert after[side] == before[side], "only the other side's address is ever learned"
        if after[other] != before[other]:
            assert after[other] in proven[other], (after, proven)
            transport = datagram[:4] == b"\x04\x00\x00\x00" and len(datagram) >= 32
            assert good or (transport and source == before[side]), "garbage moved an address"
        pending, seen = allocation._pending, allocation._seen
        assert all(len(p) <= MAX_PENDING for p in pending)
        assert all(len(s) <= REPLAY_WINDOW for s in seen)


if __name__ == "__main__":
    fuzz(TestOneInput)
