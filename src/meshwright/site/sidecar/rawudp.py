"""Probes from WireGuard's own port: a raw socket that writes UDP with the WireGuard listen port
as its source, and a raw socket that reads what arrives at that port, filtered in the kernel.

Why: a probe from any other socket tests a different NAT mapping. On an endpoint-dependent NAT
it proves nothing at all about WireGuard's path, and even on an endpoint-independent one it
opens the filter for another port. Sent from the listen port, a probe creates (or refreshes)
exactly the conntrack entry and NAT mapping that WireGuard's own packets to that peer will use,
and its answer proves the way back to WireGuard's socket. WireGuard keeps its socket: the kernel
delivers each answer to it as well, and it drops what is not a WireGuard message (a probe's first
byte, 0xff, is none).

The pattern is wireguard-tools' ``contrib/nat-hole-punching`` and NetBird's shared socket: a
classic BPF program attached to the receiving socket passes only UDP datagrams to the listen
port whose payload starts with the probe magic, so the sidecar never sees WireGuard's traffic.
IPv4; CAP_NET_RAW.

Each probe comes with the interface it arrived on (``IP_PKTINFO``): a probe to one of the
peer's LAN addresses is routed into the WireGuard tunnel, and what arrives through the tunnel
proves nothing about a path outside it (the daemon drops it).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from typing import NamedTuple

from .messages import MAGIC

__all__ = ["ProbeSocket", "Received", "bpf_program", "udp_header"]

Address = tuple[str, int]


class Received(NamedTuple):
    source: Address
    payload: bytes
    interface: int  # the index of the interface it arrived on (0: unknown)


SO_ATTACH_FILTER = 26
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("i4s4s")  # struct in_pktinfo: ipi_ifindex, ipi_spec_dst, ipi_addr
# Classic BPF opcodes (linux/filter.h).
_LDX_B_MSH = 0xB1  # X = 4 * ([k] & 0xf): the IPv4 header's length
_LD_H_IND = 0x48  # A = half word at X + k
_LD_W_IND = 0x40  # A = word at X + k
_JEQ_K = 0x15
_RET_K = 0x06


def bpf_program(port: int) -> bytes:
    """Accept IPv4 UDP to ``port`` whose payload starts with the probe magic; drop the rest.

    The raw socket hands the filter the IP packet: X is the IP header length, so X + 2 is the
    UDP destination port and X + 8 the first payload byte.
    """
    magic = int.from_bytes(MAGIC, "big")
    program = [
        (_LDX_B_MSH, 0, 0, 0),
        (_LD_H_IND, 0, 0, 2),
        (_JEQ_K, 0, 3, port),
        (_LD_W_IND, 0, 0, 8),
        (_JEQ_K, 0, 1, magic),
        (_RET_K, 0, 0, 0xFFFF),
        (_RET_K, 0, 0, 0),
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in program)


def udp_header(source_port: int, destination_port: int, payload: bytes) -> bytes:
    """A UDP header with checksum 0 (none, allowed over IPv4); the kernel adds the IP header."""
    return struct.pack(">HHHH", source_port, destination_port, 8 + len(payload), 0)


class ProbeSocket:
    """Send probes from ``port`` and receive those addressed to it (non-blocking)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._program = ctypes.create_string_buffer(bpf_program(port))
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        try:
            count = len(self._program.raw) // 8
            # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
            fprog = struct.pack("HL", count, ctypes.addressof(self._program))
            self.receiver.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            self.receiver.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.receiver.setblocking(False)
            self.sender.setblocking(False)
            # Whatever queued before the filter was attached is not filtered: discard it.
            with contextlib.suppress(BlockingIOError):
                while True:
                    self.receiver.recv(65535)
        except OSError:
            self.close()
            raise

    def fileno(self) -> int:
        return self.receiver.fileno()

    def send(self, destination: Address, payload: bytes) -> None:
        host, port = destination
        datagram = udp_header(self.port, port, payload) + payload
        self.sender.sendto(datagram, (host, 0))

    def receive(self) -> Received | None:
        """One probe, where it came from and the interface it arrived on; None when nothing
        is waiting."""
        try:
            packet, ancillary, _, _ = self.receiver.recvmsg(65535, socket.CMSG_SPACE(32))
        except BlockingIOError:
            return None
        interface = 0
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
                interface = _PKTINFO.unpack_from(data)[0]
        if len(packet) < 20:
            return None
        header = (packet[0] & 0x0F) * 4
        if len(packet) < header + 8:
            return None
        source_ip = socket.inet_ntoa(packet[12:16])
        source_port, _, length, _ = struct.unpack_from(">HHHH", packet, header)
        payload = packet[header + 8 : header + max(8, length)]
        return Received((source_ip, source_port), payload, interface)

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()
