"""What the fuzz targets share. No meshwright import here: a module imported before
``atheris.instrument_imports()`` would stay uninstrumented, so the targets import this after.

The STUN repairs below are written from RFC 8489 with zlib alone, independently of
meshwright.wire.stun: a target that repaired its input with the codec under test would only
ever check the codec against itself.
"""

from __future__ import annotations

import os
import resource
import struct
import sys
import zlib
from collections.abc import Callable

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
FINGERPRINT = 0x8028
_FINGERPRINT_XOR = 0x5354554E
STUN_HEADER_SIZE = 20
# Headroom for one target process above what it has mapped when fuzzing starts. libFuzzer's
# -malloc_limit_mb needs a sanitizer's malloc hooks, which a Python process does not have, so
# the address-space limit is what makes one huge allocation fail the run (as a MemoryError,
# which atheris reports as a crash); -rss_limit_mb catches slow growth.
ALLOCATION_HEADROOM_MB = int(os.environ.get("MESHWRIGHT_FUZZ_HEADROOM_MB", "512"))


def limit_address_space(headroom_mb: int = ALLOCATION_HEADROOM_MB) -> None:
    """Cap this process's address space at what it maps now plus ``headroom_mb``."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = kib * 1024 + headroom_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    """Fuzz ``test_one_input`` with libFuzzer's flags from the command line, the address space
    capped first (every target's ``__main__``)."""
    import atheris

    limit_address_space()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def stun_fix_length(message: bytes) -> bytes:
    """``message`` with its body padded to 4 bytes and the header's length field matching."""
    if len(message) < STUN_HEADER_SIZE:
        return message
    message = pad4(message)[: STUN_HEADER_SIZE + 0xFFFC]
    length = len(message) - STUN_HEADER_SIZE
    return message[:2] + length.to_bytes(2, "big") + message[4:]


def stun_fingerprint(message: bytes) -> bytes:
    """``message`` with a correct FINGERPRINT last: its last one rewritten, or one appended."""
    if len(message) < STUN_HEADER_SIZE:
        return message
    tail = message[-8:-4] if len(message) >= STUN_HEADER_SIZE + 8 else b""
    if tail == struct.pack("!HH", FINGERPRINT, 4):
        message = message[:-8]
    message = pad4(message)[: STUN_HEADER_SIZE + 0xFFFC - 8]
    # The length field counts FINGERPRINT itself, which the CRC covers the header of.
    length = len(message) - STUN_HEADER_SIZE + 8
    message = message[:2] + length.to_bytes(2, "big") + message[4:]
    crc = zlib.crc32(message) ^ _FINGERPRINT_XOR
    return message + struct.pack("!HHI", FINGERPRINT, 4, crc)


def repair_stun(flags: int, message: bytes) -> bytes:
    """Help mutations reach the attribute parser: flag bit 0 puts the magic cookie in, bit 1
    fixes the length field, bit 2 makes FINGERPRINT (added if missing) match."""
    if len(message) >= 8 and flags & 1:
        message = message[:4] + MAGIC_COOKIE + message[8:]
    if flags & 2:
        message = stun_fix_length(message)
    if flags & 4:
        message = stun_fingerprint(message)
    return message


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled; 0 counts as 1)."""
    if not sizes:
        return [data] if data else []
    pieces, position, turn = [], 0, 0
    while position < len(data):
        size = max(1, sizes[turn % len(sizes)])
        pieces.append(data[position : position + size])
        position += size
        turn += 1
    return pieces
