"""mesh_from_dict: a plain dict (as the mesh_plan action plugin builds it) to a Mesh.

The dict::

    {"overlay_network": "10.99.0.0/24",
     "link_kinds": ["direct"],            # optional, default ["direct"]
     "keepalive": 25,                     # optional
     "listen_port": 51820,                # optional: the sites' default
     "relays": [{"name": "r1", "addresses": ["198.51.100.10"],            # optional
                 "first_port": 40000, "last_port": 59999}],  # site ports, optional
     "sites": [{"name": "a", "public_key": "...", "overlay_address": "10.99.0.1",
                "lan_prefixes": ["192.168.1.0/24"], "nat_class": "open",
                "endpoint": "198.51.100.1:51820", "listen_port": 51820, "required": true,
                "policy": {"allow_direct": true, "allow_relay": true, "hubs": ["b"]}}]}

``sites`` and ``relays`` may also be mappings of name to the rest. Unknown keys are errors (a
typo must not silently become a default). When the shape is wrong somewhere, the error lists the
shape problems and every other problem the rest of the mesh has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .build import check
from .model import (
    DEFAULT_KEEPALIVE,
    DEFAULT_LINK_KINDS,
    DEFAULT_LISTEN_PORT,
    DEFAULT_RELAY_FIRST_PORT,
    DEFAULT_RELAY_LAST_PORT,
    Mesh,
    PlanError,
    Policy,
    Relay,
    Site,
)
from .validate import Skip

__all__ = ["mesh_from_dict", "read_mesh"]

_MESH_KEYS = {
    "overlay_network",
    "link_kinds",
    "keepalive",
    "listen_port",
    "relays",
    "sites",
    "previous_allocations",
}
_SITE_KEYS = {
    "name",
    "public_key",
    "relay_rtt_ms",
    "overlay_address",
    "lan_prefixes",
    "nat_class",
    "endpoint",
    "listen_port",
    "policy",
    "required",
}
_POLICY_KEYS = {"allow_direct", "allow_relay", "hubs"}
_RELAY_KEYS = {
    "name",
    "addresses",
    "public_key",
    "overlay_address",
    "listen_port",
    "first_port",
    "last_port",
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _entries(value: object, what: str, problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``sites``/``relays`` as (label, entry) pairs, from a list or a name -> entry mapping."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(value, Mapping):
        for key, entry in value.items():
            if not isinstance(entry, Mapping):
                problems.append(f"{what} {key}: {entry!r} is not a mapping")
                continue
            entry = dict(entry)
            if "name" in entry and entry["name"] != key:
                problems.append(f"{what} {key}: name {entry['name']!r} differs from its key")
            entry["name"] = key
            out.append((f"{what} {key}", entry))
    elif isinstance(value, list | tuple):
        for position, entry in enumerate(value):
            if not isinstance(entry, Mapping):
                problems.append(f"{what}s[{position}]: {entry!r} is not a mapping")
                continue
            name = entry.get("name")
            label = f"{what} {name}" if isinstance(name, str) and name else f"{what}s[{position}]"
            out.append((label, dict(entry)))
    else:
        problems.append(f"{what}s: {value!r} is neither a list nor a mapping")
    return out


def mesh_from_dict(data: Mapping[str, Any]) -> Mesh:
    """Read and shape-check a plain dict; :class:`PlanError` names every problem found."""
    mesh, problems, skip = read_mesh(data)
    if problems:
        more, _ = check(mesh, skip)
        raise PlanError([*problems, *more])
    return mesh


def read_mesh(data: Mapping[str, Any]) -> tuple[Mesh, list[str], Skip]:
    """The mesh of a plain dict, its shape problems, and the (site, field) pairs they concern
    (for :func:`~meshwright.plan.validate.check_mesh`'s ``skip``, so none is reported twice).

    A malformed field becomes a neutral value; PlanError only when ``data`` is no mapping.
    """
    problems: list[str] = []
    skip: set[tuple[str, str]] = set()
    if not isinstance(data, Mapping):
        raise PlanError([f"the mesh is {type(data).__name__}, not a mapping"])
    for key in sorted(set(data) - _MESH_KEYS, key=str):
        problems.append(f"mesh: unknown key {key!r} (known: {', '.join(sorted(_MESH_KEYS))})")

    overlay = data.get("overlay_network")
    if not isinstance(overlay, str):
        problems.append(f"overlay_network {overlay!r} is not a prefix such as '10.99.0.0/24'")
        skip.add(("", "overlay_network"))
        overlay = ""
    kinds_value = data.get("link_kinds", sorted(DEFAULT_LINK_KINDS))
    if isinstance(kinds_value, set | frozenset):
        kinds_value = sorted(kinds_value, key=str)
    kinds = _str_list(kinds_value)
    if kinds is None:
        problems.append(f"link_kinds {kinds_value!r} is not a list of link kinds")
        skip.add(("", "link_kinds"))
        kinds = tuple(DEFAULT_LINK_KINDS)
    keepalive = data.get("keepalive", DEFAULT_KEEPALIVE)
    if not _is_int(keepalive):
        problems.append(f"keepalive {keepalive!r} is not a whole number of seconds")
        skip.add(("", "keepalive"))
        keepalive = DEFAULT_KEEPALIVE
    listen_port = data.get("listen_port", DEFAULT_LISTEN_PORT)
    if not _is_int(listen_port):
        problems.append(f"listen_port {listen_port!r} is not a port number")
        skip.add(("", "listen_port"))
        listen_port = DEFAULT_LISTEN_PORT

    relays = []
    for label, entry in _entries(data.get("relays", []), "relay", problems):
        for key in sorted(set(entry) - _RELAY_KEYS, key=str):
            problems.append(f"{label}: unknown key {key!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{label}: no name")
            continue
        addresses = _str_list(entry.get("addresses", []))
        if addresses is None:
            problems.append(f"{label}: addresses {entry.get('addresses')!r} is not a list")
            addresses = ()
        public_key, relay_overlay = entry.get("public_key"), entry.get("overlay_address")
        port = entry.get("listen_port", DEFAULT_LISTEN_PORT)
        if public_key is not None and not isinstance(public_key, str):
            problems.append(f"{label}: public key {public_key!r} is not a string")
            public_key = None
        if relay_overlay is not None and not isinstance(relay_overlay, str):
            problems.append(f"{label}: overlay address {relay_overlay!r} is not an address string")
            relay_overlay = None
        if not _is_int(port):
            problems.append(f"{label}: listen port {port!r} is not a port number")
            port = DEFAULT_LISTEN_PORT
        first = entry.get("first_port", DEFAULT_RELAY_FIRST_PORT)
        if not _is_int(first):
            problems.append(f"{label}: first port {first!r} is not a port number")
            first = DEFAULT_RELAY_FIRST_PORT
        last = entry.get("last_port", DEFAULT_RELAY_LAST_PORT)
        if not _is_int(last):
            problems.append(f"{label}: last port {last!r} is not a port number")
            last = DEFAULT_RELAY_LAST_PORT
        relays.append(
            Relay(
                name=name,
                addresses=addresses,
                public_key=public_key,
                overlay_address=relay_overlay.split("/")[0] if relay_overlay else None,
                listen_port=port,
                first_port=first,
                last_port=last,
            )
        )

    if "sites" not in data:
        problems.append("sites: missing")
    sites = []
    for label, entry in _entries(data.get("sites", []), "site", problems):
        site = _site(label, entry, listen_port, problems, skip)
        if site is not None:
            sites.append(site)

    previous = data.get("previous_allocations", [])
    if not isinstance(previous, list | tuple) or not all(isinstance(x, Mapping) for x in previous):
        problems.append("previous_allocations is not a list of allocations")
        previous = []
    mesh = Mesh(
        previous_allocations=tuple(previous),
        sites=tuple(sites),
        relays=tuple(relays),
        overlay_network=overlay,
        link_kinds=frozenset(kinds),
        keepalive=keepalive,
        listen_port=listen_port,
    )
    return mesh, problems, frozenset(skip)


def _site(
    label: str,
    entry: dict[str, Any],
    default_port: int,
    problems: list[str],
    skip: set[tuple[str, str]],
) -> Site | None:
    add = problems.append
    for key in sorted(set(entry) - _SITE_KEYS, key=str):
        add(f"{label}: unknown key {key!r} (known: {', '.join(sorted(_SITE_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        add(f"{label}: no name")
        return None

    def bad(field: str, message: str) -> None:
        add(f"{label}: {message}")
        skip.add((name, field))

    public_key = entry.get("public_key")
    if public_key is not None and not isinstance(public_key, str):
        bad("public_key", f"public key {public_key!r} is not a string")
        public_key = None
    overlay = entry.get("overlay_address")
    if not isinstance(overlay, str):
        bad("overlay_address", f"overlay address {overlay!r} is not an address string")
        overlay = ""
    lans = _str_list(entry.get("lan_prefixes", []))
    if lans is None:
        bad("lan_prefixes", f"lan_prefixes {entry.get('lan_prefixes')!r} is not a list of prefixes")
        lans = ()
    nat_class = entry.get("nat_class")
    if nat_class is not None and not isinstance(nat_class, str):
        bad("nat_class", f"NAT class {nat_class!r} is not a string")
        nat_class = None
    endpoint = entry.get("endpoint")
    if endpoint is not None and not isinstance(endpoint, str):
        bad("endpoint", f"endpoint {endpoint!r} is not an 'ip:port' string")
        endpoint = None
    port = entry.get("listen_port", default_port)
    if not _is_int(port):
        bad("listen_port", f"listen port {port!r} is not a port number")
        port = default_port
    required = entry.get("required", True)
    if not isinstance(required, bool):
        bad("required", f"required {required!r} is not true or false")
        required = True

    rtt_value = entry.get("relay_rtt_ms") or {}
    rtt: tuple[tuple[str, float], ...] = ()
    if isinstance(rtt_value, Mapping) and all(
        isinstance(k, str) and _is_number(v) for k, v in rtt_value.items()
    ):
        rtt = tuple(sorted((k, float(v)) for k, v in rtt_value.items()))
    else:
        bad("relay_rtt_ms", f"relay_rtt_ms {rtt_value!r} is not a mapping of relay to milliseconds")

    policy_value = entry.get("policy") or {}
    policy = Policy()
    if not isinstance(policy_value, Mapping):
        bad("policy", f"policy {policy_value!r} is not a mapping")
    else:
        for key in sorted(set(policy_value) - _POLICY_KEYS, key=str):
            add(f"{label}: policy: unknown key {key!r} (known: {', '.join(sorted(_POLICY_KEYS))})")
        flags = {}
        for flag in ("allow_direct", "allow_relay"):
            value = policy_value.get(flag, True)
            if not isinstance(value, bool):
                bad(flag, f"policy {flag} {value!r} is not true or false")
                value = True
            flags[flag] = value
        hubs_value = policy_value.get("hubs")
        hubs = None if hubs_value is None else _str_list(hubs_value)
        if hubs_value is not None and hubs is None:
            bad("hubs", f"policy hubs {hubs_value!r} is not a list of site names")
        policy = Policy(hubs=hubs, **flags)
    return Site(
        name=name,
        public_key=public_key,
        overlay_address=overlay,
        lan_prefixes=lans,
        nat_class=nat_class,
        endpoint=endpoint,
        listen_port=port,
        policy=policy,
        required=required,
        relay_rtt_ms=rtt,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
