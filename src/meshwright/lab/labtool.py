#!/usr/bin/env python3
"""Lab helper run inside lab containers: echo service, NAT probes, and the link delayer.

Standard library only: it is copied into containers whose only Python is Debian's python3.

  echo   --address A [--address B] [--udp-port 7] [--tcp-port 7]
         UDP: answers every datagram with the source it saw, from the address it was sent to.
         TCP: answers a connection with the source it saw; "SENDTO ip port" instead makes it
         send one UDP datagram to ip:port from this host (a third party, for filtering tests).
  probe  --sport N --to ip:port [--to ip:port ...] [--third ip:port]
         Sends from one UDP socket to each target and prints the mapped address each saw.
         With --third, asks that host (over TCP) to send an unsolicited datagram to the
         mapping the first target saw, and reports whether it arrived.
  tcp    --to ip:port        Connects over TCP and prints the source address the server saw.
  delay  --queue N --latency-ms L [--jitter-ms J]
         Holds every packet of NFQUEUE N for L±J ms, in order (the kernel here has no netem).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import select
import socket
import struct
import sys
import time

# --- echo --------------------------------------------------------------------------------


def _echo(args: argparse.Namespace) -> int:
    udp: dict[socket.socket, str] = {}
    tcp: dict[socket.socket, str] = {}
    for addr in args.address:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u.bind((addr, args.udp_port))
        udp[u] = addr
        for port in args.tcp_port:
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((addr, port))
            t.listen(16)
            tcp[t] = addr
    while True:
        readable, _, _ = select.select([*udp, *tcp], [], [])
        for sock in readable:
            if sock in udp:
                try:
                    _, peer = sock.recvfrom(2048)
                    sock.sendto(json.dumps({"ip": peer[0], "port": peer[1]}).encode(), peer)
                except OSError:
                    continue
            else:
                _serve_tcp(sock, udp)


def _serve_tcp(listener: socket.socket, udp: dict[socket.socket, str]) -> None:
    try:
        conn, peer = listener.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(2)
        try:
            line = conn.recv(256).decode("ascii", "replace").strip()
        except OSError:
            line = ""
        parts = line.split()
        if len(parts) == 3 and parts[0] == "SENDTO":
            local = conn.getsockname()[0]
            sender = next((s for s, a in udp.items() if a == local), None)
            try:
                if sender is None:
                    raise OSError(f"no UDP socket on {local}")
                sender.sendto(b'{"third": true}', (parts[1], int(parts[2])))
                reply: dict[str, object] = {"sent": True}
            except (OSError, ValueError) as exc:
                reply = {"sent": False, "error": str(exc)}
        else:
            reply = {"ip": peer[0], "port": peer[1]}
        with contextlib.suppress(OSError):  # the prober may be gone already
            conn.sendall(json.dumps(reply).encode())


# --- probes ------------------------------------------------------------------------------


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _probe(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.sport))
    mappings: list[dict[str, object]] = []
    result: dict[str, object] = {"sport": args.sport, "mappings": mappings}
    first_mapping = None
    for target in args.to:
        dest = _endpoint(target)
        mapped = None
        error = None
        for _ in range(args.tries):
            try:
                sock.sendto(b"ECHO", dest)
            except OSError as exc:  # e.g. no route: report it, as a NAT test wants to know
                error = str(exc)
                break
            deadline = time.monotonic() + args.timeout
            while mapped is None and (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                data, peer = sock.recvfrom(2048)
                if peer == dest:
                    reply = json.loads(data)
                    mapped = f"{reply['ip']}:{reply['port']}"
            if mapped:
                break
        entry = {"to": target, "mapped": mapped, **({"error": error} if error else {})}
        mappings.append(entry)
        first_mapping = first_mapping or mapped
    if args.third:
        result["unsolicited"] = _ask_third(sock, args.third, first_mapping, args)
    print(json.dumps(result))
    return 0


def _ask_third(
    sock: socket.socket, third: str, mapping: str | None, args: argparse.Namespace
) -> object:
    if mapping is None:
        return None
    ip, port = _endpoint(mapping)
    try:
        with socket.create_connection(_endpoint(third), timeout=args.timeout) as conn:
            conn.sendall(f"SENDTO {ip} {port}\n".encode())
            ack = json.loads(conn.recv(256) or b"{}")
    except (OSError, ValueError) as exc:
        return {"error": f"third party {third}: {exc}"}
    if not ack.get("sent"):
        return {"error": ack.get("error", "third party did not send")}
    deadline = time.monotonic() + args.listen
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, _ = sock.recvfrom(2048)
        if data == b'{"third": true}':
            return True
    return False


def _tcp(args: argparse.Namespace) -> int:
    try:
        with socket.create_connection(_endpoint(args.to), timeout=args.timeout) as conn:
            conn.sendall(b"ECHO\n")
            reply = json.loads(conn.recv(256) or b"{}")
        out = {"connected": True, "seen_as": f"{reply.get('ip')}:{reply.get('port')}"}
    except OSError as exc:
        out = {"connected": False, "error": str(exc)}
    print(json.dumps(out))
    return 0


# --- the delayer: NFQUEUE over raw netlink ---------------------------------------------------

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_ACCEPT = 1


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _nfq_message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, 0, 0)
    return header + body


def _config(sock: socket.socket, queue: int, attrs: bytes) -> None:
    sock.send(_nfq_message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
    reply = sock.recv(4096)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", reply, 16)
        if err:
            raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")


def _packet_ids(data: bytes) -> list[int]:
    """Packet ids of every NFQNL_MSG_PACKET in one netlink read."""
    ids = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos = offset + 20  # nlmsghdr + nfgenmsg
            end = offset + length
            while pos + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, pos + 4)[0])
                    break
                pos += (alen + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def _delay(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    bind_cmd = struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)
    _config(sock, args.queue, _attr(NFQA_CFG_CMD, bind_cmd))
    _config(sock, args.queue, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
    _config(sock, args.queue, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 8192)))
    fail_open = struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)
    _config(sock, args.queue, _attr(NFQA_CFG_FLAGS, fail_open) + _attr(NFQA_CFG_MASK, fail_open))
    sock.setblocking(False)

    rng = random.Random()
    held: collections.deque[tuple[float, int]] = collections.deque()
    last_release = 0.0
    base, jitter = args.latency_ms / 1000, args.jitter_ms / 1000
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable = select.select([sock], [], [], timeout)[0]
        if readable:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = b""
            except OSError:  # ENOBUFS: the kernel dropped some; the fail-open queue passed them
                data = b""
            now = time.monotonic()
            for packet_id in _packet_ids(data):
                # FIFO: jitter varies the delay but never reorders, as on most real paths.
                release = max(last_release, now + base + rng.uniform(-jitter, jitter))
                last_release = release
                held.append((release, packet_id))
        now = time.monotonic()
        verdicts = []
        while held and held[0][0] <= now:
            _, packet_id = held.popleft()
            verdicts.append(
                _nfq_message(
                    NFQNL_MSG_VERDICT,
                    args.queue,
                    _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)),
                )
            )
        for verdict in verdicts:
            with contextlib.suppress(OSError):  # fail-open: an unverdicted packet passes later
                sock.send(verdict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labtool", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--address", action="append", required=True)
    echo.add_argument("--udp-port", type=int, default=7)
    echo.add_argument("--tcp-port", type=int, action="append", default=[])
    probe = sub.add_parser("probe")
    probe.add_argument("--sport", type=int, required=True)
    probe.add_argument("--to", action="append", required=True)
    probe.add_argument("--third")
    probe.add_argument("--tries", type=int, default=4)
    probe.add_argument("--timeout", type=float, default=0.6)
    probe.add_argument("--listen", type=float, default=1.5)
    tcp = sub.add_parser("tcp")
    tcp.add_argument("--to", required=True)
    tcp.add_argument("--timeout", type=float, default=3)
    delay = sub.add_parser("delay")
    delay.add_argument("--queue", type=int, default=0)
    delay.add_argument("--latency-ms", type=float, required=True)
    delay.add_argument("--jitter-ms", type=float, default=0)
    args = parser.parse_args(argv)
    handlers = {"echo": _echo, "probe": _probe, "tcp": _tcp, "delay": _delay}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
