"""The pure core of the relay: which WireGuard datagrams to forward between two sites, and where.

No I/O: no sockets, no clock, no files, no logging. The caller owns the sockets and passes the
time in. Standard library only, because this file is copied to relays that have Debian's python3
and nothing else.

The model
---------

An *allocation* is a pair of UDP ports on the relay, one per side. Site A (side 0) uses the
relay's port 0 as its WireGuard endpoint for B; site B (side 1) uses port 1 as its endpoint for A.
A datagram that arrives on port ``i`` from address ``s`` claims to come from side ``i``'s site. If
it is accepted, the caller sends it unchanged out of the *other* port (so the receiver sees it come
from its own endpoint) to the address :meth:`Allocation.receive` returns. The relay holds only the
two sites' public keys, which decrypt nothing.

API::

    Address = tuple[str, int]

    Limits(packets_per_second=50_000.0, bytes_per_second=100_000_000.0)

    allocation = Allocation((public_key_a, public_key_b), limits, confirmed=(None, None))
    destination = allocation.receive(side, source, datagram, now)  # Address, or None if dropped
    allocation.confirmed  # (Address | None, Address | None): persist it across relay restarts
    allocation.counters   # Counter: "forwarded", "forwarded_bytes", "dropped_<reason>"

``side`` is 0 or 1 (the port the datagram arrived on; anything else raises ``ValueError``, it is
the caller's own index, not network input), ``source`` is the ``(host, port)`` it came from,
``datagram`` is the ``bytes`` that ``recvfrom`` returned and ``now`` is monotonic seconds.
``receive`` never raises on any datagram or source. ``Allocation`` raises ``ValueError`` when the
public keys are not two different 32-byte strings, or ``confirmed`` is not two
``(str, int)``-or-``None``.

Learning a site's address
-------------------------

A source address is trusted for side X (``confirmed[X]``) only once it is proven, and transport
data (type 4) is forwarded only from and to confirmed addresses. Handshakes are what prove them.
For a message from side X, Y is the other side:

* Every handshake (type 1 initiation, type 2 response) must have the exact length, zero reserved
  bytes and a mac1 that verifies with *Y's* public key (Y is the receiver). A valid one is
  remembered in ``pending[X]``, keyed by its sender index, as (source, time, where it was
  forwarded to). At most :data:`MAX_PENDING` entries per side (the oldest is evicted) and each
  expires after :data:`PENDING_TTL` seconds.
* Type 1 from X is forwarded to ``confirmed[Y]``, or if there is none to Y's most recent pending
  address (bootstrap: neither side is known yet), or dropped (``no_destination``).
* Type 2 from X whose receiver index is in ``pending[Y]``, and which comes from the very address
  Y's initiation was forwarded to, proves that entry's address is Y's: Y's initiation reached
  the real X through the relay and X answered it. It becomes ``confirmed[Y]`` and the response
  goes there. Otherwise the response goes to ``confirmed[Y]`` (or is dropped, no_destination).
* Type 4 from Y is accepted only from ``confirmed[Y]`` (``unconfirmed_source`` otherwise). If its
  receiver index is in ``pending[X]`` and that entry was forwarded to this same address, the
  entry's address becomes ``confirmed[X]``: the initiator Y only sends transport data after it
  checked X's response, so X is proven too. Then it is forwarded to ``confirmed[X]``.
* Type 3 (cookie reply) from X is accepted from ``confirmed[X]`` or a pending address of X, and
  goes to ``pending[Y]``'s entry for its receiver index, else to ``confirmed[Y]``.
* Roaming follows from the same rules: a site's data from a new address is dropped until its next
  handshake from there is answered through the relay (WireGuard starts one itself when it gets no
  answer), which confirms the new address.
* Both sides moved (a conntrack flush on both NATs, a new listen port): each side's confirmed
  address is stale and each side's handshakes go there and are lost. So when the other side's
  confirmed address has sent nothing for :data:`SILENT_AFTER` seconds (longer than WireGuard's
  persistent keepalive) and it has a fresher pending handshake from elsewhere, an initiation
  also goes there (:attr:`Allocation.also`: the caller sends the copy). An answer from either
  address proves the initiator. While a site's confirmed address is heard, a forged handshake
  gets no copy of anything.

Drop reasons, each counted as ``dropped_<reason>``:

* ``malformed``: empty, unknown type, nonzero reserved bytes, wrong length for the type.
* ``bad_mac1``: a handshake whose mac1 does not verify with the receiving side's key.
* ``replay``: a handshake identical to one of the last :data:`REPLAY_WINDOW` of that side.
  WireGuard never sends the same handshake twice (each retry has a fresh ephemeral key and
  index), so this drops a captured handshake replayed from elsewhere before it teaches anything.
* ``duplicate_index``: a handshake reusing a sender index that is still pending on that side.
  WireGuard picks a fresh random index per handshake, so this is a forgery by someone who saw the
  first one; keeping the first stops it from redirecting that index's confirmation.
* ``unconfirmed_source``: transport data, or a cookie reply, from an address not proven for the
  side it arrived on.
* ``no_destination``: nothing known to send it to yet.
* ``rate_limited``: over the allocation's :class:`Limits`.

A dropped datagram changes no state, except a valid handshake dropped for ``no_destination``,
which is still remembered: that is how the first initiation of a bootstrap becomes the destination
of the other side's.

What this does not stop: mac1 only proves knowledge of the receiver's *public* key, so anyone who
has both public keys can forge handshakes that reach ``pending`` (and flush it at the packet
rate), and an attacker who can spoof the source address of a site can forge the answer that
confirms an address. Either can only deny service: the relay forwards ciphertext that nobody but
the two sites can read or forge.

Limits
------

Two token buckets per allocation, both directions together, each with a burst of one second's
worth: packets and bytes. They meter what the relay *sends* (its bandwidth is what an allocation
can use up), so only datagrams that would be forwarded take tokens; junk is dropped before and
costs no tokens, which keeps an attacker's junk from starving the sites' own traffic. A datagram
bigger than ``bytes_per_second`` can never pass.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DROP_REASONS",
    "MAX_PENDING",
    "PENDING_TTL",
    "REPLAY_WINDOW",
    "Address",
    "Allocation",
    "Limits",
]

Address = tuple[str, int]

KEY_SIZE = 32
# How long an unanswered handshake source stays pending. WireGuard retries an initiation every
# 5 s (REKEY_TIMEOUT) and an answer takes one round trip, so 15 s spans three retries.
PENDING_TTL = 15.0
MAX_PENDING = 8
REPLAY_WINDOW = 256

# The first four bytes of each message: its type, then three reserved zero bytes.
_INITIATION = b"\x01\x00\x00\x00"
_RESPONSE = b"\x02\x00\x00\x00"
_COOKIE_REPLY = b"\x03\x00\x00\x00"
_TRANSPORT = b"\x04\x00\x00\x00"
_INITIATION_SIZE = 148
_RESPONSE_SIZE = 92
_COOKIE_REPLY_SIZE = 64
_TRANSPORT_MIN_SIZE = 32
_MAC_SIZE = 16

FORWARDED = "forwarded"
KEEPALIVES = "mapping_keepalives"
# What a site's sidecar sends to its allocation port while its pair is direct (the probe magic
# of meshwright.site.sidecar.messages, and nothing else): never forwarded, only counted.
MAPPING_KEEPALIVE = b"\xffMWP"
FORWARDED_BYTES = "forwarded_bytes"
_MALFORMED = "dropped_malformed"
_BAD_MAC1 = "dropped_bad_mac1"
_REPLAY = "dropped_replay"
_DUPLICATE_INDEX = "dropped_duplicate_index"
_UNCONFIRMED_SOURCE = "dropped_unconfirmed_source"
_NO_DESTINATION = "dropped_no_destination"
_RATE_LIMITED = "dropped_rate_limited"
_DROPPED = (
    _MALFORMED,
    _BAD_MAC1,
    _REPLAY,
    _DUPLICATE_INDEX,
    _UNCONFIRMED_SOURCE,
    _NO_DESTINATION,
    _RATE_LIMITED,
)
DROP_REASONS = tuple(key.removeprefix("dropped_") for key in _DROPPED)


@dataclass(frozen=True)
class Limits:
    """Per-allocation rate limits, both directions together; the burst is one second's worth."""

    packets_per_second: float = 50_000.0
    bytes_per_second: float = 100_000_000.0

    def __post_init__(self) -> None:
        for name in ("packets_per_second", "bytes_per_second"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"Limits.{name} must be a positive finite number, not {value!r}")


