"""The sidecar's two wire formats, pure: control messages between sidecars, and path probes.

Control messages travel between two sites' sidecars *inside* WireGuard, as UDP between their
overlay addresses (through the relayed tunnel before any direct path exists), so WireGuard has
already authenticated and encrypted them: the receiver checks only that the overlay source
address is the named peer's. They are JSON objects::

    {"v": 1, "type": "offer", "from": "easy1", "session": "<16 hex>", "key": "<64 hex>",
     "candidates": ["10.0.0.2:51820", "198.51.100.21:51820"], "start_at": 1764526000.25}
    {"v": 1, "type": "answer", "from": "easy2", "session": ..., "candidates": [...]}
    {"v": 1, "type": "nominate", "from": "easy1", "session": ..., "use": "198.51.100.21:51820"}
    {"v": 1, "type": "fallback", "from": "easy1", "session": ...}
    {"v": 1, "type": "hello", "from": "easy2", "session": "<16 hex: this run of the sidecar>"}
    {"v": 1, "type": "bye", "from": "easy2", "session": "<16 hex: this run of the sidecar>"}
    {"v": 1, "type": "watch", "from": "easy1", "session": ..., "key": "<64 hex>"}

A sidecar says ``hello`` to every peer when it starts: it has just put its punch peers back on
their relays, so the peer follows and (if it controls the pair) offers at once. It says ``bye``
when it stops: a peer that would start probing alone drops its attempt instead (its pings
would reach this site's NAT before any of this site's own and leave a conntrack clash behind).
``watch`` gives a pair that starts on its direct path (the plan's ``direct`` mode, no offer)
the session and probe key that its check pings use; the controlling side sends it.

Probes travel outside WireGuard, from and to the WireGuard listen port, so they must
authenticate themselves: each carries an HMAC-SHA256 (first 16 bytes) keyed by the attempt's
session key, a fresh random 32-byte key that only the two sidecars know (it went in the offer or
the watch, inside the tunnel). Binary, big-endian::

    magic 4 (ff 4d 57 50)  kind 1 (1 ping, 2 pong)  zero 1  session 8  seq 4
    pong only: observed port 2, observed address family 1 (4 or 6), address 4 or 16
    mac 16

The magic's first byte 0xff is neither a WireGuard message type (1 to 4, then three zero bytes)
nor STUN (its first two bits are zero), so the three never mix on one port. A pong tells the
pinger where the ping came from as the ponger saw it (like a STUN response), so the pinger
learns its own mapping towards that peer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import string
import struct
from dataclasses import dataclass, field
from typing import Any

from meshwright.wire.endpoint import EndpointError, format_endpoint, parse_endpoint

__all__ = [
    "CONTROL_TYPES",
    "MAGIC",
    "PING",
    "PONG",
    "Control",
    "MessageError",
    "Probe",
    "decode_control",
    "decode_probe",
    "encode_control",
    "encode_probe",
]

Address = tuple[str, int]

MAGIC = b"\xffMWP"
PING, PONG = 1, 2
MAC_SIZE = 16
SESSION_SIZE = 8
KEY_SIZE = 32
CONTROL_VERSION = 1
CONTROL_TYPES = ("offer", "answer", "nominate", "fallback", "hello", "bye", "watch")
MAX_CANDIDATES = 16
MAX_CONTROL_SIZE = 4096
_HEAD = struct.Struct(">4sBB8sI")


class MessageError(ValueError):
    """A datagram that is not a well-formed message (or not authentic): drop and count it."""


@dataclass(frozen=True)
class Probe:
    kind: int  # PING or PONG
    session: bytes
    seq: int
    observed: Address | None = None  # pong only: the ping's source as the ponger saw it


@dataclass(frozen=True)
class Control:
    type: str
    sender: str
    session: bytes
    key: bytes | None = None  # offer and watch only
    candidates: tuple[Address, ...] = field(default_factory=tuple)  # offer and answer
    start_at: float | None = None  # offer and answer: the wall-clock time both start probing
    use: Address | None = None  # nominate only: the endpoint the receiver uses for the sender
    # offer and answer, optional: the sender sidecar's run (its hellos' session), so that a
    # hello from the run a pair just upgraded with is not taken for a restart
    run: bytes | None = None


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_SIZE]


def encode_probe(probe: Probe, key: bytes) -> bytes:
    body = _HEAD.pack(MAGIC, probe.kind, 0, probe.session, probe.seq)
    if probe.kind == PONG:
        if probe.observed is None:
            raise ValueError("a pong carries the observed address")
        host, port = probe.observed
        packed = ipaddress.ip_address(host).packed
        body += struct.pack(">HB", port, 4 if len(packed) == 4 else 6) + packed
    return body + _mac(key, body)


def probe_session(datagram: bytes) -> bytes | None:
    """The session of something that looks like a probe (to find its key), else None."""
    if len(datagram) < _HEAD.size + MAC_SIZE or datagram[:4] != MAGIC:
        return None
    return datagram[6:14]


def decode_probe(datagram: bytes, key: bytes) -> Probe:
    """A probe whose MAC verifies with ``key``; MessageError otherwise."""
    if len(datagram) < _HEAD.size + MAC_SIZE or datagram[:4] != MAGIC:
        raise MessageError("not a probe")
    body, mac = datagram[:-MAC_SIZE], datagram[-MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise MessageError("bad mac")
    _, kind, zero, session, seq = _HEAD.unpack_from(body)
    rest = body[_HEAD.size :]
    if zero != 0 or kind not in (PING, PONG):
        raise MessageError("bad header")
    if kind == PING:
        if rest:
            raise MessageError("trailing bytes")
        return Probe(PING, session, seq)
    if len(rest) < 3:
        raise MessageError("short pong")
    port, family = struct.unpack_from(">HB", rest)
    size = {4: 4, 6: 16}.get(family)
    if size is None or len(rest) != 3 + size or port == 0:
        raise MessageError("bad observed address")
    host = str(ipaddress.ip_address(rest[3:]))
    return Probe(PONG, session, seq, (host, port))


def encode_control(message: Control) -> bytes:
    data: dict[str, Any] = {
        "v": CONTROL_VERSION,
        "type": message.type,
        "from": message.sender,
        "session": message.session.hex(),
    }
    if message.key is not None:
        data["key"] = message.key.hex()
    if message.type in ("offer", "answer"):
        data["candidates"] = [format_endpoint(*c) for c in message.candidates]
    if message.start_at is not None:
        data["start_at"] = message.start_at
    if message.use is not None:
        data["use"] = format_endpoint(*message.use)
    if message.run is not None and message.type in ("offer", "answer"):
        data["run"] = message.run.hex()
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _hex(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size:
        raise MessageError(f"{what}: not {size} bytes of hex")
    # Only hex digits: bytes.fromhex would skip white space and give a shorter value.
    if not all(c in string.hexdigits for c in value):
        raise MessageError(f"{what}: not hex")
    return bytes.fromhex(value)


def _address(value: object, what: str) -> Address:
    if not isinstance(value, str):
        raise MessageError(f"{what}: not a string")
    try:
        endpoint = parse_endpoint(value)
    except EndpointError:
        raise MessageError(f"{what}: not an address and port") from None
    return endpoint.host, endpoint.port


def decode_control(datagram: bytes) -> Control:
    """A control message; MessageError names what is wrong with anything else."""
    if len(datagram) > MAX_CONTROL_SIZE:
        raise MessageError("too large")
    try:
        data = json.loads(datagram)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise MessageError("not JSON") from None
    if not isinstance(data, dict) or type(data.get("v")) is not int or data["v"] != CONTROL_VERSION:
        raise MessageError("not a version 1 control message")
    kind, sender = data.get("type"), data.get("from")
    if kind not in CONTROL_TYPES:
        raise MessageError(f"unknown type {kind!r}")
    if not isinstance(sender, str) or not sender:
        raise MessageError("from: not a name")
    session = _hex(data.get("session"), SESSION_SIZE, "session")
    key = _hex(data.get("key"), KEY_SIZE, "key") if kind in ("offer", "watch") else None
    candidates: tuple[Address, ...] = ()
    if kind in ("offer", "answer"):
        raw = data.get("candidates")
        if not isinstance(raw, list) or len(raw) > MAX_CANDIDATES:
            raise MessageError("candidates: not a list of at most 16")
        candidates = tuple(_address(c, "candidate") for c in raw)
    start_at = None
    # Required in an offer; an answer repeats it, or moves it later when the offer came late.
    if kind == "offer" or (kind == "answer" and "start_at" in data):
        start_at = data.get("start_at")
        if isinstance(start_at, bool) or not isinstance(start_at, int | float):
            raise MessageError("start_at: not a time")
        try:
            start_at = float(start_at)
        except OverflowError:
            raise MessageError("start_at: not a time") from None
        if not math.isfinite(start_at):
            raise MessageError("start_at: not a time")
    use = _address(data.get("use"), "use") if kind == "nominate" else None
    run = None
    if kind in ("offer", "answer") and "run" in data:
        run = _hex(data["run"], SESSION_SIZE, "run")
    message = Control(kind, sender, session, key, candidates, start_at, use, run)
    # The limit holds for the message as encode_control writes it too, so that whatever is
    # accepted can be written again and accepted. Its output can be longer than what came in:
    # it escapes non-ASCII (2 bytes of UTF-8 become a 6-byte \uXXXX) and writes addresses
    # canonically (1::1:1:1:1:1:1 as 1:0:1:1:1:1:1:1). Found writing its fuzz target.
    if len(encode_control(message)) > MAX_CONTROL_SIZE:
        raise MessageError("too large")
    return message
