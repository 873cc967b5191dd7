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

The answer also lists, in meshwright's ALSO-MAPPED attributes, the address this relay's relay
service has confirmed for the same site on its port (its state file), when it differs. A NAT
can map one inside socket to several public ports at once: after its table was flushed while
traffic flowed, say, the flows that clashed keep their new ports, and the NAT gives each new
flow one of them (Linux reuses the mapping of the socket's newest flow). A peer that pings
only one of them may never get in; the sidecar offers them all.

Sites also take an answer as "this relay is up" (they ask every relay once a second, and move
the pairs on one that answered nothing for a while to their standby relay), so it answers only
while the relay's forwarding service runs: that service's loop touches its state file every
second, and while the file is older than :data:`RELAY_SILENT_AFTER`, or missing, requests are
dropped (counted as ``dropped_relay_silent``). Without this, a relay whose forwarding service
alone died or hung would still answer, and its pairs would never move.

:class:`WgStunAnswerer` is pure (it is given the endpoints, and whether the relay service is
alive); :func:`main` is the service (``meshwright-node wg-stun``), which reads the endpoints
from WireGuard with :mod:`meshwright.site.wgdevice`, and the state file's age, at most every
:data:`REFRESH` seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from meshwright.wire import stun

__all__ = ["WgStunAnswerer", "main"]

Address = tuple[str, int]
REFRESH = 0.5
RELAY_STATE = "/var/lib/meshwright-relay/state.json"
# The relay service's loop writes or touches its state file about every second (a little
# later when busy: a save takes 0.23 s at 10,000 sites), so an mtime this old is two or more
# missed touches: the service is dead or hung. Not much longer: sites find a relay down after
# 4 s without answers (traversal.RELAY_DEAD_AFTER), asking once a second, so with this and
# REFRESH the pairs it carried are on their standby relay some 8.5 s after it stopped, within
# the 10 s the failover aims at. A clean stop dates the file back, so silence starts at once.
RELAY_SILENT_AFTER = 3.0
DEFAULT_PORT = 3480
SOFTWARE = "meshwright wg-stun"


class WgStunAnswerer:
    """Answers Binding requests with the requester's WireGuard endpoint, as this relay sees it."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Address] = {}  # overlay address -> WireGuard endpoint
        self.also: dict[str, tuple[Address, ...]] = {}  # overlay address -> other mappings
        self.counters: Counter[str] = Counter()
        # False: the relay service is down or hung. Then nothing is answered, so that sites
        # find this relay down and move its pairs to their standby.
        self.relay_alive = True

    def update(
        self,
        peers: Mapping[str, tuple[str, Address | None]],
        allocations: Mapping[str, Any] | None = None,
    ) -> None:
        """``peers``: overlay address (a peer's /32 allowed IP) -> (its public key, its
        WireGuard endpoint or None). ``allocations``: the relay service's state file."""
        seen = confirmed_addresses(allocations or {})
        self.endpoints, self.also = {}, {}
        for overlay, (key, endpoint) in peers.items():
            if endpoint is None:
                continue
            name = str(ipaddress.ip_address(overlay))
            self.endpoints[name] = endpoint
            self.also[name] = tuple(a for a in sorted(seen.get(key, ())) if a != endpoint)

    def handle(self, datagram: bytes, source: Address) -> bytes | None:
        """The answer to a datagram from overlay address ``source``; None: drop it."""
        if not self.relay_alive:
            self.counters["dropped_relay_silent"] += 1
            return None
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
        also = self.also.get(str(ipaddress.ip_address(source[0])), ())[:MAX_ALSO]
        return stun.binding_success(request, endpoint, software=SOFTWARE, also_mapped=also)


MAX_ALSO = 8  # more distinct mappings of one socket than this is no NAT we can punch anyway


def confirmed_addresses(snapshot: Mapping[str, Any]) -> dict[str, set[Address]]:
    """Public key -> the address the relay service has confirmed for it, from its state file
    (``{"sites": {name: {"public_key": key, "confirmed": [host, port] | null}}}``, see
    :mod:`.server`); anything malformed, and a UDP-blocked site's pseudo-address, is skipped."""
    found: dict[str, set[Address]] = {}
    sites = snapshot.get("sites")
    if not isinstance(sites, Mapping):
        return found
    for entry in sites.values():
        try:
            key, address = entry["public_key"], entry["confirmed"]
            if address is None:
                continue
            host, port = address
            ipaddress.ip_address(host)
            found.setdefault(str(key), set()).add((str(host), int(port)))
        except (KeyError, TypeError, ValueError):
            continue
    return found


def overlay_endpoints(interface: str) -> dict[str, tuple[str, Address | None]]:
    """Each peer's /32 allowed IPs -> (its public key, its endpoint), read from the running
    interface."""
    from meshwright.site.wgdevice import LiveInterface

    with LiveInterface.open(interface) as live:
        state = live.read()
    found: dict[str, tuple[str, Address | None]] = {}
    for key, peer in state.peers.items():
        endpoint = None if peer.endpoint is None else (peer.endpoint.host, peer.endpoint.port)
        for network in peer.allowed_ips:
            if network.num_addresses == 1:
                found[str(network.network_address)] = (str(key), endpoint)
    return found


def relay_state(path: str) -> dict[str, Any]:
    """The relay service's state file, or nothing (no relay service here, or not yet)."""
    try:
        with open(path) as file:
            data = json.load(file)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def relay_alive(path: str, now: float) -> bool:
    """Whether the relay service's loop touched its state file ``path`` within
    :data:`RELAY_SILENT_AFTER` of ``now`` (wall clock, as the file's mtime)."""
    try:
        age = now - os.stat(path).st_mtime
    except OSError:
        return False  # no relay service here, or it never ran
    # abs: after the clock stepped back, an mtime in the future proves nothing (a live service
    # touches the file again within a second).
    return abs(age) < RELAY_SILENT_AFTER


def refresh(
    answerer: WgStunAnswerer,
    interface: str,
    read: Callable[[str], Mapping[str, tuple[str, Address | None]]],
    state_file: str,
    now: float,
    log: Callable[[str], None],
) -> None:
    """Tell ``answerer`` what it answers from: WireGuard's endpoints, the relay service's
    state file, and whether that service is alive (``now``: wall clock); says when that
    changes."""
    alive = relay_alive(state_file, now)
    if alive != answerer.relay_alive:
        if alive:
            log("wg-stun: answering again: the relay service runs")
        else:
            log(
                f"wg-stun: not answering: the relay service has not touched {state_file} "
                f"for {RELAY_SILENT_AFTER:g} s (down or hung), so that sites fail over"
            )
        answerer.relay_alive = alive
    try:
        answerer.update(read(interface), relay_state(state_file))
    except Exception as exc:  # the interface may be down for a moment: keep serving
        answerer.counters["read_errors"] += 1
        log(f"wg-stun: cannot read {interface}: {exc}")


def serve(
    listen: Address,
    interface: str,
    *,
    read: Callable[[str], Mapping[str, tuple[str, Address | None]]] = overlay_endpoints,
    state_file: str = RELAY_STATE,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
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
            refresh(answerer, interface, read, state_file, wall(), log)
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
