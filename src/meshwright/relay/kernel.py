"""Kernel forwarding of confirmed relayed sessions: nftables rules derived from what
:mod:`.sites` proved. Pure (text in, text out, no clock); :mod:`.server` runs ``nft``.

Why
---

Every datagram the relay's code forwards costs a ``recvfrom``, a decision in Python and a
``sendto``: a relayed pair ran at 0.71 of its direct throughput that way. Yet once a session is
proven, what the code does with its transport data is fixed: a datagram arriving on the sender
X's port ``P_X`` from X's confirmed address, carrying the receiver index of a proven session
with Y, goes unchanged out of Y's port ``P_Y`` to Y's confirmed address. The kernel can do
exactly that, statelessly.

What the kernel forwards, and what stays with the code
------------------------------------------------------

A :class:`Route` is one direction of one proven session
(:meth:`.sites.Relay.proven_sessions`): arrival port ``P_X``, X's confirmed address and port,
the receiver index -> Y's confirmed address, out of ``P_Y``. It exists while

* the session is proven and alive (:data:`.sites.SESSION_TTL` from its handshake: it expires
  with the session). A new session's first data, which proves the responder's address, has no
  route (its index is not proven yet), so it reaches the code;
* both sites' confirmed addresses are IPv4 addresses, and so is the relay's (a UDP-blocked
  site's address is its TLS connection, which only the code writes to; IPv6 stays with the
  code too);
* neither address has moved: a route's source and destination are the confirmed addresses, so a
  handshake or proof that moves one changes the wanted routes, and the service withdraws the
  moved site's routes before it sends what moved it (:attr:`.sites.Relay.moved`).

Only transport data (type 4 with zero reserved bytes, at least 32 bytes) from the route's
source address and port, with the route's receiver index, matches. Handshakes, cookie replies,
the sidecars' mapping keepalives, data from any other address or with an unknown index, and
anything malformed match nothing and reach the relay's socket as before, so the code keeps
learning, confirming and counting; the code's path stays the fallback and behaves identically
(the kernel only ever does what :meth:`.sites.Relay.receive` would do). The limits are per
sender site, as in the code (both paths have their own buckets).

WireGuard's receiver index is a little-endian 32-bit number at bytes 4..8 of the message;
nftables' raw payload match (``@th,96,32``: after the 8-byte UDP header and the 4 bytes of type
and reserved) compares the bytes in network order, so the rules carry the index's bytes as they
are on the wire (:func:`wire_index`).

The ruleset
-----------

One table, ``ip meshwright_forward``, made whole at start and removed at exit. Its objects grow
with the sites (a chain, a map, two limits and counters per sender; a chain per receiver), its
map elements with the sessions (``i<P_X>``) and the pairs that have sessions (``deliver``)::

    prerouting (priority raw): type 4 and long enough -> udp dport vmap @arrive
    chain a<P_X>:  from X's confirmed address and port: mark := @i<P_X>[receiver index]
                   (the map holds MARK|P_Y for each proven session's index; no element, no mark)
                   marked, over X's packet limit (lp<P_X>) or byte limit (lb<P_X>):
                       count d<P_X>, drop
                   marked, not a fragment: count f<P_X>, notrack, don't-fragment cleared,
                       udp dport . mark vmap @deliver (P_X . MARK|P_Y -> jump t<P_Y>, each
                       element with its own counter: what X sent Y through the kernel)
                   marked still (a fragment): unmarked, to the relay's socket
    chain t<P_Y>:  count g<P_Y>, destination := Y's confirmed address, accept
    postrouting: meta mark vmap @leave (MARK|P_Y -> jump l<P_Y>)
    chain l<P_Y>:  source := the relay's address and P_Y

The rules are stateless (``notrack``): conntrack would pin a flow's first decision on all its
packets, handshakes included. The relay's firewall lets only packets carrying :data:`MARK`
through its forward hook (``net.ipv4.ip_forward`` is on for this alone). A packet that no rule
takes (unknown index, a fragment) falls through to the relay's socket. Named counters survive a
route's change; :func:`counters` reads them back (:data:`LISTING`): per sender what the kernel
forwarded (f) and dropped over the limits (d), per receiver what it delivered (g), and per
direction of a pair what it forwarded (the ``deliver`` element's counter: it counts only what
passed the limits, whole datagrams, exactly what f counts). A ``deliver`` element lives while a
route of its direction is installed, and its counter goes with it. A sender's arrival chain is
written anew when none of its routes is installed (its address may have moved since), a
receiver's chain likewise; the limit objects are made once per sender, so the service makes the
table anew when the limits change.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from .messages import Address, Limits
from .sites import Relay

__all__ = [
    "LISTING",
    "MARK",
    "TABLE",
    "Counts",
    "Route",
    "counters",
    "install",
    "routes",
    "setup",
    "teardown",
    "wire_index",
    "withdraw",
    "withdraw_sites",
]

TABLE = "meshwright_forward"
# Marks a packet the kernel forwards for the relay: the low 16 bits are its leaving port. The
# relay role's firewall accepts forwarded packets by this mark (relay-firewall.nft.j2).
MARK = 0x4D570000
MARK_MASK = 0xFFFF0000
_TRANSPORT_MIN_UDP_LENGTH = 8 + 32  # the UDP header and the smallest transport message
_U32 = 0xFFFFFFFF
_MAX_BYTE_RATE = 10_000_000_000
# nftables counts whole IPv4 packets, the code counts UDP payloads: the IPv4 header (WireGuard's
# packets carry no options) and the UDP header.
_HEADERS = 20 + 8
# What :func:`counters` reads: one ``nft -j`` run, one JSON document per command.
LISTING = f"list counters table ip {TABLE}; list map ip {TABLE} deliver"

RouteKey = tuple[int, int]  # (arrival port, receiver index)
Direction = tuple[int, int]  # (arrival port, leaving port): one site's traffic to another


class Route(NamedTuple):
    """Transport data arriving on ``port`` from ``source`` with ``receiver_index`` leaves
    ``out_port`` for ``destination``, with the relay's ``relay`` address as its source."""

    port: int
    source: Address
    receiver_index: int  # as WireGuard's little-endian field reads
    destination: Address
    out_port: int
    relay: str

    @property
    def key(self) -> RouteKey:
        return (self.port, self.receiver_index)


