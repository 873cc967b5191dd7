"""`meshwright status`: every pair of the mesh as planned and as it is now. Pure.

:func:`build_status` takes the dict of a plan file (``.meshwright/plan.json``) and what the
``mesh_status`` module returned on each site (or Ansible's answer for a site it could not
reach), and returns one JSON-ready dict (:data:`STATUS_VERSION`): a row per planned pair, the
sites that could not be read, and the live view ``meshwright graph --live`` draws.
:func:`render_table` turns that dict into the text table. No I/O, no clock: ages are measured
on the sites, each against its own clock. See docs/status.md.

How a pair's path is judged: from where its packets go, i.e. the WireGuard endpoint each side
holds for the other (:func:`judge_endpoint`). Every site has one relay port ``P`` (the same on
every relay, the plan's ``relays[r].sites``), and holds ``r_address:P`` for every peer relayed
through relay r:

* a relay's address (the plan's ``relays[r].address``) and the site's own port: relayed through
  that relay (the preferred one or, after a failover, the standby); TLS-relayed when the pair is
  a ``relay-tcp`` one (its other side is a UDP-blocked site, carried over TLS 443);
* a loopback address: the TLS carrier's local socket on a UDP-blocked site (``127.0.0.1:L_r``,
  one per relay, as the plan's endpoints for the site's peers give them), so TLS-relayed through
  that relay;
* anything else: the peer itself, so direct;
* a pair the plan routes through other sites (``via X``) has no link of its own: it is up when
  every hop of its path is.

A pair's state is ``up`` when its newest handshake (either side's) is at most
:data:`DOWN_AFTER_S` old: WireGuard renews a session every 2 minutes while packets flow, and the
plan's persistent keepalives keep them flowing. With no handshake ever, or an older one, it is
``down``, unless the plan gives neither side a keepalive (two open sites): such a pair sends
nothing while it has nothing to say, so it is ``idle``. It is ``down`` too when a side that
answered has no such peer or no interface, and ``unknown`` when neither side could be read. A
site that could not be read leaves its pairs to be judged from the other side alone.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from meshwright.graph import LIVE_PATHS
from meshwright.wire.endpoint import EndpointError, parse_endpoint

__all__ = [
    "DOWN_AFTER_S",
    "STATUS_VERSION",
    "RelayView",
    "Route",
    "StatusError",
    "build_status",
    "format_age",
    "format_bytes",
    "judge_endpoint",
    "relay_view",
    "render_table",
    "to_json",
]

STATUS_VERSION = 1
# Older handshakes mean the pair is down: WireGuard renews its session every 120 s while
# packets flow (REKEY_AFTER_TIME), and the plan's keepalives (25 s) keep them flowing.
DOWN_AFTER_S = 180.0
COLUMNS = (
    "a",
    "b",
    "planned",
    "path",
    "a sends to",
    "b sends to",
    "rtt ms",
    "handshake",
    "a->b",
    "b->a",
    "sidecar",
    "notes",
)
LINKED_MODES = ("direct", "punch", "relay", "relay-tcp")


class StatusError(ValueError):
    """The plan is not what it should be; the message names the entry."""


@dataclass(frozen=True, slots=True)
class RelayView:
    """What the plan says a relayed endpoint looks like: ``relays``: relay address (canonical
    text) -> relay; ``ports``: site -> its relay port; ``local``: UDP-blocked site -> its
    sidecar's loopback port -> relay."""

    relays: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    local: Mapping[str, Mapping[int, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one side's packets for its peer go."""

    path: str  # direct | relay | relay-tcp
    relay: str | None = None
    note: str | None = None


@dataclass(slots=True)
class _Site:
    name: str
    reachable: bool
    reason: str | None = None  # why it could not be read
    interface: str | None = None
    interface_present: bool = False
    public_key: str | None = None
    listen_port: int | None = None
    peers: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # by public key
    sidecar: Mapping[str, Any] | None = None
    planned: bool = True


@dataclass(frozen=True, slots=True)
class _Side:
    """One answering side's view of its peer; ``peer`` is None when it has no such peer."""

    site: str
    peer: Mapping[str, Any] | None
    route: Route | None


# --- reading the inputs ----------------------------------------------------------------------


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise StatusError(f"{where}: {key!r} is not a list but {type(value).__name__}")
    return value


def _mapping(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise StatusError(f"{where}: {key!r} is not a mapping but {type(value).__name__}")
    return value


def _name(entry: Any, key: str, where: str) -> str:
    value = entry.get(key) if isinstance(entry, Mapping) else None
    if not isinstance(value, str) or not value:
        raise StatusError(f"{where}: {key!r} is {value!r}, not a name")
    return value


def relay_view(plan: Mapping[str, Any]) -> RelayView:
    """The plan's relays, site ports and loopback ports (see :class:`RelayView`), checked."""
    addresses: dict[str, str] = {}
    ports: dict[str, int] = {}
    relay_of: dict[tuple[str, str], str] = {}
    for key in ("allocations", "standby_allocations"):
        for n, entry in enumerate(_list(plan, key, "plan")):
            where = f"plan: {key}[{n}]"
            found = entry.get("ports") if isinstance(entry, Mapping) else None
            if not isinstance(found, list) or not all(isinstance(p, int) for p in found):
                raise StatusError(f"{where}: 'ports' is {found!r}, not a list of ports")
            a, b = _name(entry, "a", where), _name(entry, "b", where)
            relay = _name(entry, "relay", where)
            addresses.setdefault(_canonical(_name(entry, "address", where)), relay)
            if key == "allocations":
                relay_of[(min(a, b), max(a, b))] = relay
            if len(found) == 2:  # a plan before per-site ports has a port pair per allocation
                ports.setdefault(a, found[0])
                ports.setdefault(b, found[1])
    for name, relay in _mapping(plan, "relays", "plan").items():
        if not isinstance(relay, Mapping):
            continue
        if isinstance(relay.get("address"), str):
            addresses[_canonical(relay["address"])] = name
        for entry in relay.get("sites") or []:
            if isinstance(entry, Mapping) and isinstance(entry.get("port"), int):
                ports[str(entry.get("name"))] = entry["port"]
    # A UDP-blocked site's loopback ports, from the plan's endpoints of its TLS-relayed peers.
    local: dict[str, dict[int, str]] = {}
    for site, entry in _mapping(plan, "sites", "plan").items():
        for peer in entry.get("peers") or [] if isinstance(entry, Mapping) else []:
            if not isinstance(peer, Mapping) or peer.get("mode") != "relay-tcp":
                continue
            other = str(peer.get("name"))
            carrier = relay_of.get((min(site, other), max(site, other)))
            endpoint = peer.get("endpoint")
            if carrier is None or not isinstance(endpoint, str):
                continue
            try:
                parsed = parse_endpoint(endpoint)
            except EndpointError:
                continue
            if parsed.address is not None and parsed.address.is_loopback:
                local.setdefault(site, {})[parsed.port] = carrier
    return RelayView(addresses, ports, local)


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _first_line(text: object, default: str) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0].strip() if lines else default


def _site(name: str, result: Any, planned: bool) -> _Site:
    """A site from what Ansible registered for its mesh_status task (or None: not asked)."""
    if not isinstance(result, Mapping):
        return _Site(name, False, "not asked (not in this run)", planned=planned)
    if result.get("unreachable"):
        return _Site(
            name, False, f"unreachable: {_first_line(result.get('msg'), '?')}", planned=planned
        )
    if "interface_present" not in result:  # the module failed, was skipped or never ran
        reason = _first_line(result.get("msg"), "no report")
        return _Site(name, False, f"not read: {reason}", planned=planned)
    peers: dict[str, Mapping[str, Any]] = {}
    for peer in result.get("peers") or []:
        if isinstance(peer, Mapping) and isinstance(peer.get("public_key"), str):
            peers[peer["public_key"]] = peer
    sidecar = result.get("sidecar")
    port = result.get("listen_port")
    return _Site(
        name,
        True,
        interface=str(result.get("interface") or "") or None,
        interface_present=bool(result.get("interface_present")),
        public_key=result.get("public_key") if isinstance(result.get("public_key"), str) else None,
        listen_port=port if isinstance(port, int) else None,
        peers=peers,
        sidecar=sidecar if isinstance(sidecar, Mapping) else None,
        planned=planned,
    )


# --- judging ---------------------------------------------------------------------------------


def judge_endpoint(endpoint: str | None, site: str, view: RelayView) -> Route | None:
    """Where the packets ``site`` sends to ``endpoint`` go: through a relay (a relay's address
    and the site's own port), into the TLS carrier on loopback (relay-tcp), or straight to the
    peer (direct). None for no endpoint."""
    if not endpoint:
        return None
    try:
        parsed = parse_endpoint(endpoint)
    except EndpointError:
        return Route("direct", note=f"endpoint {endpoint!r} is not ip:port")
    address = parsed.address
    host = str(address) if address is not None else parsed.host
    if address is not None and address.is_loopback:
        relay = view.local.get(site, {}).get(parsed.port)
        if relay is not None:
            return Route("relay-tcp", relay)
        return Route("relay-tcp", note=f"{endpoint} is no relay's local port of {site}")
    relay = view.relays.get(host)
    if relay is None:
        return Route("direct")
    own = view.ports.get(site)
    if parsed.port == own:
        return Route("relay", relay)
    mine = f"{site}'s port {own}" if own is not None else f"a port of {site}"
    return Route("relay", relay, note=f"{endpoint} is {relay} but not {mine}")


def _describe(route: Route) -> str:
    if route.path == "direct":
        return "direct"
    through = f" through {route.relay}" if route.relay else ""
    return ("over TLS" if route.path == "relay-tcp" else "relayed") + through


def _combine(sides: Sequence[_Side]) -> tuple[Route | None, list[str]]:
    """The pair's route from its sides' routes: a relayed side makes the pair relayed (a TLS
    side makes it TLS-relayed); sides that disagree otherwise are noted."""
    routes = [(side.site, side.route) for side in sides if side.route is not None]
    notes = [f"{site}: {route.note}" for site, route in routes if route.note]
    if not routes:
        return None, notes
    chosen = next((r for _, r in routes if r.path == "relay-tcp"), None)
    chosen = chosen or next((r for _, r in routes if r.path == "relay"), None) or routes[0][1]
    if len(routes) == 2:
        (x, x_route), (y, y_route) = routes
        paths = {x_route.path, y_route.path}
        # one side on the relay and the other on its TLS carrier is how relay-tcp works
        agree = x_route.relay == y_route.relay and (
            len(paths) == 1 or paths == {"relay", "relay-tcp"}
        )
        if not agree:
            notes.append(f"{x} sends {_describe(x_route)}, {y} sends {_describe(y_route)}")
    return chosen, notes


def _age(peer: Mapping[str, Any] | None) -> float | None:
    value = peer.get("handshake_age_s") if peer is not None else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(peer: Mapping[str, Any], key: str) -> int | None:
    value = peer.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sidecar_entry(site: _Site, peer: str) -> dict[str, Any] | None:
    """The site's sidecar's state for one peer, with the service's state beside it."""
    if not site.reachable or site.sidecar is None:
        return None
    state = site.sidecar.get("state")
    peers = state.get("peers") if isinstance(state, Mapping) else None
    entry = peers.get(peer) if isinstance(peers, Mapping) else None
    if not isinstance(entry, Mapping):
        return None
    return {**entry, "service": site.sidecar.get("service")}


def _sidecar_text(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """What the sidecars are doing for a punch pair, in a few words: the controlling side's
    view (it is the one that tries), else the other's."""
    present = [entry for entry in (a, b) if entry is not None]
    if not present:
        return "no state"
    entry = next((e for e in present if e.get("controlling")), present[0])
    service = entry.get("service")
    words = [str(entry.get("path") or "?")]
    if entry.get("path") == "direct" and isinstance(entry.get("direct_for_s"), int | float):
        words[0] += f" for {format_age(float(entry['direct_for_s']))}"
    if entry.get("phase") not in (None, "idle"):
        words[0] += f" ({entry['phase']})"
    if entry.get("suspect"):
        words.append("suspect")
    if isinstance(entry.get("next_attempt_in_s"), int | float):
        words.append(f"next try {format_age(float(entry['next_attempt_in_s']))}")
    if isinstance(entry.get("failures"), int) and entry["failures"]:
        words.append(f"{entry['failures']} failed")
    if service not in (None, "active"):
        words.insert(0, f"sidecar {service}:")
    return ", ".join(words).replace(":,", ":")


def _rtt(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """The sidecars' round-trip time of the direct path (its probes measure it), while a
    sidecar holds the pair direct; the controlling side's first."""
    entries = [e for e in (a, b) if e and e.get("path") == "direct"]
    for entry in sorted(entries, key=lambda e: not e.get("controlling")):
        value = entry.get("rtt_ms")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _linked_row(
    a: str,
    b: str,
    mode: str,
    plan: Mapping[str, Any],
    sites: Mapping[str, _Site],
    view: RelayView,
) -> dict[str, Any]:
    notes: list[str] = []
    sides: list[_Side] = []
    for me, other in ((a, b), (b, a)):
        site = sites[me]
        if not site.reachable:
            continue
        if not site.interface_present:
            sides.append(_Side(me, None, None))
            notes.append(f"{me} has no interface {site.interface or ''}".rstrip())
            continue
        key = _planned_key(plan, me, other)
        peer = site.peers.get(key) if key else None
        if peer is None:
            sides.append(_Side(me, None, None))
            notes.append(f"{other} is not a WireGuard peer of {me}")
            continue
        endpoint = peer.get("endpoint")
        route = judge_endpoint(endpoint if isinstance(endpoint, str) else None, me, view)
        if route is not None and route.path == "relay" and mode == "relay-tcp":
            # The UDP side of a pair whose other side the relay reaches over TLS.
            route = Route("relay-tcp", route.relay, route.note)
        sides.append(_Side(me, peer, route))
    route, route_notes = _combine(sides)
    notes += route_notes
    ages = [age for age in (_age(side.peer) for side in sides) if age is not None]
    age = min(ages) if ages else None
    if not sides:
        state = "unknown"
    elif any(side.peer is None for side in sides):
        state = "down"
    elif age is not None and age <= DOWN_AFTER_S:
        state = "up"
    elif any(_planned_keepalive(plan, x, y) for x, y in ((a, b), (b, a))):
        state = "down"  # keepalives would have renewed the session
    else:
        # No keepalive on either side (two open sites): WireGuard sends nothing while the
        # pair has nothing to say, so an old handshake only means quiet.
        state = "idle"
    path = route.path if route is not None else None
    by_site = {side.site: side for side in sides}
    endpoints = {
        name: (str(side.peer["endpoint"]) if side.peer and side.peer.get("endpoint") else None)
        for name, side in by_site.items()
    }
    a_to_b = b_to_a = None
    source = next((side for side in sides if side.peer is not None), None)
    if source is not None and source.peer is not None:
        sent, received = _count(source.peer, "tx_bytes"), _count(source.peer, "rx_bytes")
        a_to_b, b_to_a = (sent, received) if source.site == a else (received, sent)
    sidecar_a = sidecar_b = None
    if mode == "punch":
        sidecar_a, sidecar_b = _sidecar_entry(sites[a], b), _sidecar_entry(sites[b], a)
    row = _empty_row(a, b, mode, state, path)
    row.update(
        relay=route.relay if route is not None and path in ("relay", "relay-tcp") else None,
        a_endpoint=endpoints.get(a),
        b_endpoint=endpoints.get(b),
        handshake_age_s=age,
        rtt_ms=_rtt(sidecar_a, sidecar_b),
        bytes_a_to_b=a_to_b,
        bytes_b_to_a=b_to_a,
        sidecar_a=sidecar_a,
        sidecar_b=sidecar_b,
        seen_from=[side.site for side in sides],
        notes=notes,
    )
    return row


def _planned_peer(plan: Mapping[str, Any], site: str, peer: str) -> Mapping[str, Any]:
    """The plan's entry for ``site``'s WireGuard peer ``peer`` (empty when there is none)."""
    entry = _mapping(plan, "sites", "plan").get(site)
    for candidate in entry.get("peers") or [] if isinstance(entry, Mapping) else []:
        if isinstance(candidate, Mapping) and candidate.get("name") == peer:
            return candidate
    return {}


def _planned_key(plan: Mapping[str, Any], site: str, peer: str) -> str | None:
    """The public key the plan gives ``site`` for its peer ``peer``."""
    key = _planned_peer(plan, site, peer).get("public_key")
    return key if isinstance(key, str) else None


def _planned_keepalive(plan: Mapping[str, Any], site: str, peer: str) -> bool:
    return bool(_planned_peer(plan, site, peer).get("keepalive"))


def _empty_row(a: str, b: str, mode: str, state: str, path: str | None) -> dict[str, Any]:
    """A pair's row with nothing measured: every field of the status file's layout."""
    return {
        "a": a,
        "b": b,
        "planned": mode,
        "state": state,
        "path": path,
        "relay": None,
        "via": None,
        "a_endpoint": None,
        "b_endpoint": None,
        "handshake_age_s": None,
        "rtt_ms": None,
        "bytes_a_to_b": None,
        "bytes_b_to_a": None,
        "sidecar_a": None,
        "sidecar_b": None,
        "seen_from": [],
        "notes": [],
    }


def _via_row(
    a: str, b: str, mode: str, hops: Sequence[str], linked: Mapping[tuple[str, str], str]
) -> dict[str, Any]:
    """A pair routed through other sites: down when a hop is down, unknown when a hop is,
    else up (idle when a hop is idle)."""
    row = _empty_row(a, b, mode, "unknown", "via")
    row["via"] = mode[4:] if mode.startswith("via ") else (hops[1] if len(hops) > 2 else None)
    states = []
    for x, y in pairwise(hops):
        state = linked.get((min(x, y), max(x, y)))
        states.append(state)
        if state != "up":
            row["notes"].append(f"hop {min(x, y)} -- {max(x, y)} is {state or 'not planned'}")
    if any(s in ("down", None) for s in states):
        row["state"] = "down"
    elif "unknown" in states:
        row["state"] = "unknown"
    else:
        row["state"] = "idle" if "idle" in states else "up"
    return row


def build_status(plan: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """The mesh's status from the plan and each site's ``mesh_status`` result.

    ``results``: site -> what Ansible registered for the site's mesh_status task (the module's
    return, or ``{"unreachable": true, "msg": ...}``, or a failure with ``msg``); a planned
    site missing from it was not asked. Hosts that are not in the plan are listed as such.
    """
    if not isinstance(plan, Mapping):
        raise StatusError(f"plan: not a JSON object but {type(plan).__name__}")
    planned_sites = sorted(_mapping(plan, "sites", "plan"))
    if not planned_sites:
        raise StatusError("plan: no sites: run the meshwright.mesh.site playbook first")
    view = relay_view(plan)
    sites = {name: _site(name, results.get(name), True) for name in planned_sites}
    for name in sorted(set(results) - set(planned_sites)):
        sites[name] = _site(name, results[name], False)

    pairs: list[tuple[str, str, str, list[str]]] = []
    for n, entry in enumerate(_list(plan, "pairs", "plan")):
        where = f"plan: pairs[{n}]"
        a, b = sorted((_name(entry, "a", where), _name(entry, "b", where)))
        for name in (a, b):
            if name not in sites:
                raise StatusError(f"{where}: {a} -- {b}: {name} is not in the plan's sites")
        hops = entry.get("path") if isinstance(entry.get("path"), list) else []
        pairs.append((a, b, _name(entry, "mode", where), [str(h) for h in hops]))
    pairs.sort(key=lambda p: (p[0], p[1]))

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for a, b, mode, _ in pairs:
        if mode in LINKED_MODES:
            rows[(a, b)] = _linked_row(a, b, mode, plan, sites, view)
    linked = {key: row["state"] for key, row in rows.items()}
    for a, b, mode, hops in pairs:
        if (a, b) in rows:
            continue
        if mode == "none":
            rows[(a, b)] = _empty_row(a, b, mode, "none", None)
        else:  # "via X"
            rows[(a, b)] = _via_row(a, b, mode, hops or [a, b], linked)
    ordered = [rows[(a, b)] for a, b, _, _ in pairs]

    unreachable = {
        name: site.reason or "" for name, site in sorted(sites.items()) if not site.reachable
    }
    counted = [row["state"] for row in ordered if row["state"] != "none"]
    return {
        "version": STATUS_VERSION,
        "down_after_s": DOWN_AFTER_S,
        "sites": {name: _site_dict(site) for name, site in sorted(sites.items())},
        "unreachable": unreachable,
        "summary": {
            "sites": len(planned_sites),
            "answered": sum(1 for name in planned_sites if sites[name].reachable),
            "pairs": len(counted),
            "up": counted.count("up"),
            "idle": counted.count("idle"),
            "down": counted.count("down"),
            "unknown": counted.count("unknown"),
        },
        "rows": ordered,
        # The live view `meshwright graph --live` reads (graph.live_from_dict): the pairs that
        # are up (or idle), with the path their traffic takes. It draws the others as planned.
        "pairs": [
            {"a": row["a"], "b": row["b"], "path": row["path"]}
            for row in ordered
            if row["state"] in ("up", "idle") and row["path"] in LIVE_PATHS
        ],
    }


def _site_dict(site: _Site) -> dict[str, Any]:
    sidecar = site.sidecar or {}
    error = None
    if site.reachable and not site.interface_present:
        error = f"interface {site.interface or '?'} does not exist"
    return {
        "planned": site.planned,
        "reachable": site.reachable,
        "reason": site.reason,
        "error": error,
        "interface": site.interface,
        "public_key": site.public_key,
        "listen_port": site.listen_port,
        "peers": len(site.peers) if site.reachable else None,
        "sidecar_service": sidecar.get("service"),
        "sidecar_state": bool(sidecar.get("state")),
    }


# --- presenting ------------------------------------------------------------------------------


def format_age(seconds: float | None) -> str:
    """A duration for people: ``never``, ``12 s``, ``3 min``, ``5 h``, ``2 d``."""
    if seconds is None:
        return "never"
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 100 * 60:
        return f"{seconds // 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600:.0f} h"
    return f"{seconds // 86400:.0f} d"


def format_bytes(count: int | None) -> str:
    """A byte count in IEC units: ``512 B``, ``1.5 KiB``, ``3.0 MiB``; ``-`` for unknown."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _path_text(row: Mapping[str, Any]) -> str:
    """The path column: where traffic goes when the pair is up (or idle), else its state."""
    state, path = row.get("state"), row.get("path")
    if state == "none":
        return "-"
    if state not in ("up", "idle") or path is None:
        return str(state)
    text = str(path)
    if path in ("relay", "relay-tcp") and row.get("relay"):
        text = f"{path} ({row['relay']})"
    elif path == "via" and row.get("via"):
        text = f"via {row['via']}"
    return text + (" (idle)" if state == "idle" else "")


def _cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    linked = row.get("planned") in LINKED_MODES
    rtt = row.get("rtt_ms")
    sidecar = "-"
    if row.get("planned") == "punch" and row.get("seen_from"):
        sidecar = _sidecar_text(row.get("sidecar_a"), row.get("sidecar_b"))
    return (
        str(row["a"]),
        str(row["b"]),
        str(row.get("planned")),
        _path_text(row),
        str(row.get("a_endpoint") or "-"),
        str(row.get("b_endpoint") or "-"),
        f"{rtt:.1f}" if isinstance(rtt, int | float) else "-",
        format_age(row.get("handshake_age_s")) if linked and row.get("seen_from") else "-",
        format_bytes(row.get("bytes_a_to_b")),
        format_bytes(row.get("bytes_b_to_a")),
        sidecar,
        "; ".join(row.get("notes") or []),
    )


def _table(rows: Iterable[tuple[str, ...]]) -> list[str]:
    rows = [COLUMNS, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_table(status: Mapping[str, Any]) -> str:
    """The status dict (:func:`build_status`, or a status file) as a text table: a summary
    line, one line per pair, then the sites that could not be read and other problems."""
    summary = status.get("summary", {})
    lines = [
        f"mesh status: {summary.get('answered', 0)} of {summary.get('sites', 0)} sites answered;"
        f" {summary.get('pairs', 0)} pairs: {summary.get('up', 0)} up,"
        f" {summary.get('idle', 0)} idle, {summary.get('down', 0)} down,"
        f" {summary.get('unknown', 0)} unknown"
    ]
    lines += _table(_cells(row) for row in status.get("rows", []))
    for name, reason in sorted(status.get("unreachable", {}).items()):
        lines.append(f"not reached: {name}: {reason}")
    for name, site in sorted(status.get("sites", {}).items()):
        if site.get("error"):
            lines.append(f"problem: {name}: {site['error']}")
        if not site.get("planned", True):
            lines.append(f"problem: {name}: not in the plan (run meshwright.mesh.site)")
    return "\n".join(lines) + "\n"


def to_json(status: Mapping[str, Any]) -> str:
    """The status file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(status, indent=2, sort_keys=True) + "\n"
