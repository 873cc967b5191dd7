"""From an Ansible inventory to the planner, and from the plan to files and facts.

Every decision the ``mesh_plan`` and ``mesh_validate`` action plugins would otherwise make lives
here, where plain unit tests reach it: which host variables and facts the planner reads (the
plugins gather only the names in :data:`SITE_VARS`, :data:`RELAY_VARS`), a site's endpoint from
its NAT facts, this run's facts or the state file for hosts outside ``--limit``, the operator's
``mesh_endpoint`` override, the mesh-wide settings (which every site must agree on), the
sidecar configurations (relays of UDP-blocked sites, traversal of the others), and the state
file's layout. No I/O: the plugins read and write the files, as text.

- :func:`validate_inventory`: every problem the inventory alone shows (no facts needed), for
  the static check that runs before any host is touched.
- :func:`gather`: the :class:`Inventory` from Ansible's ``hostvars`` and ``groups`` (the action
  plugins' and ``meshwright plan``'s one way to read the inventory).
- :func:`plan_inventory`: the plan from inventory and facts, with the new state and the facts
  the playbooks use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..wire.endpoint import format_endpoint
from ..wire.frames import MAX_PAYLOAD
from .build import check
from .model import DEFAULT_LISTEN_PORT, PlanError
from .output import Plan, format_table
from .parse import read_mesh
from .relays import RelayAllocation
from .validate import check_mesh

__all__ = [
    "FACT_VARS",
    "MESH_VARS",
    "PLAN_FILE",
    "RELAY_VARS",
    "SITE_VARS",
    "STATE_DIR",
    "STATE_FILE",
    "STATE_VERSION",
    "Inventory",
    "InventoryPlan",
    "PlanError",
    "RelayState",
    "SiteState",
    "State",
    "StateError",
    "endpoint_from_nat",
    "gather",
    "plan_inventory",
    "previous_allocations",
    "read_state",
    "validate_inventory",
]

# The variables (and facts) of a site host the planner reads.
SITE_VARS = (
    "mesh_overlay_address",
    "mesh_lan_prefixes",
    "mesh_listen_port",
    "mesh_endpoint",  # an operator's override of the endpoint the NAT facts give
    "mesh_policy",
    "mesh_required",
    "mesh_overlay_network",
    "mesh_link_kinds",
    "mesh_keepalive",
    "mesh_wg_public_key",  # fact of wg_keypair
    "mesh_nat",  # fact of nat_probe
    "sidecar_certificate",  # fact of the sidecar role (UDP-blocked sites)
    "wireguard_mtu",  # the wireguard role's, checked against what a TLS relay can carry
)
# The variables (and facts) of a relay host the planner reads.
RELAY_VARS = (
    "relay_public_addresses",
    "relay_first_port",
    "relay_last_port",
    "relay_tls_port",
    "mesh_overlay_address",
    "mesh_listen_port",
    "mesh_wg_public_key",  # fact of wg_keypair
    "relay_tls_fingerprint",  # facts of the relay role: the certificate it serves,
    "relay_tls_standby_fingerprint",  # and the one a rotation will serve next
)
# Settings of the whole mesh, as every site's variables hold them (group_vars/all).
MESH_VARS = ("mesh_overlay_network", "mesh_link_kinds", "mesh_keepalive")
# What the playbook's steps learn on the nodes (facts), as opposed to what the inventory says:
# without them, a site's key and NAT class come from the state file.
FACT_VARS = frozenset(
    {
        "mesh_wg_public_key",
        "mesh_nat",
        "sidecar_certificate",
        "relay_tls_fingerprint",
        "relay_tls_standby_fingerprint",
    }
)
# Where the plan and the state file live: a hidden directory beside the inventory, so that an
# inventory directory never parses them as inventory.
STATE_DIR = ".meshwright"
PLAN_FILE = "plan.json"
STATE_FILE = "state.json"

# The relay service's TLS port (relay_tls_port) when a relay's inventory does not say.
DEFAULT_WGSTUN_PORT = 3480
DEFAULT_RELAY_TLS_PORT = 443
STATE_VERSION = 1

# MTU (docs/relays.md, "MTU and full-size packets"): the wireguard role's default; a full-size
# packet travels in a transport message of MTU + 32 bytes (16-byte header, 16-byte tag), and
# the TLS relay's frames carry at most MAX_PAYLOAD bytes.
DEFAULT_MTU = 1420
WIREGUARD_OVERHEAD = 32
TLS_RELAY_MAX_MTU = MAX_PAYLOAD - WIREGUARD_OVERHEAD
MIN_MTU, MAX_MTU = 68, 65535  # Linux's bounds for an IPv4 interface (wgstate's too)

_FACT_FIELDS = ("public_key", "nat_class")  # what only this run's facts (or the state) give
_UNSET = object()

HostVars = Mapping[str, Mapping[str, Any]]


# --- the state file -------------------------------------------------------------------------


class StateError(ValueError):
    """The state file cannot be read; the message says where and why."""


@dataclass(frozen=True, kw_only=True)
class SiteState:
    """What the last run learned of a site: facts a later run outside ``--limit`` reuses."""

    public_key: str | None = None
    nat_class: str | None = None
    endpoint: str | None = None
    certificate: str | None = None  # a UDP-blocked site's sidecar certificate (PEM, public)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "public_key": self.public_key,
            "nat_class": self.nat_class,
            "endpoint": self.endpoint,
        }
        if self.certificate is not None:
            out["certificate"] = self.certificate
        return out


@dataclass(frozen=True, kw_only=True)
class RelayState:
    """What the last run learned of a relay."""

    public_key: str | None = None
    tls_fingerprint: str | None = None
    tls_standby_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"public_key": self.public_key}
        if self.tls_fingerprint is not None:
            out["tls_fingerprint"] = self.tls_fingerprint
        if self.tls_standby_fingerprint is not None:
            out["tls_standby_fingerprint"] = self.tls_standby_fingerprint
        return out


@dataclass(frozen=True, kw_only=True)
class State:
    """``.meshwright/state.json``: public data only (keys, NAT classes, certificates)."""

    sites: Mapping[str, SiteState] = field(default_factory=dict)
    relays: Mapping[str, RelayState] = field(default_factory=dict)

    def to_json(self) -> str:
        """Sorted keys, two-space indents: the same state gives the same bytes."""
        data = {
            "version": STATE_VERSION,
            "sites": {name: s.to_dict() for name, s in self.sites.items()},
            "relays": {name: r.to_dict() for name, r in self.relays.items()},
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def read_state(text: str | None) -> State:
    """The state file's text (None: no file yet); :class:`StateError` when it is not one."""
    if text is None:
        return State()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateError(f"not valid JSON ({exc})") from None
    if not isinstance(data, Mapping):
        raise StateError(f"not a JSON object but {type(data).__name__}")
    version = data.get("version")
    if version != STATE_VERSION:
        raise StateError(
            f"version {version!r} is not {STATE_VERSION}, the one this meshwright reads"
            " (a newer meshwright wrote it, or it was edited)"
        )
    unknown = sorted(set(data) - {"version", "sites", "relays"}, key=str)
    if unknown:
        raise StateError(f"unknown key(s) {', '.join(map(repr, unknown))}")
    return State(
        sites={n: SiteState(**e) for n, e in _entries(data, "sites", _SITE_STATE).items()},
        relays={n: RelayState(**e) for n, e in _entries(data, "relays", _RELAY_STATE).items()},
    )


