"""Relay allocations: every site's relay port, and each linked pair's relay and standby relay.

Site ports. Every site that has a linked pair gets one relay port ``P``: the same number on every
relay, from the ports that lie in every relay's range (:class:`RelayPorts`, from the
inventory's ``relay_first_port`` and ``relay_last_port``) and are no relay's own WireGuard port.
A relay sends everything meant for a site out of the site's port and tells the site's sessions
apart by WireGuard's indices (:mod:`meshwright.relay.sites`), so its state grows with the sites,
not the pairs. A site's WireGuard endpoint for a peer relayed through relay r is ``r:P``, its
own port; a UDP-blocked site reaches its port through the relay's TLS service instead (its
sidecar listens on ``127.0.0.1:L_r``, :func:`local_ports`).

Relays. When the mesh has relays, every linked pair, of every kind, gets an allocation: a relayed
pair uses it, a punch pair starts on it (connect first) until the sidecar upgrades it, and a
direct pair falls back to it when its direct path dies. A pair goes to the relay with the lowest
round trip (the two sites' probe RTTs added up), spread: among relays within ``NEAR_MS`` of the
best it takes the one carrying fewest allocations.

Standby. With two relays or more, every linked pair also gets a *standby* allocation on the
best *other* relay (the same ranking). The traversal sidecar of a UDP site moves the pair there
when its relay dies (docs/relays.md, "Relay failover"), and a UDP-blocked site's WireGuard
follows it there (its TLS carrier keeps a connection to every relay of its pairs): no new
plan, no Ansible run. The plan's choice stays the preferred one.

Stable: a site keeps the port, and a pair its relay and standby relay, that the previous plan
gave it while they are still valid, so a new plan never moves a working pair (and RTTs that vary
run to run never rewrite the plan). A previous plan of the older per-pair form (a ``slot`` and a
port pair per allocation) is read too: its relays are kept, and a site's first port in it is
kept when it is a valid site port.

Compact: a mesh of n sites has up to n*(n-1)/2 linked pairs, so the choices are kept as one byte
per pair (a relay's index) in rows that mirror :class:`LinkedPairs`, and a
:class:`RelayAllocation` is made only when one is asked for (:class:`AllocationView`).
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..wire.endpoint import format_endpoint
from .model import DEFAULT_RELAY_FIRST_PORT, DEFAULT_RELAY_LAST_PORT, LINK_KINDS

__all__ = [
    "LOCAL_PORT_COUNT",
    "LOCAL_PORT_FIRST",
    "MAX_RELAYS",
    "AllocationView",
    "Allocations",
    "LinkedPairs",
    "RelayAllocation",
    "RelayPorts",
    "allocate",
    "local_ports",
    "site_ports",
    "sorted_index",
]

NEAR_MS = 10.0
UNKNOWN_RTT_MS = 500.0  # a site with no RTT to a relay (a UDP-blocked site): ranks it last

NONE = 255  # "no relay" in a row of relay indices (one byte per pair)
MAX_RELAYS = NONE

# A UDP-blocked site's sidecar listens for WireGuard on 127.0.0.1:L_r, one port per relay r.
# Below Linux's ephemeral range (32768-60999): no outgoing socket of the site holds one.
LOCAL_PORT_FIRST = 31000
LOCAL_PORT_COUNT = 1000

# Above this many RTT classes (distinct rows of round trips) the relays' ranking of a pair is
# worked out per pair, not kept per pair of classes (whose table grows with their square).
_MAX_CACHED_CLASSES = 2048

_KIND_INDEX = {kind: k for k, kind in enumerate(LINK_KINDS)}


@dataclass(frozen=True, slots=True)
class RelayPorts:
    """A relay's site ports, ``first`` to ``last`` inclusive; never its ``reserved`` port (its
    own WireGuard port, which may fall inside the range)."""

    first: int = DEFAULT_RELAY_FIRST_PORT
    last: int = DEFAULT_RELAY_LAST_PORT
    reserved: int | None = None


@dataclass(frozen=True, slots=True)
class RelayAllocation:
    """One pair on one relay: ``a`` < ``b``; ``ports`` are a's and b's site ports (the same
    number on every relay)."""

    a: str
    b: str
    kind: str
    relay: str
    address: str
    ports: tuple[int, int]
    public_keys: tuple[str, str]  # a's and b's: the relay checks each handshake's mac1
    standby: bool = False  # the pair's standby allocation (its relay's failover), not its own

    def port_of(self, site: str) -> int:
        return self.ports[0] if site == self.a else self.ports[1]

    def endpoint_of(self, site: str) -> str:
        """The WireGuard endpoint ``site`` holds for the other site of the pair: the relay's
        address and ``site``'s own port."""
        return format_endpoint(self.address, self.port_of(site))

    def to_dict(self) -> dict[str, object]:
        return {
            "a": self.a,
            "b": self.b,
            "kind": self.kind,
            "relay": self.relay,
            "address": self.address,
            "ports": list(self.ports),
            "public_keys": list(self.public_keys),
            **({"standby": True} if self.standby else {}),
        }