SILENT_AFTER = 30.0  # seconds: longer than WireGuard's persistent keepalive (25 s here)


class _Pending(NamedTuple):
    address: Address  # as received: compared and returned, never inspected
    time: float
    # Where the handshake was forwarded (None: nowhere). Only an answer from there proves it.
    forwarded_to: Address | None
    # An initiation may also go to a second address (see :attr:`Allocation.also`).
    also_to: Address | None = None


def _mac1_hasher(public_key: bytes) -> hashlib.blake2s:
    # WireGuard whitepaper 5.4.4: mac1 = MAC(HASH("mac1----" || receiver's public key), msg).
    # Keyed once here; each check copies it instead of re-keying.
    key = hashlib.blake2s(b"mac1----" + public_key).digest()
    return hashlib.blake2s(key=key, digest_size=_MAC_SIZE)


def _mac1_pair(public_keys: object) -> tuple[hashlib.blake2s, hashlib.blake2s]:
    """The mac1 hashers of an allocation's two sides; ValueError for keys that cannot be."""
    if not isinstance(public_keys, tuple | list) or len(public_keys) != 2:
        raise ValueError("public_keys must be a pair: (side 0's key, side 1's key)")
    keys = (_check_key(public_keys[0]), _check_key(public_keys[1]))
    if keys[0] == keys[1]:
        # Then a message could be reflected back to its own sender with a valid mac1.
        raise ValueError("the two sides must have different public keys")
    # Indexed by the side whose *messages* are checked: side 0's are for side 1's key.
    return (_mac1_hasher(keys[1]), _mac1_hasher(keys[0]))


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise ValueError(f"a public key must be {KEY_SIZE} raw bytes, not {type(key).__name__}")
    raw = bytes(key)
    if len(raw) != KEY_SIZE:
        raise ValueError(
            f"a public key must be {KEY_SIZE} raw bytes (decode base64 first), not {len(raw)}"
        )
    return raw


