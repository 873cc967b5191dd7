"""WireGuard messages for the relay tests: the real formats, random bytes where the real ones are
encrypted, mac1 computed independently of the modules under test."""

from __future__ import annotations

import hashlib
import random
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

_RNG = random.Random(20240601)


def mac1(receiver_public_key: bytes, body: bytes) -> bytes:
    """WireGuard's mac1 over `body` (everything before mac1), for the given receiver."""
    key = hashlib.blake2s(b"mac1----" + receiver_public_key).digest()
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


def initiation(
    receiver_key: bytes, sender_index: int, rng: random.Random = _RNG, mac2: bytes = bytes(16)
) -> bytes:
    """Type 1: type, reserved, sender_index, ephemeral(32), static(48), timestamp(28), macs."""
    body = struct.pack("<BxxxI", 1, sender_index) + rng.randbytes(32 + 48 + 28)
    message = body + mac1(receiver_key, body) + mac2
    assert len(message) == 148
    return message


def response(
    receiver_key: bytes, sender_index: int, receiver_index: int, rng: random.Random = _RNG
) -> bytes:
    """Type 2: type, reserved, sender_index, receiver_index, ephemeral(32), empty(16), macs."""
    body = struct.pack("<BxxxII", 2, sender_index, receiver_index) + rng.randbytes(32 + 16)
    message = body + mac1(receiver_key, body) + bytes(16)
    assert len(message) == 92
    return message


def cookie_reply(receiver_index: int, rng: random.Random = _RNG) -> bytes:
    """Type 3: type, reserved, receiver_index, nonce(24), encrypted cookie(32)."""
    message = struct.pack("<BxxxI", 3, receiver_index) + rng.randbytes(24 + 32)
    assert len(message) == 64
    return message


def transport(
    receiver_index: int, counter: int = 0, payload: int = 16, rng: random.Random = _RNG
) -> bytes:
    """Type 4: type, reserved, receiver_index, counter(8), encrypted packet (payload + 16 tag).

    WireGuard pads to 16 bytes, but never beyond the MTU: a full-size packet need not be
    aligned (MTU 1420 gives 1420 + 16 + 16 = 1452 bytes)."""
    return struct.pack("<BxxxIQ", 4, receiver_index, counter) + rng.randbytes(payload)


def with_reserved(message: bytes, position: int, receiver_key: bytes | None) -> bytes:
    """`message` with reserved byte `position` set, and mac1 recomputed if it has one."""
    changed = bytearray(message)
    changed[position] = 0x80
    if receiver_key is not None:
        body = bytes(changed[: len(changed) - 32])
        changed[len(changed) - 32 : len(changed) - 16] = mac1(receiver_key, body)
    return bytes(changed)


def flip_bit(message: bytes, bit: int) -> bytes:
    changed = bytearray(message)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


def public_key() -> bytes:
    """A real X25519 public key (32 raw bytes), as `wg pubkey` would give, decoded."""
    return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
