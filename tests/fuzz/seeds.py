"""Seed corpora for the fuzz targets, made from real messages: the project's own encoders, the
RFC 5769 test vectors and the bytes real STUN clients send. Generated rather than committed,
so they follow the encoders when those change.

    .venv/bin/python tests/fuzz/seeds.py OUT_DIR [TARGET ...]

writes OUT_DIR/<target>/seed-NNN for every target (stun, stun_tcp, relay_sites, frames,
sidecar_messages, wgstun), or only those named. Each seed is in its target's input format
(see the docstring of tests/fuzz/fuzz_<target>.py): a flags byte or two, then the message.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from meshwright.relay.messages import MAPPING_KEEPALIVE
from meshwright.site.sidecar.messages import (
    PING,
    PONG,
    Control,
    Probe,
    encode_control,
    encode_probe,
)
from meshwright.wire import frames, stun

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests/data/rfc5769.json").read_text("utf-8"))
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
CLASSIC_TXID = bytes.fromhex("0123456789abcdef0011223344556677")

# What real clients put on the wire (transaction ids fixed):
REAL_CLIENT_REQUESTS = [
    # pystun3 and stund's stun-client (RFC 3489): no cookie, a 16-byte id; with and without
    # CHANGE-REQUEST (change IP and port: 0x06).
    bytes.fromhex("00010000" + CLASSIC_TXID.hex()),
    bytes.fromhex("00010008" + CLASSIC_TXID.hex() + "0003000400000006"),
    bytes.fromhex("00010008" + CLASSIC_TXID.hex() + "0003000400000000"),
    # A plain RFC 8489 Binding request, the header alone: a basic mapping query.
    bytes.fromhex("000100002112a442" + TXID.hex()),
    # RFC 5780 discovery as coturn's turnutils_stunclient does it: CHANGE-REQUEST (change
    # port) and RESPONSE-PORT.
    bytes.fromhex("000100102112a442" + TXID.hex() + "00030004000000020027000412340000"),
]


def vector(name: str) -> bytes:
    return bytes.fromhex("".join(VECTORS[name]["hex"]))


def stun_messages() -> list[bytes]:
    """Real STUN messages: requests, responses and errors, RFC 8489 and RFC 3489."""
    messages = [vector(n) for n in VECTORS if not n.startswith("_")]
    messages += REAL_CLIENT_REQUESTS
    messages.append(stun.binding_request(TXID, change_ip=True, change_port=True, software="fz"))
    messages.append(stun.binding_request(TXID, fingerprint=False))
    messages.append(
        stun.binding_success(
            TXID,
            ("198.51.100.7", 51820),
            response_origin=("2001:db8::10", 3478),
            other_address=("192.0.2.11", 3479),
            software="meshwright",
            also_mapped=[("198.51.100.7", 40000)],
        )
    )
    messages.append(
        stun.binding_success(
            CLASSIC_TXID, ("198.51.100.7", 51820), response_origin=("192.0.2.1", 3478)
        )
    )
    messages.append(stun.binding_error(TXID, 420, "Unknown Attribute", software="meshwright"))
    messages.append(stun.binding_error(CLASSIC_TXID, 400, "Bad Request"))
    unknown = stun.Message(
        stun.BINDING,
        stun.REQUEST,
        TXID,
        (
            stun.Attribute(0x0031, b""),
            stun.Attribute(stun.PADDING, bytes(8)),
            stun.Attribute(stun.USERNAME, b"user:name"),
            stun.Attribute(stun.REALM, b"realm"),
            stun.Attribute(stun.NONCE, b"n0nce"),
        ),
    )
    messages.append(stun.encode(unknown, integrity_key=b"k", integrity_sha256_key=b"k"))
    indication = stun.Message(stun.BINDING, stun.INDICATION, TXID)
    messages.append(stun.encode(indication, fingerprint=True))
    return messages


def stun_seeds() -> list[bytes]:
    # Flags: 0x00 as is over UDP, 0x08 decoded classic-aware, 0x30 IPv6 on two addresses,
    # 0x90 over TCP on two addresses, 0x07 with every repair.
    return [bytes([flags]) + m for m in stun_messages() for flags in (0x00, 0x08, 0x30, 0x90, 0x07)]


def stun_tcp_seeds() -> list[bytes]:
    requests = [m for m in stun_messages() if m[4:8] == stun.MAGIC_COOKIE.to_bytes(4, "big")]
    stream = b"".join(requests)
    return [
        bytes([0]) + stream,
        bytes([3, 0, 19, 200]) + stream,  # pieces of 1, 20 and 1168 bytes, cycled
        bytes([1, 6]) + requests[0] + b"\x16\x03\x01\x00\x05",  # then bytes that are not STUN
        bytes([0]) + REAL_CLIENT_REQUESTS[0],  # RFC 3489 over TCP: closed
    ]


def relay_sites_seeds() -> list[bytes]:
    # Operation bytes: site | kind << 2 | source << 5 | time step 0x80 (fuzz_relay_sites);
    # sites a b c d = 0 1 2 3; sources: 0 home, 1 roamed, 2 a stranger, 3 the next site's home.
    def op(site: int, kind: int, source: int, *args: int, step: int | None = None) -> bytes:
        head = site | kind << 2 | source << 5 | (0x80 if step is not None else 0)
        return bytes([head, *([step] if step is not None else []), *args])

    a, b, c, d = 0, 1, 2, 3
    home, roamed, evil = 0, 1, 2
    # Handshakes: the receiver site in the choice byte, then the indices, then the fill byte.
    bootstrap = (
        op(a, 1, home, b, 0xA, 1)  # a's initiation to b: a claim, nowhere to go yet
        + op(b, 1, home, a, 0xB, 2, step=1)  # b's initiation goes to a's claim
        + op(a, 2, home, b, 0xC, 0xB, 3, step=1)  # a answers b's: b confirmed
        + op(b, 4, home, 0xC, 16, 4, step=1)  # b's data for a's index: a confirmed
        + op(a, 4, home, 0xB, 100, 5)  # data both ways
        + op(b, 4, home, 0xC, 16, 6)
    )
    # c joins: its initiation to a goes to a's confirmed address, a's answer proves c.
    third = (
        op(c, 1, home, a, 0x1, 7, step=1)
        + op(a, 2, home, c, 0x2, 0x1, 8)
        + op(c, 4, home, 0x2, 10, 9)
        + op(a, 4, home, 0x1, 10, 10)
        + op(a, 4, home, 0xB, 10, 11)  # a's sessions with b and c, told apart by index
    )
    # d, the UDP-blocked site, from its pseudo-address.
    blocked = op(d, 1, home, b, 0x3, 12) + op(b, 2, home, d, 0x4, 0x3, 13) + op(d, 4, home, 4, 9)
    garbage = (
        op(a, 4, evil, 0xB, 16, 14)  # data from a stranger
        + op(b, 3, evil, 0xA, 15)  # a cookie reply from a stranger
        + op(a, 5, evil, 1, 0xD, 16)  # an initiation with a bad mac1
        + op(a, 7, evil, 0)  # the last good handshake replayed from elsewhere
        + op(b, 6, evil)  # a mapping keepalive
        + op(c, 0, evil, 8, *b"\x01\x00\x00\x00abcd")  # raw bytes
    )
    # a roams: its handshake from a new address, answered after b's persistent keepalive.
    roam = op(a, 1, roamed, b, 0xE, 17, step=200) + op(b, 2, home, a, 0xF, 0xE, 18, step=1)
    # More handshakes than the relay keeps: pending claims, sessions, the replay window.
    flood = b"".join(op(a, 1, evil, b, i % 16, i // 16) for i in range(300))
    return [
        bytes([0]) + bootstrap,
        bytes([0]) + flood,
        bytes([0]) + bootstrap + third + blocked + garbage + roam,
        bytes([0b0100]) + third + garbage + roam,  # every site confirmed from the start
        bytes([0b0101]) + bootstrap + bootstrap,  # tight limits
        bytes([0b1000]) + roam + bootstrap + third,
    ]


def frames_seeds() -> list[bytes]:
    stream = (
        frames.encode(40000, bytes([4, 0, 0, 0]) + bytes(28))
        + frames.KEEPALIVE
        + frames.encode(40001, bytes(range(256)) * 4)
        + frames.encode(65535, b"x" * frames.MAX_PAYLOAD)
    )
    tls_hello = bytes.fromhex("16030100f4010000f00303") + bytes(32)
    return [
        bytes([0]) + stream,
        bytes([3 << 2, 0, 3, 130]) + stream,  # pieces of 1, 4 and 48 bytes, cycled
        bytes([1 << 2 | 0x40, 200]) + stream,  # big pieces, reused buffers
        bytes([2]) + stream,  # max_payload 16: fails at the second frame
        bytes([0]) + stream[:-1],  # the last frame incomplete
        bytes([0]) + frames.encode(1, b"a") + b"\x00\x01\x00\x00",  # a zero length
        bytes([0]) + tls_hello,
        bytes([0]) + stun.binding_request(TXID),
    ]


SESSION = bytes.fromhex("0011223344556677")
KEY = bytes(range(32))  # the fuzz target's probe key


def sidecar_messages_seeds() -> list[bytes]:
    controls = [
        Control(
            "offer",
            "easy1",
            SESSION,
            bytes(range(32)),
            (("10.0.0.2", 51820), ("198.51.100.21", 51820), ("2001:db8::21", 51820)),
            1764526000.25,
        ),
        Control("answer", "easy2", SESSION, candidates=(("203.0.113.5", 4500),)),
        Control("answer", "easy2", SESSION, candidates=(), start_at=1764526001.0),
        Control("nominate", "easy1", SESSION, use=("198.51.100.21", 61001)),
        Control("nominate", "easy1", SESSION, use=("2001:db8::7", 51820)),
        Control("fallback", "easy2", SESSION),
        Control("hello", "easy2", SESSION),
        Control("bye", "easy2", SESSION),
    ]
    seeds = [b"\x00" + encode_control(c) for c in controls]
    # Edges that encode_control never writes: raw UTF-8 that its escaping would blow past the
    # size limit, a lone zero group it writes longer, times that are no float.
    hello = {"v": 1, "type": "hello", "from": "é" * 700, "session": SESSION.hex()}
    seeds.append(b"\x00" + json.dumps(hello, ensure_ascii=False).encode())
    answer = json.loads(encode_control(controls[1]))
    seeds.append(b"\x00" + json.dumps({**answer, "candidates": ["[1::1:1:1:1:1:1]:1"]}).encode())
    for start_at in ("1e999", "1" * 400, "-0.0"):
        offer = encode_control(controls[0]).replace(b"1764526000.25", start_at.encode())
        seeds.append(b"\x00" + offer)
    # Probe bodies without their MAC: selector 0x03 has the target sign them.
    head = struct.Struct(">4sBB8sI")
    bodies = [
        head.pack(b"\xffMWP", PING, 0, SESSION, 7),
        head.pack(b"\xffMWP", PONG, 0, SESSION, 8) + struct.pack(">HB", 51820, 4) + bytes(4),
        head.pack(b"\xffMWP", PONG, 0, SESSION, 9) + struct.pack(">HB", 1, 6) + bytes(15) + b"\x01",
    ]
    seeds += [b"\x03" + body for body in bodies]
    # And one whole probe as a peer sends it, MAC included, to the unsigned path.
    seeds.append(b"\x01" + encode_probe(Probe(PONG, SESSION, 8, ("198.51.100.21", 51820)), KEY))
    seeds.append(b"\x01" + MAPPING_KEEPALIVE)
    return seeds


def wgstun_seeds() -> list[bytes]:
    # Flags bits 3-4 pick the asker: a site with other mappings, IPv6, no endpoint, unknown.
    requests = [
        stun.binding_request(TXID),
        stun.binding_request(TXID, software="meshwright sidecar", fingerprint=False),
        REAL_CLIENT_REQUESTS[3],
        vector("sample_request"),
    ]
    return [bytes([asker << 3]) + r for r in requests for asker in range(4)]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "stun": stun_seeds,
    "stun_tcp": stun_tcp_seeds,
    "relay_sites": relay_sites_seeds,
    "frames": frames_seeds,
    "sidecar_messages": sidecar_messages_seeds,
    "wgstun": wgstun_seeds,
}


def write(out: Path, targets: list[str]) -> None:
    for target in targets:
        directory = out / target
        directory.mkdir(parents=True, exist_ok=True)
        for number, seed in enumerate(SEEDS[target]()):
            (directory / f"seed-{number:03d}").write_bytes(seed)


def main(argv: list[str]) -> int:
    if not argv or any(t not in SEEDS for t in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    write(Path(argv[0]), argv[1:] or list(SEEDS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
