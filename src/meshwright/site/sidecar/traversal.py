"""The traversal sidecar's decisions, pure: when to try a direct path, when it is proven, when
to fall back. No sockets, no clock, no files: the daemon feeds it control messages, probes,
WireGuard's counters and the time, and carries out the actions it returns (the shape of
:mod:`meshwright.relay.forward` under :mod:`meshwright.relay.server`).

One :class:`Traversal` per site; one :class:`PeerLink` per peer the plan gives it (its
``mode``). A ``punch`` peer starts on its relay allocation, so it is never unconnected, and the
sidecar upgrades it (docs/sidecar.md has the design, its timers and why):

1. **Offer.** The *controlling* side of the pair (the smaller WireGuard public key, so both
   sides agree without talking) sends an offer through the tunnel: a fresh session id and
   probe key, its candidates, and a wall-clock moment ``start_at`` shortly ahead. The other
   side answers with its candidates. Both start probing at ``start_at``, so that each side's
   first probe leaves before the other's arrives (no conntrack clash, see the brief).
2. **Probe.** From the WireGuard port, every :data:`PROBE_INTERVAL`, each side pings every
   candidate of the other; each authentic ping is answered by a pong to wherever it came from,
   carrying that observed address. A pong validates a path only if it comes from exactly the
   candidate that was pinged, for a sequence number that was sent there and not yet answered.
3. **Nominate and switch.** The controlling side picks the best validated candidate (a private,
   same-LAN address over a public one) and tells the other side which of its own addresses
   to use (the one the pong observed); the other side accepts only an address from which it
   received an authentic ping in this session. Each side sets WireGuard's endpoint, and the
   other side (the last to switch) also starts a new WireGuard session on the direct path,
   which the relay never saw and so cannot carry. For :data:`REASSERT_GRACE` after that,
   relayed datagrams still in flight may pull WireGuard's endpoint back to the relay
   (roaming): when the daemon's sample shows it there, the direct endpoint is set again
   (``endpoint_reasserted``). The relay's address and port cannot tell this peer's datagrams
   from other peers' (one relay port per site), so nothing is rewritten on the way in. Without
   the new session a pull would echo: while pulled, a side sends through the relay, which
   pulls the other side, and so on, for as long as data flows both ways.
4. **Watch.** On a direct path, WireGuard's counters tell when this side sends data and hears
   nothing (:data:`SUSPECT_AFTER`); then it pings the direct endpoint every
   :data:`CHECK_INTERVAL`, and with no pong for :data:`DEAD_AFTER` it falls back: relay
   endpoint, a new WireGuard session through the relay (:class:`ResetSession`: the relay
   forwards a session only after it forwarded its handshake), a ``fallback`` message to the
   peer. After the grace, WireGuard's endpoint on the relay means the peer sends there: follow.
5. **Back off.** A failed attempt or a fallback waits :data:`BACKOFF_MIN` seconds, times
   :data:`BACKOFF_FACTOR` after each further failure, up to :data:`BACKOFF_MAX` (beyond NAT
   UDP timeouts, so that retries stop keeping a stale conntrack entry alive); an attempt
   that validated nothing waits at least :data:`CLASH_WAIT` (the stale entries of a
   conntrack clash, on one NAT or both, expire first); a direct path that holds
   :data:`STABLE_AFTER` resets it.
6. **Restarts.** A starting sidecar says hello, a stopping one bye (:meth:`Traversal.start`,
   :meth:`Traversal.stop`), so that both sides of a pair stay in step.
7. **Relay failover.** A peer may have a standby allocation on another relay. The daemon asks
   every relay where it sees WireGuard's socket each second (:meth:`Traversal.relay_asked`,
   :meth:`Traversal.relay_answered`); a relay that has answered nothing for
   :data:`RELAY_DEAD_AFTER` is down (:data:`RELAY_DEAD_UNHEARD` while it has not answered
   since this site's WireGuard came up: WireGuard first needs a handshake with it). A peer on
   a relay that is down moves to its other relay, if that one is up, and its WireGuard
   session is started anew (:class:`ResetSession`: the other relay has seen none of its
   handshakes, so it cannot have proven the two addresses).
   Both sides see the same relay die, so both move. Nothing moves back when the relay
   returns (no flap): a peer falls back to its plan's relay, when up, after a direct path dies.
   Peers the plan keeps relayed (mode ``relay``: two hard NATs) never offer.

A ``direct`` peer (a pair the plan connects directly) starts where WireGuard has it: on its
direct path (the plan's ``direct_endpoint``, or whatever WireGuard learned when that is null),
never moved to the relay at start. The controlling side gives it a session and probe key for
its check pings (a ``watch`` message), and it is watched like an upgraded path (4.); when it
dies it falls back to its relay and upgrades again like a punch pair.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshwright.wire.endpoint import format_endpoint

from .messages import (
    KEY_SIZE,
    MAGIC,
    MAX_CANDIDATES,
    PING,
    PONG,
    SESSION_SIZE,
    Control,
    MessageError,
    Probe,
    decode_control,
    decode_probe,
    encode_control,
    encode_probe,
    probe_session,
)

__all__ = [
    "MODES",
    "Action",
    "PeerConfig",
    "PeerLink",
    "Remap",
    "ResetSession",
    "SendControl",
    "SendProbe",
    "SetEndpoint",
    "Traversal",
]

Address = tuple[str, int]

# Timers, in seconds (docs/sidecar.md says why each has its value).
START_DELAY = 0.3  # offer -> agreed start: the offer's and answer's trip through the relay
MIN_LEAD = 0.1  # an offer arriving closer than this to its start moves the start
OFFER_TIMEOUT = 1.0  # an offer with no answer this long is sent again (no backoff)
OFFER_RETRY = 0.5  # after an unanswered offer: the peer's sidecar is (re)starting
PROBE_INTERVAL = 0.1  # pings to every candidate while an attempt runs
ATTEMPT_TIME = 3.0  # an attempt that validates nothing this long after its start fails
NOMINATE_GRACE = 0.15  # after a public path validates, wait this long for a private one
SUSPECT_AFTER = 0.75  # data sent on a direct path with nothing received this long: check it
CHECK_INTERVAL = 0.2  # pings to the direct endpoint while it is suspect
DEAD_AFTER = 1.0  # a suspect path with no pong this long is dead: fall back
# After a switch to direct: relayed datagrams still in flight (far more than a relay trip) may
# pull WireGuard's endpoint back to the relay; it is set to the direct one again meanwhile.
REASSERT_GRACE = 2.0
STABLE_AFTER = 60.0  # a direct path that held this long forgets earlier failures
BACKOFF_MIN, BACKOFF_FACTOR, BACKOFF_MAX = 2.0, 4.0, 128.0
# After an attempt that validated nothing (what a conntrack clash looks like): past Linux's
# 30 s unreplied-UDP timeout, since any earlier retry refreshes the stale entries.
CLASH_WAIT = 35.0
HELLO_AT = (0.0, 1.0, 3.0)  # after start: a peer's sidecar may be starting too; repeats are ignored
RELAY_KEEPALIVE = 20.0  # while direct: under the 30 s a Linux NAT keeps an unanswered mapping
KEEPALIVE_BYTES = 32  # a WireGuard keepalive: a transport header and tag, no payload
MAX_PONGS_PER_SECOND = 50  # per peer: an attacker replaying pings cannot make us a reflector
MAX_PEER_REFLEXIVE = 4  # per attempt: ports the peer's pings came from that it did not offer
PING_WINDOW = 1024  # a ping this far behind the newest one of its session counts as a replay
# A relay asked every second (the daemon's RELAY_CHECK) that answered nothing this long is down:
# four lost answers in a row, and the peers on it are over in well under 10 s.
RELAY_DEAD_AFTER = 4.0
# A relay not heard since this site's WireGuard came up (or the sidecar started) has no
# WireGuard session with it yet: the first ask waits for a handshake, and WireGuard sends a
# lost initiation again only after 5 s (REKEY_TIMEOUT). Silence proves death only after two
# such retries.
RELAY_DEAD_UNHEARD = 12.0


MODES = ("punch", "relay", "direct")


@dataclass(frozen=True)
class PeerConfig:
    """A peer with a relay allocation, as the plan gives it (``traversal.peers``)."""

    name: str
    public_key: str
    overlay_address: str
    relay_endpoint: Address  # this side's relay port: WireGuard's relayed endpoint
    relay: str = ""  # the relay of that allocation (the plan's choice)
    standby_endpoint: Address | None = None  # this side's port on the standby relay
    standby_relay: str = ""
    # punch: starts relayed, upgraded; relay: kept relayed (it only fails over); direct: starts
    # on its direct path (direct_endpoint, or what WireGuard learned), falls back, upgrades.
    mode: str = "punch"
    direct_endpoint: Address | None = None

    @property
    def upgrade(self) -> bool:
        """Whether the pair may go direct (the plan keeps relay pairs relayed)."""
        return self.mode != "relay"


@dataclass(frozen=True)
class SendControl:
    peer: str
    data: bytes


@dataclass(frozen=True)
class SendProbe:
    destination: Address
    data: bytes


@dataclass(frozen=True)
class SetEndpoint:
    peer: str
    public_key: str
    endpoint: Address


@dataclass(frozen=True)
class ResetSession:
    """Start the peer's WireGuard session anew (a handshake now): its path moved to a relay
    that has seen none of its handshakes."""

    peer: str
    public_key: str


@dataclass(frozen=True)
class Remap:
    """Ask the relays again where they see WireGuard's socket: this site's NAT mapping may
    have moved (a flushed or rebooted NAT, a conntrack clash), and the next offer must say
    where it is now."""


@dataclass(frozen=True)
class Log:
    peer: str
    text: str


Action = SendControl | SendProbe | SetEndpoint | ResetSession | Remap | Log


LAN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        *("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"),
        *("fc00::/7", "fe80::/10"),
    )
)


def is_private(address: Address) -> bool:
    """A candidate on a LAN (RFC 1918, ULA, link-local, CGNAT space): preferred when it works.
    Not ``ip.is_private``: that also counts the documentation ranges the lab uses as public."""
    ip = ipaddress.ip_address(address[0])
    return any(ip.version == net.version and ip in net for net in LAN_NETWORKS)


def _rank(address: Address) -> tuple[int, str, int]:
    return (0 if is_private(address) else 1, address[0], address[1])


@dataclass
class PeerLink:
    """One peer's state: path, endpoint, the attempt in progress, backoff, liveness."""

    config: PeerConfig
    controlling: bool
    path: str = "relay"  # relay | direct
    endpoint: Address | None = None
    phase: str = "idle"  # idle | offered | probing
    session: bytes | None = None
    key: bytes | None = None
    remote_candidates: tuple[Address, ...] = ()
    start: float = 0.0  # monotonic time probing starts
    agreed: float = 0.0  # the start both sides agreed on, in this side's monotonic time
    late: float | None = None  # how long after that moment this attempt's first pings left
    reflexive: int = 0  # candidates learned this attempt from the peer's pings
    deadline: float = 0.0
    next_ping: float = 0.0
    seq: int = 0
    outstanding: dict[int, tuple[Address, float]] = field(default_factory=dict)
    validated: dict[Address, tuple[float, Address]] = field(default_factory=dict)  # rtt, observed
    first_validated: float | None = None
    ping_sources: set[Address] = field(default_factory=set)
    ping_seqs: set[int] = field(default_factory=set)  # the peer's pings answered, this session
    next_attempt: float = 0.0
    failures: int = 0
    unanswered: int = 0  # offers in a row that got no answer
    direct_since: float | None = None
    reassert_until: float | None = None  # the grace after a switch to direct
    failed_session: bytes | None = None  # the session whose path death was counted
    last_proof: float | None = None
    rtt: float | None = None
    rx: int | None = None
    tx: int | None = None
    unanswered_since: float | None = None
    unanswered_bytes: int = 0
    suspect_since: float | None = None
    next_relay_keepalive: float = 0.0
    pong_budget: float = MAX_PONGS_PER_SECOND
    pong_budget_at: float = 0.0
    peer_run: bytes | None = None  # the peer sidecar's run, from its hello
    on_standby: bool = False  # the relay path is the standby allocation's
    counters: Counter[str] = field(default_factory=Counter)

    @property
    def relay_endpoint(self) -> Address:
        """The relay path in use: the plan's allocation, or its standby after a failover."""
        standby = self.config.standby_endpoint
        return standby if self.on_standby and standby is not None else self.config.relay_endpoint

    @property
    def relay(self) -> str:
        return self.config.standby_relay if self.on_standby else self.config.relay

    def is_relay_endpoint(self, endpoint: Address | None) -> bool:
        return endpoint is not None and endpoint in (
            self.config.relay_endpoint,
            self.config.standby_endpoint,
        )

    def status(self, now: float) -> dict[str, Any]:
        def age(t: float | None) -> float | None:
            return None if t is None else round(now - t, 3)

        return {
            "peer": self.config.name,
            "mode": self.config.mode,
            "path": self.path,
            "endpoint": None if self.endpoint is None else format_endpoint(*self.endpoint),
            "relay_endpoint": format_endpoint(*self.relay_endpoint),
            "relay": self.relay,
            "on_standby": self.on_standby,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 2),
            "last_proof_age_s": age(self.last_proof),
            "direct_for_s": age(self.direct_since),
            "phase": self.phase,
            "controlling": self.controlling,
            "attempts": self.counters["attempts"],
            "upgrades": self.counters["upgrades"],
            "fallbacks": self.counters["fallbacks"],
            "pings_sent": self.counters["pings"],
            "pongs_sent": self.counters["pongs"],
            "failures": self.failures,
            "next_attempt_in_s": (
                round(max(0.0, self.next_attempt - now), 3)
                if self.path == "relay"
                and self.phase == "idle"
                and self.controlling
                and self.config.upgrade
                else None
            ),
            "suspect": self.suspect_since is not None,
            "reasserted": self.counters["endpoint_reasserted"],
        }


