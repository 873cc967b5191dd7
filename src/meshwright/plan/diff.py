"""What a new plan changes against the committed one, in words, for the people reviewing it.

Pure: :func:`diff_plans` compares two plans as their files hold them (``.meshwright/plan.json``)
and, when given, the two states (the sites' NAT classes, endpoints and keys, which the plan
does not hold); :func:`render` writes the result as text (the terminal, and the summary that
``--check --diff`` shows before the files' diff), Markdown (a pull request's comment) or JSON.
``meshwright plan`` and the ``mesh_plan`` action plugin both use it.

Which changes disturb a live tunnel follows what ``wg_sync`` applies
(:mod:`meshwright.site.wgstate`):

- peers are matched by public key: a new key removes the peer and adds another (a new
  handshake); a removed peer ends its tunnel; a peer renamed with its key is the same peer;
- a wanted endpoint is set when the running one differs, and never removed (a peer without
  one roams); a punch peer's endpoint belongs to the traversal sidecar once the peer exists,
  so its plan endpoint is only the relay to fall back to;
- allowed IPs are replaced live: a prefix added disturbs nothing, a prefix removed while another
  peer now carries it moves existing traffic to another path; a prefix that leaves the mesh
  (its site or LAN removed) ends only its own traffic, which the sites' changes show;
- keepalives change live; a new listen port or overlay address touches every tunnel of the
  site (the socket is bound anew, the address replaced).
"""

from __future__ import annotations

import ipaddress
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Generic, TypeVar

from .inventory import State
from .model import PlanError

__all__ = [
    "FORMATS",
    "AddedSite",
    "Allocation",
    "AllocationChange",
    "Change",
    "Disturbance",
    "FactChange",
    "NewPeer",
    "PairChange",
    "PeerChange",
    "PlanDiff",
    "Route",
    "SettingChange",
    "SiteChange",
    "SitePortChange",
    "diff_plans",
    "headline",
    "load_plan",
    "render",
    "render_errors",
]

FORMATS = ("text", "markdown", "json")
# Of the JSON form: a consumer checks it. 2: allocations without ports, site_ports added.
DIFF_VERSION = 2
SETTINGS = ("overlay_network", "link_kinds", "keepalive")
FACTS = ("nat_class", "endpoint", "public_key")
_MISSING = "(none)"

T = TypeVar("T")
Plan = Mapping[str, Any]  # a plan file's data


@dataclass(frozen=True)
class Change(Generic[T]):
    old: T
    new: T


@dataclass(frozen=True, kw_only=True)
class SettingChange:
    setting: str
    old: Any
    new: Any


@dataclass(frozen=True, kw_only=True)
class FactChange:
    site: str
    fact: str  # nat_class, endpoint or public_key
    old: str | None
    new: str | None


@dataclass(frozen=True, kw_only=True)
class AddedSite:
    name: str
    pairs: tuple[tuple[str, str], ...]  # (other site, mode), by other site


@dataclass(frozen=True, kw_only=True)
class PairChange:
    a: str
    b: str
    mode: Change[str]
    path: Change[tuple[str, ...]]


@dataclass(frozen=True, kw_only=True)
class NewPeer:
    name: str
    mode: str
    allowed_ips: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class PeerChange:
    name: str
    mode: Change[str] | None = None
    public_key: Change[str] | None = None
    endpoint: Change[str | None] | None = None
    keepalive: Change[int | None] | None = None
    allowed_ips_added: tuple[str, ...] = ()
    allowed_ips_removed: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Route:
    prefix: str
    via: str


@dataclass(frozen=True, kw_only=True)
class SiteChange:
    name: str
    overlay_address: Change[str] | None = None
    listen_port: Change[int] | None = None
    lan_prefixes_added: tuple[str, ...] = ()
    lan_prefixes_removed: tuple[str, ...] = ()
    peers_added: tuple[NewPeer, ...] = ()
    peers_removed: tuple[str, ...] = ()
    peers_changed: tuple[PeerChange, ...] = ()
    routes_added: tuple[Route, ...] = ()
    routes_removed: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Allocation:
    relay: str
    address: str


