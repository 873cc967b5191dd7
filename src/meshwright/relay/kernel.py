"""Kernel forwarding of confirmed relayed sessions: nftables rules derived from what
:mod:`.forward` learned. Pure (text in, text out, no clock); :mod:`.server` runs ``nft``.

Why
---

Every datagram the relay's code forwards costs a ``recvfrom``, a decision in Python and a
``sendto``: a relayed pair ran at 0.71 of its direct throughput that way. Yet once both sides'
addresses are proven, what the code does with transport data is fixed: a datagram arriving on
the sender's port from the sender's confirmed address goes, unchanged, out of the receiver's
port to the receiver's confirmed address. The kernel can do exactly that, statelessly.

What the kernel forwards, and what stays with the code
------------------------------------------------------

A :class:`Route` is one direction of an allocation. It exists while

* both sides' confirmed addresses are IPv4 addresses (a UDP-blocked site's side is its TLS
  connection, which only the code writes to; IPv6 stays with the code too);
* no handshake of the *receiver* waits for the other side's answer
  (:meth:`.forward.Allocation.awaits_answer`): the initiator's first transport data is what
  proves the responder's new address, so it must reach the code;
* the sender was heard within :data:`ROUTE_IDLE` seconds: a route expires with its session
  (WireGuard rejects a session after 180 s; its keepalives are sent every 25 s).

Only transport data (type 4 with zero reserved bytes, at least 32 bytes) from the route's
source address and port matches. Handshakes, cookie replies, the sidecars' mapping keepalives,
data from any other address and anything malformed match nothing and reach the relay's socket
as before, so the code keeps learning, confirming and counting; the code's path stays the
fallback and behaves identically (the kernel only ever does what :meth:`receive` would do).
The rate limits become per direction (each direction gets an allocation's whole limits).

The ruleset
-----------

One table, ``ip meshwright_forward``, made whole at start and removed at exit::

    prerouting (priority raw): type 4 and long enough -> udp dport vmap @arrive
    chain a<port>:  from the source: over the packet limit -> count d<port>, drop
                                     over the byte limit   -> count d<port>, drop
                                     not a fragment: count f<port>, notrack,
                                     mark MARK|out port, don't-fragment cleared,
                                     destination := the receiver's address
    postrouting: meta mark vmap @leave
    chain l<out port>: source := the relay's address and the receiver's port

The rules are stateless (``notrack``): conntrack would pin a flow's first decision on all its
packets, handshakes included, and two routes share no flow anyway. The relay's firewall lets
only packets carrying :data:`MARK` through its forward hook (``net.ipv4.ip_forward`` is on for
this alone). Named counters survive a route's change; :func:`counters` reads them back.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import NamedTuple

from .forward import Address, Allocation, Limits

__all__ = [
    "MARK",
    "ROUTE_IDLE",
    "TABLE",
    "Route",
    "counters",
    "install",
    "routes",
    "setup",
    "teardown",
    "withdraw",
]

TABLE = "meshwright_forward"
# Marks a packet the kernel forwards for the relay: the low 16 bits are its leaving port.
MARK = 0x4D570000
MARK_MASK = 0xFFFF0000
# A session whose sender sent nothing for this long has ended (WireGuard: 180 s at most).
ROUTE_IDLE = 200.0
_TRANSPORT_MIN_UDP_LENGTH = 8 + 32  # the UDP header and the smallest transport message
_U32 = 0xFFFFFFFF
_MAX_BYTE_RATE = 10_000_000_000


class Route(NamedTuple):
    """Transport data arriving on ``port`` from ``source`` leaves ``out_port`` for
    ``destination``, with the relay's ``relay`` address as its source."""

    port: int
    source: Address
    destination: Address
    out_port: int
    relay: str


def _ipv4(address: Address | None) -> bool:
    if address is None:
        return False
    try:
        return ipaddress.ip_address(address[0]).version == 4
    except ValueError:
        return False  # a TLS site's pseudo-address


def routes(
    relay: str, ports: tuple[int, int], allocation: Allocation, now: float
) -> dict[int, Route]:
    """The routes ``allocation`` (on ``relay``'s ``ports``) has at ``now``, by arrival port."""
    if not _ipv4((relay, 0)):
        return {}
    confirmed = allocation.confirmed
    result = {}
    for side in (0, 1):
        other = 1 - side
        source, destination = confirmed[side], confirmed[other]
        heard = allocation.last_heard(side)
        if (
            source is not None
            and destination is not None
            and _ipv4(source)
            and _ipv4(destination)
            and heard is not None
            and now - heard < ROUTE_IDLE
            and not allocation.awaits_answer(other, now)
        ):
            result[ports[side]] = Route(ports[side], source, destination, ports[other], relay)
    return result