_SITE_STATE = frozenset(f.name for f in fields(SiteState))
_RELAY_STATE = frozenset(f.name for f in fields(RelayState))


def _entries(
    data: Mapping[str, Any], what: str, known: frozenset[str]
) -> dict[str, dict[str, str | None]]:
    section = data.get(what, {})
    if not isinstance(section, Mapping):
        raise StateError(f"{what} is not a mapping of name to entry")
    out: dict[str, dict[str, str | None]] = {}
    for name, entry in section.items():
        where = f"{what[:-1]} {name}"
        if not isinstance(entry, Mapping):
            raise StateError(f"{where}: {entry!r} is not a mapping")
        for key, value in entry.items():
            if key not in known:
                raise StateError(f"{where}: unknown key {key!r}")
            if value is not None and not isinstance(value, str):
                raise StateError(f"{where}: {key} {value!r} is not a string")
        out[str(name)] = dict(entry)
    return out


def previous_allocations(plan_text: str | None) -> list[dict[str, Any]]:
    """The allocations of the previous plan file, its standby ones too (marked ``standby``);
    a broken file is rewritten, not trusted."""
    if plan_text is None:
        return []
    try:
        data = json.loads(plan_text)
        lists = [data.get("allocations", []), data.get("standby_allocations", [])]
    except (ValueError, AttributeError):
        return []
    found = []
    for standby, allocations in enumerate(lists):
        if isinstance(allocations, list):
            found += [
                {**a, "standby": True} if standby else dict(a)
                for a in allocations
                if isinstance(a, Mapping)
            ]
    return found


