"""WireGuard's message layout, mac1, rate limits and input checks, for the relay.

Pure and standard library only, like :mod:`meshwright.relay.sites`, the per-site core that
decides with them, and :mod:`meshwright.relay.kernel`, which derives rules from that core.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

__all__ = [
    "KEY_SIZE",
    "MAPPING_KEEPALIVE",
    "Address",
    "Buckets",
    "Limits",
    "check_address",
    "check_key",
    "mac1_hasher",
]

Address = tuple[str, int]

KEY_SIZE = 32

# The first four bytes of each message: its type, then three reserved zero bytes.
INITIATION = b"\x01\x00\x00\x00"
RESPONSE = b"\x02\x00\x00\x00"
COOKIE_REPLY = b"\x03\x00\x00\x00"
TRANSPORT = b"\x04\x00\x00\x00"
INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_MIN_SIZE = 32
MAC_SIZE = 16

# What a site's sidecar sends to its relay port while its pair is direct (the probe magic of
# meshwright.site.sidecar.messages, and nothing else): never forwarded, only counted.
MAPPING_KEEPALIVE = b"\xffMWP"

# Counter names.
FORWARDED = "forwarded"
FORWARDED_BYTES = "forwarded_bytes"
KEEPALIVES = "keepalives"


@dataclass(frozen=True)
class Limits:
    """Token-bucket rate limits on what the relay sends for one site (what arrived on its
    port); the burst is one second's worth."""

    packets_per_second: float = 50_000.0
    bytes_per_second: float = 100_000_000.0

    def __post_init__(self) -> None:
        for name in ("packets_per_second", "bytes_per_second"):
            check_positive(f"Limits.{name}", getattr(self, name))


def check_positive(name: str, value: object) -> None:
    """ValueError unless ``value`` is a positive finite int or float (bool is not a number)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")


class Buckets:
    """Two token buckets, packets and bytes, each full at one second's worth."""

    __slots__ = (
        "byte_tokens",
        "bytes_per_second",
        "packet_tokens",
        "packets_per_second",
        "refilled",
    )

    def __init__(self, limits: Limits) -> None:
        self.packets_per_second = float(limits.packets_per_second)
        self.bytes_per_second = float(limits.bytes_per_second)
        self.packet_tokens = self.packets_per_second
        self.byte_tokens = self.bytes_per_second
        # -inf: the first refill tops the (already full) buckets up and sets the clock.
        self.refilled = -math.inf

    def take(self, size: int, now: float) -> bool:
        """Take one packet and ``size`` bytes, if both buckets have enough."""
        if now > self.refilled:
            elapsed = now - self.refilled
            self.refilled = now
            tokens = self.packet_tokens + elapsed * self.packets_per_second
            self.packet_tokens = min(tokens, self.packets_per_second)
            tokens = self.byte_tokens + elapsed * self.bytes_per_second
            self.byte_tokens = min(tokens, self.bytes_per_second)
        if self.packet_tokens < 1.0 or self.byte_tokens < size:
            return False
        self.packet_tokens -= 1.0
        self.byte_tokens -= size
        return True


def mac1_hasher(public_key: bytes) -> hashlib.blake2s:
    """The keyed hash that computes mac1 of messages *to* ``public_key``'s owner.

    WireGuard whitepaper 5.4.4: mac1 = MAC(HASH("mac1----" || receiver's public key), msg).
    Keyed once; each check copies it instead of re-keying.
    """
    key = hashlib.blake2s(b"mac1----" + public_key).digest()
    return hashlib.blake2s(key=key, digest_size=MAC_SIZE)


def check_key(key: object) -> bytes:
    """A WireGuard public key as 32 raw bytes; ValueError for anything else."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise ValueError(f"a public key must be {KEY_SIZE} raw bytes, not {type(key).__name__}")
    raw = bytes(key)
    if len(raw) != KEY_SIZE:
        raise ValueError(
            f"a public key must be {KEY_SIZE} raw bytes (decode base64 first), not {len(raw)}"
        )
    return raw


def check_address(address: object) -> Address | None:
    """A ``(host, port)`` or None; ValueError for anything else."""
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
