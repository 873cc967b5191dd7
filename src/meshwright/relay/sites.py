"""The pure core of a per-site relay: one port per site, WireGuard sessions told apart by index.

No I/O: no sockets, no clock, no files, no logging. The caller owns the sockets and passes the
time in. Standard library only, because relays have Debian's python3 and nothing else.
:mod:`.server` runs it; :mod:`.kernel` derives the kernel's share of the forwarding from it.
State grows with the sites and their sessions, not with the pairs.

The model
---------

Every site X has *one* port ``P_X`` on the relay (the plan gives each site a slot, the same
port number on every relay). X's WireGuard endpoint for *every* peer relayed through this relay
is ``relay:P_X``, and everything the relay sends to X leaves from ``P_X`` to X's confirmed
address. So whatever arrives on ``P_X`` claims to come from X, X's NAT needs only one mapping
towards the relay (one destination: ``relay:P_X``, even behind a symmetric NAT), and X's
WireGuard sees all its relayed peers at the same endpoint, which WireGuard allows: it tells
peers apart by the receiver index in each message, not by the endpoint.

The *sender* of a datagram is the site of the port it arrived on. The *receiver*:

* Transport data (type 4), a handshake response (type 2) and a cookie reply (type 3) carry the
  receiver's index. The relay learned it when it forwarded the handshake that announced it: a
  handshake from X with sender index ``i`` forwarded to Y means Y will address ``i`` to X. The
  index table maps ``(Y, i)`` to that *entry* (X, where X sent it from, where it went). It is
  keyed by the site that uses the index, because the random 32-bit indices of different sites
  may be equal, and a site's own WireGuard never holds two live sessions with one index.
* A handshake initiation (type 1) has no receiver index. Its receiver is the site whose public
  key makes its mac1 verify (whitepaper 5.4.4): first among the sender's recent peers (a few
  sites, most recent first), then among all sites, which costs one keyed BLAKE2s per site. Full
  scans share a relay-wide budget (``scans_per_second`` scans and ``mac1_checks_per_second``
  sites checked); an initiation that would overspend it is dropped (``scan_budget``), so junk
  initiations cannot burn the relay's CPU. Each site's mac1 key is derived once.

The relay holds public keys only, which decrypt nothing, and it forwards every datagram
unchanged.

API::

    relay = Relay({"a": public_key_a, "b": public_key_b, ...}, limits, confirmed={...},
                  sessions=[...], scans_per_second=100.0, mac1_checks_per_second=200_000.0,
                  sessions_per_site=8192)
    delivery = relay.receive("a", source, datagram, now)  # Delivery, or None if dropped
    # Delivery(site, address, also): send the datagram unchanged out of site's port to address
    # (and to also, when it is not None).
    relay.confirmed        # {site: address}: persist it across relay restarts
    relay.sessions         # [(owner, peer, index)]: the proven index table, to persist too
    relay.counters         # Counter of every site together
    relay.site_counters(s) # Counter of one site (what arrived on its port)
    relay.pair_counters()  # {(a, b): Counter}, a < b: what was forwarded between a and b
    relay.count_kernel(sender, receiver, packets, octets)  # the kernel's share of a pair's
    relay.forget_idle_pairs()  # once the pairs' counts are persisted: those without sessions go
    relay.update_sites({...})  # a reload: sites added, removed, keys rotated
    relay.update_limits(limits)
    relay.proven_sessions(now)  # [(sender, receiver, index)]: what a kernel path may forward
    relay.heard(site, now)      # the site's confirmed address was heard by that other path
    relay.moved            # the sites whose confirmed address changed or went: clear it

``site`` names the port the datagram arrived on (ValueError for a site the relay does not serve:
it is the caller's own name, not network input), ``source`` is the ``(host, port)`` it came from
(a site behind a UDP-blocked connection uses a pseudo-address such as ``("tls:site", 0)``;
nothing here treats it specially), ``datagram`` the ``bytes`` that ``recvfrom`` returned and
``now`` monotonic seconds. ``receive`` never raises on any datagram or source.

Learning a site's address
-------------------------

A source address is trusted for site X (``confirmed[X]``) only once it is proven, and transport
data is forwarded only from and to confirmed addresses. Handshakes are what prove them.

* Every handshake (type 1, type 2) must have the exact length, zero reserved bytes and a mac1
  that verifies with its receiver's public key (never the sender's own). One from an address
  that is not X's confirmed one is a *claim*, remembered in X's pending list (at most
  :data:`MAX_PENDING` per site, the oldest evicted, each expiring after :data:`PENDING_TTL`).
* Type 1 from X to Y goes to ``confirmed[Y]``, or if there is none to Y's newest pending claim
  (bootstrap: neither is known yet), or nowhere (``no_destination``; the claim is still kept, it
  is where the other side's initiation will go).
* Type 2 from Y answering X's index ``i``, from the very address X's initiation was delivered
  to, proves X's claim: X's initiation reached the real Y through the relay and Y answered it.
  It becomes ``confirmed[X]`` and the response goes there. Otherwise the response goes to
  ``confirmed[X]`` and proves nothing.
* Type 4 from X is accepted only from ``confirmed[X]`` (``unconfirmed_source``). If it is the
  first datagram to a response's index (Y's), sent from where that response was delivered, Y's
  claim is proven: the initiator X sends transport data only after it checked Y's response.
* Type 3 from X is accepted from ``confirmed[X]`` or one of X's pending claims, and goes back to
  where the handshake it answers came from.
* Roaming follows: X's data from a new address is dropped until X's next handshake from there
  is answered through the relay (WireGuard starts one itself when it hears nothing).
* Both sides moved (a conntrack flush on both NATs): each side's confirmed address is stale and
  each side's handshakes are lost there. So when Y's confirmed address has sent nothing for
  :data:`SILENT_AFTER` seconds and Y has a newer pending claim elsewhere, an initiation to Y also
  goes there (``Delivery.also``). An answer from either place proves the initiator. While Y's
  confirmed address is heard, a forged handshake gets no copy of anything.

An index entry lives while its session can: :data:`SESSION_TTL` from its handshake (WireGuard
never uses a key pair older than REJECT_AFTER_TIME, 180 s), or :data:`PENDING_TTL` if nobody
ever answers or uses it. A handshake whose sender index is live in the table for the same
receiver is dropped (``duplicate_index``): a site never reuses a live index, so that is a
forgery (it would steal the session's traffic) or a 1-in-2^32 collision of two sites' indices
towards one peer, and that initiator simply retries with a fresh index 5 s later. At most
``sessions_per_site`` entries are a site's own indices (``session_limit`` beyond).

Drop reasons, each counted as ``dropped_<reason>`` for the site whose port it arrived on:

* ``malformed``: empty, unknown type, nonzero reserved bytes, wrong length for the type.
* ``bad_mac1``: a handshake whose mac1 verifies for no other site (or for a response, not for
  the owner of its receiver index).
* ``scan_budget``: an initiation whose receiver is not among the sender's recent peers, while
  the full-scan budget is spent.
* ``replay``: a handshake whose mac1 was seen in the last :data:`REPLAY_TTL` seconds.
  WireGuard never sends a handshake twice (each retry has a fresh ephemeral key and index).
* ``duplicate_index``: see above.
* ``unknown_index``: a response, cookie reply or transport data whose receiver index the
  relay did not hand to this site (or no longer: expired, or lost in a restart without state).
* ``unconfirmed_source``: transport data, or a cookie reply, from an address not proven for the
  site it arrived for.
* ``no_destination``: nothing known to send it to yet.
* ``session_limit``: the site already owns ``sessions_per_site`` entries.
* ``rate_limited``: over the site's :class:`Limits`.

Every forwarded datagram (transport data, handshakes, cookie replies) is also counted for its
*pair*, the sender and the receiver (:meth:`Relay.pair_counters`, either direction together),
so that a pair's path can be told from the relay's counts. A pair is known while the index
table holds an entry of its sessions; :meth:`Relay.forget_idle_pairs` drops the others, so
this grows with the live sessions, not with the pairs that ever met.

A dropped datagram changes no state, except a valid handshake dropped for ``no_destination``,
which is still remembered as a claim. The 4-byte :data:`MAPPING_KEEPALIVE` of a sidecar whose
pairs are direct is counted (``keepalives``) and never forwarded.

What this does not stop
-----------------------

mac1 only proves knowledge of the receiver's *public* key. Anyone who knows public keys can
forge handshakes that reach a site's pending list (and flush it at the packet rate), spend the
scan budget (then some genuine initiations missing the recent-peer cache wait for WireGuard's
retry), and fill the replay window. Anyone who can spoof a site's source address (or race its
handshake on the path) can forge the answer that confirms an address, or send transport data as
that site. All of that denies service; none of it reads or forges tunnel traffic, which only the
two sites' keys can. See docs/relays.md, "Threat model".

Limits
------

Two token buckets per site (packets and bytes, a burst of one second's worth) meter what the
relay sends *for* the site whose port a datagram arrived on: a site can use up its own share of
the relay's bandwidth, not another site's. Only datagrams that would be forwarded take tokens;
junk is dropped before.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from .messages import (
    COOKIE_REPLY,
    COOKIE_REPLY_SIZE,
    FORWARDED,
    FORWARDED_BYTES,
    INITIATION,
    INITIATION_SIZE,
    KEEPALIVES,
    MAC_SIZE,
    MAPPING_KEEPALIVE,
    RESPONSE,
    RESPONSE_SIZE,
    TRANSPORT,
    TRANSPORT_MIN_SIZE,
    Address,
    Buckets,
    Limits,
    check_address,
    check_key,
    check_positive,
    mac1_hasher,
)

__all__ = [
    "DROP_REASONS",
    "KERNEL_FORWARDED",
    "MAPPING_KEEPALIVE",
    "MAX_PENDING",
    "MAX_REPLAY",
    "PENDING_TTL",
    "REPLAY_TTL",
    "SESSION_TTL",
    "SILENT_AFTER",
    "Address",
    "Delivery",
    "Limits",
    "Relay",
]

# An unanswered handshake: WireGuard retries every 5 s (REKEY_TIMEOUT), so 15 s spans three.
PENDING_TTL = 15.0
MAX_PENDING = 16  # claims per site: only for addresses that are not the site's confirmed one
# REJECT_AFTER_TIME (180 s) and a margin: no index is used longer after its handshake.
SESSION_TTL = 210.0
# A replay later than this is no more than a forged handshake with an old timestamp, which the
# receiving WireGuard rejects; the window only keeps the relay's own state clean.
REPLAY_TTL = 60.0
MAX_REPLAY = 1 << 17  # mac1s remembered, relay-wide
RECENT_PEERS = 16  # per site: the sites its next initiation most likely goes to
SILENT_AFTER = 30.0  # seconds: longer than WireGuard's persistent keepalive (25 s here)
SWEEP_EVERY = 1.0  # seconds between expiry sweeps (lookups check liveness themselves)
MAX_SESSIONS_PER_SITE = 8192
KERNEL_FORWARDED = "kernel_forwarded"  # of "forwarded": the packets the kernel forwarded

_MALFORMED = "dropped_malformed"
_BAD_MAC1 = "dropped_bad_mac1"
_SCAN_BUDGET = "dropped_scan_budget"
_REPLAY = "dropped_replay"
_DUPLICATE_INDEX = "dropped_duplicate_index"
_UNKNOWN_INDEX = "dropped_unknown_index"
_UNCONFIRMED_SOURCE = "dropped_unconfirmed_source"
_NO_DESTINATION = "dropped_no_destination"
_SESSION_LIMIT = "dropped_session_limit"
_RATE_LIMITED = "dropped_rate_limited"
_DROPPED = (
    _MALFORMED,
    _BAD_MAC1,
    _SCAN_BUDGET,
    _REPLAY,
    _DUPLICATE_INDEX,
    _UNKNOWN_INDEX,
    _UNCONFIRMED_SOURCE,
    _NO_DESTINATION,
    _SESSION_LIMIT,
    _RATE_LIMITED,
)
DROP_REASONS = tuple(key.removeprefix("dropped_") for key in _DROPPED)
_DEFAULT_LIMITS = Limits()  # frozen, so one shared default is safe
_INDEX_BITS = 32


class Delivery(NamedTuple):
    """Send the datagram, unchanged, out of ``site``'s port to ``address`` (and to ``also``)."""

    site: str
    address: Address
    also: Address | None = None


