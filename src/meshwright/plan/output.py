"""The plan: per-site WireGuard peers and routes, every pair's mode and path, and their forms.

A plan of n sites holds n*(n-1)/2 pairs and about n*n routes, so :class:`Plan` keeps the next
hops only and derives a site's :class:`SitePlan` (and the pairs) when asked: ``plan.sites`` is a
read-only mapping and ``plan.pairs`` a read-only sequence, both in a fixed order.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, NamedTuple, overload

from ..wire.endpoint import format_endpoint
from .links import LinkGraph
from .model import Relay
from .relays import NONE as NO_RELAY
from .relays import Allocations, AllocationView, LinkedPairs, allocate, local_ports, sorted_index
from .routing import Routing
from .validate import Node

__all__ = ["Pair", "Peer", "Plan", "Route", "SitePlan", "format_table"]

NONE = "none"


class Peer(NamedTuple):
    """One WireGuard peer of a site: a site it has a link with.

    ``allowed_ips``: the overlay address and LAN prefixes of every site whose next hop is this
    peer, sorted. ``endpoint``/``keepalive`` as WireGuard takes them (None: not set). ``mode`` is
    the link kind. ``fallback_endpoints``: the pair's other relay paths from this side, which
    the sidecar (or, on a UDP-blocked site, WireGuard's roaming) may move the peer to at run
    time: its relay allocation when ``endpoint`` is a direct one, and its standby allocation.
    """

    name: str
    public_key: str
    endpoint: str | None
    keepalive: int | None
    mode: str
    allowed_ips: tuple[str, ...]
    fallback_endpoints: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "public_key": self.public_key,
            "endpoint": self.endpoint,
            "keepalive": self.keepalive,
            "mode": self.mode,
            "allowed_ips": list(self.allowed_ips),
            "fallback_endpoints": list(self.fallback_endpoints),
        }


class Route(NamedTuple):
    """A remote prefix, the peer it goes to, the whole path (this site first) and its cost."""

    prefix: str
    via: str
    path: tuple[str, ...]
    cost: int

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "via": self.via, "path": list(self.path), "cost": self.cost}


@dataclass(frozen=True, slots=True)
class SitePlan:
    """What one site gets: peers sorted by name, routes sorted by prefix, and the mesh's
    prefixes its firewall passes (the overlay network first, then the LAN prefixes of every
    site of its connected part, its own included, sorted)."""

    name: str
    overlay_address: str
    listen_port: int
    peers: tuple[Peer, ...]
    routes: tuple[Route, ...]
    mesh_prefixes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "overlay_address": self.overlay_address,
            "listen_port": self.listen_port,
            "peers": [p.to_dict() for p in self.peers],
            "routes": [r.to_dict() for r in self.routes],
            "mesh_prefixes": list(self.mesh_prefixes),
        }


class Pair(NamedTuple):
    """How two sites (``a`` < ``b``) connect: ``mode`` is the link kind, ``via X`` (X: the first
    transit site from ``a``) or ``none``; ``path`` runs from ``a`` to ``b``; ``cost`` is None for
    ``none``."""

    a: str
    b: str
    mode: str
    path: tuple[str, ...]
    cost: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "mode": self.mode,
            "path": list(self.path),
            "cost": self.cost,
        }


class Plan:
    """The result of :func:`~meshwright.plan.build_plan`. Immutable; derived parts on demand."""

    __slots__ = (
        "_allocations",
        "_control",
        "_graph",
        "_keepalive",
        "_local",
        "_local_ports",
        "_mesh_prefixes",
        "_nodes",
        "_part",
        "_prefixes",
        "_relay_hosts",
        "_routings",
        "link_kinds",
        "overlay_network",
        "unreachable",
    )

    def __init__(
        self,
        *,
        overlay_network: str,
        link_kinds: tuple[str, ...],
        keepalive: int,
        nodes: Sequence[Node],
        graph: LinkGraph,
        routings: Sequence[Routing],
        unreachable: Mapping[str, str],
        allocations: Allocations | None = None,
        relays: Sequence[Relay] = (),
    ) -> None:
        self.overlay_network = overlay_network
        # Indexed by node index: the planner allocates over every node, in name order.
        self._allocations = allocations or allocate(LinkedPairs((), (), ()), {}, {})
        self._local_ports: dict[int, dict[str, int]] = {}  # by the site's listen port
        # Each relay's address as an endpoint's host part ("[v6]" bracketed), once.
        self._relay_hosts = [
            format_endpoint(address, 0).rsplit(":", 1)[0] for address in self._allocations.addresses
        ]
        # Relays that are WireGuard peers of the sites (control plane only).
        self._control = sorted(
            (r for r in relays if r.public_key and r.overlay_address and r.addresses),
            key=lambda r: r.name,
        )
        self.link_kinds = link_kinds
        self.unreachable: Mapping[str, str] = dict(sorted(unreachable.items()))
        self._keepalive = keepalive
        self._nodes = list(nodes)
        self._graph = graph
        self._routings = list(routings)
        # node index -> its connected part's routing (-1: a site alone) and position in it
        self._part = [-1] * len(self._nodes)
        self._local = [-1] * len(self._nodes)
        self._prefixes: list[list[tuple[str, int]]] = []
        self._mesh_prefixes: list[tuple[str, ...]] = []
        for part, routing in enumerate(self._routings):
            prefixes: list[tuple[tuple[int, int, int], str, int]] = []
            for position, i in enumerate(routing.local):
                self._part[i], self._local[i] = part, position
                prefixes.extend((key, p, position) for key, p in self._nodes[i].prefixes)
            prefixes.sort()
            self._prefixes.append([(p, position) for _, p, position in prefixes])
            self._mesh_prefixes.append(self._lan_prefixes(routing.local))

    # --- views ---------------------------------------------------------------------------------

    @property
    def allocations(self) -> AllocationView:
        """The relay allocation of every linked pair (when the mesh has relays), by (a, b)."""
        return self._allocations.preferred

    @property
    def standby_allocations(self) -> AllocationView:
        """The standby allocation (another relay: failover) of every pair that has one."""
        return self._allocations.standby

    def site_port(self, name: str) -> int | None:
        """``name``'s relay port (the same on every relay); None when it has none."""
        return self._allocations.port(name)

    def local_ports(self, name: str) -> dict[str, int]:
        """Relay -> the loopback port ``L_r`` of UDP-blocked site ``name``'s sidecar for that
        relay (:func:`.relays.local_ports`), for every relay of the mesh."""
        for node in self._nodes_named(name):
            return self._local_ports_of(node)
        raise KeyError(name)

    @property
    def relay_addresses(self) -> dict[str, str]:
        """Every relay that carries allocations -> the address its site ports are bound on."""
        found = self._allocations
        return dict(zip(found.relays, found.addresses, strict=True))

    def relays_of(self, name: str) -> list[str]:
        """The relays that carry an allocation or standby allocation of site ``name``."""
        try:
            i = self._allocations.site_index(name)
        except KeyError:
            return []
        return [
            r for r, sites in self._allocations.sites_on().items() if sorted_index(sites, i) >= 0
        ]

    @property
    def keepalive(self) -> int:
        return self._keepalive

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self._nodes)

    @property
    def sites(self) -> Mapping[str, SitePlan]:
        """Every site's plan, by name (computed on access, not cached)."""
        return _Sites(self)

    @property
    def pairs(self) -> Sequence[Pair]:
        """Every unordered pair of sites, sorted by (a, b)."""
        return _Pairs(self)

    @property
    def stats(self) -> dict[str, int]:
        """How the routing solved the ordered pairs (for benchmarks): ``two_hop_pairs`` by the
        nearest-midpoint transit, ``pending_pairs`` by the per-destination search; and the
        number of groups of interchangeable sites."""
        stats = {"two_hop_pairs": 0, "pending_pairs": 0, "groups": len(self._graph.members)}
        for routing in self._routings:
            for key, value in routing.stats.items():
                stats[key] += value
        return stats

    def site(self, name: str) -> SitePlan:
        """One site's plan; KeyError for an unknown name."""
        for node in self._nodes_named(name):
            return self._site_plan(node)
        raise KeyError(name)

    # --- output forms --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the same input gives the same dict, key for key, item for item."""
        return {
            "overlay_network": self.overlay_network,
            "link_kinds": list(self.link_kinds),
            "keepalive": self._keepalive,
            "sites": {node.name: self._site_plan(node).to_dict() for node in self._nodes},
            "pairs": [pair.to_dict() for pair in self.pairs],
            "unreachable": dict(self.unreachable),
            "allocations": [a.to_dict() for a in self.allocations.values()],
            "standby_allocations": [a.to_dict() for a in self.standby_allocations.values()],
            "relays": self._relay_plans(),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON, byte-identical for the same input, made for line diffs.

        Keys sorted; mappings one key per line; a list of mappings one item per line (a pair,
        a peer, a route), each item on one line: a change to the plan shows as changed lines.
        """
        lines: list[str] = []
        _write_json(self.to_dict(), 0, "", lines)
        return "\n".join(lines) + "\n"

    # --- internals -----------------------------------------------------------------------------

    def _nodes_named(self, name: str) -> list[Node]:
        lo, hi = 0, len(self._nodes)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._nodes[mid].name < name:
                lo = mid + 1
            else:
                hi = mid
        return [self._nodes[lo]] if lo < len(self._nodes) and self._nodes[lo].name == name else []

    def _lan_prefixes(self, members: Sequence[int]) -> tuple[str, ...]:
        """The overlay network, then the LAN prefixes of these nodes (all but overlay /32s)."""
        lans = sorted(
            item
            for i in members
            for item in self._nodes[i].prefixes
            if item[1] != self._nodes[i].overlay
        )
        return (self.overlay_network, *(prefix for _, prefix in lans))

    def _site_plan(self, node: Node) -> SitePlan:
        address = node.overlay.split("/")[0]
        part, me = self._part[node.index], self._local[node.index]
        if part < 0:
            alone = self._lan_prefixes((node.index,))
            return SitePlan(node.name, address, node.site.listen_port, (), (), alone)
        routing = self._routings[part]
        nodes, local = self._nodes, routing.local
        names = [nodes[i].name for i in local]
        next_hop = routing.next_hop
        row = next_hop[me]
        # every destination's path and cost, once (fast paths for one and two links)
        group = [self._graph.group_of[i] for i in local]
        cost = self._graph.cost
        my_cost = cost[group[me]]
        my_name = node.name
        paths: list[tuple[str, ...]] = [()] * len(local)
        costs = [0] * len(local)
        for d in range(len(local)):
            hop = row[d]
            if d == me:
                continue
            if hop == d:
                paths[d] = (my_name, names[d])
                costs[d] = my_cost[group[d]]
            elif next_hop[hop][d] == d:
                paths[d] = (my_name, names[hop], names[d])
                costs[d] = my_cost[group[hop]] + cost[group[hop]][group[d]]
            else:
                hops = routing.path(me, d)
                paths[d] = tuple(names[h] for h in hops)
                costs[d] = routing.path_cost(hops)
        new, prefixes = tuple.__new__, self._prefixes[part]
        vias = [names[hop] for hop in row]
        routes = [
            new(Route, (prefix, vias[d], paths[d], costs[d])) for prefix, d in prefixes if d != me
        ]
        buckets: dict[int, list[str]] = defaultdict(list)
        for prefix, d in prefixes:
            if d != me:
                buckets[row[d]].append(prefix)
        graph = self._graph
        allocations = self._allocations
        relays_of_pair = (
            allocations.relays_of_pair if allocations.relays else lambda i, j: (NO_RELAY, NO_RELAY)
        )
        relay_names, relay_hosts = allocations.relays, self._relay_hosts
        own_port = allocations.ports[node.index] if allocations.relays else 0

        def via(r: int) -> str:
            # The relay's address and this site's own port; a site that cannot send UDP
            # reaches it through its sidecar, which listens on loopback (one port per relay)
            # and carries it over TLS.
            if node.eclass == "blocked":
                return f"127.0.0.1:{self._local_ports_of(node)[relay_names[r]]}"
            return f"{relay_hosts[r]}:{own_port}"

        peers = []
        for hop in sorted(buckets):
            other = nodes[local[hop]]
            kind = graph.link(node.index, other.index)
            if kind is None:  # pragma: no cover - a next hop is always a linked neighbour
                raise RuntimeError(f"routing: {node.name} routes to {other.name} without a link")
            endpoint, keepalive = _peer_settings(node, other, kind, self._keepalive)
            relayed = [via(r) for r in relays_of_pair(node.index, other.index) if r != NO_RELAY]
            if relayed and kind != "direct":  # a direct pair starts on its direct path
                endpoint = relayed.pop(0)
            peers.append(
                Peer(
                    other.name,
                    other.site.public_key or "",
                    endpoint,
                    keepalive,
                    kind,
                    tuple(buckets[hop]),
                    tuple(relayed),
                )
            )
        if node.eclass != "blocked":  # a site that cannot send UDP has no UDP path to a relay
            for relay in self._control:
                endpoint = format_endpoint(ip_address(relay.addresses[0]), relay.listen_port)
                keepalive_s = None if node.eclass == "open" else self._keepalive
                allowed = (
                    f"{relay.overlay_address}/{32 if '.' in str(relay.overlay_address) else 128}",
                )
                peers.append(
                    Peer(
                        relay.name,
                        relay.public_key or "",
                        endpoint,
                        keepalive_s,
                        "control",
                        allowed,
                    )
                )
            peers.sort(key=lambda p: p.name)
        return SitePlan(
            node.name,
            address,
            node.site.listen_port,
            tuple(peers),
            tuple(routes),
            self._mesh_prefixes[part],
        )

    def _local_ports_of(self, node: Node) -> dict[str, int]:
        listen_port = node.site.listen_port
        found = self._local_ports.get(listen_port)
        if found is None:
            found = local_ports(self._allocations.relays, avoid=(listen_port,))
            self._local_ports[listen_port] = found
        return found

    def _relay_plans(self) -> dict[str, dict[str, Any]]:
        """Every relay: its address and the sites it serves (each with its port and key); and
        for a control-plane relay its WireGuard (:meth:`_relay_plan`)."""
        allocations = self._allocations
        names, ports, keys = allocations.pairs.names, allocations.ports, allocations.keys
        on = allocations.sites_on()
        plans: dict[str, dict[str, Any]] = {
            relay: {
                "address": address,
                "sites": [
                    {"name": names[i], "port": ports[i], "public_key": keys[i]} for i in on[relay]
                ],
            }
            for relay, address in zip(allocations.relays, allocations.addresses, strict=True)
        }
        for relay in self._control:
            plans.setdefault(relay.name, {}).update(self._relay_plan(relay))
        return plans

    def _relay_plan(self, relay: Relay) -> dict[str, Any]:
        """A relay's WireGuard: every site that can send UDP, allowed only its overlay address."""
        peers = [
            Peer(
                node.name,
                node.site.public_key or "",
                None,  # sites reach the relay (it is open); WireGuard learns where they are
                None,
                "control",
                (node.overlay,),
            ).to_dict()
            for node in self._nodes
            if node.eclass != "blocked" and node.site.public_key
        ]
        return {
            "overlay_address": relay.overlay_address,
            "listen_port": relay.listen_port,
            "peers": peers,
        }

    def _pair(self, i: int, j: int) -> Pair:
        return next(self._pairs_from(i, j, j + 1))

    def _pairs_from(self, i: int, start: int, stop: int) -> Iterator[Pair]:
        """Pairs (i, j) for j in range(start, stop), in order."""
        nodes, local, part = self._nodes, self._local, self._part
        a = nodes[i]
        s, mine = local[i], part[i]
        new = tuple.__new__
        if mine < 0:
            for j in range(start, stop):
                yield new(Pair, (a.name, nodes[j].name, NONE, (), None))
            return
        routing = self._routings[mine]
        group_of, cost, kind = self._graph.group_of, self._graph.cost, self._graph.kind
        next_hop = routing.next_hop
        row = next_hop[s]
        local_nodes = routing.local
        names = [nodes[k].name for k in local_nodes]
        ga = group_of[i]
        for j in range(start, stop):
            d = local[j]
            b = nodes[j].name
            if part[j] != mine:
                yield new(Pair, (a.name, b, NONE, (), None))
                continue
            hop = row[d]
            if hop == d:
                gb = group_of[j]
                yield new(Pair, (a.name, b, kind[ga][gb], (a.name, b), cost[ga][gb]))
                continue
            gx = group_of[local_nodes[hop]]
            path: tuple[str, ...]
            if next_hop[hop][d] == d:
                gb = group_of[j]
                total = cost[ga][gx] + cost[gx][gb]
                path = (a.name, names[hop], b)
            else:
                hops = routing.path(s, d)
                path, total = tuple(names[h] for h in hops), routing.path_cost(hops)
            yield new(Pair, (a.name, b, f"via {names[hop]}", path, total))


_INLINE = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(", ", ": ")).encode


