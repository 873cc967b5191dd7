"""Link rules: which kind of link a pair of sites wants, whether it may have it, and the graph.

The graph is kept per *group*: sites that are interchangeable for the link rules (same effective
NAT class, same policy flags, same hubs, named as a hub by the same hub lists) have the same
links, so a link between two groups means a link between every member of one and every member of
the other (and, within one group, between every two members or none). A mesh of 1,000 sites
has a few dozen groups; the planner works on groups wherever it can.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .model import LINK_COST, RELAY_KINDS
from .validate import Node

__all__ = ["Blocker", "LinkGraph", "blockers", "wanted_kind"]

# The kind of link two effective NAT classes want (symmetric).
_WANTED = {
    ("open", "open"): "direct",
    ("open", "easy"): "direct",
    ("open", "hard"): "direct",
    ("easy", "easy"): "punch",
    # An endpoint-dependent mapping on one side needs port prediction (birthday punching),
    # which the sidecar does not do yet: relayed.
    ("easy", "hard"): "relay",
    ("hard", "hard"): "relay",
}

# Why a pair has no link. Roles: "a" is the first site of the pair, "b" the second.
#   ("hubs", role)                 the hubs of that site do not name the other
#   ("kind", kind)                 the kind is not in link_kinds
#   ("no-relay", kind)             a relay kind, and the mesh has no relay
#   ("policy", role, flag, kind)   that site's policy flag forbids the kind
Blocker = tuple[str, ...]


def wanted_kind(class_a: str, class_b: str) -> str:
    """The link kind two effective NAT classes want: blocked on either side needs relay-tcp."""
    if "blocked" in (class_a, class_b):
        return "relay-tcp"
    return _WANTED.get((class_a, class_b)) or _WANTED[(class_b, class_a)]


def blockers(
    a: Node, b: Node, kinds: frozenset[str], has_relay: bool
) -> tuple[str, tuple[Blocker, ...]]:
    """The kind ``a`` and ``b`` want, and everything that forbids it (empty: usable)."""
    kind = wanted_kind(a.eclass, b.eclass)
    if kind == "punch" and "punch" not in kinds and "relay" in kinds:
        kind = "relay"  # connect first (through a relay); the sidecar upgrades it later
    found: list[Blocker] = []
    if a.hubs is not None and b.name not in a.hubs:
        found.append(("hubs", "a"))
    if b.hubs is not None and a.name not in b.hubs:
        found.append(("hubs", "b"))
    if kind not in kinds:
        found.append(("kind", kind))
    if kind in RELAY_KINDS:
        if not has_relay:
            found.append(("no-relay", kind))
        flag = "allow_relay"
        ok_a, ok_b = a.allow_relay, b.allow_relay
    else:
        flag = "allow_direct"
        ok_a, ok_b = a.allow_direct, b.allow_direct
    if not ok_a:
        found.append(("policy", "a", flag, kind))
    if not ok_b:
        found.append(("policy", "b", flag, kind))
    return kind, tuple(found)


@dataclass(slots=True)
class LinkGraph:
    """Groups of interchangeable nodes and the links between groups.

    ``kind[g][h]`` is the usable link kind between a member of ``g`` and a member of ``h``
    (None: no link); ``cost[g][h]`` its cost. For ``g == h`` it concerns two distinct members.
    """

    nodes: Sequence[Node]
    group_of: list[int]
    members: list[list[int]]
    kind: list[list[str | None]]
    cost: list[list[int]]
    wanted: list[list[str]]
    why_not: list[list[tuple[Blocker, ...]]]

    @classmethod
    def build(cls, nodes: Sequence[Node], kinds: frozenset[str], has_relay: bool) -> LinkGraph:
        named_by: dict[str, set[frozenset[str]]] = defaultdict(set)
        for node in nodes:
            if node.hubs is not None:
                for hub in node.hubs:
                    named_by[hub].add(node.hubs)
        index: dict[tuple[object, ...], int] = {}
        group_of: list[int] = []
        members: list[list[int]] = []
        for node in nodes:
            signature = (
                node.eclass,
                node.allow_direct,
                node.allow_relay,
                node.hubs,
                frozenset(named_by.get(node.name, ())),
            )
            g = index.setdefault(signature, len(members))
            if g == len(members):
                members.append([])
            members[g].append(node.index)
            group_of.append(g)
        count = len(members)
        kind: list[list[str | None]] = [[None] * count for _ in range(count)]
        cost = [[0] * count for _ in range(count)]
        wanted = [[""] * count for _ in range(count)]
        why_not: list[list[tuple[Blocker, ...]]] = [[()] * count for _ in range(count)]
        for g in range(count):
            for h in range(g, count):
                if g == h and len(members[g]) < 2:
                    a = b = nodes[members[g][0]]  # a lone member: no pair, but keep the table whole
                else:
                    a = nodes[members[g][0]]
                    b = nodes[members[h][1] if g == h else members[h][0]]
                want, found = blockers(a, b, kinds, has_relay)
                if g == h and len(members[g]) < 2:
                    found = (*found, ("alone",))
                wanted[g][h] = wanted[h][g] = want
                why_not[g][h] = tuple(sorted(found))
                why_not[h][g] = tuple(sorted(_swap(x) for x in found))
                if not found:
                    kind[g][h] = kind[h][g] = want
                    cost[g][h] = cost[h][g] = LINK_COST[want]
        return cls(nodes, group_of, members, kind, cost, wanted, why_not)

    def link(self, i: int, j: int) -> str | None:
        """The usable link kind between nodes ``i`` and ``j`` (None: none)."""
        return self.kind[self.group_of[i]][self.group_of[j]] if i != j else None

    def components(self) -> list[list[int]]:
        """Connected components, as sorted lists of node indices, in order of first node."""
        parent = list(range(len(self.nodes)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def union(x: int, y: int) -> None:
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)

        count = len(self.members)
        for g in range(count):
            for h in range(g, count):
                if self.kind[g][h] is None:
                    continue
                first = self.members[g][0]
                for x in self.members[g]:
                    union(first, x)
                for x in self.members[h]:
                    union(first, x)
        by_root: dict[int, list[int]] = defaultdict(list)
        for x in range(len(self.nodes)):
            by_root[find(x)].append(x)
        return sorted(by_root.values(), key=lambda c: c[0])


def _swap(blocker: Blocker) -> Blocker:
    """The same blocker with the roles of the two sites exchanged."""
    swap = {"a": "b", "b": "a"}
    if blocker[0] in ("hubs", "policy"):
        return (blocker[0], swap[blocker[1]], *blocker[2:])
    return blocker
