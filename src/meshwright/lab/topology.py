"""The lab topology: parse and validate a topology file, and derive the lab from it.

Pure: no I/O. `load_topology` turns a mapping (parsed YAML) into a `Topology`, raising
`TopologyError` naming the field at fault; `build_lab` derives every host, network, address,
route and netfilter rule, so that the podman adapter only has to carry them out.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

NAT_KINDS = ("none", "eim", "edm", "fullcone", "udp-blocked", "cgnat")
# RFC 5737 documentation ranges: the only "public" space the lab may use. The host's own
# uplink sits in 192.0.2.0/24, so that one is excluded on purpose.
ALLOWED_PUBLIC = (
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv4Network("203.0.113.0/24"),
)
DEFAULT_UPLINK_POOL = "172.31.0.0/16"
DEFAULT_CARRIER_POOL = "100.64.0.0/16"
DEFAULT_OVERLAY = "10.99.0.0/24"
MAX_LAN_HOSTS = 8
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,19}$")
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")

ROLE_RELAY = "relay"
ROLE_SITE = "site"
ROLE_LAN_HOST = "lan-host"
ROLE_ROUTER = "router"


class TopologyError(ValueError):
    """A topology file that cannot be built; the message names the field and the value."""


@dataclass(frozen=True)
class LinkShape:
    """What a WAN link does to the packets a host sends on it (one direction)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def is_ideal(self) -> bool:
        return self.latency_ms == 0 and self.jitter_ms == 0 and self.loss_pct == 0


@dataclass(frozen=True)
class LabRelay:
    name: str
    addresses: tuple[ipaddress.IPv4Address, ...]
    wan: LinkShape


@dataclass(frozen=True)
class LabSite:
    name: str
    nat: str
    lan: ipaddress.IPv4Network
    lan_hosts: int
    wan: LinkShape
    public_address: ipaddress.IPv4Address | None  # None when the site is `behind` another
    behind: str | None


@dataclass(frozen=True)
class Topology:
    name: str
    internet: tuple[ipaddress.IPv4Network, ...]
    relays: tuple[LabRelay, ...]
    sites: tuple[LabSite, ...]
    uplink_pool: ipaddress.IPv4Network
    carrier_pool: ipaddress.IPv4Network
    overlay: ipaddress.IPv4Network

    def site(self, name: str) -> LabSite:
        return next(s for s in self.sites if s.name == name)

    def overlay_address(self, site: str) -> str:
        """The site's mesh address: in declaration order, so adding a site moves no other."""
        index = [s.name for s in self.sites].index(site)
        return f"{self.overlay.network_address + 1 + index}/{self.overlay.prefixlen}"

    def relay_overlay_address(self, relay: str) -> str:
        """A relay's mesh address: from the top of the overlay down, so sites never meet it."""
        index = [r.name for r in self.relays].index(relay)
        return f"{self.overlay.broadcast_address - 1 - index}/{self.overlay.prefixlen}"


# --- parsing -------------------------------------------------------------------------------


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TopologyError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _check_keys(data: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        allowed_list = ", ".join(sorted(allowed))
        raise TopologyError(
            f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {allowed_list})"
        )