class _Site:
    """What the relay knows of one site."""

    __slots__ = (
        "base",
        "buckets",
        "confirmed",
        "delivery",
        "dropped",
        "forwarded",
        "forwarded_bytes",
        "heard",
        "keepalives",
        "key",
        "mac1",
        "name",
        "owned",
        "pending",
        "recent",
    )

    def __init__(self, name: str, number: int, key: bytes, limits: Limits) -> None:
        self.name = name
        # Index-table keys of the indices this site *uses* are base | index.
        self.base = number << _INDEX_BITS
        self.key = key
        self.mac1 = mac1_hasher(key)
        self.confirmed: Address | None = None
        self.delivery: Delivery | None = None  # Delivery(name, confirmed), made once per address
        self.heard: float | None = None  # when confirmed last sent something accepted
        # Claims: this site's handshakes from addresses other than its confirmed one, by key.
        self.pending: dict[int, _Entry] = {}
        self.recent: list[_Site] = []
        self.owned = 0  # index-table entries that are this site's own indices
        self.buckets = Buckets(limits)
        self.forwarded = 0
        self.forwarded_bytes = 0
        self.keepalives = 0
        self.dropped: dict[str, int] | None = None  # made on the first drop: most sites have none

    def drop(self, reason: str) -> None:
        dropped = self.dropped
        if dropped is None:
            dropped = self.dropped = {}
        dropped[reason] = dropped.get(reason, 0) + 1

    def confirm(self, address: Address, now: float) -> bool:
        """``address`` is proven this site's; whether that moved the site."""
        self.heard = now
        if address == self.confirmed:
            return False
        self.confirmed = address
        self.delivery = Delivery(self.name, address)
        return True

    def newest_claim(self, now: float) -> Address | None:
        pending = self.pending
        if not pending:
            return None
        entry = pending[next(reversed(pending))]
        return entry.address if now - entry.time < PENDING_TTL else None

    def claimed_from(self, source: Address, now: float) -> bool:
        return any(
            e.address == source and now - e.time < PENDING_TTL for e in self.pending.values()
        )

    def met(self, peer: _Site) -> None:
        """``peer`` is now this site's most recent peer (the mac1 cache, most recent first)."""
        recent = self.recent
        if recent and recent[0] is peer:
            return
        if peer in recent:
            recent.remove(peer)
        elif len(recent) >= RECENT_PEERS:
            recent.pop()
        recent.insert(0, peer)