def backoff(failures: int) -> float:
    """2, 8, 32, 128 s: one quick retry (a lost probe, a peer that restarted), then waits that
    outlast Linux's 30 s unreplied-UDP timeout by the third failure, so a conntrack clash
    (whose stale entries every retry refreshes) is over within a minute."""
    if not failures:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_MIN * BACKOFF_FACTOR ** (failures - 1))


class Traversal:
    """Every peer of one site. ``random`` gives fresh random bytes (``os.urandom``)."""

    def __init__(
        self,
        name: str,
        public_key: str,
        peers: Sequence[PeerConfig],
        random: Callable[[int], bytes],
    ) -> None:
        self.name = name
        self.public_key = public_key
        self._random = random
        self.candidates: tuple[Address, ...] = ()
        self.links: dict[str, PeerLink] = {}
        self.counters: Counter[str] = Counter()
        self.run = random(SESSION_SIZE)  # this run of the sidecar, named in its hellos
        self.hellos: list[float] = []
        # Per relay: since when it was asked and has not answered (absent: it answered), and
        # when it last answered.
        self.unanswered_since: dict[str, float] = {}
        self.answered_at: dict[str, float] = {}  # since this site's WireGuard came up
        self.relays_down: set[str] = set()  # found down, and not answering since
        # Per relay endpoint (one per relay: every peer through it shares it): when its NAT
        # mapping next needs a keepalive.
        self.keepalive_due: dict[Address, float] = {}
        self.configure(peers)

    def start(self, now: float) -> None:
        """The daemon started: every punch peer is on its relay here, every direct peer where
        WireGuard had it. Say hello to each peer (:data:`HELLO_AT`), so that it follows: a
        punch peer still direct would keep sending there and WireGuard would roam to it while
        this side's state says relay. A controlling peer also offers at once, instead of
        waiting for its offer to this side to time out, or sends its direct peer's watch."""
        self.hellos = [now + delay for delay in HELLO_AT]

    def stop(self) -> list[Action]:
        """The daemon stops: say bye to every peer, so that none probes alone."""
        self.hellos = []
        bye = encode_control(Control("bye", self.name, self.run))
        return [SendControl(name, bye) for name in self.links]

    # --- configuration --------------------------------------------------------------------

    def configure(
        self, peers: Sequence[PeerConfig], live: Mapping[str, Address | None] | None = None
    ) -> list[Action]:
        """Apply a new peer list: removed peers are dropped; new or changed punch and relay
        peers go to their relay; new or changed direct peers stay where WireGuard has them.
        ``live``: WireGuard's endpoints now, by peer. A punch or relay peer found elsewhere
        than on its relay (a direct path, or the other relay after a failover) starts a new
        session there: the relay forwards a session only after it forwarded its handshake."""
        actions: list[Action] = []
        wanted = {p.name: p for p in peers}
        for name in list(self.links):
            if name not in wanted:
                del self.links[name]
        for name, config in wanted.items():
            old = self.links.get(name)
            if old is not None and old.config == config:
                continue
            link = PeerLink(config, controlling=self.public_key < config.public_key)
            self.links[name] = link
            now_at = (live or {}).get(name)
            if config.mode == "direct":
                actions += self._keep_where_it_is(link, old, now_at)
                continue
            reset = now_at is not None and now_at != config.relay_endpoint
            actions += self._to_relay(link, "configured", reset=reset)
            if old is not None and old.path == "direct" and old.session is not None:
                # The peer still sends to us directly: tell it, so both start over on relays.
                message = Control("fallback", self.name, old.session)
                actions.append(SendControl(name, encode_control(message)))
        return actions

    def _keep_where_it_is(
        self, link: PeerLink, old: PeerLink | None, now_at: Address | None
    ) -> list[Action]:
        """A direct peer, new or changed: on its relay if WireGuard has it there (an earlier
        run fell back), else on its direct path, which nothing sets here (WireGuard has it,
        from the plan or from the peer's packets)."""
        name, config = link.config.name, link.config
        if old is not None and old.is_relay_endpoint(now_at) and not link.is_relay_endpoint(now_at):
            # On a relay the plan no longer gives it: onto the new one, a new session.
            return self._to_relay(link, "configured", reset=True)
        if now_at is not None and link.is_relay_endpoint(now_at):
            link.on_standby = now_at != config.relay_endpoint
            link.endpoint = now_at
            where = f" via {link.relay}" if link.relay else ""
            return [Log(name, f"relay (configured: WireGuard is there){where}")]
        link.path = "direct"
        link.endpoint = now_at or config.direct_endpoint
        if old is not None and old.path == "direct" and old.session is not None:
            # A reload: the pair's session and key go on (the peer's check pings use them).
            link.session, link.key, link.peer_run = old.session, old.key, old.peer_run
        shown = "WireGuard's" if link.endpoint is None else format_endpoint(*link.endpoint)
        return [Log(name, f"direct via {shown} (configured)"), *self._send_watch(link)]

    def _send_watch(self, link: PeerLink) -> list[Action]:
        """The controlling side of a direct pair on its direct path: the session and probe
        key both sides' check pings use (the pair had no offer to agree one)."""
        if (
            link.config.mode != "direct"
            or not link.controlling
            or link.path != "direct"
            or link.phase != "idle"
        ):
            return []
        if link.session is None:
            self._new_session(link)
        assert link.session is not None and link.key is not None
        message = Control("watch", self.name, link.session, link.key)
        return [SendControl(link.config.name, encode_control(message))]

    def set_candidates(self, candidates: Iterable[Address]) -> None:
        """This site's own candidates: LAN addresses, relay-observed mappings, public ones.
        At most what an offer may carry, public ones kept first (they reach other sites)."""
        kept = sorted(set(candidates), key=lambda c: (is_private(c), _rank(c)))[:MAX_CANDIDATES]
        self.candidates = tuple(sorted(kept, key=_rank))

    # --- relays' health -------------------------------------------------------------------

    def relay_asked(self, relay: str, now: float) -> None:
        """The daemon asked ``relay`` where it sees WireGuard's socket."""
        self.unanswered_since.setdefault(relay, now)

    def relay_answered(self, relay: str, now: float) -> None:
        """``relay`` answered: it is up (again; what moved away stays where it is)."""
        self.unanswered_since.pop(relay, None)
        self.answered_at[relay] = now
        if relay in self.relays_down:
            self.relays_down.discard(relay)
            self.counters["relays_back"] += 1

    def wireguard_gone(self) -> None:
        """The daemon could not ask: this site's own WireGuard is down. Its silence says
        nothing of the relays, and once it is back every relay needs a new handshake."""
        self.unanswered_since.clear()
        self.answered_at.clear()

    def relay_up(self, relay: str, now: float) -> bool:
        since = self.unanswered_since.get(relay)
        return not relay or since is None or now - since < self._dead_after(relay)

    def _dead_after(self, relay: str) -> float:
        return RELAY_DEAD_AFTER if relay in self.answered_at else RELAY_DEAD_UNHEARD

    def _failovers(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for relay, since in self.unanswered_since.items():
            if now - since >= self._dead_after(relay) and relay not in self.relays_down:
                self.relays_down.add(relay)
                self.counters["relays_down"] += 1
        for link in self.links.values():
            if link.config.standby_endpoint is None or self.relay_up(link.relay, now):
                continue
            other = link.config.relay if link.on_standby else link.config.standby_relay
            silent_since = self.unanswered_since[link.relay]
            if other in self.unanswered_since or self.answered_at.get(other, -1.0) < silent_since:
                # Both silent (or the other not heard since this one went quiet): perhaps this
                # site's own WireGuard is what is down. Nothing better to go to.
                continue
            link.counters["failovers"] += 1
            if link.path != "relay":
                # Direct: only where a fallback would go changes.
                link.on_standby = not link.on_standby
                actions.append(Log(link.config.name, f"relay {link.relay} is the fallback now"))
                continue
            was = link.relay
            link.on_standby = not link.on_standby
            if link.phase != "idle":
                # The attempt's messages went through the dead relay: drop it, offer again.
                link.phase = "idle"
                link.outstanding.clear()
            link.next_attempt = max(link.next_attempt, now + BACKOFF_MIN)
            actions += self._to_relay(link, f"relay {was} is down", reset=True)
        return actions

    # --- time -----------------------------------------------------------------------------

    def next_wakeup(self, now: float) -> float:
        """When :meth:`tick` next has something to do (the daemon sleeps until then, so that
        the first probes leave at the agreed moment, not up to a loop interval late)."""
        times = [now + 1.0, *self.hellos[:1]]
        for link in self.links.values():
            if link.phase == "probing":
                times.append(max(link.next_ping, link.start))
                times.append(link.deadline)
            elif link.phase == "offered":
                times.append(link.deadline)
            elif link.path == "direct" and link.suspect_since is not None:
                times.append(link.next_ping)
            elif link.path == "direct":
                times.append(link.next_relay_keepalive)
            elif (
                link.path == "relay"
                and link.controlling
                and link.config.upgrade
                and self.candidates
            ):
                times.append(link.next_attempt)
        return min(times)

    def reasserting(self, now: float) -> bool:
        """Whether a peer is in the grace after a switch to direct: the daemon then samples
        WireGuard's endpoints often, so that one a relayed datagram pulled back to the relay
        is set again within a sample (:meth:`on_counters`)."""
        return any(
            link.path == "direct" and link.reassert_until is not None and now < link.reassert_until
            for link in self.links.values()
        )

    def tick(self, now: float, wall: float) -> list[Action]:
        actions: list[Action] = []
        if self.hellos and now >= self.hellos[0]:
            del self.hellos[0]
            hello = encode_control(Control("hello", self.name, self.run))
            actions += [SendControl(name, hello) for name in self.links]
        actions += self._failovers(now)
        for link in self.links.values():
            actions += self._tick_link(link, now, wall)
        return actions

    def _tick_link(self, link: PeerLink, now: float, wall: float) -> list[Action]:
        if link.phase == "idle" and link.path == "relay":
            if (
                link.controlling
                and link.config.upgrade
                and self.candidates
                and now >= link.next_attempt
            ):
                return self._offer(link, now, wall)
            return []
        if link.phase == "offered":
            return self._no_answer(link, now) if now >= link.deadline else []
        if link.phase == "probing":
            return self._probe_round(link, now)
        if link.path == "direct":
            return self._watch(link, now)
        return []

    def _offer(self, link: PeerLink, now: float, wall: float) -> list[Action]:
        self._new_session(link)
        link.phase = "offered"
        link.deadline = now + OFFER_TIMEOUT
        link.start = link.agreed = now + START_DELAY
        link.counters["attempts"] += 1
        assert link.session is not None and link.key is not None
        offer = Control(
            "offer",
            self.name,
            link.session,
            link.key,
            self.candidates,
            wall + START_DELAY,
            run=self.run,
        )
        return [SendControl(link.config.name, encode_control(offer))]

    def _new_session(self, link: PeerLink) -> None:
        self._set_session(link, self._random(SESSION_SIZE), self._random(KEY_SIZE))

    @staticmethod
    def _set_session(link: PeerLink, session: bytes, key: bytes) -> None:
        link.session, link.key = session, key
        link.outstanding.clear()
        link.validated.clear()
        link.ping_sources.clear()
        link.ping_seqs.clear()
        link.first_validated = None
        link.late = None
        link.reflexive = 0
        link.seq = 0

    def _begin_probing(self, link: PeerLink, now: float) -> None:
        link.phase = "probing"
        link.deadline = link.start + ATTEMPT_TIME
        link.next_ping = link.start

    def _probe_round(self, link: PeerLink, now: float) -> list[Action]:
        actions: list[Action] = []
        if link.controlling and link.validated:
            assert link.first_validated is not None
            best = min(link.validated, key=_rank)
            if is_private(best) or now >= link.first_validated + NOMINATE_GRACE:
                return self._nominate(link, best, now)
        if now >= link.deadline:
            return self._fail(link, now, "no path validated")
        if now >= link.next_ping:
            if link.late is None:  # the first round: how far off the agreed moment it left
                link.late = now - link.agreed
            # A peer's LAN address may be ours too (two LANs, one numbering): that ping
            # would reach this very socket and "validate" a path to ourselves.
            targets = [c for c in link.remote_candidates if c not in self.candidates]
            actions += self._pings(link, targets, now)
            link.next_ping = now + PROBE_INTERVAL
        return actions

    def _pings(self, link: PeerLink, targets: Iterable[Address], now: float) -> list[Action]:
        assert link.session is not None and link.key is not None
        actions: list[Action] = []
        for target in targets:
            link.seq = (link.seq + 1) & 0xFFFFFFFF
            link.outstanding[link.seq] = (target, now)
            probe = Probe(PING, link.session, link.seq)
            actions.append(SendProbe(target, encode_probe(probe, link.key)))
            link.counters["pings"] += 1
        # Only recent pings can be answered; older ones are forgotten (bounded memory).
        for seq in [s for s, (_, sent) in link.outstanding.items() if now - sent > ATTEMPT_TIME]:
            del link.outstanding[seq]
        return actions

    def _nominate(self, link: PeerLink, best: Address, now: float) -> list[Action]:
        rtt, observed = link.validated[best]
        assert link.session is not None
        message = Control("nominate", self.name, link.session, use=observed)
        actions: list[Action] = [SendControl(link.config.name, encode_control(message))]
        return actions + self._to_direct(link, best, rtt, now)

    def _to_direct(
        self, link: PeerLink, endpoint: Address, rtt: float | None, now: float
    ) -> list[Action]:
        link.phase = "idle"
        link.path = "direct"
        link.endpoint = endpoint
        link.rtt = rtt
        link.direct_since = link.last_proof = now
        link.reassert_until = now + REASSERT_GRACE
        link.unanswered_since = link.suspect_since = None
        link.unanswered_bytes = 0
        link.counters["upgrades"] += 1
        name, key = link.config.name, link.config.public_key
        actions: list[Action] = [SetEndpoint(name, key, endpoint)]
        if not link.controlling:
            # The side that switches last starts a session on the direct path, which the relay
            # never saw and cannot forward: a relayed datagram that pulls either WireGuard
            # back to the relay for a moment (roaming) then makes the other side send
            # nothing through the relay that the relay carries back, so the pull cannot echo
            # between the two (and the old session's datagrams still in flight here are
            # dropped instead of pulling). The controlling side keeps its session: its
            # nominate message may still be in WireGuard's queue.
            actions += self._restart_wireguard(link)
        return [*actions, Log(name, f"direct via {format_endpoint(*endpoint)}")]

    def _to_relay(self, link: PeerLink, why: str, reset: bool = False) -> list[Action]:
        """Onto the relay path in use; ``reset``: a relay that has not seen this session."""
        link.path = "relay"
        link.phase = "idle"
        link.endpoint = link.relay_endpoint
        link.direct_since = link.reassert_until = None
        link.suspect_since = link.unanswered_since = None
        name, key = link.config.name, link.config.public_key
        actions: list[Action] = [SetEndpoint(name, key, link.relay_endpoint)]
        if reset:
            actions += self._restart_wireguard(link)
        # "relay (why)" first: tests and bench/sidecar_bench.py read the journal for it.
        where = f" via {link.relay}" if link.relay else ""
        return [*actions, Log(name, f"relay ({why}){where}")]

    def _restart_wireguard(self, link: PeerLink) -> list[Action]:
        """WireGuard's session with the peer started anew, and something for WireGuard to send
        (a hello, which the peer takes as a repeated one), so that it starts the new session
        at once. A side with nothing of its own to send would otherwise wait: an open site has
        no keepalive, and the peer goes on sending with the old session's keys, which makes
        it start a new one only after 15 s without an answer; and a relay that knows neither
        site's address proves them only from both sides' handshakes."""
        name, key = link.config.name, link.config.public_key
        hello = encode_control(Control("hello", self.name, self.run))
        return [ResetSession(name, key), SendControl(name, hello)]

    def _no_answer(self, link: PeerLink, now: float) -> list[Action]:
        # Most often the peer's sidecar is (re)starting: ask again soon (and its hello brings
        # the offer forward anyway). But the peer may have answered into a broken relayed
        # path and be probing alone, which leaves stale conntrack entries on this site's NAT:
        # so further unanswered offers back off like failed attempts.
        link.phase = "idle"
        link.unanswered += 1
        wait = OFFER_RETRY if link.unanswered == 1 else backoff(link.unanswered - 1)
        link.next_attempt = now + wait
        link.counters["unanswered_offers"] += 1
        return [Log(link.config.name, f"offer unanswered; again in {wait:g} s")]

    def _fail(self, link: PeerLink, now: float, why: str) -> list[Action]:
        link.phase = "idle"
        link.failures += 1
        wait = backoff(link.failures)
        if not link.validated:
            # Pings every 0.1 s for 3 s: a lost probe or two never leaves a whole attempt
            # unanswered. A filter or a conntrack clash (a first ping that arrived before a
            # side's own left) does, on one NAT or on both, and only silence cures a clash: a
            # retry within the unreplied timeout refreshes the stale entries, whether or not
            # some of the peer's pings got in (one NAT lets them in, the other drops the
            # pongs). A side that validated a path (the one that waits for a nomination) had
            # no clash.
            wait = max(wait, CLASH_WAIT)
        if not link.ping_sources:
            why += ", nothing heard"
        if link.late is not None:
            why += f", first pings {link.late * 1000:.0f} ms after the agreed start"
        link.next_attempt = now + wait
        link.counters["failed_attempts"] += 1
        return [Remap(), Log(link.config.name, f"attempt failed ({why}); next in {wait:.0f} s")]

    def _watch(self, link: PeerLink, now: float) -> list[Action]:
        if link.direct_since is None:  # a direct peer as configured: watched from now
            link.direct_since = now
        if now - link.direct_since >= STABLE_AFTER:
            link.failures = 0
        if link.reassert_until is not None and now >= link.reassert_until:
            # Relayed datagrams in flight at the switch have arrived. From now on one from
            # the relay means the peer sends there: WireGuard follows it, and so do we.
            link.reassert_until = None
        if link.suspect_since is None:
            return self._relay_keepalive(link, now)
        if now - link.suspect_since >= DEAD_AFTER:
            return self._fall_back(link, now, "direct path silent")
        # No session (a direct peer whose watch has not come): nothing can prove the path,
        # and the fallback comes after DEAD_AFTER.
        if now >= link.next_ping and link.endpoint is not None and link.key is not None:
            link.next_ping = now + CHECK_INTERVAL
            return self._pings(link, [link.endpoint], now)
        return []

    def _relay_keepalive(self, link: PeerLink, now: float) -> list[Action]:
        """Keep this side's NAT mapping towards the relay: on fallback the relay's first
        datagram then finds it, instead of clashing with its expiry. One keepalive per relay
        endpoint, however many peers on a direct path share it."""
        if now < link.next_relay_keepalive:
            return []
        link.next_relay_keepalive = now + RELAY_KEEPALIVE
        target = link.relay_endpoint
        if now < self.keepalive_due.get(target, 0.0):
            return []
        self.keepalive_due[target] = now + RELAY_KEEPALIVE
        link.counters["relay_keepalives"] += 1
        return [SendProbe(target, MAGIC)]

    def _fall_back(self, link: PeerLink, now: float, why: str) -> list[Action]:
        link.counters["fallbacks"] += 1
        link.failed_session = link.session
        link.failures += 1
        link.next_attempt = now + backoff(link.failures)
        # Back to the plan's relay when it is up, else the standby. Always a new session: a
        # relay forwards a session's data only after it forwarded its handshake, and this one
        # may have been made (or rekeyed, every two minutes) on the direct path, or the relay
        # may never have seen the pair at all (a direct pair, a standby relay).
        link.on_standby = link.config.standby_endpoint is not None and not self.relay_up(
            link.config.relay, now
        )
        # The message goes through WireGuard: after the switch, or it takes the dead path.
        actions = [*self._to_relay(link, why, reset=True), Remap()]
        if link.session is not None:
            message = Control("fallback", self.name, link.session)
            actions.append(SendControl(link.config.name, encode_control(message)))
        return actions

    # --- WireGuard's counters -------------------------------------------------------------

    def on_counters(
        self, peer: str, rx: int, tx: int, now: float, endpoint: Address | None = None
    ) -> list[Action]:
        """The peer's transfer counters (bytes received and sent) and WireGuard's endpoint
        for it, sampled by the daemon."""
        link = self.links.get(peer)
        if link is None:
            return []
        previous_rx, previous_tx = link.rx, link.tx
        link.rx, link.tx = rx, tx
        if link.path != "direct":
            return self._follow_to_direct(link, endpoint, now)
        if link.is_relay_endpoint(endpoint):
            if (
                link.reassert_until is not None
                and now < link.reassert_until
                and link.endpoint is not None
            ):
                # A relayed datagram that was in flight at the switch: WireGuard roamed back
                # to the relay. The switch stands: set the direct endpoint again.
                link.counters["endpoint_reasserted"] += 1
                return [SetEndpoint(link.config.name, link.config.public_key, link.endpoint)]
            # WireGuard followed an authenticated packet from the relay: the peer is there
            # (its fallback message may not have come through: a NAT that moved, say).
            # Not counted as a failure: a restarted peer is there too. A fallback message
            # that follows counts it.
            link.counters["fallbacks"] += 1
            link.next_attempt = max(link.next_attempt, now + BACKOFF_MIN)
            return [*self._to_relay(link, "peer is on the relay"), Remap()]
        if endpoint is not None and endpoint != link.endpoint:
            # WireGuard roamed to another direct address (the peer's NAT moved, or a direct
            # peer's endpoint learned from its packets): checks go where WireGuard sends.
            link.endpoint = endpoint
            link.counters["endpoint_learned"] += 1
        if previous_rx is None or previous_tx is None:
            return []
        if rx != previous_rx:
            link.last_proof = now
            link.unanswered_since = link.suspect_since = None
            link.unanswered_bytes = 0
            return []
        # Keepalives alone prove nothing missing (WireGuard does not answer them): only data
        # sent and not answered makes a path suspect.
        if tx - previous_tx > KEEPALIVE_BYTES:
            link.unanswered_bytes += tx - previous_tx
            if link.unanswered_since is None:
                link.unanswered_since = now
        if (
            link.suspect_since is None
            and link.unanswered_since is not None
            and link.unanswered_bytes > 2 * KEEPALIVE_BYTES
            and now - link.unanswered_since >= SUSPECT_AFTER
        ):
            link.suspect_since = now
            link.next_ping = now
            link.counters["suspicions"] += 1
            return self._watch(link, now)
        return []

    def _follow_to_direct(
        self, link: PeerLink, endpoint: Address | None, now: float
    ) -> list[Action]:
        """WireGuard roamed to a direct address while this side is on its relay: the peer
        sends from there (WireGuard authenticated it), so the peer is direct; its nomination
        got lost, say, in a relayed path that broke. Follow it, and let the watch prove the
        path or drop it. Not for a sidecar that has had no session with the peer yet (a
        restart: hello sorts that out), nor before a backoff has run out (a path that just
        died one way would come and go)."""
        if (
            endpoint is None
            or not link.config.upgrade
            or link.is_relay_endpoint(endpoint)
            or link.phase != "idle"
            or link.session is None
            or now < link.next_attempt
        ):
            return []
        link.counters["followed"] += 1
        return [
            *self._to_direct(link, endpoint, None, now),
            Log(link.config.name, "followed the peer to the direct path"),
        ]

    # --- control messages -----------------------------------------------------------------

    def on_control(self, source: str, datagram: bytes, now: float, wall: float) -> list[Action]:
        """A control message from overlay address ``source`` (WireGuard authenticated it)."""
        try:
            message = decode_control(datagram)
        except MessageError:
            self.counters["dropped_control_malformed"] += 1
            return []
        link = self.links.get(message.sender)
        if link is None or link.config.overlay_address != source:
            self.counters["dropped_control_stranger"] += 1
            return []
        handler = {
            "offer": self._on_offer,
            "answer": self._on_answer,
            "nominate": self._on_nominate,
            "fallback": self._on_fallback,
            "hello": self._on_hello,
            "bye": self._on_bye,
            "watch": self._on_watch,
        }[message.type]
        return handler(link, message, now, wall)

    def _on_offer(self, link: PeerLink, message: Control, now: float, wall: float) -> list[Action]:
        if link.controlling or not link.config.upgrade:
            self.counters["dropped_control_unexpected"] += 1
            return []
        actions: list[Action] = []
        if link.path == "direct":
            # The controlling side offers only from its relay: follow it there, then upgrade.
            actions += self._to_relay(link, "peer offered anew")
        assert message.key is not None
        self._set_session(link, message.session, message.key)
        link.peer_run = message.run or link.peer_run  # its hellos from this run repeat it
        link.remote_candidates = message.candidates
        assert message.start_at is not None
        # Both sides must send their first probes at the same moment (the conntrack clash):
        # an offer that came too late for its start moves the start, and the answer says so.
        # Never far ahead: a skewed clock costs at most the attempt.
        start_at = message.start_at
        if start_at - wall < MIN_LEAD:
            # The offer's trip (it left START_DELAY before its start) took long: the answer's
            # will take about as long, and the start must come after it arrives.
            trip = min(max(wall - (start_at - START_DELAY), 0.0), OFFER_TIMEOUT)
            start_at = wall + min(trip + START_DELAY, OFFER_TIMEOUT)
        link.start = link.agreed = now + min(start_at - wall, OFFER_TIMEOUT)
        link.counters["attempts"] += 1
        self._begin_probing(link, now)
        answer = Control(
            "answer",
            self.name,
            message.session,
            candidates=self.candidates,
            start_at=start_at,
            run=self.run,
        )
        return [*actions, SendControl(link.config.name, encode_control(answer))]

    def _on_answer(self, link: PeerLink, message: Control, now: float, wall: float) -> list[Action]:
        if not link.controlling or link.phase != "offered" or message.session != link.session:
            self.counters["dropped_control_unexpected"] += 1
            return []
        link.remote_candidates = message.candidates
        link.peer_run = message.run or link.peer_run  # its hellos from this run repeat it
        link.unanswered = 0
        if message.start_at is not None:  # later when the offer came late; never earlier
            # An answer that comes after the agreed moment starts this side late: the peer's
            # first pings may have reached this side's NAT before its own left (a clash).
            lead = message.start_at - wall
            link.agreed = max(link.agreed, now + lead)
            link.start = max(link.start, now + min(max(lead, 0.0), OFFER_TIMEOUT))
        self._begin_probing(link, now)
        return []

    def _on_nominate(
        self, link: PeerLink, message: Control, now: float, wall: float
    ) -> list[Action]:
        use = message.use
        if (
            link.controlling
            or message.session != link.session
            or use is None
            or use not in link.ping_sources
        ):
            # Only an address that proved itself with an authentic ping in this session.
            self.counters["dropped_control_unexpected"] += 1
            return []
        # Unknown until a pong from there: the first check ping measures it.
        rtt = link.validated[use][0] if use in link.validated else None
        return self._to_direct(link, use, rtt, now)

    def _on_fallback(
        self, link: PeerLink, message: Control, now: float, wall: float
    ) -> list[Action]:
        if message.session != link.session or link.phase != "idle":
            self.counters["dropped_control_unexpected"] += 1
            return []
        # The path died: back off, even when WireGuard's roaming told us first (but once,
        # when both sides noticed it).
        if link.failed_session != link.session:
            link.failed_session = link.session
            link.failures += 1
            link.next_attempt = now + backoff(link.failures)
        if link.path != "direct":
            return []
        link.counters["fallbacks"] += 1
        return [*self._to_relay(link, "peer fell back"), Remap()]

    def _on_hello(self, link: PeerLink, message: Control, now: float, wall: float) -> list[Action]:
        if message.session == link.peer_run:
            self.counters["hello_repeated"] += 1
            return self._send_watch(link)  # in case the first one was lost
        link.peer_run = message.session
        if link.path == "direct" and link.config.mode == "direct":
            # The restarted peer kept WireGuard's endpoint, so the pair stays direct; its
            # sidecar lost the session its check pings need.
            return self._send_watch(link)
        if link.path == "direct":
            # Not a failure of the path: the peer offers (or is offered) anew at once.
            return self._to_relay(link, "peer restarted")
        if link.controlling and link.phase == "idle" and link.failures == 0:
            link.unanswered = 0
            # An offer to the starting sidecar went unanswered: offer again now. An attempt
            # under way goes on (the peer may have answered it already); after failures the
            # backoff runs on, so an earlier attempt's stale conntrack entries expire first.
            link.next_attempt = min(link.next_attempt, now)
        return []

    def _on_bye(self, link: PeerLink, message: Control, now: float, wall: float) -> list[Action]:
        link.counters["peer_stopped"] += 1
        if link.phase == "idle":
            return []  # a direct path carries on while the peer's sidecar is away
        # Probing alone, our pings would reach the peer's NAT before any of its own: the
        # conntrack clash, for 30 s. Drop the attempt; the peer's hello brings the next one.
        link.phase = "idle"
        link.outstanding.clear()
        link.next_attempt = now + BACKOFF_MIN
        return [Log(link.config.name, "peer stopped: attempt dropped")]

    def _on_watch(self, link: PeerLink, message: Control, now: float, wall: float) -> list[Action]:
        if (
            link.controlling
            or link.config.mode != "direct"
            or link.path != "direct"
            or link.phase != "idle"
            or message.key is None
        ):
            self.counters["dropped_control_unexpected"] += 1
            return []
        if message.session == link.session:
            self.counters["watch_repeated"] += 1
            return []
        self._set_session(link, message.session, message.key)
        return []

    # --- probes ---------------------------------------------------------------------------

    def on_probe(self, source: Address, datagram: bytes, now: float) -> list[Action]:
        """A datagram that reached the WireGuard port and starts with the probe magic."""
        session = probe_session(datagram)
        link = next(
            (k for k in self.links.values() if session is not None and k.session == session),
            None,
        )
        if link is None or link.key is None:
            self.counters["dropped_probe_unknown"] += 1
            return []
        try:
            probe = decode_probe(datagram, link.key)
        except MessageError:
            self.counters["dropped_probe_forged"] += 1
            return []
        if probe.kind == PING:
            return self._on_ping(link, probe, source, now)
        return self._on_pong(link, probe, source, now)

    def _on_ping(self, link: PeerLink, probe: Probe, source: Address, now: float) -> list[Action]:
        # Every ping has a fresh sequence number: one seen before (from anywhere) is a replay,
        # and answering it would make us a reflector towards whatever address it came from.
        newest = max(link.ping_seqs, default=0)
        if probe.seq in link.ping_seqs or probe.seq <= newest - PING_WINDOW:
            self.counters["dropped_probe_replay"] += 1
            return []
        link.pong_budget = min(
            MAX_PONGS_PER_SECOND,
            link.pong_budget + (now - link.pong_budget_at) * MAX_PONGS_PER_SECOND,
        )
        link.pong_budget_at = now
        if link.pong_budget < 1:
            self.counters["dropped_probe_rate"] += 1
            return []
        link.pong_budget -= 1
        link.ping_seqs.add(probe.seq)
        if len(link.ping_seqs) > 2 * PING_WINDOW:
            newest = max(link.ping_seqs)
            link.ping_seqs = {s for s in link.ping_seqs if s > newest - PING_WINDOW}
        link.ping_sources.add(source)
        assert link.key is not None
        pong = Probe(PONG, probe.session, probe.seq, source)
        link.counters["pongs"] += 1
        actions: list[Action] = [SendProbe(source, encode_probe(pong, link.key))]
        if (
            link.phase == "probing"
            and source not in link.remote_candidates
            and source not in self.candidates
            and source[0] != link.config.overlay_address  # through the tunnel itself
            and link.reflexive < MAX_PEER_REFLEXIVE
        ):
            # The peer's pings leave from a port it did not offer (its NAT gave the flow a
            # new one: a clash there). Ping that port too, at once (a peer-reflexive candidate,
            # as in ICE), so this side can validate, and nominate, what actually arrives. An
            # authentic ping is needed; a pong is still needed from exactly there.
            link.remote_candidates = (*link.remote_candidates, source)
            link.reflexive += 1
            link.counters["peer_reflexive"] += 1
            actions += self._pings(link, [source], now)
        return actions

    def _on_pong(self, link: PeerLink, probe: Probe, source: Address, now: float) -> list[Action]:
        sent = link.outstanding.get(probe.seq)
        if sent is None or sent[0] != source or probe.observed is None:
            # A replayed pong, or one from somewhere we did not ping: it proves nothing (and
            # does not use up the sequence number, so a copy cannot beat the genuine pong).
            self.counters["dropped_probe_unexpected"] += 1
            return []
        del link.outstanding[probe.seq]
        rtt = now - sent[1]
        if link.path == "direct" and source == link.endpoint:
            link.last_proof = now
            link.rtt = rtt
            link.suspect_since = link.unanswered_since = None
            link.unanswered_bytes = 0
            return []
        if link.phase == "probing":
            if link.first_validated is None:
                link.first_validated = now
            link.validated[source] = (rtt, probe.observed)
        return []

    # --- status ---------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        return {
            "site": self.name,
            "candidates": [format_endpoint(*c) for c in self.candidates],
            "peers": {name: link.status(now) for name, link in sorted(self.links.items())},
            "counters": dict(sorted(self.counters.items())),
        }
