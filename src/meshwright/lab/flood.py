"""Bounded floods for the lab's hostile-input tests, run inside a lab container.

Standard library only: the tests copy this file into a lab host (``podman cp``) and run it
with the host's python3. Two kinds:

* ``tcp``: hold up to ``--connections`` connections to one address, each sending one byte
  every ``--trickle`` seconds and never finishing anything (a slowloris); a connection the
  server closes is opened again, up to ``--attempts`` connection attempts in all.
* ``udp``: datagrams to one or more ``ADDRESS:PORT`` targets, round robin, at ``--rate`` per
  second, up to ``--packets`` in all: STUN Binding requests for STUN ports (``--stun``), and
  random bytes otherwise (after ``--prefix``, such as a protocol's magic, to get past its
  first check).

Every flood stops after ``--seconds`` or its count, whichever is first, and prints one JSON
line of what it did. It refuses any target outside the lab's "internet" (the documentation
ranges 198.51.100.0/24 and 203.0.113.0/24) and the lab LANs named with ``--allow`` (private
networks of /16 or smaller, which the caller takes from its lab's topology): these tools may
never aim anywhere else.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Sequence

LAB_NETWORKS = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24"))
MAX_SECONDS = 120.0
MAX_CONNECTIONS = 5000
MAX_PACKETS = 2_000_000


def lab_network(text: str) -> ipaddress.IPv4Network:
    """A lab LAN given with ``--allow``: private, and no larger than a /16."""
    network = ipaddress.IPv4Network(text)
    if not network.is_private or network.prefixlen < 16:
        raise ValueError(f"{text} is not a private network of /16 or smaller")
    return network


def lab_target(text: str, allowed: Sequence[ipaddress.IPv4Network] = ()) -> tuple[str, int]:
    """``ADDRESS:PORT`` of a lab host; ValueError for anything else."""
    host, _, port = text.rpartition(":")
    address = ipaddress.ip_address(host)
    if not any(address in network for network in (*LAB_NETWORKS, *allowed)):
        raise ValueError(f"{host} is not a lab address (198.51.100.0/24, 203.0.113.0/24)")
    number = int(port)
    if not 0 < number <= 0xFFFF:
        raise ValueError(f"{port} is not a port")
    return str(address), number


def stun_request() -> bytes:
    """A Binding request (RFC 8489) with a random transaction id."""
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12)


def tcp_flood(
    target: tuple[str, int], connections: int, trickle: float, seconds: float, attempts: int
) -> dict[str, object]:
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}  # socket -> when it last sent a byte
    stats = {"attempts": 0, "connected": 0, "closed_by_server": 0, "refused": 0, "bytes": 0}
    peak = 0
    started = time.monotonic()
    deadline = started + seconds

    def open_one() -> None:
        stats["attempts"] += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        error = sock.connect_ex(target)
        if error not in (0, errno.EINPROGRESS):
            stats["refused"] += 1
            sock.close()
            return
        opened[sock] = 0.0
        selector.register(sock, selectors.EVENT_READ)

    def close(sock: socket.socket) -> None:
        selector.unregister(sock)
        opened.pop(sock, None)
        sock.close()

    while time.monotonic() < deadline:
        while len(opened) < connections and stats["attempts"] < attempts:
            open_one()
        peak = max(peak, len(opened))
        now = time.monotonic()
        for sock, last in list(opened.items()):
            if now - last >= trickle:
                try:
                    # A TLS record header first, then one byte at a time: a handshake that
                    # is always about to arrive.
                    sock.send(b"\x16\x03\x01\x02\x00" if last == 0.0 else b"\x01")
                    if last == 0.0:
                        stats["connected"] += 1
                    stats["bytes"] += 1
                    opened[sock] = now
                except BlockingIOError:
                    pass  # still connecting
                except OSError:
                    stats["closed_by_server"] += 1
                    close(sock)
        for key, _ in selector.select(timeout=min(0.05, trickle)):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                stats["closed_by_server"] += 1
                close(sock)
    for sock in list(opened):
        close(sock)
    took = time.monotonic() - started
    return {
        "kind": "tcp",
        "target": f"{target[0]}:{target[1]}",
        "seconds": round(took, 2),
        "peak_open": peak,
        "attempts_per_second": round(stats["attempts"] / took, 1),
        **stats,
    }


def udp_flood(
    targets: Sequence[tuple[str, int]],
    stun: set[int],
    rate: float,
    seconds: float,
    packets: int,
    prefix: bytes = b"",
) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent = errors = 0
    started = time.monotonic()
    deadline = started + seconds
    interval = 1.0 / rate
    next_send = started
    while sent + errors < packets:
        now = time.monotonic()
        if now >= deadline:
            break
        if now < next_send:
            time.sleep(min(next_send - now, 0.01))
            continue
        # Catch up in bursts when the clock ran ahead, but never beyond the rate on average.
        burst = min(int((now - next_send) / interval) + 1, 256, packets - sent - errors)
        for _ in range(burst):
            target = targets[(sent + errors) % len(targets)]
            junk = prefix + os.urandom(32 + sent % 120)
            payload = stun_request() if target[1] in stun else junk
            try:
                sock.sendto(payload, target)
                sent += 1
            except OSError:
                errors += 1
        next_send += burst * interval
    sock.close()
    took = time.monotonic() - started
    return {
        "kind": "udp",
        "targets": [f"{a}:{p}" for a, p in targets],
        "seconds": round(took, 2),
        "sent": sent,
        "errors": errors,
        "packets_per_second": round(sent / took, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    tcp = kinds.add_parser("tcp", help="hold many trickling connections to one address")
    tcp.add_argument("target", type=lab_target, help="ADDRESS:PORT of a lab host")
    tcp.add_argument("--connections", type=int, default=1000)
    tcp.add_argument("--trickle", type=float, default=1.0, help="seconds between bytes")
    tcp.add_argument("--attempts", type=int, default=20000)
    tcp.add_argument("--seconds", type=float, default=20.0)
    udp = kinds.add_parser("udp", help="datagrams to lab ports at a fixed rate")
    udp.add_argument("targets", nargs="+", help="ADDRESS:PORT of lab hosts")
    udp.add_argument("--allow", type=lab_network, action="append", default=[], help="a lab LAN")
    udp.add_argument("--prefix", type=bytes.fromhex, default=b"", help="hex before the junk")
    udp.add_argument("--stun", type=int, action="append", default=[], help="a STUN port")
    udp.add_argument("--rate", type=float, default=2000.0, help="datagrams per second")
    udp.add_argument("--packets", type=int, default=100_000)
    udp.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    seconds = min(max(args.seconds, 0.1), MAX_SECONDS)
    if args.kind == "tcp":
        connections = min(max(args.connections, 1), MAX_CONNECTIONS)
        attempts = min(max(args.attempts, 1), 10 * MAX_CONNECTIONS)
        result = tcp_flood(args.target, connections, max(args.trickle, 0.05), seconds, attempts)
    else:
        try:
            targets = [lab_target(target, args.allow) for target in args.targets]
        except ValueError as exc:
            parser.error(str(exc))
        packets = min(max(args.packets, 1), MAX_PACKETS)
        rate = max(args.rate, 1.0)
        result = udp_flood(targets, set(args.stun), rate, seconds, packets, args.prefix)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