def sorted_index(ascending: Sequence[int], value: int) -> int:
    """Where ``value`` is in the ascending sequence, or -1."""
    k = bisect_left(ascending, value)
    return k if k < len(ascending) and ascending[k] == value else -1


class LinkedPairs:
    """The linked pairs of a mesh, compactly: ``partners[a]`` lists (ascending) every site
    ``b`` > ``a`` linked with site ``a``, ``kinds[a]`` the links' kinds (indices into
    LINK_KINDS). Sites are indices into ``names``, which is sorted."""

    __slots__ = ("kinds", "names", "partners")

    def __init__(
        self, names: Sequence[str], partners: Sequence[array[int]], kinds: Sequence[bytes]
    ) -> None:
        self.names = names
        self.partners = partners
        self.kinds = kinds

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str, str]]) -> LinkedPairs:
        """From (a, b, kind) triples (either order of a and b)."""
        found = {(min(a, b), max(a, b)): kind for a, b, kind in pairs}
        names = sorted({name for pair in found for name in pair})
        index = {name: i for i, name in enumerate(names)}
        rows: list[list[tuple[int, int]]] = [[] for _ in names]
        for (a, b), kind in sorted(found.items()):
            rows[index[a]].append((index[b], _KIND_INDEX[kind]))
        return cls(
            names,
            [array("I", (b for b, _ in row)) for row in rows],
            [bytes(k for _, k in row) for row in rows],
        )

    def __len__(self) -> int:
        return sum(len(row) for row in self.partners)

    def find(self, a: int, b: int) -> int:
        """The position of ``b`` in ``a``'s row (``a`` < ``b``), or -1."""
        return sorted_index(self.partners[a], b)


class Allocations:
    """Every linked pair's relay (:attr:`preferred`) and standby relay (:attr:`standby`), and
    every site's port: the result of :func:`allocate`."""

    __slots__ = ("_index", "_on", "addresses", "keys", "pairs", "ports", "relays", "rows")

    def __init__(
        self,
        pairs: LinkedPairs,
        relays: Sequence[str],
        addresses: Sequence[str],
        rows: tuple[Sequence[bytearray], Sequence[bytearray]],
        ports: array[int],
        keys: Sequence[str],
    ) -> None:
        self.pairs = pairs
        self.relays = tuple(relays)  # sorted names; a row's byte is an index into them
        self.addresses = tuple(addresses)
        self.rows = rows  # (preferred, standby), shaped as pairs.partners; NONE: no allocation
        self.ports = ports  # by site index; 0: the site has no port (no linked pair)
        self.keys = keys  # public keys, by site index
        self._index: dict[str, int] | None = None
        self._on: dict[str, list[int]] | None = None

    @property
    def preferred(self) -> AllocationView:
        """Each pair's allocation on its relay, by (a, b)."""
        return AllocationView(self, False)

    @property
    def standby(self) -> AllocationView:
        """Each pair's standby allocation (another relay: failover), by (a, b)."""
        return AllocationView(self, True)

    def site_index(self, name: str) -> int:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.pairs.names)}
        return self._index[name]

    def port(self, name: str) -> int | None:
        """``name``'s site port, None when it has none."""
        try:
            port = self.ports[self.site_index(name)]
        except KeyError:
            return None
        return port or None

    def relays_of_pair(self, a: int, b: int) -> tuple[int, int]:
        """The relay indices (preferred, standby) of the pair of sites ``a`` and ``b`` (either
        order); NONE where there is none."""
        if a > b:
            a, b = b, a
        k = self.pairs.find(a, b)
        return (NONE, NONE) if k < 0 else (self.rows[0][a][k], self.rows[1][a][k])

    def sites_on(self) -> dict[str, list[int]]:
        """Relay name -> the sites (ascending indices) with an allocation or standby on it."""
        if self._on is None:
            marks = [bytearray(len(self.pairs.names)) for _ in self.relays]
            for rows in self.rows:
                for a, (partners, row) in enumerate(zip(self.pairs.partners, rows, strict=True)):
                    for r in set(row) - {NONE}:
                        marks[r][a] = 1
                    for b, r in zip(partners, row, strict=True):
                        if r != NONE:
                            marks[r][b] = 1
            self._on = {
                name: [i for i, mark in enumerate(marks[r]) if mark]
                for r, name in enumerate(self.relays)
            }
        return self._on

    def make(self, a: int, k: int, standby: bool) -> RelayAllocation:
        """The allocation of row ``a``'s ``k``-th pair."""
        b = self.pairs.partners[a][k]
        r = self.rows[standby][a][k]
        names = self.pairs.names
        return RelayAllocation(
            names[a],
            names[b],
            LINK_KINDS[self.pairs.kinds[a][k]],
            self.relays[r],
            self.addresses[r],
            (self.ports[a], self.ports[b]),
            (self.keys[a], self.keys[b]),
            standby,
        )


