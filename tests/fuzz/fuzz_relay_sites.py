"""Fuzz target: the per-site relay core's WireGuard message handling
(meshwright.relay.sites.Relay), four sites on one relay.

    .venv/bin/python tests/fuzz/fuzz_relay_sites.py CORPUS_DIR [libFuzzer flags]

Input: one setup byte (bits 0-1: limits, bits 2-3: which sites start confirmed), then
operations until the input runs out. Each operation is one byte: bits 0-1 the site whose port
it arrives on, bits 2-4 what to send, bits 5-6 where from (the site's home address, its roamed
address, a stranger, or another site's home), bit 7 a time step (the next byte, in quarter
seconds) before it:

    0 raw bytes (a length byte, then that many)     4 transport data (receiver index, size)
    1 initiation, a good mac1 for a receiver site    5 a handshake whose mac1 is keyed for its
      (a byte: receiver, sender index)                 own sender: never valid
    2 response, a good mac1 for a receiver site      6 the sidecar's mapping keepalive
      (a byte: receiver, sender and receiver index)  7 the last good handshake again, a bit
    3 cookie reply (receiver index)                    flipped or not

Indices are one byte (0-15) so that they collide across sites and sessions; built messages take
one more byte, repeated to fill what the relay cannot read (keys, ciphertext). A random mutator
alone would never forge a mac1, so operations 1, 2 and 7 build the handshakes that the relay's
address learning turns on; mac1 is computed here, independently of the module.

Invariants, after every datagram:

* receive returns a Delivery or None and raises nothing;
* the arriving site forwards (forwarded +1, forwarded_bytes +size) or drops under exactly one
  counter (or counts a keepalive); no other site's counters move;
* a delivery goes to another site than the sender, and only to an address that sent that
  site a handshake with a good mac1 (or was confirmed at the start); so does ``also``;
* the arriving site's own confirmed address never changes; another site's changes only to such
  an address, only on a good handshake or transport data from the arriving site's confirmed
  address, and then it is in :attr:`Relay.moved`;
* what :meth:`Relay.proven_sessions` offers the kernel is what receive does: transport data
  with such a session's index from the sender's confirmed address goes to the receiver's
  confirmed address (or is dropped over the limits);
* pending claims, the replay window and the sessions a site owns stay within their bounds, and
  the index table's entries are exactly the sites' owned ones.
"""

from __future__ import annotations

import hashlib
import struct

import atheris

with atheris.instrument_imports(include=["meshwright"]):
    from meshwright.relay.sites import (
        MAPPING_KEEPALIVE,
        MAX_PENDING,
        MAX_REPLAY,
        Address,
        Delivery,
        Limits,
        Relay,
    )

from harness import fuzz

NAMES = ("a", "b", "c", "d")
KEYS = {name: bytes([n]) * 16 + bytes(range(16)) for n, name in enumerate(NAMES)}
HOME: dict[str, Address] = {
    "a": ("198.51.100.10", 51820),
    "b": ("203.0.113.20", 51820),
    "c": ("192.0.2.30", 4500),
    "d": ("tls:d", 40003),  # a UDP-blocked site's pseudo-address
}
ROAMED: dict[str, Address] = {
    "a": ("198.51.100.77", 40001),
    "b": ("203.0.113.99", 61000),
    "c": ("2001:db8::c", 4500),
    "d": ("tls:d", 40013),
}
STRANGER: Address = ("192.0.2.66", 6666)
LIMITS = (
    Limits(),
    Limits(packets_per_second=3.0, bytes_per_second=1_000.0),
    Limits(packets_per_second=1e9, bytes_per_second=150.0),  # only small datagrams pass
    Limits(packets_per_second=1.0, bytes_per_second=1e9),
)
STARTS: tuple[dict[str, Address], ...] = (
    {},
    {name: HOME[name] for name in NAMES},
    {"a": HOME["a"], "b": HOME["b"]},
    {"c": ROAMED["c"], "d": HOME["d"]},
)
SESSIONS_PER_SITE = 6  # small, so that session_limit is reached
INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE, RESPONSE_SIZE = 148, 92


def mac1_key(public_key: bytes) -> bytes:
    return hashlib.blake2s(b"mac1----" + public_key).digest()


MAC1_KEYS = {name: mac1_key(key) for name, key in KEYS.items()}


def with_mac1(receiver: str, body: bytes) -> bytes:
    """WireGuard's mac1 for the receiving site's key, then an all-zero mac2."""
    mac = hashlib.blake2s(body, key=MAC1_KEYS[receiver], digest_size=16).digest()
    return body + mac + bytes(16)


def good_handshake(site: str, datagram: bytes) -> bool:
    """A handshake arriving for ``site`` whose mac1 verifies with another site's key."""
    size = len(datagram)
    if not (
        (size == INITIATION_SIZE and datagram[:4] == b"\x01\x00\x00\x00")
        or (size == RESPONSE_SIZE and datagram[:4] == b"\x02\x00\x00\x00")
    ):
        return False
    body, mac = datagram[:-32], datagram[-32:-16]
    return any(
        hashlib.blake2s(body, key=MAC1_KEYS[other], digest_size=16).digest() == mac
        for other in NAMES
        if other != site
    )


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


