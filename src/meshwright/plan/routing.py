"""Least-cost paths between every two sites of one connected part of the mesh.

Weights. A link ``u-v`` weighs ``cost(u, v) * 2**160 + (h(u) - h(v))**2``, where ``h`` is a 64-bit
hash of the site's name (sha256). Integer comparison of path weights is then lexicographic: base
cost first (any sum of up to 2**32 squares stays below 2**160), the hash term only breaks ties.
The weight of a link is the same in both directions and depends on the two names alone, so:

* least-weight paths are unique (two different simple paths differ in at least one link
  ``u-v``, whose term ``-2 h(u) h(v)`` makes the difference of their weights a nonzero
  polynomial of degree 2 in the hashes; for random 64-bit hashes it is zero with probability at
  most 2**-63, Schwartz-Zippel);
* unique shortest paths are symmetric (``path(d, s)`` is ``path(s, d)`` reversed) and closed
  under sub-paths, so every site's next hops agree with every path through it;
* adding a site changes a pair's path only if a path through the new site weighs less;
  removing one changes only the pairs whose path used it. Nothing depends on rank or order.

The search. Any single link (cost at most 19) beats any two links (at least 20), so a linked
pair uses its own link: only unlinked pairs are searched. For an unlinked pair of groups the
best two-link paths cost ``b2`` = min over transit groups of the two link costs; if ``b2`` is
below ``m(s) + m_mid + m(d)`` (cheapest link of each end plus the cheapest link anywhere: a
lower bound of every path of three links or more) the best path has two links, and among the
transits ``x`` of those groups it minimises ``(h(s) - h(x))**2 + (h(x) - h(d))**2 =
2 (h(x) - m)**2 + const`` with ``m`` the midpoint of ``h(s)`` and ``h(d)``: the transit whose
hash is nearest the midpoint, one bisection. Transit load spreads over the transits (by hash,
not by name order), and a new transit takes over only the pairs whose midpoint is nearer to it.
Every other unlinked pair ("pending") is solved exactly per destination ``d``: a Dijkstra over
the pending sources of ``d``, seeded from their neighbours whose path to ``d`` is already final.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise

from .links import LinkGraph

__all__ = ["SHIFT", "Routing", "site_hash"]

SHIFT = 160  # base cost is shifted above every possible sum of tie-break terms


def site_hash(name: str) -> int:
    """The site's 64-bit tie-break hash: depends on its name only."""
    digest = hashlib.sha256(b"meshwright-plan-site\0" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big")


class Routing:
    """Next hops between every two members of one connected component.

    ``local`` lists the component's node indices in name order; everything here is indexed by
    position in it. ``next_hop[s][d]`` is the neighbour of ``s`` on the path to ``d``.
    """

    __slots__ = ("_cost", "_group", "graph", "hashes", "local", "next_hop", "stats")

    def __init__(self, graph: LinkGraph, local: Sequence[int]) -> None:
        self.graph = graph
        self.local = list(local)
        n = len(self.local)
        self.hashes = [site_hash(graph.nodes[i].name) for i in self.local]
        self._group = [graph.group_of[i] for i in self.local]
        self._cost = graph.cost
        identity = array("I", range(n))
        self.next_hop = [array("I", identity) for _ in range(n)]
        self.stats = {"two_hop_pairs": 0, "pending_pairs": 0}
        self._solve()

    # --- weights ---------------------------------------------------------------------------------

    def weight(self, u: int, v: int) -> int:
        """The weight of the link between local nodes ``u`` and ``v``."""
        diff = self.hashes[u] - self.hashes[v]
        return (self._cost[self._group[u]][self._group[v]] << SHIFT) + diff * diff

    def final_weight(self, s: int, d: int) -> int:
        """The weight of the (linked or two-link) path from ``s`` to ``d``."""
        x = self.next_hop[s][d]
        if x == d:
            return self.weight(s, d)
        return self.weight(s, x) + self.weight(x, d)

    # --- results ---------------------------------------------------------------------------------

    def path(self, s: int, d: int) -> list[int]:
        hops = [s]
        next_hop = self.next_hop
        while s != d:
            s = next_hop[s][d]
            hops.append(s)
        return hops

    def path_cost(self, hops: Sequence[int]) -> int:
        group, cost = self._group, self._cost
        return sum(cost[group[u]][group[v]] for u, v in pairwise(hops))

    # --- the search -----------------------------------------------------------------------------

    def _solve(self) -> None:
        graph = self.graph
        hashes = self.hashes
        kind, cost = graph.kind, graph.cost
        members: dict[int, list[int]] = {}
        for position, g in enumerate(self._group):
            members.setdefault(g, []).append(position)
        for g in members:
            members[g].sort(key=hashes.__getitem__)
        active = sorted(members)

        def linked(g: int, h: int) -> bool:
            return kind[g][h] is not None and (g != h or len(members[g]) > 1)

        neighbours = {g: [h for h in active if linked(g, h)] for g in active}
        cheapest = {g: min((cost[g][h] for h in neighbours[g]), default=0) for g in active}
        cheapest_anywhere = min((cost[g][h] for g in active for h in neighbours[g]), default=0)

        pending: dict[int, set[int]] = {}
        for i, g1 in enumerate(active):
            for g2 in active[i:]:
                if (g1 == g2 and len(members[g1]) < 2) or linked(g1, g2):
                    continue
                best: int | None = None
                via: list[int] = []
                for gx in neighbours[g1]:
                    if gx in (g1, g2) or not linked(gx, g2):
                        continue
                    two = cost[g1][gx] + cost[gx][g2]
                    if best is None or two < best:
                        best, via = two, [gx]
                    elif two == best:
                        via.append(gx)
                bound = cheapest[g1] + cheapest_anywhere + cheapest[g2]
                if best is not None and best < bound:
                    transits = sorted(
                        (x for gx in via for x in members[gx]), key=hashes.__getitem__
                    )
                    self._two_hop(members[g1], members[g2], transits, g1 == g2)
                else:
                    pending.setdefault(g1, set()).add(g2)
                    pending.setdefault(g2, set()).add(g1)
        for g, sources in sorted(pending.items()):
            for d in members[g]:
                self._solve_pending(d, sources, members, neighbours)

    def _two_hop(
        self, sources: list[int], targets: list[int], transits: list[int], same: bool
    ) -> None:
        """Every pair of ``sources`` x ``targets`` goes through its transit nearest the midpoint."""
        hashes, next_hop = self.hashes, self.next_hop
        twice = [2 * hashes[x] for x in transits]
        last = len(transits) - 1
        count = 0
        for position, s in enumerate(sources):
            hs = hashes[s]
            row = next_hop[s]
            for d in sources[position + 1 :] if same else targets:
                key = hs + hashes[d]
                p = bisect_left(twice, key)
                if p == 0:
                    x = transits[0]
                elif p > last:
                    x = transits[last]
                elif twice[p] - key < key - twice[p - 1]:
                    x = transits[p]
                else:
                    x = transits[p - 1]
                row[d] = x
                next_hop[d][s] = x
                count += 1
        self.stats["two_hop_pairs"] += 2 * count  # ordered pairs, like pending_pairs

    def _solve_pending(
        self,
        d: int,
        source_groups: set[int],
        members: dict[int, list[int]],
        neighbours: dict[int, list[int]],
    ) -> None:
        """Exact paths to ``d`` from every node of ``source_groups`` (pairs not solved above).

        A Dijkstra toward ``d`` over those sources; a source's first label comes from its
        neighbours outside them, whose paths to ``d`` are final (linked or two links). When no
        two source groups are linked, those first labels are final (a spoke reaches ``d`` through
        one of its hubs) and no Dijkstra is needed: only linked source groups need one.
        """
        group, next_hop, hashes, cost = self._group, self.next_hop, self.hashes, self._cost
        linked_sources = {
            g for g in source_groups if any(gx in source_groups for gx in neighbours[g])
        }
        to_d: dict[int, int] = {}  # final weight from a neighbour outside the sources to d
        label: dict[int, int] = {}
        first: dict[int, int] = {}
        expected = 0
        for g in sorted(source_groups):
            sources = [s for s in members[g] if s != d]
            expected += len(sources)
            outside = [x for gx in neighbours[g] if gx not in source_groups for x in members[gx]]
            inner = g in linked_sources
            if len(outside) == 1 and not inner:
                (x,) = outside
                for s in sources:
                    next_hop[s][d] = x
                continue
            for x in outside:
                if x not in to_d:
                    to_d[x] = self.final_weight(x, d)
            candidates = [(x, (cost[g][group[x]] << SHIFT) + to_d[x], hashes[x]) for x in outside]
            for s in sources:
                hs = hashes[s]
                best: int | None = None
                hop = -1
                for x, rest, hx in candidates:
                    w = rest + (hs - hx) * (hs - hx)
                    if best is None or w < best:
                        best, hop = w, x
                if best is not None:
                    if inner:
                        label[s], first[s] = best, hop
                    else:
                        next_hop[s][d] = hop
        self.stats["pending_pairs"] += expected
        if not linked_sources:
            return
        heap = [(w, s) for s, w in label.items()]
        heapq.heapify(heap)
        done: set[int] = set()
        weight = self.weight
        while heap:
            w, s = heapq.heappop(heap)
            if s in done:
                continue
            done.add(s)
            next_hop[s][d] = first[s]
            for gx in neighbours[group[s]]:
                if gx not in linked_sources:
                    continue
                for t in members[gx]:
                    if t in (s, d) or t in done:
                        continue
                    candidate = w + weight(t, s)
                    old = label.get(t)
                    if old is None or candidate < old:
                        label[t], first[t] = candidate, s
                        heapq.heappush(heap, (candidate, t))
        inner_count = sum(len(members[g]) for g in linked_sources) - (group[d] in linked_sources)
        if len(done) != inner_count:  # cannot happen within one connected component
            raise RuntimeError(f"routing: {inner_count - len(done)} sources cannot reach {d}")