def setup() -> str:
    """The script that makes the table, empty (replacing one left by an earlier run)."""
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
	map arrive {{ type inet_service : verdict ; }}
	map leave {{ type mark : verdict ; }}
	chain prerouting {{
		type filter hook prerouting priority raw; policy accept;
		udp length >= {_TRANSPORT_MIN_UDP_LENGTH} @th,64,32 0x04000000 udp dport vmap @arrive
	}}
	chain postrouting {{
		type filter hook postrouting priority srcnat; policy accept;
		meta mark & {MARK_MASK:#x} == {MARK:#x} meta mark vmap @leave
	}}
}}
"""


def teardown() -> str:
    """The script that removes the table (and with it every route)."""
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"


def install(route: Route, limits: Limits) -> str:
    """The script that installs ``route`` (none is installed on its port)."""
    port, out = route.port, route.out_port
    mark = MARK | out
    match = f"ip saddr {route.source[0]} udp sport {route.source[1]}"
    packets = max(1, round(limits.packets_per_second))
    # The kernel's limit overflows past about 10 GB/s; beyond that it is no limit anyway.
    octets = min(max(1, round(limits.bytes_per_second)), _MAX_BYTE_RATE)
    # nftables keeps a burst in 32 bits.
    packets_burst, octets_burst = min(packets, _U32), min(octets, _U32)
    lines = [
        f"add counter ip {TABLE} f{port}",
        f"add counter ip {TABLE} d{port}",
        f"add chain ip {TABLE} a{port}",
        f"flush chain ip {TABLE} a{port}",
        f"add rule ip {TABLE} a{port} {match} limit rate over {packets}/second"
        f' burst {packets_burst} packets counter name "d{port}" drop',
        f"add rule ip {TABLE} a{port} {match} limit rate over {octets} bytes/second"
        f' burst {octets_burst} bytes counter name "d{port}" drop',
        # Whole datagrams only (a fragment goes to the code, which reassembles it), and their
        # don't-fragment bit cleared: the kernel ignores learned path MTUs when it forwards,
        # so a smaller path behind the relay would drop every full-size packet, where the
        # relay's own socket would fragment after the first.
        f"add rule ip {TABLE} a{port} {match} ip frag-off & 0x3fff == 0"
        f' counter name "f{port}" notrack meta mark set {mark:#x} ip frag-off set 0'
        f" ip daddr set {route.destination[0]} udp dport set {route.destination[1]}",
        f"add chain ip {TABLE} l{out}",
        f"flush chain ip {TABLE} l{out}",
        f"add rule ip {TABLE} l{out} ip saddr set {route.relay} udp sport set {out}",
        f"add element ip {TABLE} arrive {{ {port} : jump a{port} }}",
        f"add element ip {TABLE} leave {{ {mark:#x} : jump l{out} }}",
    ]
    return "\n".join(lines) + "\n"


def withdraw(route: Route) -> str:
    """The script that removes ``route`` (its counters stay, for :func:`counters`)."""
    port, out = route.port, route.out_port
    return (
        f"delete element ip {TABLE} arrive {{ {port} }}\n"
        f"delete element ip {TABLE} leave {{ {MARK | out:#x} }}\n"
        f"flush chain ip {TABLE} a{port}\n"
        f"flush chain ip {TABLE} l{out}\n"
    )


def counters(listing: str) -> dict[int, tuple[int, int, int]]:
    """By arrival port: (packets, bytes) forwarded and packets dropped over the limits, from
    ``nft -j list counters table ip meshwright_forward``; ValueError for unreadable text."""
    data = json.loads(listing)
    result: dict[int, list[int]] = {}
    for item in data.get("nftables", []) if isinstance(data, Mapping) else []:
        counter = item.get("counter") if isinstance(item, Mapping) else None
        if not isinstance(counter, Mapping) or counter.get("table") != TABLE:
            continue
        name = str(counter.get("name", ""))
        if name[:1] not in ("f", "d") or not name[1:].isdigit():
            continue
        totals = result.setdefault(int(name[1:]), [0, 0, 0])
        if name[0] == "f":
            totals[0], totals[1] = int(counter.get("packets", 0)), int(counter.get("bytes", 0))
        else:
            totals[2] = int(counter.get("packets", 0))
    return {port: (v[0], v[1], v[2]) for port, v in result.items()}
