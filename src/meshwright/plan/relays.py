"""Relay allocations: which relay carries each relayed pair, and on which ports.

Every pair the routing links with ``relay`` or ``relay-tcp`` gets one allocation: a relay and a
slot. Slot ``k`` of a relay is the port pair ``(first + 2k, first + 2k + 1)`` of that relay's
allocation range (:class:`RelayPorts`, from the inventory's ``relay_first_port`` and
``relay_last_port``), the first port for the pair's first site (in name order), the second for
the other. Each site's WireGuard endpoint for its peer is the relay's address and its own port;
the relay forwards between the two ports. A site that cannot send UDP (``relay-tcp``, a
``blocked`` site) reaches its port through the relay's TLS service instead, naming the port.

Ports are unique across relays, not only per relay: a UDP-blocked site binds its side of every
allocation on its own loopback (``127.0.0.1:<port>``), whichever relay carries it.

Stable: an allocation the previous plan made is kept while its pair is still relayed and its
relay and ports still exist, so a new plan never moves a working pair. A new pair goes to the
relay with the lowest round trip (the two sites' probe RTTs added up), spread: among relays
within ``NEAR_MS`` of the best it takes the one carrying fewest pairs; then the lowest free slot
(a full relay passes the pair on to the next one).

Standby: with two relays or more, every pair of a :data:`STANDBY_KINDS` kind also gets a
*standby* allocation on the best *other* relay (the same ranking), kept stable the same way. The
traversal sidecar moves the pair there when its relay dies (docs/relays.md, "Relay failover"):
no new plan, no Ansible run. The plan's choice stays the preferred one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..wire.endpoint import format_endpoint
from .model import DEFAULT_RELAY_FIRST_PORT, DEFAULT_RELAY_LAST_PORT

__all__ = ["STANDBY_KINDS", "RelayAllocation", "RelayPorts", "allocate", "allocate_with_standby"]

# The kinds whose pairs get a standby allocation: the UDP-relayed ones. A UDP-blocked site's
# pairs (relay-tcp) follow its TLS connection, which does not fail over yet.
STANDBY_KINDS = ("relay", "punch")

NEAR_MS = 10.0
UNKNOWN_RTT_MS = 500.0  # a site with no RTT to a relay (a UDP-blocked site): ranks it last


@dataclass(frozen=True, slots=True)
class RelayPorts:
    """A relay's allocation ports, ``first`` to ``last`` inclusive; never its ``reserved`` port
    (its own WireGuard port, which may fall inside the range)."""

    first: int = DEFAULT_RELAY_FIRST_PORT
    last: int = DEFAULT_RELAY_LAST_PORT
    reserved: int | None = None

    @property
    def slots(self) -> int:
        return max(0, (self.last - self.first + 1) // 2)

    def pair(self, slot: int) -> tuple[int, int]:
        return self.first + 2 * slot, self.first + 2 * slot + 1


@dataclass(frozen=True, slots=True)
class RelayAllocation:
    """One relayed pair: ``a`` < ``b``; ``ports`` are a's and b's ports on ``relay``."""

    a: str
    b: str
    kind: str
    relay: str
    address: str
    slot: int
    ports: tuple[int, int]
    public_keys: tuple[str, str]  # a's and b's: the relay checks each handshake's mac1
    standby: bool = False  # the pair's standby allocation (its relay's failover), not its own

    def endpoint_of(self, site: str) -> str:
        """The WireGuard endpoint ``site`` holds for the other site of the pair."""
        port = self.ports[0] if site == self.a else self.ports[1]
        return format_endpoint(self.address, port)

    def local_endpoint_of(self, site: str) -> str:
        """The endpoint of a UDP-blocked ``site``: its sidecar, on loopback, on its port."""
        port = self.ports[0] if site == self.a else self.ports[1]
        return f"127.0.0.1:{port}"

    def to_dict(self) -> dict[str, object]:
        return {
            "a": self.a,
            "b": self.b,
            "kind": self.kind,
            "relay": self.relay,
            "address": self.address,
            "slot": self.slot,
            "ports": list(self.ports),
            "public_keys": list(self.public_keys),
            **({"standby": True} if self.standby else {}),
        }


def allocate(
    pairs: Iterable[tuple[str, str, str]],
    relays: Mapping[str, str],
    rtt_ms: Mapping[str, Mapping[str, float]],
    previous: Sequence[Mapping[str, object]] = (),
    public_keys: Mapping[str, str] | None = None,
    ports: Mapping[str, RelayPorts] | None = None,
) -> dict[tuple[str, str], RelayAllocation]:
    """Allocations for ``pairs`` ((a, b, kind), a < b) on ``relays`` (name -> address).

    ``rtt_ms[site][relay]``: the probe's round trips. ``previous``: the last plan's allocations
    (as :meth:`RelayAllocation.to_dict` wrote them); the ones still valid are kept.
    ``public_keys``: every site's WireGuard public key, by name. ``ports``: each relay's
    allocation ports (default :class:`RelayPorts`). ValueError when every port is taken.
    """
    return allocate_with_standby(
        pairs, relays, rtt_ms, previous, public_keys, ports, standby_kinds=()
    )[0]


def allocate_with_standby(
    pairs: Iterable[tuple[str, str, str]],
    relays: Mapping[str, str],
    rtt_ms: Mapping[str, Mapping[str, float]],
    previous: Sequence[Mapping[str, object]] = (),
    public_keys: Mapping[str, str] | None = None,
    ports: Mapping[str, RelayPorts] | None = None,
    previous_standby: Sequence[Mapping[str, object]] = (),
    *,
    standby_kinds: Sequence[str] = STANDBY_KINDS,
) -> tuple[dict[tuple[str, str], RelayAllocation], dict[tuple[str, str], RelayAllocation]]:
    """:func:`allocate`'s allocations, and the standby ones (see the module's docstring) of
    the pairs of ``standby_kinds`` kinds, on other relays; ``previous_standby``: the last
    plan's, kept while still valid. Both draw on the same ports."""
    keys = public_keys or {}
    ranges = {name: (ports or {}).get(name, RelayPorts()) for name in relays}
    used: dict[str, set[int]] = {name: set() for name in relays}  # each relay's slots (load)
    taken: set[int] = set()  # ports, across relays (see the module's docstring)
    cursor = dict.fromkeys(relays, 0)  # per relay: every slot below it is unusable

    def free(relay: str, slot: int) -> bool:
        span = ranges[relay]
        if not 0 <= slot < span.slots:
            return False
        pair = span.pair(slot)
        return span.reserved not in pair and taken.isdisjoint(pair)

    def take(
        pair: tuple[str, str], kind: str, relay: str, slot: int, standby: bool = False
    ) -> RelayAllocation:
        used[relay].add(slot)
        taken.update(ranges[relay].pair(slot))
        pair_keys = (keys.get(pair[0], ""), keys.get(pair[1], ""))
        return RelayAllocation(
            *pair, kind, relay, relays[relay], slot, ranges[relay].pair(slot), pair_keys, standby
        )

    def place(
        wanted: Mapping[tuple[str, str], str],
        old_ones: Sequence[Mapping[str, object]],
        avoid: Mapping[tuple[str, str], RelayAllocation],
        standby: bool,
    ) -> dict[tuple[str, str], RelayAllocation]:
        """An allocation for each wanted pair, never on the relay ``avoid`` has for it."""
        what = " (standby)" if standby else ""

        def allowed(key: tuple[str, str], relay: object) -> bool:
            return (
                isinstance(relay, str)
                and relay in relays
                and (key not in avoid or avoid[key].relay != relay)
            )

        result: dict[tuple[str, str], RelayAllocation] = {}
        for old in old_ones:
            key = (str(old.get("a")), str(old.get("b")))
            relay, slot = old.get("relay"), old.get("slot")
            if (
                key in wanted
                and key not in result
                and allowed(key, relay)
                and isinstance(slot, int)
                and not isinstance(slot, bool)
                and free(str(relay), slot)
            ):
                result[key] = take(key, wanted[key], str(relay), slot, standby)
        for key, kind in wanted.items():
            if key in result:
                continue
            for relay in _preference(key, relays, rtt_ms, used):
                if not allowed(key, relay):
                    continue
                slot = cursor[relay]
                while slot < ranges[relay].slots and not free(relay, slot):
                    slot += 1
                cursor[relay] = slot
                if slot < ranges[relay].slots:
                    result[key] = take(key, kind, relay, slot, standby)
                    break
            else:
                count = sum(len(slots) for slots in used.values())
                counted = "allocations" if what else "relayed pairs"
                raise ValueError(
                    f"no free port pair for {key[0]} and {key[1]}{what}: every relay's"
                    f" allocation ports are taken ({count} {counted}; widen"
                    " relay_first_port to relay_last_port, or add a relay)"
                )
        return dict(sorted(result.items()))

    wanted = {(a, b): kind for a, b, kind in sorted(pairs)}
    preferred = place(wanted, previous, {}, standby=False)
    spares: dict[tuple[str, str], RelayAllocation] = {}
    if len(relays) >= 2:
        spare = {key: kind for key, kind in wanted.items() if kind in standby_kinds}
        spares = place(spare, previous_standby, preferred, standby=True)
    return preferred, spares


def _preference(
    pair: tuple[str, str],
    relays: Mapping[str, str],
    rtt_ms: Mapping[str, Mapping[str, float]],
    used: Mapping[str, set[int]],
) -> list[str]:
    """Relays in the order ``pair`` tries them: the near ones (within NEAR_MS of the best round
    trip) least loaded first, then the others nearest first."""

    def rtt(relay: str) -> float:
        return sum(rtt_ms.get(site, {}).get(relay, UNKNOWN_RTT_MS) for site in pair)

    best = min(rtt(name) for name in relays)

    def rank(name: str) -> tuple[bool, int, float, str]:
        far = rtt(name) > best + NEAR_MS
        return far, 0 if far else len(used[name]), rtt(name), name

    return sorted(relays, key=rank)