def _write_json(value: Any, depth: int, head: str, lines: list[str]) -> None:
    """Append ``head`` + ``value`` as indented JSON lines (see :meth:`Plan.to_json`)."""
    pad = " " * depth
    if isinstance(value, dict) and value:
        lines.append(f"{pad}{head}{{")
        last = len(value) - 1
        for k, key in enumerate(sorted(value)):
            _write_json(value[key], depth + 1, f"{_INLINE(key)}: ", lines)
            if k < last:
                lines[-1] += ","
        lines.append(f"{pad}}}")
    elif isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        lines.append(f"{pad}{head}[")
        inner = " " * (depth + 1)
        encoded = [inner + _INLINE(item) for item in value]
        lines.append(",\n".join(encoded))
        lines.append(f"{pad}]")
    else:
        lines.append(f"{pad}{head}{_INLINE(value)}")


def _peer_settings(
    node: Node, other: Node, kind: str, keepalive: int
) -> tuple[str | None, int | None]:
    """Endpoint and keepalive ``node`` holds for ``other`` on a link of ``kind``.

    direct: the NATed side initiates (holds the open side's endpoint, sends keepalives); an open
    side holds no endpoint for a NATed peer (WireGuard roams to it); two open sites hold each
    other's endpoints and need no keepalive. punch, relay, relay-tcp: the traversal sidecar sets
    the endpoint at run time; keepalives hold the NAT mappings open, on both sides.
    """
    if kind == "direct":
        endpoint = other.endpoint if other.eclass == "open" else None
        return endpoint, None if node.eclass == "open" else keepalive
    return None, keepalive