def _name(value: Any, where: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise TopologyError(
            f"{where}: {value!r} is not a valid name "
            f"(lower-case letters and digits, starting with a letter, pattern {pattern.pattern})"
        )
    return value


def _address(value: Any, where: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        raise TopologyError(f"{where}: {value!r} is not an IPv4 address") from None


def _network(value: Any, where: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(str(value))
    except ValueError as exc:
        raise TopologyError(f"{where}: {value!r} is not an IPv4 prefix ({exc})") from None


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(f"{where}: {value!r} is not a number")
    if not low <= value <= high:
        raise TopologyError(f"{where}: {value!r} is out of range [{low}, {high}]")
    return float(value)


def _shape(value: Any, where: str, default: LinkShape) -> LinkShape:
    if value is None:
        return default
    data = _require_mapping(value, where)
    _check_keys(data, where, {"latency_ms", "jitter_ms", "loss_pct"})
    shape = LinkShape(
        latency_ms=_number(
            data.get("latency_ms", default.latency_ms), f"{where}.latency_ms", 0, 2000
        ),
        jitter_ms=_number(data.get("jitter_ms", default.jitter_ms), f"{where}.jitter_ms", 0, 1000),
        loss_pct=_number(data.get("loss_pct", default.loss_pct), f"{where}.loss_pct", 0, 100),
    )
    if shape.jitter_ms > shape.latency_ms:
        raise TopologyError(
            f"{where}.jitter_ms: {shape.jitter_ms:g} is larger than latency_ms {shape.latency_ms:g}"
        )
    return shape


def _public(
    addr: ipaddress.IPv4Address, where: str, internet: tuple[ipaddress.IPv4Network, ...]
) -> ipaddress.IPv4Address:
    if not any(addr in net for net in ALLOWED_PUBLIC):
        raise TopologyError(
            f"{where}: {addr} is outside the lab's public space "
            f"({', '.join(map(str, ALLOWED_PUBLIC))})"
        )
    net = next((n for n in internet if addr in n), None)
    if net is None:
        raise TopologyError(
            f"{where}: {addr} is in none of internet.subnets ({', '.join(map(str, internet))})"
        )
    if addr in (net.network_address, net.broadcast_address, net.network_address + 1):
        raise TopologyError(
            f"{where}: {addr} is reserved in {net} (network, broadcast or .1, the bridge's)"
        )
    return addr


def load_topology(data: Any) -> Topology:
    """Validate a parsed topology file and return it as a `Topology`."""
    top = _require_mapping(data, "topology")
    _check_keys(
        top, "topology", {"name", "internet", "defaults", "pools", "overlay", "relays", "sites"}
    )
    name = _name(top.get("name", "mwlab"), "name", LAB_NAME_RE)

    inet = _require_mapping(top.get("internet", {}), "internet")
    _check_keys(inet, "internet", {"subnets"})
    subnets_raw = inet.get("subnets", [str(n) for n in ALLOWED_PUBLIC])
    if not isinstance(subnets_raw, list) or not subnets_raw:
        raise TopologyError(f"internet.subnets: expected a non-empty list, got {subnets_raw!r}")
    internet: list[ipaddress.IPv4Network] = []
    for i, raw in enumerate(subnets_raw):
        net = _network(raw, f"internet.subnets[{i}]")
        if not any(net.subnet_of(allowed) for allowed in ALLOWED_PUBLIC):
            raise TopologyError(
                f"internet.subnets[{i}]: {net} is not inside the lab's public space "
                f"({', '.join(map(str, ALLOWED_PUBLIC))})"
            )
        internet.append(net)

    defaults = _require_mapping(top.get("defaults", {}), "defaults")
    _check_keys(defaults, "defaults", {"wan"})
    default_wan = _shape(defaults.get("wan"), "defaults.wan", LinkShape())

    pools = _require_mapping(top.get("pools", {}), "pools")
    _check_keys(pools, "pools", {"uplink", "carrier"})
    uplink_pool = _network(pools.get("uplink", DEFAULT_UPLINK_POOL), "pools.uplink")
    carrier_pool = _network(pools.get("carrier", DEFAULT_CARRIER_POOL), "pools.carrier")
    for label, pool in (("pools.uplink", uplink_pool), ("pools.carrier", carrier_pool)):
        if pool.prefixlen > 23:
            raise TopologyError(f"{label}: {pool} is too small (at most /23: one /24 per NAT)")
    if uplink_pool.overlaps(carrier_pool):
        raise TopologyError(f"pools: uplink {uplink_pool} overlaps carrier {carrier_pool}")

    overlay = _network(top.get("overlay", DEFAULT_OVERLAY), "overlay")
    relays = _load_relays(top.get("relays"), tuple(internet), default_wan)
    sites = _load_sites(top.get("sites"), tuple(internet), default_wan)

    topology = Topology(
        name=name,
        internet=tuple(internet),
        relays=relays,
        sites=sites,
        uplink_pool=uplink_pool,
        carrier_pool=carrier_pool,
        overlay=overlay,
    )
    if overlay.num_addresses - 2 < len(sites):
        raise TopologyError(f"overlay: {overlay} is too small for {len(sites)} sites")
    return _check_cross_references(topology)


def _load_relays(
    raw: Any, internet: tuple[ipaddress.IPv4Network, ...], wan: LinkShape
) -> tuple[LabRelay, ...]:
    relays_map = _require_mapping(raw if raw is not None else {}, "relays")
    relays = []
    for rname, rdata in relays_map.items():
        where = f"relays.{rname}"
        _name(rname, where)
        rdata = _require_mapping(rdata, where)
        _check_keys(rdata, where, {"addresses", "wan"})
        addrs_raw = rdata.get("addresses")
        if not isinstance(addrs_raw, list) or not 1 <= len(addrs_raw) <= 2:
            raise TopologyError(f"{where}.addresses: expected a list of 1 or 2, got {addrs_raw!r}")
        addrs = tuple(
            _public(_address(a, f"{where}.addresses[{i}]"), f"{where}.addresses[{i}]", internet)
            for i, a in enumerate(addrs_raw)
        )
        if len(set(addrs)) != len(addrs):
            raise TopologyError(f"{where}.addresses: {addrs_raw!r} repeats an address")
        relays.append(LabRelay(rname, addrs, _shape(rdata.get("wan"), f"{where}.wan", wan)))
    return tuple(relays)


def _load_sites(
    raw: Any, internet: tuple[ipaddress.IPv4Network, ...], wan: LinkShape
) -> tuple[LabSite, ...]:
    sites_map = _require_mapping(raw, "sites")
    if not sites_map:
        raise TopologyError("sites: at least one site is needed")
    sites = []
    for sname, sdata in sites_map.items():
        where = f"sites.{sname}"
        _name(sname, where)
        sdata = _require_mapping(sdata, where)
        _check_keys(sdata, where, {"nat", "public_address", "behind", "lan", "lan_hosts", "wan"})
        behind = sdata.get("behind")
        if behind is not None:
            behind = _name(behind, f"{where}.behind")
            for forbidden in ("public_address", "wan"):
                if forbidden in sdata:
                    raise TopologyError(
                        f"{where}.{forbidden}: a site behind {behind!r} shares its NAT, "
                        f"so it has no {forbidden} of its own"
                    )
            nat = sdata.get("nat")  # checked against the owner's kind later
            if nat is not None and nat not in NAT_KINDS:
                raise TopologyError(f"{where}.nat: {nat!r} is not one of {', '.join(NAT_KINDS)}")
            public = None
        else:
            nat = sdata.get("nat")
            if nat not in NAT_KINDS:
                raise TopologyError(f"{where}.nat: {nat!r} is not one of {', '.join(NAT_KINDS)}")
            if "public_address" not in sdata:
                raise TopologyError(f"{where}.public_address: required for a site with its own NAT")
            public = _public(
                _address(sdata["public_address"], f"{where}.public_address"),
                f"{where}.public_address",
                internet,
            )
        if "lan" not in sdata:
            raise TopologyError(f"{where}.lan: required (the site's LAN prefix)")
        lan = _network(sdata["lan"], f"{where}.lan")
        if lan.prefixlen > 28:
            raise TopologyError(f"{where}.lan: {lan} is too small (at most /28)")
        lan_hosts = sdata.get("lan_hosts", 1)
        if isinstance(lan_hosts, bool) or not isinstance(lan_hosts, int):
            raise TopologyError(f"{where}.lan_hosts: {lan_hosts!r} is not a whole number")
        if not 0 <= lan_hosts <= MAX_LAN_HOSTS:
            raise TopologyError(
                f"{where}.lan_hosts: {lan_hosts} is out of range [0, {MAX_LAN_HOSTS}]"
            )
        sites.append(
            LabSite(
                name=sname,
                nat=nat or "",
                lan=lan,
                lan_hosts=lan_hosts,
                wan=_shape(sdata.get("wan"), f"{where}.wan", wan),
                public_address=public,
                behind=behind,
            )
        )
    return tuple(sites)


def _check_cross_references(top: Topology) -> Topology:
    """Resolve `behind` and check names, addresses and prefixes across the whole lab."""
    by_name = {s.name: s for s in top.sites}
    names: dict[str, str] = {}
    for relay in top.relays:
        names[relay.name] = f"relays.{relay.name}"
    for site in top.sites:
        if site.name in names:
            raise TopologyError(
                f"sites.{site.name}: the name is already used by {names[site.name]}"
            )
        names[site.name] = f"sites.{site.name}"

    resolved = []
    for site in top.sites:
        if site.behind is None:
            resolved.append(site)
            continue
        owner = by_name.get(site.behind)
        where = f"sites.{site.name}.behind"
        if owner is None:
            raise TopologyError(f"{where}: no site named {site.behind!r}")
        if owner.behind is not None:
            raise TopologyError(
                f"{where}: {site.behind!r} is itself behind {owner.behind!r}; name the NAT's owner"
            )
        if owner.nat == "none":
            raise TopologyError(f"{where}: {site.behind!r} has no NAT (nat: none) to share")
        if owner.nat == "fullcone":
            raise TopologyError(
                f"{where}: {site.behind!r} is a fullcone NAT, which forwards unsolicited datagrams "
                "to a single host and so cannot be shared"
            )
        if site.nat and site.nat != owner.nat:
            raise TopologyError(
                f"sites.{site.name}.nat: {site.nat!r} differs from {owner.nat!r}, "
                f"the NAT of {site.behind!r} it sits behind"
            )
        resolved.append(_replace_nat(site, owner.nat))
    top = dataclasses.replace(top, sites=tuple(resolved))

    # Every generated host name must be unique across the lab.
    for site in top.sites:
        for extra in _site_host_names(site):
            if extra in names and names[extra] != f"sites.{site.name}":
                raise TopologyError(
                    f"sites.{site.name}: its host {extra!r} clashes with {names[extra]}"
                )
            names.setdefault(extra, f"sites.{site.name}")

    publics: dict[ipaddress.IPv4Address, str] = {}
    for relay in top.relays:
        for i, addr in enumerate(relay.addresses):
            _claim(publics, addr, f"relays.{relay.name}.addresses[{i}]")
    for site in top.sites:
        if site.public_address is not None:
            _claim(publics, site.public_address, f"sites.{site.name}.public_address")

    reserved = [
        ("overlay", top.overlay),
        ("pools.uplink", top.uplink_pool),
        ("pools.carrier", top.carrier_pool),
        *((f"internet.subnets[{i}]", n) for i, n in enumerate(top.internet)),
    ]
    lans: list[tuple[str, ipaddress.IPv4Network]] = []
    for site in top.sites:
        where = f"sites.{site.name}.lan"
        for other_where, other in [*reserved, *lans]:
            if site.lan.overlaps(other):
                raise TopologyError(f"{where}: {site.lan} overlaps {other_where} ({other})")
        lans.append((where, site.lan))

    owners = [s for s in top.sites if s.behind is None and s.nat != "none"]
    if len(owners) > top.uplink_pool.num_addresses // 256:
        raise TopologyError(
            f"pools.uplink: {top.uplink_pool} has too few /24s for {len(owners)} NATs"
        )
    return top


def _claim(seen: dict[ipaddress.IPv4Address, str], addr: ipaddress.IPv4Address, where: str) -> None:
    if addr in seen:
        raise TopologyError(f"{where}: {addr} is already used by {seen[addr]}")
    seen[addr] = where


def _replace_nat(site: LabSite, nat: str) -> LabSite:
    return LabSite(site.name, nat, site.lan, site.lan_hosts, site.wan, None, site.behind)


def _site_host_names(site: LabSite) -> list[str]:
    hosts = [f"{site.name}-lan{i}" for i in range(1, site.lan_hosts + 1)]
    if site.behind is None and site.nat != "none":
        hosts.append(f"{site.name}-nat")
    if site.behind is None and site.nat == "cgnat":
        hosts.append(f"{site.name}-cgnat")
    return hosts


# --- deriving the lab ----------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    network: str  # podman network name
    ifname: str  # name inside the container
    addresses: tuple[str, ...]  # "a.b.c.d/len"


@dataclass
class LabHost:
    name: str  # inventory host name
    container: str
    role: str
    site: str | None
    nat: str | None
    interfaces: list[Interface] = field(default_factory=list)
    forwarding: bool = False
    # Shell run once inside the container after it boots (addresses, routes, netfilter).
    setup: list[str] = field(default_factory=list)
    # The internet-facing link's shaping, applied on this host's `wan` egress.
    shape: LinkShape | None = None
    public_address: str | None = None

    def address_on(self, network: str) -> str:
        iface = next(i for i in self.interfaces if i.network == network)
        return iface.addresses[0].split("/")[0]


@dataclass(frozen=True)
class Network:
    name: str
    purpose: str  # internet, uplink, carrier, lan


@dataclass
class Lab:
    name: str
    networks: list[Network]
    hosts: list[LabHost]

    def host(self, name: str) -> LabHost:
        return next(h for h in self.hosts if h.name == name)


def _iface(network: str, ifname: str, *addrs: str) -> Interface:
    return Interface(network, ifname, tuple(addrs))


def _nth(net: ipaddress.IPv4Network, n: int) -> str:
    return f"{net.network_address + n}/{net.prefixlen}"


def _ip(net: ipaddress.IPv4Network, n: int) -> str:
    return str(net.network_address + n)


def build_lab(top: Topology) -> Lab:
    """Derive every network and host of the lab, with what must run inside each."""
    inet = f"{top.name}-internet"
    networks = [Network(inet, "internet")]
    hosts: list[LabHost] = []

    def public_cidr(addr: ipaddress.IPv4Address) -> str:
        net = next(n for n in top.internet if addr in n)
        return f"{addr}/{net.prefixlen}"

    for relay in top.relays:
        hosts.append(
            LabHost(
                name=relay.name,
                container=f"{top.name}-{relay.name}",
                role=ROLE_RELAY,
                site=None,
                nat=None,
                # The relay's kernel forwards confirmed sessions (meshwright.relay.kernel); a
                # container's /proc/sys is read-only, so the lab sets what the role would.
                forwarding=True,
                interfaces=[_iface(inet, "wan", *(public_cidr(a) for a in relay.addresses))],
                shape=relay.wan,
                public_address=str(relay.addresses[0]),
                # The internet's echo service, on every address: the lab's NAT tests use it.
                setup=[
                    "systemd-run --quiet --unit=mw-echo -p Restart=always python3 "
                    "/usr/local/lib/meshwright/labtool.py echo --tcp-port 7 "
                    + " ".join(f"--address {a}" for a in relay.addresses)
                ],
            )
        )

    uplinks = iter(top.uplink_pool.subnets(new_prefix=24))
    carriers = iter(top.carrier_pool.subnets(new_prefix=24))
    # One uplink network per NAT owner; sites `behind` it join the same network.
    owner_uplink: dict[str, tuple[str, ipaddress.IPv4Network]] = {}
    gateways_on_uplink: dict[str, int] = {}
    routers: dict[str, LabHost] = {}

    for site in top.sites:
        lan_net = f"{top.name}-{site.name}-lan"
        networks.append(Network(lan_net, "lan"))
        gw = LabHost(
            name=site.name,
            container=f"{top.name}-{site.name}",
            role=ROLE_SITE,
            site=site.name,
            nat=site.nat,
            forwarding=True,
        )
        owner = site.behind or site.name
        if site.nat == "none":
            addr = site.public_address
            assert addr is not None
            gw.interfaces.append(_iface(inet, "wan", public_cidr(addr)))
            gw.shape = site.wan
            gw.public_address = str(addr)
            # A public site's own LAN reaches the internet through the gateway's NAT, as a
            # router with a public address does; mesh traffic (not via `wan`) is never NATed.
            gw.setup.append(f"iptables -t nat -A POSTROUTING -s {site.lan} -o wan -j MASQUERADE")
        else:
            if owner not in owner_uplink:
                owner_site = top.site(owner)
                net = next(uplinks)
                up_name = f"{top.name}-{owner}-uplink"
                networks.append(Network(up_name, "uplink"))
                owner_uplink[owner] = (up_name, net)
                gateways_on_uplink[owner] = 0
                routers[owner] = _make_router(
                    top, owner_site, up_name, net, carriers, networks, hosts, public_cidr
                )
            up_name, net = owner_uplink[owner]
            gateways_on_uplink[owner] += 1
            gw_addr = _nth(net, 1 + gateways_on_uplink[owner])
            gw.interfaces.append(_iface(up_name, "wan", gw_addr))
            gw.public_address = routers[owner].public_address
            gw.setup.append(f"ip route replace default via {_ip(net, 1)} dev wan")
            router = routers[owner]
            router.setup.append(
                f"ip route replace {site.lan} via {gw_addr.split('/')[0]} dev inside"
            )
            if site.nat == "fullcone" and site.behind is None:
                router.setup.append(
                    f"iptables -t nat -A PREROUTING -i wan -d {router.public_address} -p udp "
                    f"-j DNAT --to-destination {gw_addr.split('/')[0]}"
                )
        gw.interfaces.append(_iface(lan_net, "lan", _nth(site.lan, 1)))
        hosts.append(gw)

        for i in range(1, site.lan_hosts + 1):
            hosts.append(
                LabHost(
                    name=f"{site.name}-lan{i}",
                    container=f"{top.name}-{site.name}-lan{i}",
                    role=ROLE_LAN_HOST,
                    site=site.name,
                    nat=site.nat,
                    interfaces=[_iface(lan_net, "lan", _nth(site.lan, 9 + i))],
                    setup=[f"ip route replace default via {_ip(site.lan, 1)} dev lan"],
                    public_address=gw.public_address,
                )
            )

    for host in hosts:
        first = [
            f"ip addr add {cidr} dev {iface.ifname}"
            for iface in host.interfaces
            for cidr in iface.addresses
        ]
        if any(iface.network == inet for iface in host.interfaces):
            # Both public subnets share one segment: reach the other one on-link.
            own = {ipaddress.IPv4Interface(c).network for i in host.interfaces for c in i.addresses}
            first += [f"ip route replace {net} dev wan" for net in top.internet if net not in own]
        host.setup[:0] = first
        if host.shape is not None and not host.shape.is_ideal:
            host.setup.extend(_shaping(host.shape))
    # Networks: internet first, then in the order sites declared them (stable for a diff).
    return Lab(top.name, networks, _ordered(hosts))


def _ordered(hosts: list[LabHost]) -> list[LabHost]:
    rank = {ROLE_RELAY: 0, ROLE_ROUTER: 1, ROLE_SITE: 2, ROLE_LAN_HOST: 3}
    return sorted(hosts, key=lambda h: rank[h.role])


def _make_router(
    top: Topology,
    site: LabSite,
    up_name: str,
    net: ipaddress.IPv4Network,
    carriers: Iterator[ipaddress.IPv4Network],
    networks: list[Network],
    hosts: list[LabHost],
    public_cidr: Callable[[ipaddress.IPv4Address], str],
) -> LabHost:
    """The NAT router (or routers, for cgnat) in front of `site`; returns the inner one."""
    assert site.public_address is not None
    public = str(site.public_address)
    router = LabHost(
        name=f"{site.name}-nat",
        container=f"{top.name}-{site.name}-nat",
        role=ROLE_ROUTER,
        site=site.name,
        nat=site.nat,
        forwarding=True,
        public_address=public,
    )
    inside = _iface(up_name, "inside", _nth(net, 1))
    inet = f"{top.name}-internet"
    if site.nat == "cgnat":
        carrier = next(carriers)
        carrier_name = f"{top.name}-{site.name}-carrier"
        networks.append(Network(carrier_name, "carrier"))
        cgn = LabHost(
            name=f"{site.name}-cgnat",
            container=f"{top.name}-{site.name}-cgnat",
            role=ROLE_ROUTER,
            site=site.name,
            nat="cgnat",
            forwarding=True,
            interfaces=[
                _iface(inet, "wan", public_cidr(site.public_address)),
                _iface(carrier_name, "inside", _nth(carrier, 1)),
            ],
            setup=["iptables -t nat -A POSTROUTING -o wan -j MASQUERADE"],
            shape=site.wan,
            public_address=public,
        )
        hosts.append(cgn)
        # The customer's router: an ordinary EIM NAT onto the carrier network.
        router.interfaces = [_iface(carrier_name, "wan", _nth(carrier, 2)), inside]
        router.setup = [
            f"ip route replace default via {_ip(carrier, 1)} dev wan",
            "iptables -t nat -A POSTROUTING -o wan -j MASQUERADE",
        ]
    else:
        router.interfaces = [_iface(inet, "wan", public_cidr(site.public_address)), inside]
        router.shape = site.wan
        router.setup = _nat_rules(site.nat, public)
    hosts.append(router)
    return router


def _nat_rules(kind: str, public: str) -> list[str]:
    if kind == "eim":
        # Linux MASQUERADE keeps the source port when it can: endpoint-independent mapping,
        # and conntrack admits only replies: address-and-port-dependent filtering.
        return ["iptables -t nat -A POSTROUTING -o wan -j MASQUERADE"]
    if kind == "edm":
        # A fresh random port for every new conntrack entry: endpoint-dependent mapping.
        return ["iptables -t nat -A POSTROUTING -o wan -j MASQUERADE --random-fully"]
    if kind == "fullcone":
        # SNAT keeps ports (EIM); the per-site DNAT rule sends every unsolicited UDP datagram
        # to the gateway on the same port (EIF): together, a full cone.
        return [f"iptables -t nat -A POSTROUTING -o wan -j SNAT --to-source {public}"]
    if kind == "udp-blocked":
        return [
            "iptables -t nat -A POSTROUTING -o wan -j MASQUERADE",
            "iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "iptables -A FORWARD -i inside -o wan -p tcp -m multiport --dports 80,443 -j ACCEPT",
            "iptables -A FORWARD -j DROP",
        ]
    raise AssertionError(f"no NAT rules for {kind!r}")


def _shaping(shape: LinkShape) -> list[str]:
    # The kernel here has no netem: loss is the `statistic` match, latency and jitter an
    # NFQUEUE that labtool's delayer holds packets in (fail-open, so it never blackholes).
    # The delay is on what arrives, before conntrack (raw PREROUTING): a packet's flight then
    # ends after the receiving NAT has mapped and confirmed anything it sent meanwhile, as on
    # the internet. Delaying on egress instead holds each packet before its own NAT mapping
    # exists, so two sides' simultaneous first packets could never cross in flight.
    rules = []
    if shape.loss_pct > 0:
        rules.append(
            "iptables -t mangle -A POSTROUTING -o wan -m statistic --mode random "
            f"--probability {shape.loss_pct / 100:.4f} -j DROP"
        )
    if shape.latency_ms > 0:
        rules.append("iptables -t raw -A PREROUTING -i wan -j NFQUEUE --queue-num 0 --queue-bypass")
        rules.append(
            "systemd-run --quiet --unit=mw-netdelay -p Restart=always "
            f"python3 /usr/local/lib/meshwright/labtool.py delay --queue 0 "
            f"--latency-ms {shape.latency_ms:g} --jitter-ms {shape.jitter_ms:g}"
        )
    return rules
