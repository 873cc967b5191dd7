"""WG-STUN on a relay: "where do you see my WireGuard socket?", answered from inside WireGuard.

A site's NAT probe measures sockets of its own; WireGuard's socket may be mapped differently.
The relay is a WireGuard peer of every UDP site, so it already knows each site's WireGuard
endpoint: WireGuard learned it from the site's authenticated packets. This service listens on
the relay's *overlay* address; a site's sidecar sends it a STUN Binding request through the
tunnel, and the answer's XOR-MAPPED-ADDRESS is the endpoint the relay's WireGuard holds for
the peer whose allowed IPs contain the request's source address. WireGuard's cryptokey routing
already tells who is asking (a packet from a site's overlay address can only have come through
that site's tunnel), so no further authentication is needed. Two relays give two such
observations, and from them the mapping behaviour of WireGuard's socket itself (libtelio's
WG-STUN, done without extra keys).

:class:`WgStunAnswerer` is pure (it is given the endpoints); :func:`main` is the service
(``meshwright-node wg-stun``), which reads the endpoints from WireGuard with
:mod:`meshwright.site.wgdevice`, at most every :data:`REFRESH` seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping

from meshwright.wire import stun

__all__ = ["WgStunAnswerer", "main"]

Address = tuple[str, int]
REFRESH = 0.5
DEFAULT_PORT = 3480
SOFTWARE = "meshwright wg-stun"


class WgStunAnswerer:
    """Answers Binding requests with the requester's WireGuard endpoint, as this relay sees it."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Address] = {}  # overlay address -> WireGuard endpoint
        self.counters: Counter[str] = Counter()

    def update(self, peers: Mapping[str, Address | None]) -> None:
        """Overlay address (a peer's /32 allowed IP) -> its WireGuard endpoint, or None."""
        self.endpoints = {
            str(ipaddress.ip_address(overlay)): endpoint
            for overlay, endpoint in peers.items()
            if endpoint is not None
        }

    def handle(self, datagram: bytes, source: Address) -> bytes | None:
        """The answer to a datagram from overlay address ``source``; None: drop it."""
        try:
            request = stun.decode(datagram)
        except stun.StunError:
            self.counters["dropped_malformed"] += 1
            return None
        if request.method != stun.BINDING or request.cls != stun.REQUEST:
            self.counters["dropped_not_binding_request"] += 1
            return None
        endpoint = self.endpoints.get(str(ipaddress.ip_address(source[0])))
        if endpoint is None:
            self.counters["unknown_peer"] += 1
            return stun.binding_error(request, 404, "no WireGuard endpoint for you", SOFTWARE)
        self.counters["answered"] += 1
        return stun.binding_success(request, endpoint, software=SOFTWARE)


def overlay_endpoints(interface: str) -> dict[str, Address | None]:
    """Each peer's /32 allowed IPs -> its endpoint, read from the running interface."""
    from meshwright.site.wgdevice import LiveInterface

    with LiveInterface.open(interface) as live:
        state = live.read()
    found: dict[str, Address | None] = {}
    for peer in state.peers.values():
        endpoint = None if peer.endpoint is None else (peer.endpoint.host, peer.endpoint.port)
        for network in peer.allowed_ips:
            if network.num_addresses == 1:
                found[str(network.network_address)] = endpoint
    return found


def serve(
    listen: Address,
    interface: str,
    *,
    read: Callable[[str], Mapping[str, Address | None]] = overlay_endpoints,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = print,
) -> None:
    answerer = WgStunAnswerer()
    sock = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The overlay address exists only once WireGuard is up: IP_FREEBIND lets us bind before.
    sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    sock.bind(listen)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    refreshed = -REFRESH
    log(f"wg-stun: answering on {listen[0]}:{listen[1]} from {interface}")
    while not stopping:
        if not selector.select(1.0):
            continue
        try:
            datagram, source = sock.recvfrom(2048)
        except OSError:
            continue
        now = clock()
        if now - refreshed >= REFRESH:
            try:
                answerer.update(read(interface))
            except Exception as exc:  # the interface may be down for a moment: keep serving
                answerer.counters["read_errors"] += 1
                log(f"wg-stun: cannot read {interface}: {exc}")
            refreshed = now
        answer = answerer.handle(datagram, source[:2])
        if answer is not None:
            try:
                sock.sendto(answer, source)
            except OSError:
                answerer.counters["send_errors"] += 1
    sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshwright wg-stun", description="answer sites where their WireGuard socket is seen"
    )
    parser.add_argument("--listen", required=True, help="this relay's overlay address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--interface", default="mesh0")
    args = parser.parse_args(argv)
    serve((args.listen, args.port), args.interface, log=lambda m: print(m, file=sys.stderr))
    return 0
