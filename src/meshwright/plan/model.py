"""The planner's input: a mesh of sites, its relays and its settings; and its one error type."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_KEEPALIVE",
    "DEFAULT_LINK_KINDS",
    "DEFAULT_LISTEN_PORT",
    "DEFAULT_RELAY_FIRST_PORT",
    "DEFAULT_RELAY_LAST_PORT",
    "LINK_COST",
    "LINK_KINDS",
    "NAT_CLASSES",
    "RELAY_KINDS",
    "Mesh",
    "PlanError",
    "Policy",
    "Relay",
    "Site",
]

# NAT classes, as meshwright.site.nat.probe reports them (``mesh_nat.nat_class``).
NAT_CLASSES = ("open", "easy", "hard", "blocked")

# Link kinds, best first, and what one link of each kind costs a path.
LINK_KINDS = ("direct", "punch", "relay", "relay-tcp")
LINK_COST = {"direct": 10, "punch": 10, "relay": 15, "relay-tcp": 19}
RELAY_KINDS = frozenset({"relay", "relay-tcp"})

DEFAULT_LINK_KINDS = frozenset({"direct"})
DEFAULT_KEEPALIVE = 25
DEFAULT_LISTEN_PORT = 51820
# A relay's site ports, unless its inventory says otherwise (relay_first_port and
# relay_last_port): one per site, the same on every relay, so room for 20,000 sites. Defined
# here only; the plan hands them on.
DEFAULT_RELAY_FIRST_PORT = 40000
DEFAULT_RELAY_LAST_PORT = 59999


class PlanError(ValueError):
    """The mesh cannot be planned. :attr:`problems` lists every problem found, one per line."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = [f"{len(self.problems)} problems:"]
        lines.extend(f"- {p}" for p in self.problems)
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What links one site accepts.

    ``allow_direct`` false: no ``direct`` or ``punch`` link. ``allow_relay`` false: no ``relay`` or
    ``relay-tcp`` link. ``hubs``: links (of any kind) only with the named sites.
    """

    allow_direct: bool = True
    allow_relay: bool = True
    hubs: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Site:
    """One site: a WireGuard gateway and the LAN prefixes behind it.

    ``nat_class`` is the probe's summary (None: no NAT facts). ``endpoint`` is ``"ip:port"`` where
    peers reach this site's WireGuard port unsolicited; it matters for ``open`` sites only, and an
    ``open`` site without one is planned as ``easy``.
    """

    name: str
    public_key: str | None
    overlay_address: str
    lan_prefixes: tuple[str, ...] = ()
    nat_class: str | None = None
    endpoint: str | None = None
    listen_port: int = DEFAULT_LISTEN_PORT
    policy: Policy = field(default_factory=Policy)
    required: bool = True
    relay_rtt_ms: tuple[tuple[str, float], ...] = ()  # (relay name, probe round trip)


@dataclass(frozen=True, kw_only=True)
class Relay:
    """A relay node: its public addresses (the first carries the site ports and WireGuard).

    With a ``public_key`` and an ``overlay_address`` it is also a WireGuard peer of every site
    that can send UDP, for the control plane only: each side's allowed IPs for the other hold
    only the other's overlay address, so no site traffic is ever routed through a relay.
    """

    name: str
    addresses: tuple[str, ...] = ()
    public_key: str | None = None
    overlay_address: str | None = None
    listen_port: int = DEFAULT_LISTEN_PORT
    # Its site ports, inclusive: a site's port lies in every relay's range (plan.relays).
    first_port: int = DEFAULT_RELAY_FIRST_PORT
    last_port: int = DEFAULT_RELAY_LAST_PORT


@dataclass(frozen=True, kw_only=True)
class Mesh:
    """Everything the planner reads. ``listen_port`` is the default for sites that give none."""

    sites: tuple[Site, ...]
    relays: tuple[Relay, ...] = ()
    overlay_network: str
    link_kinds: frozenset[str] = DEFAULT_LINK_KINDS
    keepalive: int = DEFAULT_KEEPALIVE
    listen_port: int = DEFAULT_LISTEN_PORT
    # The previous plan's relay allocations (its "allocations", and its "standby_allocations"
    # marked "standby": true): relays and site ports kept while still valid.
    previous_allocations: tuple[Mapping[str, object], ...] = ()
