"""Validation of a :class:`~meshwright.plan.model.Mesh`: every problem, naming sites and values.

:func:`check_mesh` returns the problems and the *nodes*: the sites the link graph can hold (a
unique name and a known NAT class), in name order, with their addresses parsed and normalised.
Reachability is judged later, on those nodes, so that one run reports structural problems and
unreachable sites together.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..wire.endpoint import EndpointError, parse_endpoint
from .model import LINK_KINDS, NAT_CLASSES, RELAY_KINDS, Mesh, Site

__all__ = ["Node", "check_mesh", "prefix_key"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Problems already reported while reading a plain dict: (site name, field). check_mesh does not
# report them a second time (mesh_from_dict substitutes a neutral value for a malformed field).
Skip = frozenset[tuple[str, str]]


@dataclass(slots=True)
class Node:
    """One plannable site, as the link rules and the output see it."""

    index: int
    name: str
    site: Site
    eclass: str  # effective NAT class: "open" without an endpoint counts as "easy"
    allow_direct: bool
    allow_relay: bool
    hubs: frozenset[str] | None
    overlay: str  # host prefix, e.g. "10.99.0.1/32"
    prefixes: tuple[tuple[tuple[int, int, int], str], ...]  # (sort key, prefix): overlay + LANs
    endpoint: str | None  # normalised "ip:port" / "[ip6]:port"


def prefix_key(net: IPNetwork) -> tuple[int, int, int]:
    """Sort key of a prefix: IPv4 before IPv6, then by address, shorter prefix first."""
    return (net.version, int(net.network_address), net.prefixlen)


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def _public_key_problem(key: str) -> str | None:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(key) != 44 or len(raw) != 32:
        return f"public key {key!r} is not a WireGuard key (44 characters of base64, 32 bytes)"
    return None


def check_mesh(mesh: Mesh, skip: Skip = frozenset()) -> tuple[list[str], list[Node]]:
    """Every structural problem of ``mesh``, and the nodes of the link graph."""
    problems: list[str] = []
    add = problems.append

    # --- mesh settings ---------------------------------------------------------------------------
    overlay_net: IPNetwork | None = None
    if ("", "overlay_network") not in skip:
        try:
            overlay_net = ipaddress.ip_network(mesh.overlay_network, strict=True)
        except (TypeError, ValueError) as exc:
            add(f"overlay_network {mesh.overlay_network!r} is not a valid prefix ({exc})")
    unknown_kinds = sorted(str(k) for k in mesh.link_kinds if k not in LINK_KINDS)
    if unknown_kinds and ("", "link_kinds") not in skip:
        add(
            f"link_kinds: unknown kind(s) {', '.join(unknown_kinds)}"
            f" (known: {', '.join(LINK_KINDS)})"
        )
    if not _is_port(mesh.keepalive) and ("", "keepalive") not in skip:
        add(f"keepalive {mesh.keepalive!r} is not a number of seconds in 1-65535")
    if not _is_port(mesh.listen_port) and ("", "listen_port") not in skip:
        add(f"listen_port {mesh.listen_port!r} is not a port in 1-65535")

    # --- relays -------------------------------------------------------------------------------
    relay_kinds_on = bool(RELAY_KINDS & set(mesh.link_kinds))
    relay_count: dict[str, int] = defaultdict(int)
    relay_overlays: list[tuple[IPAddress, str]] = []
    for relay in sorted(mesh.relays, key=lambda r: str(r.name)):
        relay_count[relay.name] += 1
        for text in relay.addresses:
            try:
                ipaddress.ip_address(text)
            except (TypeError, ValueError):
                add(f"relay {relay.name}: address {text!r} is not an IP address")
        if not relay.addresses and relay_kinds_on:
            add(f"relay {relay.name}: no addresses (link kinds include relays)")
        if relay.public_key is not None and (problem := _public_key_problem(relay.public_key)):
            add(f"relay {relay.name}: {problem}")
        if relay.overlay_address is not None:
            try:
                address = ipaddress.ip_address(relay.overlay_address)
            except ValueError:
                add(
                    f"relay {relay.name}: overlay address {relay.overlay_address!r}"
                    " is not an IP address"
                )
            else:
                relay_overlays.append((address, relay.name))
        if not _is_port(relay.listen_port):
            add(f"relay {relay.name}: listen port {relay.listen_port!r} is not a port in 1-65535")
        first, last = relay.first_port, relay.last_port
        if not (_is_port(first) and _is_port(last)):
            add(f"relay {relay.name}: site ports {first!r}-{last!r} are not ports in 1-65535")
        elif last < first:
            add(
                f"relay {relay.name}: site ports {first}-{last} hold no port"
                " (the first must not be above the last)"
            )
    for name, times in sorted(relay_count.items()):
        if times > 1:
            add(f"relay {name}: defined {times} times")

    # --- sites, one by one -----------------------------------------------------------------------
    count: dict[str, int] = defaultdict(int)
    for site in mesh.sites:
        count[site.name] += 1
    for name, n in sorted(count.items()):
        if n > 1:
            add(f"site {name}: defined {n} times")
    known = set(count)
    for name in sorted(known & set(relay_count)):
        add(f"relay {name}: a site has the same name (WireGuard peers are named uniquely)")

    sites = sorted(mesh.sites, key=lambda s: s.name)
    nodes: list[Node] = []
    overlay_of: dict[IPAddress, list[str]] = defaultdict(list)
    for address, name in relay_overlays:
        overlay_of[address].append(f"relay {name}")
        if overlay_net is not None and address not in overlay_net:
            add(
                f"relay {name}: overlay address {address} is outside the overlay"
                f" network {overlay_net}"
            )
    key_of: dict[str, list[str]] = defaultdict(list)
    endpoint_of: dict[str, list[str]] = defaultdict(list)
    lans: list[tuple[IPNetwork, str]] = []
    for site in sites:
        name = site.name
        where = f"site {name}"

        def skipped(field: str, name: str = name) -> bool:
            return (name, field) in skip

        # public key
        if not skipped("public_key"):
            if not site.public_key or not isinstance(site.public_key, str):
                add(f"{where}: no public key (the keys step has not run on it)")
            else:
                problem = _public_key_problem(site.public_key)
                if problem:
                    add(f"{where}: {problem}")
                else:
                    key_of[site.public_key].append(name)

        # overlay address
        host_prefix = ""
        if not skipped("overlay_address"):
            try:
                address = ipaddress.ip_address(site.overlay_address)
            except (TypeError, ValueError):
                add(f"{where}: overlay address {site.overlay_address!r} is not an IP address")
            else:
                host_prefix = f"{address}/{address.max_prefixlen}"
                overlay_of[address].append(name)
                if overlay_net is not None:
                    if address.version != overlay_net.version or address not in overlay_net:
                        add(
                            f"{where}: overlay address {address} is outside the overlay"
                            f" network {overlay_net}"
                        )
                    elif address == overlay_net.network_address and overlay_net.prefixlen < (
                        address.max_prefixlen - 1
                    ):
                        add(
                            f"{where}: overlay address {address} is the network address of"
                            f" {overlay_net}"
                        )
                    elif (
                        address.version == 4
                        and address == overlay_net.broadcast_address
                        and overlay_net.prefixlen < 31
                    ):
                        add(
                            f"{where}: overlay address {address} is the broadcast address of"
                            f" {overlay_net}"
                        )

        # LAN prefixes
        site_lans: list[tuple[IPNetwork, str]] = []
        if not skipped("lan_prefixes"):
            for text in site.lan_prefixes:
                try:
                    net = ipaddress.ip_network(text, strict=True)
                except (TypeError, ValueError) as exc:
                    hint = ""
                    try:
                        hint = f" (did you mean {ipaddress.ip_network(text, strict=False)}?)"
                    except (TypeError, ValueError):
                        hint = f" ({exc})"
                    add(f"{where}: LAN prefix {text!r} is not a valid prefix{hint}")
                    continue
                site_lans.append((net, name))
                if (
                    overlay_net is not None
                    and net.version == overlay_net.version
                    and net.overlaps(overlay_net)
                ):
                    add(f"{where}: LAN prefix {net} overlaps the overlay network {overlay_net}")
        lans.extend(site_lans)

        # NAT class and endpoint
        nat_ok = False
        if not skipped("nat_class"):
            if site.nat_class is None:
                add(f"{where}: no NAT facts (nat_class is unknown: the probe has not run on it)")
            elif site.nat_class not in NAT_CLASSES:
                add(
                    f"{where}: NAT class {site.nat_class!r} is unknown"
                    f" (known: {', '.join(NAT_CLASSES)})"
                )
            else:
                nat_ok = True
        endpoint: str | None = None
        if site.endpoint is not None and not skipped("endpoint"):
            try:
                endpoint = str(parse_endpoint(str(site.endpoint)))
            except EndpointError as exc:
                add(f"{where}: endpoint {site.endpoint!r} is not valid ({exc.reason})")
                endpoint = site.endpoint  # still "has an endpoint" for the link rules
            else:
                endpoint_of[endpoint].append(name)

        if not _is_port(site.listen_port) and not skipped("listen_port"):
            add(f"{where}: listen port {site.listen_port!r} is not a port in 1-65535")

        # policy
        policy = site.policy
        hubs: frozenset[str] | None = None
        if policy.hubs is not None and not skipped("hubs"):
            hubs = frozenset(policy.hubs)
            unknown = sorted(hubs - known)
            if unknown:
                add(f"{where}: hubs name unknown site(s) {', '.join(unknown)}")

        if count[name] == 1 and nat_ok:
            eclass = site.nat_class or ""
            if eclass == "open" and site.endpoint is None:
                eclass = "easy"
            prefixes: list[tuple[tuple[int, int, int], str]] = []
            if host_prefix:
                host_net = ipaddress.ip_network(host_prefix)
                prefixes.append((prefix_key(host_net), host_prefix))
            prefixes.extend((prefix_key(net), str(net)) for net, _ in site_lans)
            nodes.append(
                Node(
                    index=len(nodes),
                    name=name,
                    site=site,
                    eclass=eclass,
                    allow_direct=bool(policy.allow_direct),
                    allow_relay=bool(policy.allow_relay),
                    hubs=hubs,
                    overlay=host_prefix,
                    prefixes=tuple(sorted(prefixes)),
                    endpoint=endpoint,
                )
            )

    # --- across sites ---------------------------------------------------------------------------
    for overlay, names in sorted(overlay_of.items(), key=lambda kv: (kv[0].version, kv[0])):
        if len(names) > 1:
            add(f"sites {_names(names)}: same overlay address {overlay}")
    for key, names in sorted(key_of.items()):
        if len(names) > 1:
            add(f"sites {_names(names)}: same public key {key}")
    for endpoint_text, names in sorted(endpoint_of.items()):
        if len(names) > 1:
            add(f"sites {_names(names)}: same endpoint {endpoint_text}")
    problems.extend(_overlaps(lans))
    return problems, nodes


def _overlaps(lans: Sequence[tuple[IPNetwork, str]]) -> list[str]:
    """Every pair of overlapping LAN prefixes, in O(n log n + overlaps).

    Prefixes nest or are disjoint, so sorted by (start, length) every prefix that overlaps a later
    one is still on the stack of prefixes that contain the current start.
    """
    found: list[str] = []
    stack: list[tuple[IPNetwork, str]] = []
    for net, owner in sorted(lans, key=lambda item: (prefix_key(item[0]), item[1])):
        while stack and (
            stack[-1][0].version != net.version
            or int(stack[-1][0].broadcast_address) < int(net.network_address)
        ):
            stack.pop()
        for outer, outer_owner in stack:
            if outer_owner == owner:
                found.append(f"site {owner}: LAN prefixes {outer} and {net} overlap")
            else:
                found.append(
                    f"sites {outer_owner} and {owner}: LAN prefixes {outer} ({outer_owner})"
                    f" and {net} ({owner}) overlap"
                )
        stack.append((net, owner))
    return found
