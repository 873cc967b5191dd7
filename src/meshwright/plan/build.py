"""build_plan: validation, the link graph, reachability, routing; and why a site is unreachable."""

from __future__ import annotations

from array import array
from collections import defaultdict
from collections.abc import Sequence

from .links import Blocker, LinkGraph
from .model import LINK_KINDS, Mesh, PlanError
from .output import Plan
from .relays import Allocations, LinkedPairs, RelayPorts, allocate
from .routing import Routing
from .validate import Node, Skip, check_mesh

__all__ = ["build_plan", "check", "unreachable_reason"]

_MAX_NAMES = 5


def check(mesh: Mesh, skip: Skip = frozenset()) -> tuple[list[str], Plan | None]:
    """Every problem of ``mesh`` (structure and reachability) and, when there is none, its plan."""
    problems, nodes = check_mesh(mesh, skip)
    kinds = frozenset(k for k in mesh.link_kinds if k in LINK_KINDS)
    has_relay = any(relay.addresses for relay in mesh.relays)
    graph = LinkGraph.build(nodes, kinds, has_relay)
    components: list[list[int]] = []
    unreachable: dict[str, str] = {}
    if nodes:
        components = graph.components()
        main = max(
            components,
            key=lambda c: (sum(nodes[i].site.required for i in c), len(c)),
        )  # ties: the component with the first name (components are in order of first node)
        in_main = set(main)
        component_of = {i: c for c in components for i in c}
        for node in nodes:
            if node.index in in_main:
                continue
            reason = unreachable_reason(graph, node, main, component_of[node.index], kinds)
            if node.site.required:
                problems.append(f"site {node.name}: {reason}")
            else:
                unreachable[node.name] = reason
    if problems:
        return problems, None
    # Every connected part is routed: an island of optional sites that no path from the main
    # part reaches keeps its links among itself (the main part gets nothing to it), and a
    # removed site changes no pair whose path it was not on.
    routings = [Routing(graph, c) for c in components if len(c) > 1]
    try:
        allocations = _allocations(mesh, graph, routings)
    except ValueError as exc:
        return [f"relays: {exc}"], None
    plan = Plan(
        allocations=allocations,
        relays=mesh.relays,
        overlay_network=str(mesh.overlay_network),
        link_kinds=tuple(k for k in LINK_KINDS if k in kinds),
        keepalive=mesh.keepalive,
        nodes=nodes,
        graph=graph,
        routings=routings,
        unreachable=unreachable,
    )
    return [], plan


def _allocations(mesh: Mesh, graph: LinkGraph, routings: Sequence[Routing]) -> Allocations | None:
    """When the mesh has relays: a relay, and a standby relay, for every pair the routing links
    (:func:`.relays.allocate`): a relayed pair uses it, a punch pair starts on it until the
    sidecar upgrades it, a direct pair falls back to it when its direct path dies."""
    relays = {r.name: r.addresses[0] for r in mesh.relays if r.addresses}
    if not relays:
        return None
    nodes = graph.nodes
    kind_index = {kind: k for k, kind in enumerate(LINK_KINDS)}
    # per group: the kind index of its link with each group, as a bytes.translate table
    kinds_of = [
        bytes(kind_index.get(k or "", 0) for k in row).ljust(256, b"\0") for row in graph.kind
    ]
    group_of = graph.group_of
    partners: list[array[int]] = [array("I") for _ in nodes]
    kinds: list[bytes] = [b""] * len(nodes)
    few_groups = len(graph.members) < 256  # a group's index fits a byte
    for routing in routings:
        local, next_hop = routing.local, routing.next_hop
        size = len(local)
        members = array("I", local)
        identity = array("I", range(size))
        groups = bytes(group_of[i] for i in local) if few_groups else b""
        for s, i in enumerate(local):
            row, mine = next_hop[s], kinds_of[group_of[i]]
            if row[s + 1 :] == identity[s + 1 :]:
                # Linked with every later member (with relays, most sites are): C-speed copies.
                partners[i] = members[s + 1 :]
                if few_groups:
                    kinds[i] = groups[s + 1 :].translate(mine)
                    continue
            else:
                partners[i] = array("I", [local[d] for d in range(s + 1, size) if row[d] == d])
            kinds[i] = bytes([mine[group_of[j]] for j in partners[i]])
    pairs = LinkedPairs([node.name for node in nodes], partners, kinds)
    ports = {r.name: RelayPorts(r.first_port, r.last_port, r.listen_port) for r in mesh.relays}
    rtt = {node.name: dict(node.site.relay_rtt_ms) for node in nodes}
    keys = {node.name: node.site.public_key or "" for node in nodes}
    return allocate(pairs, relays, rtt, mesh.previous_allocations, keys, ports)