class Counts(NamedTuple):
    """The rules' counters, by site port: (packets, bytes) the kernel forwarded for the sender,
    packets it dropped over the sender's limits, (packets, bytes) it delivered to the receiver,
    and by :data:`Direction`, (packets, bytes) it forwarded from one site to another. Bytes are
    UDP payload bytes, as the code counts them."""

    forwarded: dict[int, tuple[int, int]]
    dropped: dict[int, int]
    delivered: dict[int, tuple[int, int]]
    directions: dict[Direction, tuple[int, int]]

    @classmethod
    def empty(cls) -> Counts:
        return cls({}, {}, {}, {})


@functools.lru_cache(maxsize=1 << 16)
def _ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False  # a TLS site's pseudo-address


def wire_index(index: int) -> int:
    """The receiver index as nftables' raw payload match sees it: its wire bytes, big-endian."""
    return int.from_bytes(index.to_bytes(4, "little"), "big")


def routes(relay: str, ports: Mapping[str, int], core: Relay, now: float) -> dict[RouteKey, Route]:
    """The routes ``core``'s proven sessions have at ``now`` on ``relay``'s site ``ports``."""
    if not _ipv4(relay):
        return {}
    # Each site once: its port and its confirmed address, if the kernel can reach it.
    usable = {
        name: (ports[name], address)
        for name, address in core.confirmed.items()
        if name in ports and _ipv4(address[0])
    }
    result: dict[RouteKey, Route] = {}
    for sender, receiver, index in core.proven_sessions(now):
        origin, target = usable.get(sender), usable.get(receiver)
        if origin is not None and target is not None:
            result[(origin[0], index)] = Route(
                origin[0], origin[1], index, target[1], target[0], relay
            )
    return result


def setup() -> str:
    """The script that makes the table, empty (replacing one left by an earlier run)."""
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
	map arrive {{ type inet_service : verdict ; }}
	map deliver {{ type inet_service . mark : verdict ; counter ; }}
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


def withdraw(installed: Mapping[RouteKey, Route], wanted: Mapping[RouteKey, Route]) -> str:
    """The script that removes the ``installed`` routes that ``wanted`` does not hold as they
    are (empty when there are none), and the ``deliver`` elements of the directions left with
    no route; the named counters stay, for :func:`counters`."""
    stale: dict[int, list[int]] = {}
    kept: set[Direction] = set()
    for key, route in installed.items():
        if wanted.get(key) != route:
            stale.setdefault(route.port, []).append(wire_index(route.receiver_index))
        else:
            kept.add(_direction(route))
    gone = directions(installed) - kept
    lines = [
        f"delete element ip {TABLE} i{port} {{ {', '.join(f'{v:#x}' for v in sorted(values))} }}"
        for port, values in sorted(stale.items())
    ]
    if gone:
        lines.append(
            f"delete element ip {TABLE} deliver {{ {', '.join(map(_deliver_key, sorted(gone)))} }}"
        )
    return "".join(line + "\n" for line in lines)