class AllocationView(Mapping[tuple[str, str], RelayAllocation]):
    """The preferred or the standby allocations, by (a, b), sorted; made when read."""

    __slots__ = ("_all", "_standby")

    def __init__(self, allocations: Allocations, standby: bool) -> None:
        self._all = allocations
        self._standby = standby

    def _where(self, key: object) -> tuple[int, int] | None:
        if not (isinstance(key, tuple) and len(key) == 2):
            return None
        try:
            a, b = (self._all.site_index(name) for name in key)
        except (KeyError, TypeError):
            return None
        if a >= b:
            return None
        k = self._all.pairs.find(a, b)
        if k < 0 or self._all.rows[self._standby][a][k] == NONE:
            return None
        return a, k

    def __getitem__(self, key: tuple[str, str]) -> RelayAllocation:
        where = self._where(key)
        if where is None:
            raise KeyError(key)
        return self._all.make(*where, self._standby)

    def __contains__(self, key: object) -> bool:
        return self._where(key) is not None

    def __len__(self) -> int:
        return sum(len(row) - row.count(NONE) for row in self._all.rows[self._standby])

    def _positions(self) -> Iterator[tuple[int, int]]:
        for a, row in enumerate(self._all.rows[self._standby]):
            if len(row) != row.count(NONE):
                for k, r in enumerate(row):
                    if r != NONE:
                        yield a, k

    def __iter__(self) -> Iterator[tuple[str, str]]:
        names, partners = self._all.pairs.names, self._all.pairs.partners
        for a, k in self._positions():
            yield names[a], names[partners[a][k]]

    def values(self) -> Iterator[RelayAllocation]:  # type: ignore[override]
        make, standby = self._all.make, self._standby
        for a, k in self._positions():
            yield make(a, k, standby)

    def items(self) -> Iterator[tuple[tuple[str, str], RelayAllocation]]:  # type: ignore[override]
        for allocation in self.values():
            yield (allocation.a, allocation.b), allocation


def site_ports(
    sites: Iterable[str],
    ports: Mapping[str, RelayPorts],
    previous: Mapping[str, int],
) -> dict[str, int]:
    """Each site's relay port: its previous one when still usable, else the lowest free one.

    ValueError when the relays' common range has too few ports for the sites.
    """
    spans = list(ports.values()) or [RelayPorts()]
    first, last = max(s.first for s in spans), min(s.last for s in spans)
    reserved = {s.reserved for s in spans}
    wanted = sorted(set(sites))
    result: dict[str, int] = {}
    taken: set[int] = set()
    for site in wanted:
        port = previous.get(site)
        if port is not None and first <= port <= last and port not in reserved | taken:
            result[site] = port
            taken.add(port)
    port = first
    for site in wanted:
        if site in result:
            continue
        while port <= last and (port in taken or port in reserved):
            port += 1
        if port > last:
            common = f"{first}-{last}" if first <= last else "none"
            raise ValueError(
                f"no free relay port for {site}: the ports every relay has ({common}) are"
                f" fewer than the {len(wanted)} sites with relay paths; widen"
                " relay_first_port to relay_last_port"
            )
        result[site] = port
        taken.add(port)
    return result


def local_ports(relays: Iterable[str], avoid: Collection[int] = ()) -> dict[str, int]:
    """Relay name -> ``L_r``: the loopback port a UDP-blocked site's sidecar listens on for the
    peers relayed through r (WireGuard's endpoint for them is ``127.0.0.1:L_r``).

    ``L_r`` is ``LOCAL_PORT_FIRST`` + (a hash of r's name modulo ``LOCAL_PORT_COUNT``); relays
    are placed in name order, and one whose port is taken (or in ``avoid``: the site's own
    WireGuard port) takes the next free one, wrapping. So a relay keeps its port when others
    come and go, unless a new one that sorts before it lands on it.
    """
    result: dict[str, int] = {}
    taken = set(avoid)
    for name in sorted(set(relays)):
        digest = hashlib.sha256(b"meshwright-local-port\0" + name.encode()).digest()
        start = int.from_bytes(digest[:4], "big") % LOCAL_PORT_COUNT
        for step in range(LOCAL_PORT_COUNT):
            port = LOCAL_PORT_FIRST + (start + step) % LOCAL_PORT_COUNT
            if port not in taken:
                break
        else:
            raise ValueError(f"no free local port for relay {name}: too many relays")
        result[name] = port
        taken.add(port)
    return result