@dataclass(frozen=True, kw_only=True)
class AllocationChange:
    """A pair's allocation added (``old`` None), removed (``new`` None) or moved to another
    relay; ``standby``: its standby allocation (relay failover). Its ports are the sites':
    :class:`SitePortChange`."""

    a: str
    b: str
    old: Allocation | None
    new: Allocation | None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class SitePortChange:
    """A site's relay port (the same on every relay) changed, given or taken back; sites
    added or removed are left out (their own lines say it)."""

    site: str
    old: int | None
    new: int | None


@dataclass(frozen=True, kw_only=True)
class Disturbance:
    """A live tunnel (``a`` < ``b``, sites or relays) the apply disturbs, and why."""

    a: str
    b: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class PlanDiff:
    sites_added: tuple[AddedSite, ...] = ()
    sites_removed: tuple[str, ...] = ()
    to_probe: tuple[str, ...] = ()  # in the inventory, not planned: no key or NAT facts yet
    settings: tuple[SettingChange, ...] = ()
    facts: tuple[FactChange, ...] = ()
    relays_added: tuple[str, ...] = ()
    relays_removed: tuple[str, ...] = ()
    unreachable: tuple[tuple[str, str | None], ...] = ()  # (site, reason); None: reachable again
    pairs: tuple[PairChange, ...] = ()
    sites: tuple[SiteChange, ...] = ()
    allocations: tuple[AllocationChange, ...] = ()
    site_ports: tuple[SitePortChange, ...] = ()
    disturbed: tuple[Disturbance, ...] = ()

    @property
    def changed(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def counts(self) -> dict[str, int]:
        return {
            "sites_added": len(self.sites_added),
            "sites_removed": len(self.sites_removed),
            "sites_to_probe": len(self.to_probe),
            "settings_changed": len(self.settings),
            "facts_changed": len(self.facts),
            "pairs_changed": len(self.pairs),
            "sites_changed": len(self.sites),
            "allocations_changed": len(self.allocations),
            "site_ports_changed": len(self.site_ports),
            "tunnels_disturbed": len(self.disturbed),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: every list sorted, every change as ``{"old", "new"}``."""
        data = asdict(self)
        data["unreachable"] = [{"site": s, "reason": r} for s, r in self.unreachable]
        data["sites_added"] = [
            {"name": s.name, "pairs": [{"site": o, "mode": m} for o, m in s.pairs]}
            for s in self.sites_added
        ]
        return {
            "version": DIFF_VERSION,
            "changed": self.changed,
            "counts": self.counts(),
            **data,
        }


def load_plan(text: str | None) -> dict[str, Any] | None:
    """A plan file's data; None for no file, or one that is not a plan (it is rewritten)."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# --- the comparison ---------------------------------------------------------------------------


def diff_plans(
    old: Plan | None,
    new: Plan,
    *,
    to_probe: Sequence[str] = (),
    old_state: State | None = None,
    new_state: State | None = None,
) -> PlanDiff:
    """What ``new`` changes against ``old`` (None: no plan yet, everything is added).

    ``to_probe``: sites of the inventory left out of ``new`` for want of facts. The states, when
    both are given, add the sites' NAT class, endpoint and key changes.
    """
    old = old or {}
    old_sites: Mapping[str, Any] = old.get("sites", {})
    new_sites: Mapping[str, Any] = new.get("sites", {})
    added = sorted(set(new_sites) - set(old_sites))
    # A site in the old plan that is now waiting for its probe is not removed (it has no facts
    # only when its state was lost); it is listed once, as to be probed.
    removed = sorted(set(old_sites) - set(new_sites) - set(to_probe))
    old_relays: Mapping[str, Any] = old.get("relays", {})
    new_relays: Mapping[str, Any] = new.get("relays", {})
    old_pairs = {(p["a"], p["b"]): p for p in old.get("pairs", [])}
    return PlanDiff(
        sites_added=_added_sites(added, new.get("pairs", [])),
        sites_removed=tuple(removed),
        to_probe=tuple(sorted(to_probe)),
        settings=tuple(
            SettingChange(setting=k, old=old.get(k), new=new.get(k))
            for k in SETTINGS
            if old and old.get(k) != new.get(k)
        ),
        facts=_facts(old_state, new_state, set(old_sites) & set(new_sites)),
        relays_added=tuple(sorted(set(new_relays) - set(old_relays))),
        relays_removed=tuple(sorted(set(old_relays) - set(new_relays))),
        unreachable=_unreachable(old.get("unreachable", {}), new.get("unreachable", {})),
        pairs=tuple(_pairs(old_pairs, new.get("pairs", []))),
        sites=tuple(
            change
            for name in sorted(set(old_sites) & set(new_sites))
            if (change := _site(name, old_sites[name], new_sites[name])) is not None
        ),
        allocations=_allocations(old.get("allocations", []), new.get("allocations", []))
        + _allocations(
            old.get("standby_allocations", []), new.get("standby_allocations", []), standby=True
        ),
        site_ports=_site_ports(old_relays, new_relays, set(old_sites) & set(new_sites)),
        disturbed=_disturbed({**old_sites, **old_relays}, {**new_sites, **new_relays}),
    )


def _added_sites(added: Sequence[str], pairs: Iterable[Mapping[str, Any]]) -> tuple[AddedSite, ...]:
    if not added:
        return ()
    wanted = set(added)
    found: dict[str, list[tuple[str, str]]] = {name: [] for name in added}
    for pair in pairs:
        a, b, mode = pair["a"], pair["b"], pair["mode"]
        if a in wanted:
            found[a].append((b, mode))
        if b in wanted:
            # "via X" names the first transit from a; seen from b it is the last one
            path = pair.get("path") or []
            back = f"via {path[-2]}" if mode.startswith("via ") and len(path) > 2 else mode
            found[b].append((a, back))
    return tuple(AddedSite(name=n, pairs=tuple(sorted(found[n]))) for n in added)


def _facts(old: State | None, new: State | None, names: set[str]) -> tuple[FactChange, ...]:
    if old is None or new is None:
        return ()
    changes = []
    for name in sorted(names):
        before, after = old.sites.get(name), new.sites.get(name)
        if before is None or after is None:
            continue
        for fact in FACTS:
            a, b = getattr(before, fact), getattr(after, fact)
            if a != b:
                changes.append(FactChange(site=name, fact=fact, old=a, new=b))
    return tuple(changes)


def _unreachable(
    old: Mapping[str, str], new: Mapping[str, str]
) -> tuple[tuple[str, str | None], ...]:
    found: list[tuple[str, str | None]] = [
        (name, reason) for name, reason in new.items() if old.get(name) != reason
    ]
    found += [(name, None) for name in old if name not in new]
    return tuple(sorted(found, key=lambda item: item[0]))


def _pairs(
    old: Mapping[tuple[str, str], Mapping[str, Any]], new: Iterable[Mapping[str, Any]]
) -> Iterable[PairChange]:
    for pair in new:
        before = old.get((pair["a"], pair["b"]))
        if before is None:
            continue  # a pair of an added site: the added site's line shows it
        path, old_path = tuple(pair["path"]), tuple(before["path"])
        if pair["mode"] != before["mode"] or path != old_path:
            yield PairChange(
                a=pair["a"],
                b=pair["b"],
                mode=Change(before["mode"], pair["mode"]),
                path=Change(old_path, path),
            )


def _lan_prefixes(site: Mapping[str, Any]) -> list[str]:
    """A site's own LAN prefixes: the plan lists the mesh's prefixes (overlay network first)
    and a route to every other site's, so its own are the ones without a route."""
    routed = {route["prefix"] for route in site.get("routes", [])}
    return [p for p in site.get("mesh_prefixes", [])[1:] if p not in routed]


def _change(old: T, new: T) -> Change[T] | None:
    return None if old == new else Change(old, new)


def _site(name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> SiteChange | None:
    old_lans, new_lans = _lan_prefixes(old), _lan_prefixes(new)
    old_peers = {p["name"]: p for p in old.get("peers", [])}
    new_peers = {p["name"]: p for p in new.get("peers", [])}
    old_routes = {r["prefix"] for r in old.get("routes", [])}
    new_routes = {r["prefix"] for r in new.get("routes", [])}
    change = SiteChange(
        name=name,
        overlay_address=_change(old["overlay_address"], new["overlay_address"]),
        listen_port=_change(old["listen_port"], new["listen_port"]),
        lan_prefixes_added=_missing(new_lans, old_lans),
        lan_prefixes_removed=_missing(old_lans, new_lans),
        peers_added=tuple(
            NewPeer(name=p["name"], mode=p["mode"], allowed_ips=tuple(p["allowed_ips"]))
            for n, p in new_peers.items()
            if n not in old_peers
        ),
        peers_removed=tuple(n for n in old_peers if n not in new_peers),
        peers_changed=tuple(
            c
            for n, p in new_peers.items()
            if n in old_peers and (c := _peer(old_peers[n], p)) is not None
        ),
        routes_added=tuple(
            Route(prefix=r["prefix"], via=r["via"])
            for r in new.get("routes", [])
            if r["prefix"] not in old_routes
        ),
        routes_removed=tuple(
            r["prefix"] for r in old.get("routes", []) if r["prefix"] not in new_routes
        ),
    )
    return None if change == SiteChange(name=name) else change


def _missing(items: Sequence[str], others: Sequence[str]) -> tuple[str, ...]:
    """``items`` not in ``others``, in their order (the planner's prefix order)."""
    known = set(others)
    return tuple(item for item in items if item not in known)


def _peer(old: Mapping[str, Any], new: Mapping[str, Any]) -> PeerChange | None:
    change = PeerChange(
        name=new["name"],
        mode=_change(old["mode"], new["mode"]),
        public_key=_change(old["public_key"], new["public_key"]),
        endpoint=_change(old.get("endpoint"), new.get("endpoint")),
        keepalive=_change(old.get("keepalive"), new.get("keepalive")),
        allowed_ips_added=_missing(new["allowed_ips"], old["allowed_ips"]),
        allowed_ips_removed=_missing(old["allowed_ips"], new["allowed_ips"]),
    )
    return None if change == PeerChange(name=new["name"]) else change


def _allocation(data: Mapping[str, Any]) -> Allocation:
    return Allocation(relay=data["relay"], address=data["address"])


def _allocations(
    old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]], standby: bool = False
) -> tuple[AllocationChange, ...]:
    before = {(a["a"], a["b"]): _allocation(a) for a in old}
    after = {(a["a"], a["b"]): _allocation(a) for a in new}
    # A kind alone changing (punch -> relay on the same relay) is a pair's change, shown there;
    # a site's port changing is the site's (every one of its pairs would show it).
    return tuple(
        AllocationChange(a=a, b=b, old=before.get((a, b)), new=after.get((a, b)), standby=standby)
        for a, b in sorted(set(before) | set(after))
        if before.get((a, b)) != after.get((a, b))
    )


def _ports(relays: Mapping[str, Any]) -> dict[str, int]:
    """Site -> its relay port, from the relays' site lists (a plan before per-site ports has
    none)."""
    found: dict[str, int] = {}
    for relay in relays.values():
        for entry in relay.get("sites", []) if isinstance(relay, Mapping) else []:
            found.setdefault(entry["name"], entry["port"])
    return found


def _site_ports(
    old: Mapping[str, Any], new: Mapping[str, Any], kept: set[str]
) -> tuple[SitePortChange, ...]:
    before, after = _ports(old), _ports(new)
    return tuple(
        SitePortChange(site=site, old=before.get(site), new=after.get(site))
        for site in sorted(kept & (set(before) | set(after)))
        if before.get(site) != after.get(site)
    )


# --- live tunnels -----------------------------------------------------------------------------


def _disturbed(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[Disturbance, ...]:
    """Every live tunnel (a peer in the old plan of a site or relay) the apply disturbs, seen
    from both of its ends; see the module's docstring for the rules."""
    reasons: dict[tuple[str, str], list[str]] = defaultdict(list)

    def add(x: str, y: str, reason: str) -> None:
        found = reasons[(x, y) if x < y else (y, x)]
        if reason not in found:
            found.append(reason)

    for name in sorted(old):
        before, after = old[name], new.get(name)
        old_peers = {p["name"]: p for p in before.get("peers", [])}
        if after is None:
            for other in old_peers:
                add(name, other, "tunnel removed")
            continue
        new_peers = {p["name"]: p for p in after.get("peers", [])}
        by_key = {p["public_key"]: p for p in after.get("peers", [])}
        own = []
        for what, key in (("listen port", "listen_port"), ("overlay address", "overlay_address")):
            if before.get(key) != after.get(key):
                own.append(f"{name}'s {what} {before.get(key)} -> {after.get(key)}")
        carriers = _Carriers(new_peers.values())
        for other, peer in old_peers.items():
            # wg_sync matches peers by public key: a new key is a new peer (a new handshake)
            now = by_key.get(peer["public_key"])
            if now is None:
                renewed = other in new_peers
                reason = f"{other}'s public key changes (a new handshake)"
                add(name, other, reason if renewed else "tunnel removed")
                continue
            for reason in own:
                add(name, other, reason)
            for reason in _peer_reasons(name, peer, now, carriers):
                add(name, other, reason)
    return tuple(
        Disturbance(a=a, b=b, reasons=tuple(found)) for (a, b), found in sorted(reasons.items())
    )


def _peer_reasons(
    name: str, old: Mapping[str, Any], new: Mapping[str, Any], carriers: _Carriers
) -> Iterable[str]:
    other = new["name"]
    old_endpoint, endpoint = old.get("endpoint"), new.get("endpoint")
    old_punch, punch = old["mode"] == "punch", new["mode"] == "punch"
    if endpoint is not None and endpoint != old_endpoint:
        if old_punch and punch:  # the sidecar holds the live endpoint; this is its fallback
            yield (
                f"at {name}: relay fallback {old_endpoint or _MISSING} -> {endpoint}"
                " (disturbs it only while it is relayed)"
            )
        else:
            yield f"at {name}: endpoint {old_endpoint or _MISSING} -> {endpoint}"
    elif old_punch and not punch and endpoint is not None:
        # wg_sync takes the endpoint back from the sidecar, which may have moved it
        yield f"at {name}: endpoint set to {endpoint} (disturbs it if the sidecar made it direct)"
    kept = set(new["allowed_ips"])
    for prefix in old["allowed_ips"]:
        if prefix not in kept and (carrier := carriers.of(prefix, other)) is not None:
            yield f"at {name}: {prefix} moves to {carrier}"


class _Carriers:
    """Which peer of a site (in the new plan) carries traffic to a prefix, if another one."""

    __slots__ = ("_exact", "_networks", "_peers")

    def __init__(self, peers: Iterable[Mapping[str, Any]]) -> None:
        self._peers = [(p["name"], tuple(p["allowed_ips"])) for p in peers]
        self._exact = {prefix: name for name, allowed in self._peers for prefix in allowed}
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []

    def of(self, prefix: str, other_than: str) -> str | None:
        exact = self._exact.get(prefix)
        if exact is not None:
            return exact if exact != other_than else None
        if not self._networks:  # parsed only when a prefix moves inexactly: rare
            self._networks = [
                (ipaddress.ip_network(p), name) for name, allowed in self._peers for p in allowed
            ]
        net = ipaddress.ip_network(prefix)
        for candidate, name in self._networks:
            if name != other_than and candidate.version == net.version and candidate.overlaps(net):
                return name
        return None


# --- rendering --------------------------------------------------------------------------------

Item = tuple[str, list[str]]  # a line, and the lines under it


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def headline(diff: PlanDiff) -> str:
    """One line: what changes, counted, and the goal line's "live tunnels disturbed"."""
    counts = [
        (len(diff.sites_added), "site", "added"),
        (len(diff.sites_removed), "site", "removed"),
        (len(diff.to_probe), "site", "to be probed"),
        (len(diff.settings), "mesh setting", "changed"),
        (len(diff.facts), "site fact", "changed"),
        (len(diff.pairs), "pair", "changed"),
        (len(diff.sites), "site", "changed"),
        (len(diff.allocations), "relay allocation", "changed"),
        (len(diff.site_ports), "relay port", "changed"),
    ]
    parts = [f"{_plural(n, word)} {what}" for n, word, what in counts if n]
    disturbed = len(diff.disturbed) or "none"
    return f"Plan: {', '.join(parts)}; live tunnels disturbed: {disturbed}"


def _value(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or _MISSING
    return str(value)


def _path(path: Sequence[str]) -> str:
    return " > ".join(path) if path else _MISSING


def _pairs_of(site: AddedSite) -> str:
    """An added site's pairs, grouped by mode: "direct with a, b; via a to c"."""
    by_mode: dict[str, list[str]] = defaultdict(list)
    for other, mode in site.pairs:
        by_mode[mode].append(other)
    parts = []
    for mode, others in sorted(by_mode.items()):
        names = ", ".join(others)
        if mode.startswith("via "):
            parts.append(f"{mode} to {names}")
        elif mode == "none":
            parts.append(f"no path to {names}")
        else:
            parts.append(f"{mode} with {names}")
    return "; ".join(parts) or "no other site"


def _shows_path(pair: PairChange) -> bool:
    """A path is worth showing when it changed and crosses a transit site (a linked pair's
    path is the pair itself)."""
    return pair.path.old != pair.path.new and max(len(pair.path.old), len(pair.path.new)) > 2


def _pair_line(pair: PairChange) -> str:
    line = f"{pair.a} -- {pair.b}: {pair.mode.old} -> {pair.mode.new}"
    if _shows_path(pair):
        line += f" (path {_path(pair.path.old)} -> {_path(pair.path.new)})"
    return line


def _fact_line(fact: FactChange) -> str:
    if fact.fact == "public_key":
        return f"{fact.site}: public key changes"
    what = "NAT class" if fact.fact == "nat_class" else fact.fact
    return f"{fact.site}: {what} {_value(fact.old)} -> {_value(fact.new)}"


def _peer_line(peer: PeerChange) -> str:
    parts = []
    if peer.mode is not None:
        parts.append(f"mode {peer.mode.old} -> {peer.mode.new}")
    if peer.public_key is not None:
        parts.append("public key changes")
    if peer.endpoint is not None:
        parts.append(f"endpoint {_value(peer.endpoint.old)} -> {_value(peer.endpoint.new)}")
    if peer.keepalive is not None:
        old, new = peer.keepalive.old or "off", peer.keepalive.new or "off"
        parts.append(f"keepalive {old} -> {new}")
    if peer.allowed_ips_added:
        parts.append(f"allowed IPs added {', '.join(peer.allowed_ips_added)}")
    if peer.allowed_ips_removed:
        parts.append(f"allowed IPs removed {', '.join(peer.allowed_ips_removed)}")
    return f"peer {peer.name}: {'; '.join(parts)}"


def _site_lines(site: SiteChange) -> list[str]:
    lines = []
    if site.overlay_address is not None:
        lines.append(f"overlay address {site.overlay_address.old} -> {site.overlay_address.new}")
    if site.listen_port is not None:
        lines.append(f"listen port {site.listen_port.old} -> {site.listen_port.new}")
    if site.lan_prefixes_added:
        lines.append(f"LAN prefixes added: {', '.join(site.lan_prefixes_added)}")
    if site.lan_prefixes_removed:
        lines.append(f"LAN prefixes removed: {', '.join(site.lan_prefixes_removed)}")
    lines += [
        f"peer added: {p.name} ({p.mode}; allowed IPs {', '.join(p.allowed_ips)})"
        for p in site.peers_added
    ]
    lines += [f"peer removed: {name}" for name in site.peers_removed]
    lines += [_peer_line(p) for p in site.peers_changed]
    if site.routes_added:
        by_via: dict[str, list[str]] = defaultdict(list)
        for route in site.routes_added:
            by_via[route.via].append(route.prefix)
        groups = "; ".join(f"{', '.join(p)} via {via}" for via, p in sorted(by_via.items()))
        lines.append(f"routes added: {groups}")
    if site.routes_removed:
        lines.append(f"routes removed: {', '.join(site.routes_removed)}")
    return lines


def _grouped(sites: Sequence[SiteChange]) -> list[Item]:
    """Sites with the same changes under one line of their names: a prefix added to one site
    changes every other site alike, and a reviewer reads it once."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for site in sites:
        groups.setdefault(tuple(_site_lines(site)), []).append(site.name)
    return [(", ".join(names), list(lines)) for lines, names in groups.items()]


def _where(allocation: Allocation) -> str:
    return f"{allocation.relay} ({allocation.address})"


def _port_line(change: SitePortChange) -> str:
    return f"{change.site}: {_value(change.old)} -> {_value(change.new)}"


def _allocation_line(change: AllocationChange) -> str:
    pair = f"{change.a} -- {change.b}" + (" (standby)" if change.standby else "")
    if change.old is None and change.new is not None:
        return f"added: {pair} on {_where(change.new)}"
    if change.new is None and change.old is not None:
        return f"removed: {pair} from {_where(change.old)}"
    assert change.old is not None and change.new is not None
    return f"moved: {pair}: {_where(change.old)} -> {_where(change.new)}"


def _sections(diff: PlanDiff) -> list[tuple[str, list[Item]]]:
    """The body, shared by text and Markdown: (title, items), empty ones left out."""
    relays: list[Item] = [(f"added: {n}", []) for n in diff.relays_added]
    relays += [(f"removed: {n}", []) for n in diff.relays_removed]
    sections: list[tuple[str, list[Item]]] = [
        ("Sites added", [(f"{s.name}: {_pairs_of(s)}", []) for s in diff.sites_added]),
        ("Sites removed", [(name, []) for name in diff.sites_removed]),
        (
            "Sites to be probed (no key or NAT facts yet; their links are planned after the probe)",
            [(name, []) for name in diff.to_probe],
        ),
        (
            "Mesh settings",
            [(f"{s.setting}: {_value(s.old)} -> {_value(s.new)}", []) for s in diff.settings],
        ),
        ("Site facts", [(_fact_line(f), []) for f in diff.facts]),
        ("Relays", relays),
        (
            "Reachability",
            [
                (f"{site}: reachable again" if why is None else f"{site}: unreachable: {why}", [])
                for site, why in diff.unreachable
            ],
        ),
        ("Pairs", [(_pair_line(p), []) for p in diff.pairs]),
        ("Sites", _grouped(diff.sites)),
        ("Relay allocations", [(_allocation_line(a), []) for a in diff.allocations]),
        (
            "Relay ports (a site's port on every relay)",
            [(_port_line(c), []) for c in diff.site_ports],
        ),
        (
            "Live tunnels disturbed",
            [(f"{d.a} -- {d.b}: {'; '.join(d.reasons)}", []) for d in diff.disturbed],
        ),
    ]
    return [(title, items) for title, items in sections if items]


def _text(diff: PlanDiff) -> str:
    if not diff.changed:
        return "No changes.\n"
    lines = [headline(diff)]
    for title, items in _sections(diff):
        lines += ["", f"{title}:"]
        for text, under in items:
            lines.append(f"  {text}")
            lines += [f"    {line}" for line in under]
    return "\n".join(lines) + "\n"


def _markdown(diff: PlanDiff) -> str:
    lines = ["### meshwright plan", ""]
    if not diff.changed:
        return "\n".join([*lines, "No changes."]) + "\n"
    lines.append(f"**{headline(diff)}**")
    for title, items in _sections(diff):
        lines += ["", f"**{title}**", ""]
        if title == "Pairs":  # a table: one row per pair reads best side by side
            lines += ["| pair | before | after |", "| --- | --- | --- |"]
            for pair in diff.pairs:
                before, after = pair.mode.old, pair.mode.new
                if _shows_path(pair):
                    before += f" ({_path(pair.path.old)})"
                    after += f" ({_path(pair.path.new)})"
                lines.append(f"| {pair.a} -- {pair.b} | {before} | {after} |")
            continue
        for text, under in items:
            lines.append(f"- {text}")
            lines += [f"  - {line}" for line in under]
    return "\n".join(lines) + "\n"


def render(diff: PlanDiff, fmt: str = "text") -> str:
    """``diff`` as ``text``, ``markdown`` or ``json`` (sorted keys: stable for machines)."""
    if fmt == "json":
        return json.dumps(diff.to_dict(), indent=2, sort_keys=True) + "\n"
    if fmt == "markdown":
        return _markdown(diff)
    if fmt == "text":
        return _text(diff)
    raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")


def render_errors(message: str, problems: Sequence[str], fmt: str = "text") -> str:
    """Why there is no plan: ``message`` ("the inventory is not valid") and every problem, in
    text worded as the playbooks word it (``mesh_validate``, ``mesh_plan``)."""
    if fmt == "json":
        data = {"version": DIFF_VERSION, "error": message, "problems": list(problems)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    if fmt == "markdown":
        lines = ["### meshwright plan", "", f"**{message}**", ""]
        return "\n".join([*lines, *(f"- {p}" for p in problems)]) + "\n"
    return f"{message}: {PlanError(problems)}\n" if problems else f"{message}\n"