def directions(installed: Mapping[RouteKey, Route]) -> set[Direction]:
    """The directions the ``installed`` routes forward: those with a ``deliver`` element."""
    return {_direction(route) for route in installed.values()}


def _direction(route: Route) -> Direction:
    return (route.port, route.out_port)


def _deliver_key(direction: Direction) -> str:
    return f"{direction[0]} . {MARK | direction[1]:#x}"


def withdraw_sites(
    installed: Mapping[RouteKey, Route], ports: Iterable[int]
) -> dict[RouteKey, Route]:
    """The ``installed`` routes from or to one of ``ports`` (sites that moved): what to withdraw
    at once, before what moved them is sent on; the tick puts their new routes in."""
    moved = set(ports)
    return {k: r for k, r in installed.items() if r.port in moved or r.out_port in moved}


def install(
    installed: Mapping[RouteKey, Route], wanted: Mapping[RouteKey, Route], limits: Limits
) -> str:
    """The script that adds the ``wanted`` routes not ``installed`` (after :func:`withdraw`,
    every installed route is wanted as it is); empty when there are none."""
    added = [route for key, route in sorted(wanted.items()) if key not in installed]
    if not added:
        return ""
    senders_in_use = {r.port for r in installed.values()}
    receivers_in_use = {r.out_port for r in installed.values()}
    directions_in_use = directions(installed)
    senders: dict[int, Route] = {}
    receivers: dict[int, Route] = {}
    new_directions: dict[Direction, Route] = {}
    elements: dict[int, list[str]] = {}
    for route in added:
        senders.setdefault(route.port, route)
        receivers.setdefault(route.out_port, route)
        if _direction(route) not in directions_in_use:
            new_directions.setdefault(_direction(route), route)
        elements.setdefault(route.port, []).append(
            f"{wire_index(route.receiver_index):#x} : {MARK | route.out_port:#x}"
        )
    lines: list[str] = []
    for port, route in senders.items():
        if port not in senders_in_use:
            lines += _sender(route, limits)
    for port, route in receivers.items():
        if port not in receivers_in_use:
            lines += _receiver(route)
    if new_directions:
        verdicts = [f"{_deliver_key(d)} : jump t{d[1]}" for d in new_directions]
        lines.append(f"add element ip {TABLE} deliver {{ {', '.join(verdicts)} }}")
    lines += [
        f"add element ip {TABLE} i{port} {{ {', '.join(items)} }}"
        for port, items in elements.items()
    ]
    return "\n".join(lines) + "\n"


def _sender(route: Route, limits: Limits) -> list[str]:
    """The sender's objects (``add`` keeps existing ones: the limits stay as first made) and its
    arrival chain anew: its confirmed address may have moved since its routes were last in."""
    port = route.port
    chain = f"ip {TABLE} a{port}"
    marked = f"meta mark & {MARK_MASK:#x} == {MARK:#x}"
    packets = max(1, round(limits.packets_per_second))
    # The kernel's limit overflows past about 10 GB/s; beyond that it is no limit anyway.
    octets = min(max(1, round(limits.bytes_per_second)), _MAX_BYTE_RATE)
    # nftables keeps a burst in 32 bits.
    packets_burst, octets_burst = min(packets, _U32), min(octets, _U32)
    source = f"ip saddr {route.source[0]} udp sport {route.source[1]}"
    return [
        f"add counter ip {TABLE} f{port}",
        f"add counter ip {TABLE} d{port}",
        f"add limit ip {TABLE} lp{port} {{ rate over {packets}/second burst {packets_burst}"
        " packets ; }",
        f"add limit ip {TABLE} lb{port} {{ rate over {octets} bytes/second burst {octets_burst}"
        " bytes ; }",
        f"add map ip {TABLE} i{port} {{ typeof @th,96,32 : meta mark ; }}",
        f"add chain {chain}",
        f"flush chain {chain}",
        f"add rule {chain} {source} meta mark set @th,96,32 map @i{port}",
        f'add rule {chain} {marked} limit name "lp{port}" counter name "d{port}" drop',
        f'add rule {chain} {marked} limit name "lb{port}" counter name "d{port}" drop',
        # Whole datagrams only (a fragment goes to the code, which reassembles it), and their
        # don't-fragment bit cleared: the kernel ignores learned path MTUs when it forwards,
        # so a smaller path behind the relay would drop every full-size packet, where the
        # relay's own socket would fragment after the first.
        f"add rule {chain} {marked} ip frag-off & 0x3fff == 0"
        f' counter name "f{port}" notrack ip frag-off set 0 udp dport . meta mark vmap @deliver',
        f"add rule {chain} {marked} meta mark set 0",
        f"add element ip {TABLE} arrive {{ {port} : jump a{port} }}",
    ]