def allocate(
    pairs: LinkedPairs | Iterable[tuple[str, str, str]],
    relays: Mapping[str, str],
    rtt_ms: Mapping[str, Mapping[str, float]],
    previous: Sequence[Mapping[str, object]] = (),
    public_keys: Mapping[str, str] | None = None,
    ports: Mapping[str, RelayPorts] | None = None,
) -> Allocations:
    """Every pair's allocation and standby allocation, and every site's port (see the module's
    docstring). ``pairs``: the linked pairs, or (a, b, kind) triples; ``relays``: name ->
    address; ``rtt_ms[site][relay]``: the probe's round trips; ``previous``: the last plan's
    allocations as :meth:`RelayAllocation.to_dict` wrote them (standby ones marked
    ``"standby": true``), kept while valid; ``public_keys``: every site's WireGuard key;
    ``ports``: each relay's port range (default :class:`RelayPorts`).

    ValueError when the relays have too few common ports for the sites, or there are more than
    MAX_RELAYS relays.
    """
    linked = pairs if isinstance(pairs, LinkedPairs) else LinkedPairs.of(pairs)
    names = linked.names
    relay_names = sorted(relays)
    if len(relay_names) >= MAX_RELAYS:
        raise ValueError(f"{len(relay_names)} relays: a mesh has at most {MAX_RELAYS - 1}")
    keys = [(public_keys or {}).get(name, "") for name in names]
    count = len(relay_names)
    if not count:  # no relay: no allocation, no port
        empty = [bytearray(b"\xff") * len(row) for row in linked.partners]
        return Allocations(linked, (), (), (empty, empty), array("I", bytes(4 * len(names))), keys)
    ranges = {name: (ports or {}).get(name, RelayPorts()) for name in relay_names}
    index = {name: i for i, name in enumerate(names)}
    relay_index = {name: r for r, name in enumerate(relay_names)}

    # Sites with a linked pair, and their previous ports and choices.
    with_pairs: set[int] = set()
    for a, partners in enumerate(linked.partners):
        if len(with_pairs) == len(names):
            break  # with relays, often after the first row
        if partners:
            with_pairs.add(a)
            with_pairs.update(partners)
    old_port: dict[str, int] = {}
    kept: list[tuple[int, int, int, bool]] = []  # (a, position, relay, standby)
    for old in previous:
        a_name, b_name = old.get("a"), old.get("b")
        if not (isinstance(a_name, str) and isinstance(b_name, str)):
            continue
        old_ports = old.get("ports")
        if isinstance(old_ports, list | tuple) and len(old_ports) == 2:
            for site, port in ((a_name, old_ports[0]), (b_name, old_ports[1])):
                if isinstance(port, int) and not isinstance(port, bool):
                    old_port.setdefault(site, port)
        a, b = index.get(a_name, -1), index.get(b_name, -1)
        relay = old.get("relay")
        if a < 0 or b < 0 or not isinstance(relay, str) or relay not in relay_index:
            continue
        if a > b:
            a, b = b, a
        k = linked.find(a, b)
        if k >= 0:
            kept.append((a, k, relay_index[relay], bool(old.get("standby"))))
    named_ports = site_ports((names[i] for i in with_pairs), ranges, old_port)
    site_port = array("I", (named_ports.get(name, 0) for name in names))

    # Each site's round trips as a row over the relays; sites with the same row share a class,
    # and the ranking of relays is worked out once per pair of classes.
    classes: dict[tuple[float, ...], int] = {}
    rtt_rows: list[tuple[float, ...]] = []
    class_of = array("I")
    for name in names:
        known = rtt_ms.get(name, {})
        rtts = tuple(float(known.get(relay, UNKNOWN_RTT_MS)) for relay in relay_names)
        c = classes.setdefault(rtts, len(classes))
        if c == len(rtt_rows):
            rtt_rows.append(rtts)
        class_of.append(c)
    Ranking = tuple[tuple[int, ...], tuple[int, ...]]
    # rankings[ca][cb]: for a pair of sites of classes ca and cb, the near relays (within
    # NEAR_MS of the best, nearest first) and the far ones; made when first needed, and kept
    # only while the classes are few (probed RTTs make every site a class of its own).
    cached = count > 2 and len(rtt_rows) <= _MAX_CACHED_CLASSES  # two relays: no ranking
    rankings: list[list[Ranking | None]] = [
        [None] * len(rtt_rows) if cached else [] for _ in rtt_rows
    ]

    def ranking(ca: int, cb: int) -> Ranking:
        sums = [x + y for x, y in zip(rtt_rows[ca], rtt_rows[cb], strict=True)]
        order = sorted(range(count), key=sums.__getitem__)  # stable: ties by name
        limit = sums[order[0]] + NEAR_MS
        near = 1
        while near < count and sums[order[near]] <= limit:
            near += 1
        found = (tuple(order[:near]), tuple(order[near:]))
        if cached:
            rankings[ca][cb] = found
        return found

    load = [0] * count  # allocations (preferred and standby) per relay
    preferred = [bytearray(b"\xff") * len(row) for row in linked.partners]
    standby = [bytearray(b"\xff") * len(row) for row in linked.partners]
    if count == 1:
        preferred = [bytearray(len(row)) for row in linked.partners]
    for a, k, r, spare in kept:
        if not spare and preferred[a][k] == NONE:
            preferred[a][k] = r
            load[r] += 1
    # The loops below run once per pair.
    if count == 2:
        # The rule of the general case, written out for two relays (the sums compared as
        # there): the nearer one, or the less loaded when both are near.
        rtt0 = [rtt_rows[c][0] for c in class_of]
        rtt1 = [rtt_rows[c][1] for c in class_of]
        load0, load1 = load
        with_kept = {a for a, _, _, spare in kept if not spare}
        for a, partners in enumerate(linked.partners):
            a0, a1 = rtt0[a], rtt1[a]
            if a not in with_kept:
                picks: list[int] = []
                pick = picks.append
                for b in partners:
                    s0, s1 = a0 + rtt0[b], a1 + rtt1[b]
                    if s0 <= s1:
                        if s1 > s0 + NEAR_MS or load0 <= load1:
                            pick(0)
                            load0 += 1
                        else:
                            pick(1)
                            load1 += 1
                    elif s0 > s1 + NEAR_MS or load1 <= load0:
                        pick(1)
                        load1 += 1
                    else:
                        pick(0)
                        load0 += 1
                preferred[a] = bytearray(picks)
                continue
            chosen = preferred[a]
            for k, b in enumerate(partners):
                if chosen[k] != NONE:
                    continue
                s0, s1 = a0 + rtt0[b], a1 + rtt1[b]
                if s0 <= s1:
                    r = 0 if s1 > s0 + NEAR_MS or load0 <= load1 else 1
                else:
                    r = 1 if s0 > s1 + NEAR_MS or load1 <= load0 else 0
                chosen[k] = r
                if r:
                    load1 += 1
                else:
                    load0 += 1
    elif count > 2:
        for a, partners in enumerate(linked.partners):
            chosen, ca = preferred[a], class_of[a]
            of_a = rankings[ca]
            for k, b in enumerate(partners):
                if chosen[k] != NONE:
                    continue
                cb = class_of[b]
                near = ((of_a[cb] if cached else None) or ranking(ca, cb))[0]
                r = near[0] if len(near) == 1 else min(near, key=load.__getitem__)
                chosen[k] = r
                load[r] += 1
    if count == 2:
        # The standby is the other relay (a kept one can be nothing else): whole rows at once.
        other = bytes.maketrans(b"\x00\x01", b"\x01\x00")
        for a, own in enumerate(preferred):
            if own:
                standby[a] = bytearray(own.translate(other))
    elif count > 2:
        for a, k, r, spare in kept:
            if spare and standby[a][k] == NONE and r != preferred[a][k]:
                standby[a][k] = r
                load[r] += 1
        for a, partners in enumerate(linked.partners):
            spares, own = standby[a], preferred[a]
            of_a, ca = rankings[class_of[a]], class_of[a]
            for k, b in enumerate(partners):
                if spares[k] != NONE:
                    continue
                mine = own[k]
                cb = class_of[b]
                near, far = (of_a[cb] if cached else None) or ranking(ca, cb)
                others = [x for x in near if x != mine]
                if others:
                    r = min(others, key=load.__getitem__)
                else:
                    r = next(x for x in far if x != mine)
                spares[k] = r
                load[r] += 1
    addresses = [relays[name] for name in relay_names]
    return Allocations(linked, relay_names, addresses, (preferred, standby), site_port, keys)
