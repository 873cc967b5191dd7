"""Who may hold a connection to a relay's TCP port before proving who it is. No I/O.

A relay's TCP 443 serves two kinds of stranger: sites opening their TLS relay connection and
STUN-over-TCP clients. Until a stranger has finished a TLS handshake with a site certificate
or a STUN transaction, it has proved nothing, so what it may hold is bounded twice:

* **per source** (:class:`SourceSlots`): one address may hold only a few unproven connections,
  so one host cannot fill the relay's connection table and lock UDP-blocked sites out;
* **in time** (the callers' deadlines): an unproven connection is closed a few seconds after
  it was accepted, whatever trickle of bytes it sends, so slow connections cannot hold even
  their own few slots for long.

A source is an IPv4 address or an IPv6 /64 (:func:`source_key`): one host usually owns a
whole /64, and keying by full address would let it take 2**64 times the share.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

__all__ = ["SourceSlots", "source_key"]


def source_key(ip: str) -> str | bytes:
    """The unit a per-source limit counts: the IPv4 address, or the IPv6 address's /64."""
    if ":" in ip:
        try:
            return ipaddress.IPv6Address(ip.split("%", 1)[0]).packed[:8]
        except ValueError:
            return ip
    return ip


class SourceSlots:
    """At most ``per_source`` slots held by one source, and ``total`` by all together.

    :meth:`take` before serving a connection, :meth:`give` back when it closes or proves
    itself. Memory grows only with the sources currently holding slots (at most ``total``).
    """

    def __init__(self, per_source: int, total: int) -> None:
        if per_source < 1 or total < 1:
            raise ValueError("per_source and total must be at least 1")
        self.per_source, self.total = per_source, total
        self._held: Counter[str | bytes] = Counter()
        self._count = 0

    def __len__(self) -> int:
        """Slots held now."""
        return self._count

    def held(self, ip: str) -> int:
        """Slots held now by ``ip``'s source."""
        return self._held.get(source_key(ip), 0)

    def take(self, ip: str) -> str | None:
        """Take a slot for ``ip``; None when granted, else why not ("source" or "total")."""
        if self._count >= self.total:
            return "total"
        key = source_key(ip)
        if self._held[key] >= self.per_source:
            return "source"
        self._held[key] += 1
        self._count += 1
        return None

    def give(self, ip: str) -> None:
        """Give back a slot :meth:`take` granted for ``ip``."""
        key = source_key(ip)
        held = self._held.get(key, 0)
        if held <= 0:
            return  # a bug elsewhere must not drive the counts negative
        if held == 1:
            del self._held[key]
        else:
            self._held[key] = held - 1
        self._count -= 1