def _receiver(route: Route) -> list[str]:
    """The receiver's chains anew: its confirmed address may have moved since."""
    out, mark = route.out_port, MARK | route.out_port
    destination = f"ip daddr set {route.destination[0]} udp dport set {route.destination[1]}"
    return [
        f"add counter ip {TABLE} g{out}",
        f"add chain ip {TABLE} t{out}",
        f"flush chain ip {TABLE} t{out}",
        # accept: done, past the sender chain's last rule (which unmarks what it did not send).
        f'add rule ip {TABLE} t{out} counter name "g{out}" {destination} accept',
        f"add chain ip {TABLE} l{out}",
        f"flush chain ip {TABLE} l{out}",
        f"add rule ip {TABLE} l{out} ip saddr set {route.relay} udp sport set {out}",
        f"add element ip {TABLE} leave {{ {mark:#x} : jump l{out} }}",
    ]


def counters(listing: str) -> Counts:
    """The rules' counters, from the output of ``nft -j`` :data:`LISTING` (one JSON document
    per command); ValueError for unreadable text."""
    counts = Counts.empty()
    for item in _items(listing):
        counter = item.get("counter")
        if isinstance(counter, Mapping) and counter.get("table") == TABLE:
            _named(counts, counter)
        found = item.get("map")
        if (
            isinstance(found, Mapping)
            and found.get("table") == TABLE
            and found.get("name") == "deliver"
        ):
            _deliver(counts, found.get("elem"))
    return counts


def _items(listing: str) -> Iterable[Mapping[str, object]]:
    """The objects of every document in ``listing``."""
    decoder = json.JSONDecoder()
    position, end = 0, len(listing)
    while True:
        while position < end and listing[position].isspace():
            position += 1
        if position == end:
            return
        data, position = decoder.raw_decode(listing, position)
        items = data.get("nftables", []) if isinstance(data, Mapping) else []
        yield from (item for item in items if isinstance(item, Mapping))


def _counted(counter: Mapping[str, object]) -> tuple[int, int]:
    """(packets, UDP payload bytes) of an nftables counter."""
    packets, octets = counter.get("packets", 0), counter.get("bytes", 0)
    if not isinstance(packets, int) or not isinstance(octets, int):
        raise ValueError(f"not a counter: {counter!r}")
    return packets, max(0, octets - _HEADERS * packets)


def _named(counts: Counts, counter: Mapping[str, object]) -> None:
    name = str(counter.get("name", ""))
    if name[:1] not in ("f", "d", "g") or not name[1:].isdigit():
        return
    port = int(name[1:])
    packets, octets = _counted(counter)
    if name[0] == "f":
        counts.forwarded[port] = (packets, octets)
    elif name[0] == "g":
        counts.delivered[port] = (packets, octets)
    else:
        counts.dropped[port] = packets


def _deliver(counts: Counts, elements: object) -> None:
    """The ``deliver`` map's elements: ``[{"elem": {"val": {"concat": [P_X, MARK|P_Y]},
    "counter": {...}}}, verdict]``."""
    for element in elements if isinstance(elements, list) else []:
        key = element[0] if isinstance(element, list) and element else None
        elem = key.get("elem") if isinstance(key, Mapping) else None
        if not isinstance(elem, Mapping):
            continue
        value, counter = elem.get("val"), elem.get("counter")
        concat = value.get("concat") if isinstance(value, Mapping) else None
        if not isinstance(concat, list) or len(concat) != 2 or not isinstance(counter, Mapping):
            continue
        port, mark = concat
        if isinstance(port, int) and isinstance(mark, int) and mark & MARK_MASK == MARK:
            counts.directions[(port, mark & 0xFFFF)] = _counted(counter)
