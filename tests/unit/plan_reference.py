"""A plain reference for the planner's tests: the link rules pair by pair and a textbook Dijkstra.

Deliberately naive (every pair tested, one Dijkstra per site, paths kept whole), sharing nothing
with the planner but the tie-break hash, so that tests can compare the two on random meshes.
"""

from __future__ import annotations

import heapq

from meshwright.plan.model import LINK_COST, RELAY_KINDS, Mesh, Site
from meshwright.plan.routing import SHIFT, site_hash

__all__ = ["reference_link", "reference_paths"]

_TABLE = {
    frozenset({"open"}): "direct",
    frozenset({"open", "easy"}): "direct",
    frozenset({"open", "hard"}): "direct",
    frozenset({"easy"}): "punch",
    frozenset({"easy", "hard"}): "relay",  # no birthday punching yet
    frozenset({"hard"}): "relay",
}


def _effective(site: Site) -> str:
    if site.nat_class == "open" and site.endpoint is None:
        return "easy"
    return site.nat_class or ""


def reference_link(a: Site, b: Site, mesh: Mesh) -> str | None:
    """The usable link kind between two sites, or None."""
    classes = {_effective(a), _effective(b)}
    kind = "relay-tcp" if "blocked" in classes else _TABLE[frozenset(classes)]
    if kind == "punch" and "punch" not in mesh.link_kinds and "relay" in mesh.link_kinds:
        kind = "relay"
    if kind not in mesh.link_kinds:
        return None
    if kind in RELAY_KINDS:
        if not any(r.addresses for r in mesh.relays):
            return None
        if not (a.policy.allow_relay and b.policy.allow_relay):
            return None
    elif not (a.policy.allow_direct and b.policy.allow_direct):
        return None
    if a.policy.hubs is not None and b.name not in a.policy.hubs:
        return None
    if b.policy.hubs is not None and a.name not in b.policy.hubs:
        return None
    return kind


def reference_paths(mesh: Mesh) -> dict[str, dict[str, tuple[str, ...]]]:
    """For every site, the least-weight path to every site it can reach (itself excluded)."""
    sites = sorted(mesh.sites, key=lambda s: s.name)
    h = {s.name: site_hash(s.name) for s in sites}
    adjacency: dict[str, list[tuple[str, int]]] = {s.name: [] for s in sites}
    for i, a in enumerate(sites):
        for b in sites[i + 1 :]:
            kind = reference_link(a, b, mesh)
            if kind is not None:
                w = (LINK_COST[kind] << SHIFT) + (h[a.name] - h[b.name]) ** 2
                adjacency[a.name].append((b.name, w))
                adjacency[b.name].append((a.name, w))
    result: dict[str, dict[str, tuple[str, ...]]] = {}
    for source in adjacency:
        best: dict[str, int] = {source: 0}
        parent: dict[str, str] = {}
        heap = [(0, source)]
        done: set[str] = set()
        while heap:
            w, u = heapq.heappop(heap)
            if u in done:
                continue
            done.add(u)
            for v, edge in adjacency[u]:
                if v not in best or w + edge < best[v]:
                    best[v] = w + edge
                    parent[v] = u
                    heapq.heappush(heap, (w + edge, v))
        paths: dict[str, tuple[str, ...]] = {}
        for target in done - {source}:
            hops = [target]
            while hops[-1] != source:
                hops.append(parent[hops[-1]])
            paths[target] = tuple(reversed(hops))
        result[source] = paths
    return result