class _Pair:
    """What the relay forwarded between two sites, either way."""

    __slots__ = ("forwarded", "forwarded_bytes", "kernel_forwarded")

    def __init__(self) -> None:
        self.forwarded = 0
        self.forwarded_bytes = 0
        self.kernel_forwarded = 0  # of forwarded: what the kernel forwarded (count_kernel)

    def count(self, size: int) -> None:
        self.forwarded += 1
        self.forwarded_bytes += size


class _Entry:
    """One index announced by ``owner``'s handshake and told to ``peer``."""

    __slots__ = (
        "address",
        "also_to",
        "forwarded_to",
        "key",
        "owner",
        "pair",
        "peer",
        "proven",
        "time",
    )
    pair: _Pair  # set by Relay._add: every entry in the index counts for its pair

    def __init__(
        self,
        owner: _Site,
        peer: _Site,
        key: int,
        address: Address,
        time: float,
        forwarded_to: Address | None,
        also_to: Address | None = None,
        proven: bool = False,
    ) -> None:
        self.owner = owner
        self.peer = peer
        self.key = key  # peer.base | index
        self.address = address  # where owner's handshake came from
        self.time = time
        # Where the handshake was forwarded (None: nowhere). Only an answer from there proves it.
        self.forwarded_to = forwarded_to
        self.also_to = also_to
        # Proven: answered through the relay, or used by the peer; then it lives SESSION_TTL.
        self.proven = proven