def build_plan(mesh: Mesh) -> Plan:
    """The plan of ``mesh``; :class:`PlanError` lists every problem when it cannot be planned."""
    problems, plan = check(mesh)
    if plan is None:
        raise PlanError(problems)
    return plan


def _names(names: Sequence[str]) -> str:
    if len(names) <= _MAX_NAMES:
        return ", ".join(names)
    return f"{', '.join(names[:_MAX_NAMES])} and {len(names) - _MAX_NAMES} more"


def _predicate(found: tuple[Blocker, ...], node: Node, kinds: frozenset[str], one: bool) -> str:
    """What the blockers of a link say, as a predicate (``one``: a single link, singular verbs).

    Every blocker but "hubs" concerns the one kind the pair wants.
    """
    clauses: list[str] = []
    wanted = ""
    parts: list[str] = []
    for blocker in found:
        what = blocker[0]
        if what == "kind":
            wanted = blocker[1]
            listed = ", ".join(k for k in LINK_KINDS if k in kinds) or "none"
            clauses.append(f"is not available (link kinds: {listed})")
        elif what == "no-relay":
            wanted = blocker[1]
            clauses.append("needs a relay, and the mesh has none")
        elif what == "policy":
            wanted = blocker[3]
            whose = "its" if blocker[1] == "a" else ("that site's" if one else "their")
            clauses.append(f"{whose} policy forbids ({blocker[2]}: false)")
        elif what == "hubs" and blocker[1] == "a":
            hubs = ", ".join(sorted(node.hubs or ()))
            parts.append(f"{'is' if one else 'are'} not in its hubs ({hubs})")
        elif what == "hubs":
            whose = "that site's" if one else "their"
            parts.append(f"{'is' if one else 'are'} refused by {whose} hubs")
    if clauses:
        parts.insert(0, f"{'needs' if one else 'need'} {wanted}, which {' and '.join(clauses)}")
    return " and ".join(parts) or "is impossible"


def unreachable_reason(
    graph: LinkGraph,
    node: Node,
    main: Sequence[int],
    component: Sequence[int],
    kinds: frozenset[str],
) -> str:
    """Why no path from the main component reaches ``node``, naming sites and link kinds."""
    nodes = graph.nodes
    g = graph.group_of[node.index]
    by_reason: dict[tuple[Blocker, ...], list[str]] = defaultdict(list)
    for i in main:
        by_reason[graph.why_not[g][graph.group_of[i]]].append(nodes[i].name)
    parts = []
    others = [nodes[i].name for i in component if i != node.index]
    if others:
        parts.append(f"it links only with {_names(others)}, which no path reaches either")
    for found, names in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[1][0])):
        one = len(names) == 1
        if len(names) == len(main) and not one:
            subject = "its links"
        else:
            subject = f"its link{'' if one else 's'} to {_names(names)}"
        predicate = _predicate(found, node, kinds, one)
        parts.append(f"{subject} {predicate}")
    if not main:  # pragma: no cover - main is never empty when there are nodes
        parts.append("the mesh has no other site")
    return "no path reaches it: " + "; ".join(parts)