def _check_address(address: object) -> Address | None:
    if address is None:
        return None
    # A list is accepted too: that is what a tuple becomes after a JSON round trip.
    if isinstance(address, tuple | list) and len(address) == 2:
        host, port = address
        if (
            isinstance(host, str)
            and isinstance(port, int)
            and not isinstance(port, bool)
            and 0 <= port <= 0xFFFF
        ):
            return (host, port)
    raise ValueError(f"a confirmed address must be None or (host, port), not {address!r}")


def _expire(pending: dict[bytes, _Pending], now: float) -> None:
    # Entries are inserted in time order, so the expired ones are at the front.
    while pending:
        index = next(iter(pending))
        if now - pending[index].time < PENDING_TTL:
            return
        del pending[index]


def _live(pending: dict[bytes, _Pending], index: bytes, now: float) -> _Pending | None:
    entry = pending.get(index)
    if entry is None or now - entry.time >= PENDING_TTL:
        return None
    return entry


class Allocation:
    """One relay allocation: two sides, their public keys, what was learned about their addresses.

    See the module docstring for the rules.
    """

    __slots__ = (
        "_byte_tokens",
        "_bytes_per_second",
        "_confirmed",
        "_counters",
        "_dropped",
        "_forwarded",
        "_forwarded_bytes",
        "_heard",
        "_mac1",
        "_packet_tokens",
        "_packets_per_second",
        "_pending",
        "_refilled",
        "_seen",
        "also",
    )

    def __init__(
        self,
        public_keys: tuple[bytes, bytes],
        limits: Limits = Limits(),  # frozen, so one shared default is safe
        confirmed: tuple[Address | None, Address | None] = (None, None),
    ) -> None:
        mac1 = _mac1_pair(public_keys)
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a Limits, not {type(limits).__name__}")
        if not isinstance(confirmed, tuple | list) or len(confirmed) != 2:
            raise ValueError("confirmed must be a pair: (side 0's address, side 1's address)")

        self._mac1 = mac1
        self._confirmed: list[Address | None] = [_check_address(a) for a in confirmed]
        self._pending: tuple[dict[bytes, _Pending], dict[bytes, _Pending]] = ({}, {})
        # mac1 of the recent handshakes per side, as an insertion-ordered set.
        self._seen: tuple[dict[bytes, None], dict[bytes, None]] = ({}, {})
        self._packets_per_second = float(limits.packets_per_second)
        self._bytes_per_second = float(limits.bytes_per_second)
        self._packet_tokens = self._packets_per_second
        self._byte_tokens = self._bytes_per_second
        # -inf: the first refill tops the (already full) buckets up and sets the clock.
        self._refilled = -math.inf
        # Per-packet tallies since they were last folded into the Counter: plain ints and a plain
        # dict, because a Counter's += costs three times as much (no fast path for subclasses).
        self._forwarded = 0
        self._forwarded_bytes = 0
        self._dropped: dict[str, int] = dict.fromkeys(_DROPPED, 0)
        self._counters: Counter[str] = Counter(dict.fromkeys((FORWARDED, FORWARDED_BYTES), 0))
        self._counters.update(self._dropped)
        # Set by receive(): a second destination for the same datagram, or None. A handshake
        # initiation goes to the other side's confirmed address *and* to where that side's
        # newest handshake came from, when the two differ and the confirmed one has been
        # silent for SILENT_AFTER seconds: after both sides' NAT mappings
        # towards the relay changed (a conntrack flush, a new listen port), each side's
        # confirmed address is stale, and each side's new one is only pending, so without the
        # copy neither handshake would ever reach the other. The copy teaches nothing by
        # itself: only an answer from where it went confirms that address.
        self.also: Address | None = None
        # When each side's confirmed address last sent something accepted (None: not since
        # this allocation began; the first datagram sets both).
        self._heard: list[float | None] = [None, None]

    def rekey(self, public_keys: tuple[bytes, bytes]) -> None:
        """New public keys for the two sides (a key rotation); ValueError changes nothing.

        What was learned stays: the sessions running now keep flowing through the confirmed
        addresses until the new keys' handshakes, checked against the new keys, replace them.
        """
        self._mac1 = _mac1_pair(public_keys)

    def awaits_answer(self, side: int, now: float) -> bool:
        """Whether a handshake of ``side`` waits for the other side's answer to prove an address
        (then transport data *to* ``side`` must come through :meth:`receive`, which confirms)."""
        pending = self._pending[side]
        _expire(pending, now)
        # One that went nowhere (a bootstrap's first) can never be answered: it waits for nothing.
        return any(entry.forwarded_to is not None for entry in pending.values())

    def last_heard(self, side: int) -> float | None:
        """When ``side``'s confirmed address last sent something accepted (monotonic seconds)."""
        return self._heard[side]

    def heard(self, side: int, now: float) -> None:
        """``side``'s confirmed address was heard at ``now`` by another path (the kernel's)."""
        self._heard[side] = now

    @property
    def confirmed(self) -> tuple[Address | None, Address | None]:
        """The proven address of each side's site (None: not known); persist it across restarts."""
        return (self._confirmed[0], self._confirmed[1])

    @property
    def counters(self) -> Counter[str]:
        """The counts: "forwarded", "forwarded_bytes" and "dropped_<reason>" for every reason in
        :data:`DROP_REASONS` (present from the start, at zero).

        Always the same Counter, which the caller may add its own keys to or clear. The
        per-packet tallies are folded into it when this property is read, so read the property
        again rather than keeping the object to watch it.
        """
        counters = self._counters
        if self._forwarded:
            counters[FORWARDED] += self._forwarded
            counters[FORWARDED_BYTES] += self._forwarded_bytes
            self._forwarded = self._forwarded_bytes = 0
        dropped = self._dropped
        for key, count in dropped.items():
            if count:
                counters[key] += count
                dropped[key] = 0
        return counters

    def receive(self, side: int, source: Address, datagram: bytes, now: float) -> Address | None:
        """Where to send `datagram` out of the other side's port, or None when dropped (counted).

        `side` is the port it arrived on (0 or 1; ValueError otherwise), `source` the address it
        came from, `now` monotonic seconds. Never raises on any datagram or source.
        """
        # Normalised to exact ints, as they index lists below (0.0 == 0, but is no index).
        if side == 0:
            side, other = 0, 1
        elif side == 1:
            side, other = 1, 0
        else:
            raise ValueError(f"side must be 0 or 1, not {side!r}")
        self.also = None
        heard = self._heard
        if heard[0] is None:
            heard[0] = heard[1] = now
        size = len(datagram)
        # The per-packet path: transport data between confirmed addresses.
        # No alignment check: WireGuard pads to 16 bytes only up to the MTU, so a full-size
        # packet (MTU 1420: 1452 bytes) is not a multiple of 16.
        if datagram.startswith(_TRANSPORT) and size >= _TRANSPORT_MIN_SIZE:
            if source != self._confirmed[side]:
                self._dropped[_UNCONFIRMED_SOURCE] += 1
                return None
            heard[side] = now
            if self._pending[other]:
                return self._transport_confirming(other, source, datagram, size, now)
            destination = self._confirmed[other]
            if destination is None:
                self._dropped[_NO_DESTINATION] += 1
                return None
            # _take(), inlined: a method call here would cost as much as all the arithmetic.
            if now > self._refilled:
                elapsed = now - self._refilled
                self._refilled = now
                tokens = self._packet_tokens + elapsed * self._packets_per_second
                self._packet_tokens = (
                    tokens if tokens < self._packets_per_second else self._packets_per_second
                )
                tokens = self._byte_tokens + elapsed * self._bytes_per_second
                self._byte_tokens = (
                    tokens if tokens < self._bytes_per_second else self._bytes_per_second
                )
            if self._packet_tokens < 1.0 or self._byte_tokens < size:
                self._dropped[_RATE_LIMITED] += 1
                return None
            self._packet_tokens -= 1.0
            self._byte_tokens -= size
            self._forwarded += 1
            self._forwarded_bytes += size
            return destination
        if size == _INITIATION_SIZE and datagram.startswith(_INITIATION):
            return self._initiation(side, other, source, datagram, now)
        if size == _RESPONSE_SIZE and datagram.startswith(_RESPONSE):
            return self._response(side, other, source, datagram, now)
        if size == _COOKIE_REPLY_SIZE and datagram.startswith(_COOKIE_REPLY):
            return self._cookie_reply(side, other, source, datagram, now)
        if datagram == MAPPING_KEEPALIVE:
            # A site's sidecar holds its NAT mapping towards this port open while the pair is
            # on a direct path, so that falling back finds it as it was: not forwarded.
            self._counters[KEEPALIVES] += 1
            return None
        self._dropped[_MALFORMED] += 1
        return None

    # -- the rest runs once per handshake, not per packet --------------------------------------

    def _take(self, size: int, now: float) -> bool:
        """Take one packet and `size` bytes from the buckets, if both have enough."""
        if now > self._refilled:
            elapsed = now - self._refilled
            self._refilled = now
            tokens = self._packet_tokens + elapsed * self._packets_per_second
            self._packet_tokens = min(tokens, self._packets_per_second)
            tokens = self._byte_tokens + elapsed * self._bytes_per_second
            self._byte_tokens = min(tokens, self._bytes_per_second)
        if self._packet_tokens < 1.0 or self._byte_tokens < size:
            return False
        self._packet_tokens -= 1.0
        self._byte_tokens -= size
        return True

    def _forward(self, destination: Address, size: int) -> Address:
        self._forwarded += 1
        self._forwarded_bytes += size
        return destination

    def _transport_confirming(
        self, other: int, source: Address, datagram: bytes, size: int, now: float
    ) -> Address | None:
        """Type 4 from a confirmed address while the other side has pending handshakes."""
        pending = self._pending[other]
        _expire(pending, now)
        index = datagram[4:8]
        entry = _live(pending, index, now)
        # The initiator sends data only after it checked the response that carried this index,
        # and that response was delivered to this very address: its sender is proven.
        proven = entry is not None and entry.forwarded_to == source
        destination = entry.address if entry is not None and proven else self._confirmed[other]
        if destination is None:
            self._dropped[_NO_DESTINATION] += 1
            return None
        if not self._take(size, now):
            self._dropped[_RATE_LIMITED] += 1
            return None
        if proven:
            self._confirmed[other] = destination
            self._heard[other] = now
            del pending[index]
        return self._forward(destination, size)

    def _handshake_ok(self, side: int, datagram: bytes) -> bytes | None:
        """The message's mac1 if it verifies and is not a replay; else None (counted)."""
        size = len(datagram)
        hasher = self._mac1[side].copy()
        hasher.update(datagram[: size - 2 * _MAC_SIZE])
        mac1 = datagram[size - 2 * _MAC_SIZE : size - _MAC_SIZE]
        if not hmac.compare_digest(hasher.digest(), mac1):
            self._dropped[_BAD_MAC1] += 1
            return None
        # mac1 is a keyed 128-bit hash of everything before it, so it identifies the message;
        # keying the replay window on it also catches a copy with only mac2 changed.
        if mac1 in self._seen[side]:
            self._dropped[_REPLAY] += 1
            return None
        return mac1

    def _remember(self, side: int, mac1: bytes, index: bytes, entry: _Pending) -> None:
        seen = self._seen[side]
        seen[mac1] = None
        if len(seen) > REPLAY_WINDOW:
            del seen[next(iter(seen))]
        pending = self._pending[side]
        if len(pending) >= MAX_PENDING:
            del pending[next(iter(pending))]
        pending[index] = entry

    def _fresh_index(self, side: int, datagram: bytes, now: float) -> bytes | None:
        """The handshake's sender index, or None (counted) if it is still pending on this side."""
        pending = self._pending[side]
        _expire(pending, now)
        index = datagram[4:8]
        if index in pending:
            self._dropped[_DUPLICATE_INDEX] += 1
            return None
        return index

    def _silent(self, side: int, now: float) -> bool:
        """Nothing from ``side``'s confirmed address for longer than WireGuard's persistent
        keepalive: the address is probably stale (only then does an initiation get a copy,
        so a forged handshake can never divert a live site's handshakes)."""
        heard = self._heard[side]
        return heard is not None and now - heard > SILENT_AFTER

    def _initiation(
        self, side: int, other: int, source: Address, datagram: bytes, now: float
    ) -> Address | None:
        mac1 = self._handshake_ok(side, datagram)
        if mac1 is None:
            return None
        index = self._fresh_index(side, datagram, now)
        if index is None:
            return None
        destination = self._confirmed[other]
        pending = self._pending[other]
        _expire(pending, now)
        newest = next(reversed(pending.values())).address if pending else None
        also = None
        if destination is None:
            # Bootstrap: the other side is not proven yet, try where it last sent a handshake.
            destination = newest
        elif newest is not None and newest != destination and self._silent(other, now):
            also = newest
        size = len(datagram)
        if destination is not None and not self._take(size, now):
            self._dropped[_RATE_LIMITED] += 1
            return None
        # Remembered even when it goes nowhere: it is the destination of the other side's.
        self._remember(side, mac1, index, _Pending(source, now, destination, also))
        self.also = also
        if destination is None:
            self._dropped[_NO_DESTINATION] += 1
            return None
        return self._forward(destination, size)

    def _response(
        self, side: int, other: int, source: Address, datagram: bytes, now: float
    ) -> Address | None:
        mac1 = self._handshake_ok(side, datagram)
        if mac1 is None:
            return None
        index = self._fresh_index(side, datagram, now)
        if index is None:
            return None
        pending = self._pending[other]
        _expire(pending, now)
        receiver = datagram[8:12]
        entry = _live(pending, receiver, now)
        # The initiation was delivered to exactly this address and is answered from it, so the
        # address it came from is the initiator's. An answer from anywhere else proves nothing.
        answered = entry is not None and source in (
            (entry.forwarded_to, entry.also_to) if entry.also_to else (entry.forwarded_to,)
        )
        destination = entry.address if entry is not None and answered else self._confirmed[other]
        size = len(datagram)
        if destination is not None and not self._take(size, now):
            self._dropped[_RATE_LIMITED] += 1
            return None
        if answered:
            self._confirmed[other] = destination
            self._heard[other] = now
            del pending[receiver]
        self._remember(side, mac1, index, _Pending(source, now, destination))
        if destination is None:
            self._dropped[_NO_DESTINATION] += 1
            return None
        return self._forward(destination, size)

    def _cookie_reply(
        self, side: int, other: int, source: Address, datagram: bytes, now: float
    ) -> Address | None:
        if source != self._confirmed[side]:
            pending = self._pending[side]
            _expire(pending, now)
            if not any(entry.address == source for entry in pending.values()):
                self._dropped[_UNCONFIRMED_SOURCE] += 1
                return None
        # It answers the other side's handshake with this sender index; send it where that came
        # from (the other side may not be confirmed yet).
        entry = _live(self._pending[other], datagram[4:8], now)
        destination = entry.address if entry is not None else self._confirmed[other]
        if destination is None:
            self._dropped[_NO_DESTINATION] += 1
            return None
        size = len(datagram)
        if not self._take(size, now):
            self._dropped[_RATE_LIMITED] += 1
            return None
        return self._forward(destination, size)