class Relay:
    """A relay's forwarding state for the sites it serves. See the module docstring."""

    def __init__(
        self,
        sites: Mapping[str, bytes],
        limits: Limits = _DEFAULT_LIMITS,
        confirmed: Mapping[str, Address] | None = None,
        sessions: Iterable[tuple[str, str, int]] = (),
        *,
        scans_per_second: float = 100.0,
        mac1_checks_per_second: float = 200_000.0,
        sessions_per_site: int = MAX_SESSIONS_PER_SITE,
    ) -> None:
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a Limits, not {type(limits).__name__}")
        check_positive("sessions_per_site", sessions_per_site)
        self._limits = limits
        self._sessions_per_site = sessions_per_site
        # The scan budget, as buckets: a full scan is one "packet" of len(sites) "bytes".
        self._scan_budget = Buckets(Limits(scans_per_second, mac1_checks_per_second))
        self._sites: dict[str, _Site] = {}
        self._numbers = 0  # never reused: a removed site's keys can never alias a new one's
        self._index: dict[int, _Entry] = {}  # in creation order
        # Claims and forwarded handshakes, in creation order: what may expire unproven.
        self._tentative: deque[_Entry] = deque()
        self._seen: dict[bytes, float] = {}  # recent handshakes' mac1, in time order
        self._next_sweep = -float("inf")
        self._restored: list[_Entry] = []  # stamped with the first receive()'s time
        self._totals: Counter[str] = Counter()  # counts of removed sites, kept in the totals
        self._pairs: dict[tuple[str, str], _Pair] = {}  # by names, sorted
        # The sites whose confirmed address changed or went since the caller last cleared it:
        # its cue that what it derived from them (kernel routes) must change before it sends
        # what it was handed.
        self.moved: set[str] = set()
        self.update_sites(sites)
        for name, address in (confirmed or {}).items():
            checked = check_address(address)
            site = self._sites.get(name)
            if site is not None and checked is not None:
                site.confirmed = checked
                site.delivery = Delivery(name, checked)
        for owner_name, peer_name, index in sessions:
            owner, peer = self._sites.get(owner_name), self._sites.get(peer_name)
            if owner is None or peer is None or owner is peer:
                continue
            if not isinstance(index, int) or not 0 <= index < 1 << _INDEX_BITS:
                raise ValueError(f"a session index must be a 32-bit integer, not {index!r}")
            key = peer.base | index
            if key in self._index or owner.owned >= sessions_per_site:
                continue
            entry = _Entry(owner, peer, key, owner.confirmed or ("", 0), 0.0, None, proven=True)
            self._add(entry)
            self._restored.append(entry)
            owner.met(peer)
            peer.met(owner)

    # -- configuration and state ---------------------------------------------------------------

    def update_sites(self, sites: Mapping[str, bytes]) -> None:
        """The sites to serve and their public keys (a reload); ValueError changes nothing.

        A site whose key changed (a rotation) keeps its confirmed address and sessions: they keep
        flowing until handshakes under the new key replace them. A removed site's state goes.
        """
        keys: dict[str, bytes] = {}
        for name, key in sites.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"a site name must be a non-empty string, not {name!r}")
            keys[name] = check_key(key)
        if len(set(keys.values())) != len(keys):
            # Then an initiation's receiver would be ambiguous (and could be its sender).
            raise ValueError("every site must have its own public key")
        for name in [n for n in self._sites if n not in keys]:
            self._remove(self._sites.pop(name))
        for name, key in keys.items():
            site = self._sites.get(name)
            if site is None:
                self._sites[name] = _Site(name, self._numbers, key, self._limits)
                self._numbers += 1
            elif site.key != key:
                site.key = key
                site.mac1 = mac1_hasher(key)

    def update_limits(self, limits: Limits) -> None:
        """New per-site limits (a reload); every site starts with full buckets."""
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a Limits, not {type(limits).__name__}")
        self._limits = limits
        for site in self._sites.values():
            site.buckets = Buckets(limits)

    def _remove(self, site: _Site) -> None:
        self.moved.add(site.name)
        for key, entry in list(self._index.items()):
            if entry.owner is site or entry.peer is site:
                del self._index[key]
                entry.owner.owned -= 1
        for other in self._sites.values():
            if site in other.recent:
                other.recent.remove(site)
        self._totals.update(self._site_counts(site))

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._sites)

    @property
    def confirmed(self) -> dict[str, Address]:
        """Every site's proven address (sites with none are left out); persist it."""
        return {n: s.confirmed for n, s in self._sites.items() if s.confirmed is not None}

    @property
    def sessions(self) -> list[tuple[str, str, int]]:
        """The proven index table as (owner, peer, index): the peer sends ``index`` to the owner.
        Persist it with :attr:`confirmed`, and running sessions survive a relay restart."""
        mask = (1 << _INDEX_BITS) - 1
        return [(e.owner.name, e.peer.name, e.key & mask) for e in self._index.values() if e.proven]

    def proven_sessions(self, now: float) -> list[tuple[str, str, int]]:
        """(sender, receiver, index) of every proven session alive at ``now``, when both sites
        have a confirmed address: transport data with receiver index ``index`` from the sender's
        confirmed address goes, unchanged, to the receiver's confirmed address, and only the
        rate limits and the counters decide anything more. What a kernel path may take over
        (:mod:`.kernel`); a new session's first data, which proves an address, is not in it."""
        if now >= self._next_sweep:
            self._sweep(now)
        mask = (1 << _INDEX_BITS) - 1
        return [
            (e.peer.name, e.owner.name, e.key & mask)
            for e in self._index.values()
            if e.proven
            and now - e.time < SESSION_TTL
            and e.peer.confirmed is not None
            and e.owner.confirmed is not None
        ]

    def pair_counters(self) -> dict[tuple[str, str], Counter[str]]:
        """What was forwarded between two sites, either way, by the pair's names (sorted):
        "forwarded", "forwarded_bytes" (by the code and the kernel) and "kernel_forwarded" (of
        those, the packets :meth:`count_kernel` added), for the pairs with a session in the
        index table, and those that had one since :meth:`forget_idle_pairs`. New Counters."""
        return {
            key: Counter(
                {
                    FORWARDED: pair.forwarded,
                    FORWARDED_BYTES: pair.forwarded_bytes,
                    KERNEL_FORWARDED: pair.kernel_forwarded,
                }
            )
            for key, pair in sorted(self._pairs.items())
        }

    def count_kernel(self, sender: str, receiver: str, packets: int, octets: int) -> None:
        """The kernel forwarded ``packets`` (``octets`` bytes of UDP payload) of ``sender``'s to
        ``receiver``: they count for the pair (sites the relay does not serve are ignored)."""
        if sender in self._sites and receiver in self._sites and sender != receiver:
            pair = self._pair(sender, receiver)
            pair.forwarded += packets
            pair.forwarded_bytes += octets
            pair.kernel_forwarded += packets

    def forget_idle_pairs(self) -> None:
        """Forget the pairs none of whose sessions is left in the index table (expired, or a
        site removed); call it once their last counts were persisted. A pair that meets again
        counts from zero."""
        live = {id(entry.pair) for entry in self._index.values()}
        self._pairs = {key: pair for key, pair in self._pairs.items() if id(pair) in live}

    def heard(self, site: str, now: float) -> None:
        """``site``'s confirmed address sent accepted data at ``now`` by another path (the
        kernel's): it is not silent (:data:`SILENT_AFTER`)."""
        found = self._sites.get(site)
        if found is not None and found.confirmed is not None:
            found.heard = now

    def stats(self) -> dict[str, int]:
        """How much state the relay holds (gauges)."""
        return {
            "sites": len(self._sites),
            "confirmed": sum(s.confirmed is not None for s in self._sites.values()),
            "sessions": len(self._index),
            "tentative": len(self._tentative),
            "pending": sum(len(s.pending) for s in self._sites.values()),
            "replay_window": len(self._seen),
        }

    @staticmethod
    def _site_counts(site: _Site) -> Counter[str]:
        counts: Counter[str] = Counter(dict.fromkeys(_DROPPED, 0))
        counts[FORWARDED] = site.forwarded
        counts[FORWARDED_BYTES] = site.forwarded_bytes
        counts[KEEPALIVES] = site.keepalives
        counts.update(site.dropped or {})
        return counts

    def site_counters(self, name: str) -> Counter[str]:
        """What arrived on ``name``'s port: "forwarded", "forwarded_bytes",
        "keepalives" and "dropped_<reason>" (every reason, from 0). A new Counter."""
        return self._site_counts(self._sites[name])

    @property
    def counters(self) -> Counter[str]:
        """The counts of every site together (removed ones included). A new Counter."""
        totals = Counter(self._totals)
        for site in self._sites.values():
            totals.update(self._site_counts(site))
        return totals

    # -- the datagrams -------------------------------------------------------------------------

    def receive(self, site: str, source: Address, datagram: bytes, now: float) -> Delivery | None:
        """Where to send `datagram`, or None when it is dropped (counted).

        `site` names the port it arrived on (ValueError for one not served), `source` the
        address it came from, `now` monotonic seconds. Never raises on any datagram or source.
        """
        sender = self._sites.get(site)
        if sender is None:
            raise ValueError(f"no site {site!r} on this relay")
        if now >= self._next_sweep:
            self._sweep(now)
        size = len(datagram)
        # The per-packet path: transport data between confirmed addresses.
        if datagram.startswith(TRANSPORT) and size >= TRANSPORT_MIN_SIZE:
            if source != sender.confirmed:
                sender.drop(_UNCONFIRMED_SOURCE)
                return None
            entry = self._index.get(sender.base | int.from_bytes(datagram[4:8], "little"))
            if entry is None:
                sender.drop(_UNKNOWN_INDEX)
                return None
            sender.heard = now
            receiver = entry.owner
            delivery = receiver.delivery
            if not entry.proven:
                return self._transport_proving(sender, entry, source, size, now)
            if delivery is None:
                sender.drop(_NO_DESTINATION)
                return None
            if not sender.buckets.take(size, now):
                sender.drop(_RATE_LIMITED)
                return None
            sender.forwarded += 1
            sender.forwarded_bytes += size
            entry.pair.count(size)
            return delivery
        if size == INITIATION_SIZE and datagram.startswith(INITIATION):
            return self._initiation(sender, source, datagram, now)
        if size == RESPONSE_SIZE and datagram.startswith(RESPONSE):
            return self._response(sender, source, datagram, now)
        if size == COOKIE_REPLY_SIZE and datagram.startswith(COOKIE_REPLY):
            return self._cookie_reply(sender, source, datagram, now)
        if datagram == MAPPING_KEEPALIVE:
            # A sidecar holds its NAT mapping towards this port open while its pairs are direct.
            sender.keepalives += 1
            return None
        sender.drop(_MALFORMED)
        return None

    # -- the rest runs once per handshake (or per session), not per packet ----------------------

    def _forward(self, sender: _Site, entry: _Entry, delivery: Delivery, size: int) -> Delivery:
        """Counted for the sender and for the pair of ``entry``'s session (in the index)."""
        sender.forwarded += 1
        sender.forwarded_bytes += size
        entry.pair.count(size)
        return delivery

    def _transport_proving(
        self, sender: _Site, entry: _Entry, source: Address, size: int, now: float
    ) -> Delivery | None:
        """The first transport data to an index no answer has proven yet."""
        if now - entry.time >= PENDING_TTL:
            sender.drop(_UNKNOWN_INDEX)
            return None
        receiver = entry.owner
        # The initiator sends data only after it checked the response that carried this index,
        # and that response was delivered to this very address: the responder's claim is true.
        proving = entry.forwarded_to == source
        address = entry.address if proving else receiver.confirmed
        if address is None:
            sender.drop(_NO_DESTINATION)
            return None
        if not sender.buckets.take(size, now):
            sender.drop(_RATE_LIMITED)
            return None
        if proving:
            if receiver.confirm(address, now):
                self.moved.add(receiver.name)
            receiver.pending.pop(entry.key, None)
        # Used by the peer's own WireGuard, which holds a session with this index: a real one
        # (no forged handshake makes a session), so it lives as long as a session can.
        entry.proven = True
        delivery = receiver.delivery
        assert delivery is not None  # confirmed just now, or before
        return self._forward(sender, entry, delivery, size)

    def _fresh(self, sender: _Site, mac1: bytes) -> bool:
        """Not a replay: mac1 is a keyed 128-bit hash of everything before it, so it names the
        message (and catches a copy with only mac2 changed)."""
        if mac1 in self._seen:
            sender.drop(_REPLAY)
            return False
        return True

    def _receiver_of(self, sender: _Site, datagram: bytes, now: float) -> _Site | None:
        """The site whose key verifies the initiation's mac1; None when none does (counted)."""
        body = datagram[: INITIATION_SIZE - 2 * MAC_SIZE]
        mac1 = datagram[INITIATION_SIZE - 2 * MAC_SIZE : INITIATION_SIZE - MAC_SIZE]
        # mac1 is no secret (anyone with the public key computes it), so plain == is fine.
        for site in sender.recent:
            hasher = site.mac1.copy()
            hasher.update(body)
            if hasher.digest() == mac1:
                return site
        budget = self._scan_budget
        if not budget.take(int(min(len(self._sites), budget.bytes_per_second)), now):
            sender.drop(_SCAN_BUDGET)
            return None
        recent = sender.recent
        for site in self._sites.values():
            if site is sender or site in recent:
                continue
            hasher = site.mac1.copy()
            hasher.update(body)
            if hasher.digest() == mac1:
                return site
        sender.drop(_BAD_MAC1)
        return None

    def _sender_index_free(self, sender: _Site, key: int, now: float) -> bool:
        entry = self._index.get(key)
        if (entry is not None and self._live(entry, now)) or key in sender.pending:
            sender.drop(_DUPLICATE_INDEX)
            return False
        if sender.owned >= self._sessions_per_site:
            sender.drop(_SESSION_LIMIT)
            return False
        return True

    @staticmethod
    def _live(entry: _Entry, now: float) -> bool:
        return now - entry.time < (SESSION_TTL if entry.proven else PENDING_TTL)

    def _remember(self, sender: _Site, mac1: bytes, entry: _Entry, claim: bool) -> None:
        """A handshake passed: its mac1 against replays, its sender index in the table."""
        self._seen[mac1] = entry.time
        if len(self._seen) > MAX_REPLAY:
            del self._seen[next(iter(self._seen))]
        self._tentative.append(entry)
        if claim:
            pending = sender.pending
            if len(pending) >= MAX_PENDING:
                self._forget(pending.pop(next(iter(pending))))
            pending[entry.key] = entry
        if entry.forwarded_to is not None:
            stale = self._index.pop(entry.key, None)  # expired, or _sender_index_free said so
            if stale is not None:
                stale.owner.owned -= 1
            self._add(entry)
            sender.met(entry.peer)
            entry.peer.met(sender)

    def _add(self, entry: _Entry) -> None:
        self._index[entry.key] = entry
        entry.owner.owned += 1
        entry.pair = self._pair(entry.owner.name, entry.peer.name)

    def _pair(self, one: str, other: str) -> _Pair:
        key = (one, other) if one < other else (other, one)
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = _Pair()
        return pair

    def _forget(self, entry: _Entry) -> None:
        """An unproven entry leaves the index (a proven one stays: it is a session)."""
        if not entry.proven and self._index.get(entry.key) is entry:
            del self._index[entry.key]
            entry.owner.owned -= 1

    def _initiation(
        self, sender: _Site, source: Address, datagram: bytes, now: float
    ) -> Delivery | None:
        receiver = self._receiver_of(sender, datagram, now)
        if receiver is None:
            return None
        mac1 = datagram[INITIATION_SIZE - 2 * MAC_SIZE : INITIATION_SIZE - MAC_SIZE]
        if not self._fresh(sender, mac1):
            return None
        key = receiver.base | int.from_bytes(datagram[4:8], "little")
        if not self._sender_index_free(sender, key, now):
            return None
        claim = source != sender.confirmed
        if not claim:
            sender.heard = now
        destination = receiver.confirmed
        newest = receiver.newest_claim(now)
        also = None
        if destination is None:
            # Bootstrap: the receiver is not proven yet; try where it last sent a handshake.
            destination = newest
        elif (
            newest is not None
            and newest != destination
            and receiver.heard is not None
            and now - receiver.heard > SILENT_AFTER
        ):
            also = newest
        size = len(datagram)
        if destination is not None and not sender.buckets.take(size, now):
            sender.drop(_RATE_LIMITED)
            return None
        entry = _Entry(sender, receiver, key, source, now, destination, also)
        if claim or destination is not None:
            # Kept even when it goes nowhere: it is where the receiver's initiation will go.
            self._remember(sender, mac1, entry, claim)
        if destination is None:
            sender.drop(_NO_DESTINATION)
            return None
        if also is None and destination == receiver.confirmed:
            delivery = receiver.delivery
            assert delivery is not None
        else:
            delivery = Delivery(receiver.name, destination, also)
        return self._forward(sender, entry, delivery, size)  # in the index: it went somewhere

    def _response(
        self, sender: _Site, source: Address, datagram: bytes, now: float
    ) -> Delivery | None:
        answered = self._index.get(sender.base | int.from_bytes(datagram[8:12], "little"))
        if answered is None or not self._live(answered, now):
            sender.drop(_UNKNOWN_INDEX)
            return None
        receiver = answered.owner
        body = datagram[: RESPONSE_SIZE - 2 * MAC_SIZE]
        mac1 = datagram[RESPONSE_SIZE - 2 * MAC_SIZE : RESPONSE_SIZE - MAC_SIZE]
        hasher = receiver.mac1.copy()
        hasher.update(body)
        if hasher.digest() != mac1:
            sender.drop(_BAD_MAC1)
            return None
        if not self._fresh(sender, mac1):
            return None
        key = receiver.base | int.from_bytes(datagram[4:8], "little")
        if not self._sender_index_free(sender, key, now):
            return None
        # The initiation was delivered to exactly this address and is answered from it, so the
        # address it came from is the initiator's. An answer from anywhere else proves nothing.
        proving = not answered.proven and source in (answered.forwarded_to, answered.also_to)
        destination = answered.address if proving else receiver.confirmed
        size = len(datagram)
        if destination is not None and not sender.buckets.take(size, now):
            sender.drop(_RATE_LIMITED)
            return None
        if proving:
            if receiver.confirm(answered.address, now):
                self.moved.add(receiver.name)
            receiver.pending.pop(answered.key, None)
            answered.proven = True
        claim = source != sender.confirmed
        if not claim:
            sender.heard = now
        entry = _Entry(sender, receiver, key, source, now, destination)
        if claim or destination is not None:
            self._remember(sender, mac1, entry, claim)
        if destination is None:
            sender.drop(_NO_DESTINATION)
            return None
        delivery = receiver.delivery
        assert delivery is not None and delivery.address == destination
        return self._forward(sender, entry, delivery, size)  # in the index: it went somewhere

    def _cookie_reply(
        self, sender: _Site, source: Address, datagram: bytes, now: float
    ) -> Delivery | None:
        if source != sender.confirmed and not sender.claimed_from(source, now):
            sender.drop(_UNCONFIRMED_SOURCE)
            return None
        entry = self._index.get(sender.base | int.from_bytes(datagram[4:8], "little"))
        if entry is None or not self._live(entry, now):
            sender.drop(_UNKNOWN_INDEX)
            return None
        # It answers the handshake that announced this index: back to where that came from
        # (its sender may not be confirmed yet).
        receiver = entry.owner
        destination = receiver.confirmed if entry.proven else entry.address
        if destination is None:
            sender.drop(_NO_DESTINATION)
            return None
        size = len(datagram)
        if not sender.buckets.take(size, now):
            sender.drop(_RATE_LIMITED)
            return None
        delivery = receiver.delivery
        if delivery is None or delivery.address != destination:
            delivery = Delivery(receiver.name, destination)
        return self._forward(sender, entry, delivery, size)

    # -- expiry --------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Drop what expired; each structure is in time order, so only its front is looked at."""
        self._next_sweep = now + SWEEP_EVERY
        if self._restored:
            # Restored sessions and addresses live from the relay's first datagram on.
            for entry in self._restored:
                entry.time = now
            for site in self._sites.values():
                if site.confirmed is not None and site.heard is None:
                    site.heard = now
            self._restored = []
        seen = self._seen
        while seen:
            mac1 = next(iter(seen))
            if now - seen[mac1] < REPLAY_TTL:
                break
            del seen[mac1]
        tentative = self._tentative
        while tentative and now - tentative[0].time >= PENDING_TTL:
            entry = tentative.popleft()
            self._forget(entry)
            pending = entry.owner.pending
            if pending.get(entry.key) is entry:
                del pending[entry.key]
        index = self._index
        while index:
            key = next(iter(index))
            entry = index[key]
            if now - entry.time < SESSION_TTL:
                break
            del index[key]
            entry.owner.owned -= 1