class _Sites(Mapping[str, SitePlan]):
    __slots__ = ("_plan",)

    def __init__(self, plan: Plan) -> None:
        self._plan = plan

    def __getitem__(self, name: str) -> SitePlan:
        return self._plan.site(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan.site_names)

    def __len__(self) -> int:
        return len(self._plan._nodes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self._plan._nodes_named(name))


class _Pairs(Sequence[Pair]):
    __slots__ = ("_n", "_plan")

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._n = len(plan._nodes)

    def __len__(self) -> int:
        return self._n * (self._n - 1) // 2

    def __iter__(self) -> Iterator[Pair]:
        for i in range(self._n):
            yield from self._plan._pairs_from(i, i + 1, self._n)

    @overload
    def __getitem__(self, index: int) -> Pair: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Pair]: ...

    def __getitem__(self, index: int | slice) -> Pair | Sequence[Pair]:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("pair index out of range")
        # row i holds pairs (i, i+1..n-1): n-1-i of them
        n, i = self._n, 0
        while index >= n - 1 - i:
            index -= n - 1 - i
            i += 1
        return self._plan._pair(i, i + 1 + index)


def format_table(plan: Plan) -> str:
    """One line per pair (pair, mode, cost, path), then the unreachable sites: for people."""
    rows = [("pair", "mode", "cost", "path")]
    for pair in plan.pairs:
        rows.append(
            (
                f"{pair.a} -- {pair.b}",
                pair.mode,
                "-" if pair.cost is None else str(pair.cost),
                " > ".join(pair.path) if pair.path else "-",
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    lines = [
        f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2].rjust(widths[2])}  {row[3]}"
        for row in rows
    ]
    for name, reason in plan.unreachable.items():
        lines.append(f"unreachable: {name}: {reason}")
    return "\n".join(lines) + "\n"