def build(kind: int, site: str, reader: Reader, last: list[bytes]) -> bytes:
    if kind == 0:
        return reader.take(reader.byte())
    if kind in (1, 2):
        choice = reader.byte()
        receiver = NAMES[choice & 3]
        if kind == 1:
            body = struct.pack("<Bxxx", INITIATION) + index(reader) + fill(reader, 108)
        else:
            body = struct.pack("<Bxxx", RESPONSE) + index(reader) + index(reader) + fill(reader, 48)
        return with_mac1(receiver, body)  # keyed for the sender itself when receiver == site
    if kind == 3:
        return struct.pack("<Bxxx", COOKIE_REPLY) + index(reader) + fill(reader, 56)
    if kind == 4:
        receiver_index = index(reader)
        return struct.pack("<Bxxx", TRANSPORT) + receiver_index + fill(reader, 24 + reader.byte())
    if kind == 5:
        if reader.byte() & 1:
            body = struct.pack("<Bxxx", INITIATION) + index(reader) + fill(reader, 108)
        else:
            body = struct.pack("<Bxxx", RESPONSE) + index(reader) + index(reader) + fill(reader, 48)
        return with_mac1(site, body)
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


def source_of(site: str, choice: int) -> Address:
    if choice == 0:
        return HOME[site]
    if choice == 1:
        return ROAMED[site]
    if choice == 2:
        return STRANGER
    return HOME[NAMES[(NAMES.index(site) + 1) % 4]]


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    reader = Reader(data)
    setup = reader.byte()
    start = STARTS[setup >> 2 & 3]
    relay = Relay(KEYS, LIMITS[setup & 3], start, sessions_per_site=SESSIONS_PER_SITE)
    # Per site: the addresses that sent a good handshake on its port, and what it started with.
    proven: dict[str, set[Address]] = {
        name: {start[name]} if name in start else set() for name in NAMES
    }
    last: list[bytes] = []
    now = 1000.0
    while reader.more():
        op = reader.byte()
        site, kind = NAMES[op & 3], op >> 2 & 7
        source = source_of(site, op >> 5 & 3)
        if op & 0x80:
            now += reader.byte() / 4
        datagram = build(kind, site, reader, last)
        good = good_handshake(site, datagram)
        if good:
            proven[site].add(source)
            last.append(datagram)
        before = relay.confirmed
        relay.moved.clear()
        counted = {name: relay.site_counters(name) for name in NAMES}
        transport = datagram[:4] == b"\x04\x00\x00\x00" and len(datagram) >= 32
        offered = {(s, i): r for s, r, i in relay.proven_sessions(now)}
        expected = None
        if transport and source == before.get(site):
            receiver = offered.get((site, int.from_bytes(datagram[4:8], "little")))
            if receiver is not None:
                expected = Delivery(receiver, before[receiver])

        delivery = relay.receive(site, source, datagram, now)

        after = relay.confirmed
        for name in NAMES:
            moved = relay.site_counters(name)
            moved.subtract(counted[name])
            changes = {k: v for k, v in moved.items() if v}
            if name != site:
                assert not changes, (name, changes)
            elif delivery is None:
                assert len(changes) == 1, changes
                ((reason, count),) = changes.items()
                assert count == 1 and (reason.startswith("dropped_") or reason == "keepalives")
            else:
                assert changes == {"forwarded": 1, "forwarded_bytes": len(datagram)}, changes
        if delivery is not None:
            assert delivery.site != site
            assert delivery.address in proven[delivery.site], (delivery, proven)
            if delivery.also is not None:
                assert good and datagram[0] == INITIATION
                assert delivery.also in proven[delivery.site] and delivery.also != delivery.address
        if expected is not None:
            limited = relay.site_counters(site)["dropped_rate_limited"]
            assert delivery == expected or (
                delivery is None and limited == counted[site]["dropped_rate_limited"] + 1
            ), (delivery, expected)
        assert after.get(site) == before.get(site), "a site's own datagram moved its address"
        if after != before:
            assert relay.moved == {n for n in NAMES if after.get(n) != before.get(n)}
            assert good or (transport and source == before.get(site)), "garbage moved an address"
            for name, address in after.items():
                if before.get(name) != address:
                    assert address in proven[name], (name, address, proven)
        sites = relay._sites
        assert all(len(s.pending) <= MAX_PENDING for s in sites.values())
        assert all(0 <= s.owned <= SESSIONS_PER_SITE for s in sites.values())
        assert sum(s.owned for s in sites.values()) == len(relay._index)
        assert len(relay._seen) <= MAX_REPLAY


if __name__ == "__main__":
    fuzz(TestOneInput)
