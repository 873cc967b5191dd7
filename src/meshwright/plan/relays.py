"""Relay allocations: which relay carries each relayed pair, and on which ports.

Every pair the routing links with ``relay`` or ``relay-tcp`` gets one allocation: a relay and a
slot (unique across relays, so at most ``MAX_SLOTS`` relayed pairs in a mesh). Slot ``k`` is
the port pair ``(FIRST_PORT + 2k, FIRST_PORT + 2k + 1)``, the first
port for the pair's first site (in name order), the second for the other. Each site's WireGuard
endpoint for its peer is the relay's address and its own port; the relay forwards between the
two ports. A site that cannot send UDP (``relay-tcp``, a ``blocked`` site) reaches its port
through the relay's TLS service instead, naming the port.

Stable: an allocation the previous plan made is kept while its pair is still relayed and its
relay still exists, so a new plan never moves a working pair. A new pair goes to the relay with
the lowest round trip (the two sites' probe RTTs added up), spread: among relays within
``NEAR_MS`` of the best it takes the one carrying fewest pairs; then the lowest free slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["FIRST_PORT", "MAX_SLOTS", "RelayAllocation", "allocate"]

FIRST_PORT = 40000
MAX_SLOTS = 10000  # ports 40000-59999
NEAR_MS = 10.0
UNKNOWN_RTT_MS = 500.0  # a site with no RTT to a relay (a UDP-blocked site): ranks it last


@dataclass(frozen=True, slots=True)
class RelayAllocation:
    """One relayed pair: ``a`` < ``b``; ``ports`` are a's and b's ports on ``relay``."""

    a: str
    b: str
    kind: str
    relay: str
    address: str
    slot: int
    public_keys: tuple[str, str]  # a's and b's: the relay checks each handshake's mac1

    @property
    def ports(self) -> tuple[int, int]:
        return FIRST_PORT + 2 * self.slot, FIRST_PORT + 2 * self.slot + 1

    def endpoint_of(self, site: str) -> str:
        """The WireGuard endpoint ``site`` holds for the other site of the pair."""
        port = self.ports[0] if site == self.a else self.ports[1]
        return f"{self.address}:{port}"

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
        }


def allocate(
    pairs: Iterable[tuple[str, str, str]],
    relays: Mapping[str, str],
    rtt_ms: Mapping[str, Mapping[str, float]],
    previous: Sequence[Mapping[str, object]] = (),
    public_keys: Mapping[str, str] | None = None,
) -> dict[tuple[str, str], RelayAllocation]:
    """Allocations for ``pairs`` ((a, b, kind), a < b) on ``relays`` (name -> address).

    ``rtt_ms[site][relay]``: the probe's round trips. ``previous``: the last plan's allocations
    (as :meth:`RelayAllocation.to_dict` wrote them); the ones still valid are kept.
    ``public_keys``: every site's WireGuard public key, by name.
    """
    keys = public_keys or {}

    def make(pair: tuple[str, str], kind: str, relay: str, slot: int) -> RelayAllocation:
        pair_keys = (keys.get(pair[0], ""), keys.get(pair[1], ""))
        return RelayAllocation(*pair, kind, relay, relays[relay], slot, pair_keys)

    wanted = {(a, b): kind for a, b, kind in sorted(pairs)}
    used: dict[str, set[int]] = {name: set() for name in relays}  # each relay's load
    # Slots are unique across relays, not only per relay: a UDP-blocked site binds its side of
    # every allocation on its own loopback (127.0.0.1:<port>), whichever relay carries it.
    taken: set[int] = set()
    cursor = 0  # every slot below it is taken
    result: dict[tuple[str, str], RelayAllocation] = {}
    for old in previous:
        key = (str(old.get("a")), str(old.get("b")))
        relay, slot = old.get("relay"), old.get("slot")
        if (
            key in wanted
            and key not in result
            and isinstance(relay, str)
            and relay in relays
            and isinstance(slot, int)
            and 0 <= slot < MAX_SLOTS
            and slot not in taken
        ):
            used[relay].add(slot)
            taken.add(slot)
            result[key] = make(key, wanted[key], relay, slot)
    for key, kind in wanted.items():
        if key in result:
            continue
        relay = _choose(key, relays, rtt_ms, used)
        slot = cursor
        while slot in taken:
            slot += 1
        if slot >= MAX_SLOTS:
            raise ValueError(f"more than {MAX_SLOTS} relayed pairs (ports {FIRST_PORT} and up)")
        used[relay].add(slot)
        taken.add(slot)
        cursor = slot + 1
        result[key] = make(key, kind, relay, slot)
    return dict(sorted(result.items()))


def _choose(
    pair: tuple[str, str],
    relays: Mapping[str, str],
    rtt_ms: Mapping[str, Mapping[str, float]],
    used: Mapping[str, set[int]],
) -> str:
    def rtt(relay: str) -> float:
        return sum(rtt_ms.get(site, {}).get(relay, UNKNOWN_RTT_MS) for site in pair)

    best = min(rtt(name) for name in relays)
    near = [name for name in sorted(relays) if rtt(name) <= best + NEAR_MS]
    return min(near, key=lambda name: (len(used[name]), rtt(name), name))
