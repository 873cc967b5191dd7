"""Stand-ins the sidecar daemon's tests share."""

from __future__ import annotations

import socket


class FakeProbes:
    """The probe socket (raw sockets, CAP_NET_RAW) is not what these tests are about."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, destination: tuple[str, int], payload: bytes) -> None:
        pass

    def receive(self) -> None:
        return None

    def close(self) -> None:
        self.sock.close()