# --- from host variables to the planner's input -----------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Inventory:
    """What the plugins gather: each site's and relay's variables (the names in
    :data:`SITE_VARS` and :data:`RELAY_VARS` that are defined), by host name; the task's
    options, which win over the variables; and the groups' names, for messages."""

    sites: HostVars
    relays: HostVars = field(default_factory=dict)
    overlay_network: str | None = None
    link_kinds: Sequence[str] | None = None
    sites_group: str = "mesh_sites"
    relays_group: str = "mesh_relays"


def gather(
    hostvars: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Sequence[str]],
    *,
    sites_group: str = "mesh_sites",
    relays_group: str = "mesh_relays",
    overlay_network: str | None = None,
    link_kinds: Sequence[str] | None = None,
    facts: bool = True,
) -> Inventory:
    """The :class:`Inventory` of the sites and relays groups, from Ansible's ``hostvars`` and
    ``groups`` (a task's, or ones built from the inventory alone by ``meshwright plan``).

    Only the variables the planner reads are looked up: Ansible templates a host variable when
    it is read, and templating every one would fail on any unrelated undefined variable.
    ``facts=False`` leaves out :data:`FACT_VARS`, so that keys and NAT classes come from the
    state file only (what was learned and committed, not a fact cache).
    """

    def pick(group: str, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        wanted = names if facts else tuple(n for n in names if n not in FACT_VARS)
        picked: dict[str, dict[str, Any]] = {}
        for host in groups.get(group, ()):
            values = hostvars[host]  # one lookup per host: Ansible builds its variables anew
            picked[host] = {var: values[var] for var in wanted if var in values}
        return picked

    return Inventory(
        sites=pick(sites_group, SITE_VARS),
        relays=pick(relays_group, RELAY_VARS),
        overlay_network=overlay_network,
        link_kinds=link_kinds,
        sites_group=sites_group,
        relays_group=relays_group,
    )


def endpoint_from_nat(nat: Mapping[str, Any], listen_port: object) -> str | None:
    """Where peers reach a site's WireGuard port unsolicited, from its NAT facts, if anywhere."""
    addresses = nat.get("public_addresses")
    if nat.get("nat_class") != "open" or not addresses:
        return None
    # Behind a NAT the WireGuard port is reachable on the same public port only when the NAT
    # keeps ports (a full cone that preserves ports); otherwise the sidecar must learn it.
    if nat.get("behind_nat") and not nat.get("port_preservation"):
        return None
    port = _number(listen_port)
    if not isinstance(port, int):  # the planner reports the listen port
        return None
    return format_endpoint(str(addresses[0]), port)


def _number(value: object) -> object:
    """A whole number given as text (``-e mesh_keepalive=30``) as an int; else as it is, for
    the planner to report."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _listed(value: object) -> object:
    """A list as a list; anything else as it is, for the planner to report (never a string
    split into characters)."""
    return list(value) if isinstance(value, list | tuple) else value


@dataclass(slots=True)
class _Input:
    """The planner's input dict, with the problems found on the way and the (site, field)
    pairs the planner must not report again."""

    mesh: dict[str, Any]
    problems: list[str]
    skip: set[tuple[str, str]]
    sites: dict[str, dict[str, Any]]  # name -> the site's dict, as the planner reads it
    pending: list[str] = field(default_factory=list)  # sites left out: no key or NAT facts yet
    mtus: dict[str, int] = field(default_factory=dict)  # name -> WireGuard MTU, when valid


def _settings(inventory: Inventory, problems: list[str]) -> dict[str, Any]:
    """The mesh-wide settings: the task's options, else the sites' variables, which agree."""
    names = sorted(inventory.sites)
    values: dict[str, Any] = {}
    for var in MESH_VARS:
        first = inventory.sites[names[0]].get(var, _UNSET) if names else _UNSET
        for name in names[1:]:
            value = inventory.sites[name].get(var, _UNSET)
            if value != first:
                problems.append(
                    f"site {name}: {var} {_shown(value)} differs from {_shown(first)}"
                    f" (site {names[0]}): set it once for every site (group_vars/all)"
                )
        values[var] = first
    out: dict[str, Any] = {}
    overlay = inventory.overlay_network or values["mesh_overlay_network"]
    if overlay is _UNSET:
        problems.append(
            "mesh_overlay_network is not set: give every site the overlay's prefix, such as"
            " 10.99.0.0/24 (group_vars/all)"
        )
        overlay = ""
    out["overlay_network"] = overlay
    kinds = inventory.link_kinds or values["mesh_link_kinds"]
    if kinds is _UNSET:
        # With relays, relayed pairs get a relay (UDP, or TLS for a UDP-blocked site), and
        # pairs of endpoint-independent NATs are punched by the sidecar, starting relayed.
        kinds = ["direct", "punch", "relay", "relay-tcp"] if inventory.relays else ["direct"]
    out["link_kinds"] = _listed(kinds)
    if values["mesh_keepalive"] is not _UNSET:
        out["keepalive"] = _number(values["mesh_keepalive"])
    return out


def _shown(value: object) -> str:
    return "(not set)" if value is _UNSET else repr(value)


def _site(
    name: str, host: Mapping[str, Any], saved: SiteState, facts: bool, found: _Input
) -> dict[str, Any]:
    """One site as the planner reads it. ``facts``: this run's facts (or the state file)
    give its key and NAT class; without, those are left out (static validation)."""
    port = _number(host.get("mesh_listen_port", DEFAULT_LISTEN_PORT))
    site: dict[str, Any] = {"name": name, "listen_port": port}
    if "mesh_overlay_address" in host:
        # An address with its prefix length (10.99.0.1/24) is fine: the planner wants the address.
        site["overlay_address"] = str(host["mesh_overlay_address"]).split("/")[0]
    else:
        found.problems.append(f"site {name}: mesh_overlay_address is not set")
        found.skip.add((name, "overlay_address"))
        site["overlay_address"] = ""
    for var, key in (
        ("mesh_lan_prefixes", "lan_prefixes"),
        ("mesh_policy", "policy"),
        ("mesh_required", "required"),
    ):
        if var in host:
            site[key] = _listed(host[var])
    nat = host.get("mesh_nat")
    if facts:
        site["public_key"] = host.get("mesh_wg_public_key") or saved.public_key
        if isinstance(nat, Mapping) and nat:  # this run probed it
            site["nat_class"] = nat.get("nat_class")
            site["endpoint"] = endpoint_from_nat(nat, port)
            # Only this run's measurements: they choose the relay of a new relayed pair, and an
            # existing pair keeps its relay (the previous plan's allocations), so RTTs that vary
            # from run to run never move a pair or rewrite the state file.
            site["relay_rtt_ms"] = dict(nat.get("rtt_ms") or {})
        else:  # outside --limit: what the last run learned
            site["nat_class"] = saved.nat_class
            site["endpoint"] = saved.endpoint
    else:
        found.skip.update((name, key) for key in _FACT_FIELDS)
    if "mesh_endpoint" in host:  # an operator's override wins, even null (no endpoint)
        site["endpoint"] = host["mesh_endpoint"]
    mtu = _number(host.get("wireguard_mtu", DEFAULT_MTU))
    if isinstance(mtu, int) and not isinstance(mtu, bool) and MIN_MTU <= mtu <= MAX_MTU:
        found.mtus[name] = mtu
    else:
        found.problems.append(
            f"site {name}: wireguard_mtu {mtu!r} is not a whole number in {MIN_MTU}-{MAX_MTU}"
        )
    return site


def _relay(name: str, host: Mapping[str, Any], saved: RelayState) -> dict[str, Any]:
    """A relay: its addresses and site port range, and its WireGuard key and overlay address
    when it has them. The ports' defaults are the planner's (one place)."""
    addresses = host.get("relay_public_addresses", [])
    relay: dict[str, Any] = {
        "name": name,
        "addresses": [addresses] if isinstance(addresses, str) else _listed(addresses),
        "public_key": host.get("mesh_wg_public_key") or saved.public_key,
        "listen_port": _number(host.get("mesh_listen_port", DEFAULT_LISTEN_PORT)),
    }
    if host.get("mesh_overlay_address"):
        relay["overlay_address"] = str(host["mesh_overlay_address"])
    for var, key in (("relay_first_port", "first_port"), ("relay_last_port", "last_port")):
        if var in host:
            relay[key] = _number(host[var])
    return relay


def _mesh_input(inventory: Inventory, state: State, facts: bool, pending: bool = False) -> _Input:
    found = _Input(mesh={}, problems=[], skip=set(), sites={})
    if not inventory.sites:
        found.problems.append(
            f"the {inventory.sites_group} inventory group is empty: nothing to plan"
        )
    settings = _settings(inventory, found.problems)
    if settings["overlay_network"] == "":
        found.skip.add(("", "overlay_network"))
    for name, host in inventory.sites.items():
        saved = state.sites.get(name, SiteState())
        site = _site(name, host, saved, facts, found)
        if pending and (not site.get("public_key") or site.get("nat_class") is None):
            # Not probed yet: still checked with the others (addresses, prefixes, a hub's
            # name), but not a node of the link graph, as in static validation.
            site["public_key"] = site["nat_class"] = None
            found.skip.update((name, key) for key in _FACT_FIELDS)
            found.pending.append(name)
        found.sites[name] = site
    relays = [
        _relay(name, host, state.relays.get(name, RelayState()))
        for name, host in inventory.relays.items()
    ]
    found.mesh = {**settings, "sites": list(found.sites.values()), "relays": relays}
    return found


def validate_inventory(inventory: Inventory) -> list[str]:
    """Every problem the inventory alone shows, naming hosts and values; [] when none.

    The planner's own validation, without what needs facts (keys, NAT classes, and so
    reachability): those are checked by :func:`plan_inventory`, when the facts exist.
    """
    found = _mesh_input(inventory, State(), facts=False)
    mesh, shape, skip = read_mesh(found.mesh)
    more, _ = check_mesh(mesh, skip | frozenset(found.skip))
    return [*found.problems, *shape, *more]


def rotation_names(value: object) -> list[str]:
    """The host names a rotation option gives: a list, or one string of names separated by
    commas or spaces (as ``-e mesh_rotate_keys=easy1,easy2`` gives it); None gives none."""
    if value is None or value == "":
        return []
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{value!r} is not a list of host names")
    return [str(item).strip() for item in items if str(item).strip()]


def check_rotations(inventory: Inventory, keys: object, tls: object) -> list[str]:
    """Problems with what ``mesh_rotate_keys`` (sites and relays) and ``mesh_rotate_tls``
    (relays) name, each naming the value; [] when every name is a host of its group."""
    problems: list[str] = []
    hosts = {**inventory.sites, **inventory.relays}
    for option, value, known, what in (
        ("mesh_rotate_keys", keys, hosts, f"a host of {inventory.sites_group} or "),
        ("mesh_rotate_tls", tls, inventory.relays, ""),
    ):
        try:
            names = rotation_names(value)
        except ValueError as exc:
            problems.append(f"{option}: {exc}")
            continue
        problems.extend(
            f"{option}: {name!r} is not {what}a host of {inventory.relays_group}"
            for name in names
            if name not in known
        )
    return problems


# --- the plan, and what the playbooks get from it ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InventoryPlan:
    """One planning run: the plan and its file's text, the new state and its text, and the
    facts the playbooks use."""

    plan: Plan
    plan_json: str
    state: State
    state_json: str
    sidecars: dict[str, dict[str, Any]]  # site -> its sidecar: relays (UDP-blocked), traversal
    tls_sites: dict[str, str]  # UDP-blocked site -> its certificate (PEM), pinned by relays
    pending: tuple[str, ...] = ()  # sites left out of the plan: no key or NAT facts yet

    @property
    def table(self) -> list[str]:
        return format_table(self.plan).splitlines()

    def facts(self) -> dict[str, Any]:
        """``mesh_plan`` (the plan file's data), ``mesh_tls_sites`` and ``mesh_sidecars``."""
        return {
            "mesh_plan": json.loads(self.plan_json),  # one serialisation, shared with the file
            "mesh_tls_sites": dict(self.tls_sites),
            "mesh_sidecars": self.sidecars,
        }


def plan_inventory(
    inventory: Inventory,
    state: State,
    previous_plan: str | None = None,
    *,
    pending: bool = False,
) -> InventoryPlan:
    """Plan the mesh from inventory and facts; :class:`PlanError` names every problem.

    ``state``: the last run's (:func:`read_state`), for hosts this run has no facts of.
    ``previous_plan``: the last plan file's text, whose relay allocations are kept while valid.
    ``pending``: a site with no key or NAT class (a new site the keys and probe steps have not
    reached) is left out of the plan and listed in :attr:`InventoryPlan.pending` instead of
    being an error: ``meshwright plan`` contacts no host, so it plans what is known.
    """
    found = _mesh_input(inventory, state, facts=True, pending=pending)
    found.mesh["previous_allocations"] = previous_allocations(previous_plan)
    mesh, shape, skip = read_mesh(found.mesh)
    more, plan = check(mesh, skip | frozenset(found.skip))
    problems = [*found.problems, *shape, *more]
    if plan is not None:
        problems += _tls_mtu_problems(plan.allocations.values(), found.mtus)
    if problems or plan is None:
        raise PlanError(problems)
    # TLS for UDP-blocked sites: public certificates and fingerprints only (every private key
    # stays on its node), from this run's facts or, outside --limit, the state file.
    certificates = {
        name: cert
        for name, host in inventory.sites.items()
        if (cert := host.get("sidecar_certificate") or _saved_site(state, name).certificate)
    }
    fingerprints = {
        name: fp
        for name, host in inventory.relays.items()
        if (fp := host.get("relay_tls_fingerprint") or _saved_relay(state, name).tls_fingerprint)
    }
    # Taken with the serving one, never mixed from this run's facts and the state file.
    standby = {
        name: fp
        for name, host in inventory.relays.items()
        if (
            fp := host.get("relay_tls_standby_fingerprint")
            if host.get("relay_tls_fingerprint")
            else _saved_relay(state, name).tls_standby_fingerprint
        )
    }
    new_state = State(
        sites={
            name: SiteState(
                public_key=site.get("public_key"),
                nat_class=site.get("nat_class"),
                endpoint=site.get("endpoint"),
                certificate=certificates.get(name),
            )
            for name, site in found.sites.items()
        },
        relays={
            relay["name"]: RelayState(
                public_key=relay["public_key"],
                tls_fingerprint=fingerprints.get(relay["name"]),
                tls_standby_fingerprint=standby.get(relay["name"]),
            )
            for relay in found.mesh["relays"]
        },
    )
    blocked = [name for name, site in found.sites.items() if site.get("nat_class") == "blocked"]
    tls_ports = {
        name: _number(host.get("relay_tls_port", DEFAULT_RELAY_TLS_PORT))
        for name, host in inventory.relays.items()
    }
    plan_json = plan.to_json()
    sidecars = sidecar_configs(plan, blocked, tls_ports, fingerprints, standby)
    wgstun_ports = {
        name: _number(host.get("relay_wgstun_port", DEFAULT_WGSTUN_PORT))
        for name, host in inventory.relays.items()
        if host.get("relay_wgstun", True)
    }
    keys = {name: site.get("public_key") for name, site in found.sites.items()}
    configs = traversal_configs(json.loads(plan_json), wgstun_ports, keys, blocked)
    for name, traversal in configs.items():
        # This run's NAT facts: the site's public addresses are candidates too.
        nat = inventory.sites[name].get("mesh_nat")
        public = list(nat.get("public_addresses") or []) if isinstance(nat, Mapping) else []
        sidecars.setdefault(name, {})["traversal"] = {**traversal, "public_addresses": public}
    return InventoryPlan(
        plan=plan,
        plan_json=plan_json,
        state=new_state,
        state_json=new_state.to_json(),
        sidecars=sidecars,
        tls_sites=certificates,
        pending=tuple(sorted(found.pending)),
    )


def _tls_mtu_problems(allocations: Iterable[RelayAllocation], mtus: Mapping[str, int]) -> list[str]:
    """Sites whose full-size packets a TLS relay would drop: both ends of a relay-tcp link send
    datagrams of up to their MTU + 32 bytes into the TLS connection (the UDP side through the
    relay), and a frame holds at most MAX_PAYLOAD."""
    too_big: dict[str, list[str]] = {}
    for allocation in allocations:
        if allocation.kind == "relay-tcp":
            for site in (allocation.a, allocation.b):
                if mtus.get(site, DEFAULT_MTU) > TLS_RELAY_MAX_MTU:
                    too_big.setdefault(site, []).append(f"{allocation.a}-{allocation.b}")
    return [
        f"site {site}: wireguard_mtu {mtus[site]} is too big for its TLS-relayed"
        f" {'pairs' if len(pairs) > 1 else 'pair'} {', '.join(sorted(pairs))}: a TLS relay"
        f" carries WireGuard datagrams (MTU + {WIREGUARD_OVERHEAD} bytes) of at most"
        f" {MAX_PAYLOAD} bytes, so the MTU must be at most {TLS_RELAY_MAX_MTU}"
        for site, pairs in sorted(too_big.items())
    ]


def _saved_site(state: State, name: str) -> SiteState:
    return state.sites.get(name, SiteState())


def _saved_relay(state: State, name: str) -> RelayState:
    return state.relays.get(name, RelayState())


def traversal_configs(
    plan: Mapping[str, Any],
    wgstun_ports: Mapping[str, object],
    keys: Mapping[str, Any],
    blocked: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """For every site that can send UDP (not in ``blocked``) and has relay allocations, what its
    sidecar's traversal needs: its own key, overlay address and listen port; for each peer with
    an allocation: its key, overlay address, ``mode`` (a relay-tcp peer's is ``relay``: this
    side's half of the pair is relayed UDP), ``direct_endpoint`` (a direct peer's planned
    endpoint, may be null; null otherwise), the relay endpoint (the relay's address and this
    site's own port: where a punch or relay pair starts, and where a pair falls back to) and
    relay, its standby endpoint and relay (where it goes when that relay dies), and whether it
    may go direct (``upgrade``: punch and direct peers); and the relays whose WG-STUN service
    tells where they see its WireGuard socket (their overlay addresses) and whether they are
    alive. A UDP-blocked site has no traversal: its WireGuard follows its peers from relay to
    relay (roaming), through the TLS carrier's socket for each relay."""
    sites = plan.get("sites", {})
    relays = [
        {"name": name, "overlay_address": relay["overlay_address"], "port": wgstun_ports[name]}
        for name, relay in sorted(plan.get("relays", {}).items())
        if name in wgstun_ports and relay.get("overlay_address")
    ]
    preferred = _by_pair(plan.get("allocations", []))
    standby = _by_pair(plan.get("standby_allocations", []))
    configs: dict[str, dict[str, Any]] = {}
    no_udp = set(blocked)
    for name, site in sorted(sites.items()):
        if name in no_udp:
            continue
        peers = []
        for peer in site.get("peers", []):
            other, mode = peer["name"], peer.get("mode")
            mode = "relay" if mode == "relay-tcp" else mode
            if mode not in ("punch", "relay", "direct") or other not in sites:
                continue
            pair = (min(name, other), max(name, other))
            allocation = preferred.get(pair)
            if allocation is None:
                continue
            side = 0 if name == pair[0] else 1
            entry = {
                "name": other,
                "public_key": peer["public_key"],
                "overlay_address": sites[other]["overlay_address"],
                "mode": mode,
                "direct_endpoint": peer.get("endpoint") if mode == "direct" else None,
                "relay_endpoint": format_endpoint(allocation["address"], allocation["ports"][side]),
                "relay": allocation["relay"],
                "upgrade": mode != "relay",
            }
            spare = standby.get(pair)
            if spare is not None:
                entry["standby_endpoint"] = format_endpoint(spare["address"], spare["ports"][side])
                entry["standby_relay"] = spare["relay"]
            peers.append(entry)
        if peers:
            configs[name] = {
                "site": name,
                "public_key": keys.get(name),
                "overlay_address": site["overlay_address"],
                "listen_port": site["listen_port"],
                "peers": peers,
                "relays": relays,
            }
    return configs


def _by_pair(allocations: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(a["a"], a["b"]): a for a in allocations}


def sidecar_configs(
    plan: Plan,
    blocked: Iterable[str],
    tls_ports: Mapping[str, object],
    fingerprints: Mapping[str, str],
    standby: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """For every UDP-blocked site with relay allocations: the relays it reaches over TLS
    (address, TLS port, pinned fingerprints: the certificate the relay serves and its standby),
    each with the site's own port (``site_port``, the same on every relay) and the loopback
    port its sidecar listens on for that relay (``local_port``: WireGuard's endpoint for every
    peer relayed through it is ``127.0.0.1:local_port``)."""
    standby = standby or {}
    addresses = plan.relay_addresses
    configs: dict[str, dict[str, Any]] = {}
    for site in sorted(set(blocked)):
        site_port = plan.site_port(site)
        carriers = plan.relays_of(site)
        if site_port is None or not carriers:
            continue
        local = plan.local_ports(site)
        relays: dict[str, dict[str, Any]] = {}
        for relay in carriers:
            relays[relay] = {
                "address": addresses[relay],
                "port": tls_ports.get(relay, DEFAULT_RELAY_TLS_PORT),
                "fingerprint": fingerprints.get(relay, ""),
                "site_port": site_port,
                "local_port": local[relay],
            }
            if relay in standby:
                relays[relay]["standby_fingerprint"] = standby[relay]
        configs[site] = {"relays": relays}
    return configs
