"""Tests for meshwright.site.sidecar.traversal: the per-peer state machine, in a simulation.

The harness below is deterministic: a fake clock that advances in steps of the daemon's loop
interval, two sites (alpha and bravo) whose :class:`Traversal` cores are ticked, fed WireGuard's
counters every :data:`SAMPLE` seconds (every :data:`SAMPLE_GRACE` while the core is in the grace
after a switch to direct, as the daemon does) and given every probe and control message that
reaches them, and a tiny network between them:

* each site has a private address on a LAN, behind a NAT with a public address. The NAT maps
  endpoint-independently (an inside address:port keeps one public port, its own if free) and
  filters address-and-port-dependently (a packet from outside gets in only if the inside sent
  to exactly that address:port before, within the conntrack timeouts: 30 s unreplied, 120 s
  replied). With ``clash`` it behaves like Linux conntrack: an inbound packet that is filtered
  leaves an unreplied entry, and a later outbound packet to that remote gets a new public port;
* two sites can share one LAN and one NAT (which hairpins: a packet to its own public address
  is translated and filtered like one from outside);
* ``cut`` drops everything between the two sites' public addresses, ``cut_from`` only what
  leaves that public address for the other;
* the relay always delivers, after ``relay_delay``.

WireGuard is modelled by a record per site: its endpoint for the peer (SetEndpoint sets it;
like WireGuard it also roams to the source of any packet it accepts, a relayed one included),
rx/tx byte counters, and sessions: a packet carries its sender's session, a site accepts the
sessions it has keys for, and the relay carries only sessions whose handshake it forwarded (a
per-site relay learns a session's indices from its handshake). ResetSession gives both sides
a new session at once (the handshake takes no time here), through the relay when the
resetting side's endpoint is there; the resetting side forgets the old one, the other keeps
it (WireGuard's previous keypair). Control messages
travel as WireGuard data to wherever the sending site's WireGuard endpoint points at the moment
the daemon sends them (the daemon writes them to a socket on the overlay address).
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import ipaddress
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwright.site.sidecar import traversal
from meshwright.site.sidecar.messages import (
    MAGIC,
    PING,
    PONG,
    Control,
    Probe,
    decode_control,
    decode_probe,
    encode_control,
    encode_probe,
)
from meshwright.site.sidecar.traversal import (
    CLASH_WAIT,
    MAX_PEER_REFLEXIVE,
    OFFER_TIMEOUT,
    Action,
    Log,
    PeerConfig,
    ResetSession,
    SendControl,
    SendProbe,
    SetEndpoint,
    Traversal,
    backoff,
)
from meshwright.wire.endpoint import format_endpoint

Address = tuple[str, int]

T0 = 1000.0  # the monotonic clock at the start of every run
WALL = 1_764_526_000.0 - T0  # wall clock = monotonic + WALL (+ a site's skew)
STEP = 0.02  # the daemon's loop interval: cores are ticked this often
SAMPLE = 0.25  # the daemon samples WireGuard's counters this often
SAMPLE_GRACE = 0.1  # and this often in the grace after a switch to direct (daemon.SAMPLE_GRACE)
WG = 51820
RELAY = "198.51.100.200"
UNREPLIED_TIMEOUT = 30.0  # nf_conntrack_udp_timeout
REPLIED_TIMEOUT = 120.0  # nf_conntrack_udp_timeout_stream
KEEPALIVE = 32
LAN = ipaddress.ip_network("10.0.0.0/8")  # sites' private addresses

# Base64 WireGuard keys, chosen so that alpha's is the smaller one: alpha is controlling.
KEY_ALPHA = "AAAA" + "a" * 39 + "="
KEY_BETA = "zzzz" + "a" * 39 + "="


# --- the network ---------------------------------------------------------------------------


@dataclass
class Entry:
    port: int
    last: float
    replied: bool = False


class Nat:
    """Endpoint-independent mapping, address-and-port-dependent filtering, optional clash."""

    def __init__(self, public: str, *, clash: bool = False, hairpin: bool = True) -> None:
        self.public = public
        self.clash = clash
        self.hairpin = hairpin
        self.entries: dict[tuple[Address, Address], Entry] = {}  # (inside, remote)
        self.strays: dict[tuple[Address, int], float] = {}  # (remote, public port): unreplied
        self.ports: dict[Address, int] = {}  # inside -> its public port
        self.next_port = 61000
        self.clashes = 0

    def _expire(self, now: float) -> None:
        for key, entry in list(self.entries.items()):
            if now - entry.last > (REPLIED_TIMEOUT if entry.replied else UNREPLIED_TIMEOUT):
                del self.entries[key]
        for key, last in list(self.strays.items()):
            if now - last > UNREPLIED_TIMEOUT:
                del self.strays[key]

    def _fresh_port(self) -> int:
        self.next_port += 1
        return self.next_port

    def outbound(self, inside: Address, remote: Address, now: float) -> Address:
        self._expire(now)
        entry = self.entries.get((inside, remote))
        if entry is None:
            port = self.ports.get(inside)
            if port is None:
                taken = set(self.ports.values())
                port = inside[1] if inside[1] not in taken else self._fresh_port()
                self.ports[inside] = port
            if (remote, port) in self.strays:
                # The reply tuple is the unreplied inbound entry's: Linux picks a new port.
                port = self._fresh_port()
                self.clashes += 1
            entry = self.entries[(inside, remote)] = Entry(port, now)
        entry.last = now
        return (self.public, entry.port)

    def inbound(self, remote: Address, port: int, now: float) -> Address | None:
        self._expire(now)
        for (inside, peer), entry in self.entries.items():
            if peer == remote and entry.port == port:
                entry.last = now
                entry.replied = True
                return inside
        if self.clash:
            self.strays[(remote, port)] = now  # a retry refreshes it (tailscale#20910)
        return None


@dataclass
class Site:
    name: str
    key: str
    overlay: str
    private: Address
    lan: str
    nat: Nat
    relay_endpoint: Address  # its relay endpoint (its site port on the relay)
    mode: str = "punch"  # the pair's, from the plan
    direct_endpoint: Address | None = None  # direct mode: where WireGuard starts
    skew: float = 0.0  # its wall clock's error
    keepalive: float | None = None  # WireGuard's persistent keepalive
    data_every: float | None = None  # sends data to the peer this often
    data_size: int = 200
    core: Traversal = field(init=False)
    wg_endpoint: Address | None = None
    session: int = 0  # the session it sends with
    accepts: set[int] = field(default_factory=lambda: {0})  # the sessions it has keys for
    rx: int = 0
    tx: int = 0
    last_sent: float = T0
    next_data: float = T0
    sampled_at: float = T0 - 1.0
    actions: list[tuple[float, Action]] = field(default_factory=list)
    probes_in: list[tuple[float, Address, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Wg:
    """A WireGuard datagram (data, keepalive, or a control message inside it)."""

    sender: str
    size: int
    control: bytes | None = None
    session: int = 0


class Sim:
    def __init__(
        self,
        a: Site,
        b: Site,
        *,
        net_delay: float = 0.02,
        lan_delay: float = 0.0005,
        relay_delay: float = 0.02,
        seed: int = 1,
    ) -> None:
        self.a, self.b = a, b
        self.sites = {a.name: a, b.name: b}
        self.net_delay, self.lan_delay, self.relay_delay = net_delay, lan_delay, relay_delay
        self.relay_delay_from: dict[str, float] = {}  # a site's own relay delay, if not the above
        self.cut = False
        self.cut_from: str | None = None
        self.step = 0
        self.now = T0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.delivered: list[tuple[float, str, Address, str]] = []  # time, site, source, kind
        self.rng = random.Random(seed)
        # A direct pair's first session was never through the relay.
        self.relay_sessions: set[int] = set() if a.mode == "direct" else {0}
        self.sessions = itertools.count(1)
        self.dropped: Counter[str] = Counter()
        for site in (a, b):
            self._start(site)

    def _start(self, site: Site, first: bool = True) -> None:
        """The daemon's start: a core configured with WireGuard's endpoint as it is (a punch
        peer goes to its relay, a direct one stays where WireGuard has it; at the first start
        WireGuard has what the plan gave it). The start's actions are not recorded."""
        peer = self.peer(site)
        config = PeerConfig(
            peer.name,
            peer.key,
            peer.overlay,
            site.relay_endpoint,
            mode=site.mode,
            direct_endpoint=site.direct_endpoint,
        )
        site.core = Traversal(site.name, site.key, [], self.rng.randbytes)
        if first:
            site.wg_endpoint = site.direct_endpoint if site.mode == "direct" else None
        live = {peer.name: site.wg_endpoint}
        self.carry_out(site, site.core.configure([config], live), record=False)
        # The relay sees where WireGuard's socket is mapped: that is a candidate.
        mapped = site.nat.outbound(site.private, (RELAY, 3478), self.now)
        site.core.set_candidates([site.private, mapped])

    def restart(self, site: Site, hello: bool = True) -> None:
        """The site's sidecar restarts: a new core, the peer where the daemon's start puts it,
        and (as the daemon does) hellos to the peer."""
        self._start(site, first=False)
        if hello:
            site.core.start(self.now)

    # --- plumbing ---

    def peer(self, site: Site) -> Site:
        return self.b if site is self.a else self.a

    def at(self, when: float, what: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._order), what))

    def wall(self, site: Site) -> float:
        return self.now + WALL + site.skew

    def carry_out(self, site: Site, actions: Iterable[Action], record: bool = True) -> None:
        for action in actions:
            if record:
                site.actions.append((self.now, action))
            if isinstance(action, SendControl):
                assert action.peer == self.peer(site).name
                self.send_wg(site, len(action.data) + 32, action.data)
            elif isinstance(action, SendProbe):
                self.send_udp(site, action.destination, action.data)
            elif isinstance(action, SetEndpoint):
                assert action.public_key == self.peer(site).key
                site.wg_endpoint = action.endpoint
            elif isinstance(action, ResetSession):
                assert action.public_key == self.peer(site).key
                new, peer = next(self.sessions), self.peer(site)
                site.session = peer.session = new
                site.accepts = {new}
                peer.accepts.add(new)
                if site.wg_endpoint == site.relay_endpoint:
                    self.relay_sessions.add(new)

    def send_wg(self, site: Site, size: int, control: bytes | None = None) -> None:
        site.tx += size
        site.last_sent = self.now
        packet = Wg(site.name, size, control, site.session)
        if site.wg_endpoint == site.relay_endpoint:
            if packet.session not in self.relay_sessions:
                self.dropped["relay_unknown_session"] += 1
                return
            peer = self.peer(site)
            delay = self.relay_delay_from.get(site.name, self.relay_delay)
            self.at(self.now + delay, lambda: self.receive_wg(peer, None, packet))
        else:
            assert site.wg_endpoint is not None
            self.send_udp(site, site.wg_endpoint, packet)

    def send_udp(self, site: Site, destination: Address, payload: bytes | Wg) -> None:
        target = next(
            (s for s in self.sites.values() if s.lan == site.lan and s.private == destination),
            None,
        )
        if target is not None:
            source = site.private
            self.at(self.now + self.lan_delay, lambda: self.arrive(target, source, payload))
            return
        if ipaddress.ip_address(destination[0]) in LAN:
            return  # a private address on no LAN of ours
        translated = site.nat.outbound(site.private, destination, self.now)
        self.at(self.now + self.net_delay, lambda: self.inbound(translated, destination, payload))

    def inbound(self, source: Address, destination: Address, payload: bytes | Wg) -> None:
        publics = {self.a.nat.public, self.b.nat.public}
        between_sites = len(publics) == 2 and {source[0], destination[0]} == publics
        if between_sites and (self.cut or source[0] == self.cut_from):
            return
        for site in self.sites.values():
            nat = site.nat
            if nat.public != destination[0]:
                continue
            if source[0] == nat.public and not nat.hairpin:
                return
            inside = nat.inbound(source, destination[1], self.now)
            for target in self.sites.values():
                if target.nat is nat and target.private == inside:
                    self.arrive(target, source, payload)
            return

    def arrive(self, site: Site, source: Address, payload: bytes | Wg) -> None:
        if isinstance(payload, Wg):
            if payload.sender != site.name:  # a site's own packet is nothing to its WireGuard
                self.receive_wg(site, source, payload)
            return
        site.probes_in.append((self.now, source, payload))
        self.delivered.append((self.now, site.name, source, "ping" if payload[4] == 1 else "pong"))
        self.carry_out(site, site.core.on_probe(source, payload, self.now))

    def receive_wg(self, site: Site, source: Address | None, packet: Wg) -> None:
        if source is None:  # from the relay
            source = site.relay_endpoint
        if packet.session not in site.accepts:
            self.dropped[f"{site.name}_no_keys"] += 1
            return
        site.rx += packet.size
        site.wg_endpoint = source  # roaming: WireGuard follows any authenticated packet
        if packet.control is not None:
            sender = self.sites[packet.sender]
            actions = site.core.on_control(
                sender.overlay, packet.control, self.now, self.wall(site)
            )
            self.carry_out(site, actions)

    # --- time ---

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            self.now = T0 + self.step * STEP
            while self._queue and self._queue[0][0] <= self.now + 1e-9:
                when, _, what = heapq.heappop(self._queue)
                self.now = max(when, T0)
                what()
            self.now = T0 + self.step * STEP
            for site in (self.a, self.b):
                if site.data_every is not None and self.now >= site.next_data - 1e-9:
                    self.send_wg(site, site.data_size)
                    site.next_data = self.now + site.data_every
                if site.keepalive is not None and self.now - site.last_sent >= site.keepalive:
                    self.send_wg(site, KEEPALIVE)
                self.carry_out(site, site.core.tick(self.now, self.wall(site)))
            for site in (self.a, self.b):
                grace = site.core.reasserting(self.now)
                if self.step % round(SAMPLE / STEP) == 0 or (
                    grace and self.now - site.sampled_at >= SAMPLE_GRACE - 1e-9
                ):
                    site.sampled_at = self.now
                    peer = self.peer(site).name
                    actions = site.core.on_counters(
                        peer, site.rx, site.tx, self.now, site.wg_endpoint
                    )
                    self.carry_out(site, actions)
            self.step += 1

    def run_until(self, condition: Callable[[], bool], limit: float) -> float:
        """Run until ``condition`` holds; the time it first did (fails after ``limit`` s)."""
        end = self.now + limit
        while not condition():
            assert self.now < end, f"not within {limit} s"
            self.run(STEP)
        return self.now

    # --- what happened ---

    def direct(self) -> bool:
        """Both WireGuards point at the other's direct address (not at their relay)."""
        return all(s.wg_endpoint not in (None, s.relay_endpoint) for s in (self.a, self.b))

    def on_relay(self) -> bool:
        return all(s.wg_endpoint == s.relay_endpoint for s in (self.a, self.b))

    def paths(self) -> tuple[str, str]:
        a, b = (s.core.status(self.now)["peers"][self.peer(s).name] for s in (self.a, self.b))
        return a["path"], b["path"]


def easy_pair(
    *,
    clash_a: bool = False,
    clash_b: bool = False,
    private_a: str = "10.1.0.2",
    mode: str = "punch",
    **kw: Any,
) -> Sim:
    """Two sites behind endpoint-independent NATs. ``mode`` direct: the plan connects them
    directly (each WireGuard starts on the other's public address) and both sidecars start
    (hellos), as the daemon does."""
    direct = mode == "direct"
    a = Site(
        "alpha",
        KEY_ALPHA,
        "10.200.0.1",
        (private_a, WG),
        "alpha-lan",
        Nat("198.51.100.10", clash=clash_a),
        (RELAY, 40001),
        mode=mode,
        direct_endpoint=("203.0.113.20", WG) if direct else None,
    )
    b = Site(
        "bravo",
        KEY_BETA,
        "10.200.0.2",
        ("10.2.0.2", WG),
        "bravo-lan",
        Nat("203.0.113.20", clash=clash_b),
        (RELAY, 40002),
        mode=mode,
        direct_endpoint=("198.51.100.10", WG) if direct else None,
    )
    sim = Sim(a, b, **kw)
    if direct:
        for site in (a, b):
            site.core.start(sim.now)
    return sim


def lan_pair(**kw: Any) -> Sim:
    nat = Nat("198.51.100.30")
    a = Site("alpha", KEY_ALPHA, "10.200.0.1", ("10.0.0.2", WG), "home", nat, (RELAY, 40001))
    b = Site("bravo", KEY_BETA, "10.200.0.2", ("10.0.0.3", WG), "home", nat, (RELAY, 40002))
    return Sim(a, b, **kw)


def actions_of(site: Site, kind: type, since: float = 0.0) -> list[tuple[float, Any]]:
    return [(t, a) for t, a in site.actions if isinstance(a, kind) and t >= since]


def controls(site: Site, since: float = 0.0) -> list[tuple[float, Control]]:
    return [(t, decode_control(a.data)) for t, a in actions_of(site, SendControl, since)]


def counters(site: Site) -> Counter[str]:
    return Counter(site.core.status(0.0)["counters"])


def offer_key(sim: Sim) -> tuple[bytes, bytes]:
    """The session and probe key of alpha's latest offer (as bravo's sidecar learns them)."""
    offer = [c for _, c in controls(sim.a) if c.type == "offer"][-1]
    assert offer.key is not None
    return offer.session, offer.key


def upgraded(sim: Sim, limit: float = 5.0) -> float:
    return sim.run_until(lambda: sim.direct() and sim.paths() == ("direct", "direct"), limit)


# --- scenarios: upgrades -------------------------------------------------------------------


def test_two_easy_sites_go_direct_within_a_second() -> None:
    sim = easy_pair()
    sim.run(1.0)
    assert sim.paths() == ("direct", "direct")
    assert sim.a.wg_endpoint == ("203.0.113.20", WG)
    assert sim.b.wg_endpoint == ("198.51.100.10", WG)
    # Each side set the endpoint once, to the direct one.
    for site, direct in ((sim.a, ("203.0.113.20", WG)), (sim.b, ("198.51.100.10", WG))):
        [(t_set, set_)] = actions_of(site, SetEndpoint)
        assert set_.endpoint == direct
        assert t_set <= T0 + 1.0
    # The direct path carries data both ways afterwards, and stays.
    sim.a.data_every = sim.b.data_every = 0.1
    rx = (sim.a.rx, sim.b.rx)
    sim.run(10.0)
    assert sim.a.rx > rx[0] and sim.b.rx > rx[1]
    assert sim.direct() and sim.paths() == ("direct", "direct")
    assert counters(sim.a)["dropped_probe_forged"] == counters(sim.b)["dropped_probe_forged"] == 0


def test_both_sides_agree_on_controlling_and_only_it_offers() -> None:
    sim = easy_pair()
    sim.cut = True  # every attempt fails: many offers
    sim.run(300.0)
    a = sim.a.core.status(sim.now)["peers"]["bravo"]
    b = sim.b.core.status(sim.now)["peers"]["alpha"]
    assert a["controlling"] and not b["controlling"]
    assert {c.type for _, c in controls(sim.a)} == {"offer"}
    assert {c.type for _, c in controls(sim.b)} == {"answer"}
    assert len(controls(sim.a)) == len(controls(sim.b)) >= 5
    assert b["next_attempt_in_s"] is None


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=2, unique=True))
def test_exactly_one_side_controls_for_any_keys(keys: list[bytes]) -> None:
    k1, k2 = (base64.b64encode(k).decode() for k in keys)
    one = Traversal("one", k1, [PeerConfig("two", k2, "10.200.0.2", (RELAY, 1))], bytes)
    two = Traversal("two", k2, [PeerConfig("one", k1, "10.200.0.1", (RELAY, 2))], bytes)
    assert one.links["two"].controlling != two.links["one"].controlling


def test_a_site_with_no_controlling_peer_never_offers() -> None:
    core = Traversal(
        "bravo", KEY_BETA, [PeerConfig("alpha", KEY_ALPHA, "10.200.0.1", (RELAY, 1))], bytes
    )
    core.set_candidates([("10.2.0.2", WG), ("203.0.113.20", WG)])
    sent = [a for t in range(0, 60_000, 20) for a in core.tick(T0 + t / 1000, WALL + T0)]
    assert sent == []


def test_same_lan_pair_upgrades_to_private_addresses() -> None:
    sim = lan_pair()
    upgraded(sim, 1.0)
    assert sim.a.wg_endpoint == ("10.0.0.3", WG)
    assert sim.b.wg_endpoint == ("10.0.0.2", WG)
    # The public addresses (through the hairpinning NAT) answered pings too.
    public = sim.a.nat.public
    assert any(
        site == "alpha" and source[0] == public and kind == "pong"
        for _, site, source, kind in sim.delivered
    )


def test_same_lan_prefers_private_even_when_the_public_pong_comes_first() -> None:
    """The LAN is slower than the hairpin, within the nomination grace: private still wins."""
    sim = lan_pair(lan_delay=0.05, net_delay=0.001)
    upgraded(sim, 1.5)
    assert sim.a.wg_endpoint == ("10.0.0.3", WG)
    assert sim.b.wg_endpoint == ("10.0.0.2", WG)
    first_pong = next(d for d in sim.delivered if d[1] == "alpha" and d[3] == "pong")
    assert first_pong[2][0] == sim.a.nat.public


def test_same_lan_without_private_candidates_uses_the_hairpin() -> None:
    sim = lan_pair()
    for site in (sim.a, sim.b):
        mapped = site.nat.outbound(site.private, (RELAY, 3478), sim.now)
        site.core.set_candidates([mapped])
    upgraded(sim, 1.0)
    assert sim.a.wg_endpoint == (sim.a.nat.public, sim.b.nat.ports[sim.b.private])
    assert sim.b.wg_endpoint == (sim.a.nat.public, sim.a.nat.ports[sim.a.private])


def test_sites_with_the_same_private_address_go_direct_over_public_ones() -> None:
    """Two homes both numbered 10.2.0.2: a ping to the other's private candidate reaches
    oneself. That must never validate a path (nor keep a dead one alive)."""
    sim = easy_pair(private_a="10.2.0.2")
    upgraded(sim, 1.5)
    assert sim.a.wg_endpoint == ("203.0.113.20", WG)
    assert sim.b.wg_endpoint == ("198.51.100.10", WG)
    sim.a.data_every = sim.b.data_every = 0.1
    rx = (sim.a.rx, sim.b.rx)
    sim.run(5.0)
    assert sim.a.rx > rx[0] and sim.b.rx > rx[1]
    assert sim.paths() == ("direct", "direct")


def test_ipv6_sites_behind_stateful_firewalls_go_direct() -> None:
    """No NAT, only a firewall that lets in what answers something sent: the same model with
    the public address equal to the inside one."""
    a = Site(
        "alpha",
        KEY_ALPHA,
        "10.200.0.1",
        ("2001:db8:a::2", WG),
        "alpha-lan",
        Nat("2001:db8:a::2"),
        (RELAY, 40001),
    )
    b = Site(
        "bravo",
        KEY_BETA,
        "10.200.0.2",
        ("2001:db8:b::2", WG),
        "bravo-lan",
        Nat("2001:db8:b::2"),
        (RELAY, 40002),
    )
    sim = Sim(a, b)
    upgraded(sim, 1.0)
    assert sim.a.wg_endpoint == ("2001:db8:b::2", WG)
    assert sim.b.wg_endpoint == ("2001:db8:a::2", WG)


def test_a_site_with_many_addresses_still_offers_what_its_peer_accepts() -> None:
    """An offer carries at most 16 candidates: a host with many LAN addresses must not send
    one its peer refuses (every attempt would then end with no answer)."""
    sim = easy_pair()
    lan = [(f"10.1.{i}.2", WG) for i in range(30)]
    mapped = ("198.51.100.10", WG)
    sim.a.core.set_candidates([*lan, mapped, ("fd00::2", WG)])
    upgraded(sim, 1.0)
    (offer,) = [c for _, c in controls(sim.a) if c.type == "offer"]
    assert len(offer.candidates) == 16 and mapped in offer.candidates
    assert sim.b.wg_endpoint == mapped


def test_skewed_wall_clock_costs_at_most_the_attempt() -> None:
    sim = easy_pair()
    sim.b.skew = 30.0  # bravo believes the start is long past: it moves it, alpha waits
    assert upgraded(sim, 3.3) < T0 + OFFER_TIMEOUT + 1.0
    sim = easy_pair()
    sim.b.skew = -30.0  # bravo believes the start is far ahead: it waits OFFER_TIMEOUT at most
    assert upgraded(sim, 3.3) < T0 + 2.5


# --- the conntrack clash and the backoff ---------------------------------------------------


def test_backoff_function() -> None:
    assert [backoff(n) for n in range(7)] == [0, 2, 8, 32, 128, 128, 128]


def _failures_and_offers(site: Site) -> tuple[list[float], list[float]]:
    failed = [t for t, a in actions_of(site, Log) if a.text.startswith("attempt failed")]
    offers = [t for t, c in controls(site) if c.type == "offer"]
    return failed, offers


def test_backoff_grows_to_128_s_while_no_path_exists() -> None:
    sim = easy_pair()
    sim.cut = True
    sim.run(700.0)
    failed, offers = _failures_and_offers(sim.a)
    waits = [round(o - f, 1) for f, o in zip(failed, offers[1:], strict=False)]
    # Nothing of the peer heard: at least the clash wait, until the backoff is longer.
    assert waits[:6] == [CLASH_WAIT, CLASH_WAIT, CLASH_WAIT, 128, 128, 128]
    assert sim.on_relay() and sim.paths() == ("relay", "relay")
    # Nothing unvalidated ever touched the working (relayed) path.
    for site in (sim.a, sim.b):
        assert actions_of(site, SetEndpoint) == []
        assert site.wg_endpoint == site.relay_endpoint


def test_a_slow_relay_moves_the_start_past_the_answers_trip() -> None:
    """Offer and answer through a congested relay (each longer than the offer's lead): bravo
    moves the start, far enough for its answer to arrive first, and no side's pings reach the
    other's NAT before its own left: direct at the first attempt."""
    sim = easy_pair(clash_a=True, clash_b=True, relay_delay=0.35)
    upgraded(sim, 3.0)
    assert sim.a.nat.clashes == sim.b.nat.clashes == 0
    assert [c.type for _, c in controls(sim.a)].count("offer") == 1


def test_conntrack_clash_waits_until_the_stale_entries_expire() -> None:
    """The first attempt's answer is late (a congested relay towards alpha: later than the
    start), so bravo's pings reach alpha's Linux NAT before alpha has sent any: alpha's pings
    then leave from a new port, which bravo's NAT filters, and any retry within 30 s would
    refresh both stale entries. An attempt that heard nothing waits longer than the unreplied
    timeout, and the next one finds them gone."""
    sim = easy_pair(clash_a=True, clash_b=True)
    sim.relay_delay_from["bravo"] = 0.37  # the offer's lead is 0.3 s
    sim.run(1.0)
    sim.relay_delay_from.clear()
    assert sim.a.nat.clashes == 1
    when = upgraded(sim, 45.0)
    failed, offers = _failures_and_offers(sim.a)
    assert len(failed) == 1 and len(offers) == 2
    assert offers[1] - failed[0] == pytest.approx(CLASH_WAIT)
    assert CLASH_WAIT > UNREPLIED_TIMEOUT
    # Direct at once on the retry.
    assert offers[-1] < when < offers[-1] + 1.0
    assert sim.a.wg_endpoint == ("203.0.113.20", WG)
    assert sim.b.wg_endpoint == ("198.51.100.10", WG)
    for site in (sim.a, sim.b):
        assert actions_of(site, SetEndpoint)[0][0] > offers[-1]
    assert any("nothing heard" in a.text for _, a in actions_of(sim.a, Log))
    # Why, in the log: alpha's first pings left well after the moment agreed on.
    (why,) = [a.text for _, a in actions_of(sim.a, Log) if a.text.startswith("attempt failed")]
    late = re.search(r"first pings (\d+) ms after the agreed start", why)
    assert late is not None and int(late.group(1)) >= 50, why


def test_an_attempt_that_heard_the_peer_but_validated_nothing_waits_as_long() -> None:
    """One way open, the other not (bravo's pings and pongs never reach alpha, as when both
    NATs clashed and one lets the other's pings in): bravo hears alpha's pings, nothing
    validates, and both sides wait past the unreplied timeout, as after a silent attempt, so
    that no retry keeps the stale entries alive."""
    sim = easy_pair()
    sim.cut_from = sim.b.nat.public
    sim.run(200.0)
    for site in (sim.a, sim.b):
        failed, _ = _failures_and_offers(site)
        assert len(failed) >= 3, site.name
        gaps = [later - earlier for earlier, later in itertools.pairwise(failed)]
        assert min(gaps) >= CLASH_WAIT, (site.name, failed)
    heard = [a.text for _, a in actions_of(sim.b, Log) if a.text.startswith("attempt failed")]
    assert heard and "nothing heard" not in heard[0]
    assert sim.paths() == ("relay", "relay")


def test_clash_on_one_side_is_survived_by_following_the_observed_port() -> None:
    """The same clash, but bravo's NAT filters nothing (endpoint-independent filtering): the
    ping from alpha's new port gets in, and the nomination names the port that arrived."""
    sim = easy_pair(clash_a=True)
    sim.relay_delay_from["bravo"] = 0.37
    sim.b.nat.inbound = _open_inbound(sim.b.nat)  # type: ignore[method-assign]
    upgraded(sim, 2.0)
    assert sim.a.nat.clashes == 1
    port = sim.a.nat.entries[(sim.a.private, ("203.0.113.20", WG))].port
    assert port != WG
    assert sim.b.wg_endpoint == ("198.51.100.10", port)


def test_a_ping_from_an_unknown_port_is_pinged_back_and_can_be_nominated() -> None:
    """The clash on the controlled side's NAT (bravo starts 50 ms late: alpha's first ping is
    there first), the controlling side's NAT filters nothing: bravo's pings from its NAT's new
    port reach alpha, but alpha pings only bravo's candidates, whose port the stale entry
    holds. Alpha learns the port a ping came from (a peer-reflexive candidate, as in ICE),
    pings it, and nominates it when its pong comes back from there."""
    sim = easy_pair(clash_b=True)
    sim.b.skew = -0.05
    sim.a.nat.inbound = _open_inbound(sim.a.nat)  # type: ignore[method-assign]
    upgraded(sim, 2.0)
    assert sim.b.nat.clashes == 1
    port = sim.b.nat.entries[(sim.b.private, ("198.51.100.10", WG))].port
    assert port != WG
    assert sim.a.wg_endpoint == ("203.0.113.20", port)
    assert sim.a.core.links["bravo"].counters["peer_reflexive"] == 1


def _open_inbound(nat: Nat) -> Callable[[Address, int, float], Address | None]:
    """A NAT that lets in anything to a mapped port (endpoint-independent filtering)."""

    def inbound(remote: Address, port: int, now: float) -> Address | None:
        for inside, mapped in nat.ports.items():
            if mapped == port:
                return inside
        return None

    return inbound


# --- watching a direct path: fallback and keepalives ---------------------------------------


def _fell_back(site: Site, since: float) -> float:
    """When ``site`` went back to its relay after ``since``."""
    relay = [
        t for t, a in actions_of(site, SetEndpoint, since) if a.endpoint == site.relay_endpoint
    ]
    assert relay, f"{site.name} did not fall back"
    return relay[0]


def _cut_the_direct_path(sim: Sim) -> tuple[float, dict[str, float]]:
    """Cut the pair's direct path: both sides are back on the relay within 3 s. The moment of
    the cut, and how long each side took."""
    cut = sim.now
    sim.cut = True
    sim.run(3.0)
    assert sim.on_relay() and sim.paths() == ("relay", "relay")
    back = {site.name: _fell_back(site, cut) - cut for site in (sim.a, sim.b)}
    assert all(0.5 < t <= 3.0 for t in back.values()), back
    return cut, back


def test_a_peer_on_its_relay_is_followed_even_when_its_fallback_message_is_lost() -> None:
    """Bravo alone sends data, so bravo alone notices the cut; its fallback message is lost.
    Its data, now relayed, makes alpha's WireGuard roam to the relay (long after the grace):
    the sidecar sees that endpoint and follows, and asks the relays where its NAT maps it
    now."""
    sim = easy_pair()
    upgraded(sim, 1.0)
    sim.b.data_every = 0.05
    sim.run(traversal.REASSERT_GRACE + 1.0)
    send_wg = sim.send_wg

    def losing_fallbacks(site: Site, size: int, control: bytes | None = None) -> None:
        if control is None or decode_control(control).type != "fallback":
            send_wg(site, size, control)

    sim.send_wg = losing_fallbacks  # type: ignore[method-assign]
    sim.cut = True
    cut = sim.now
    sim.run(4.0)
    assert sim.paths() == ("relay", "relay") and sim.on_relay()
    followed = _fell_back(sim.a, cut)
    assert followed - _fell_back(sim.b, cut) <= traversal.SUSPECT_AFTER  # one sample or so
    logs = [a.text for _, a in actions_of(sim.a, Log, cut)]
    assert "relay (peer is on the relay)" in logs
    for site in (sim.a, sim.b):
        assert actions_of(site, traversal.Remap, cut)


@pytest.mark.parametrize(
    "senders", [("alpha", "bravo"), ("alpha",), ("bravo",)], ids=["both", "alpha", "bravo"]
)
def test_cut_direct_path_falls_back_within_3_s_and_upgrades_after_healing(
    senders: tuple[str, ...],
) -> None:
    sim = easy_pair()
    upgraded(sim, 1.0)
    for name in senders:
        sim.sites[name].data_every = 0.05
    sim.run(10.0)
    assert sim.paths() == ("direct", "direct")
    cut, back = _cut_the_direct_path(sim)
    # Whoever noticed first told the other, and the message got there (through the relay).
    first = min((sim.a, sim.b), key=lambda s: back[s.name])
    fallbacks = [c for _, c in controls(first, cut) if c.type == "fallback"]
    assert len(fallbacks) == 1
    # Data flows again, through the relay.
    rx = {s.name: s.rx for s in (sim.a, sim.b)}
    sim.run(1.0)
    for name in senders:
        assert sim.peer(sim.sites[name]).rx > rx[sim.peer(sim.sites[name]).name]
    # Healed: upgraded again after the first backoff (2 s after the fallback).
    sim.cut = False
    healed = sim.now
    when = upgraded(sim, 5.0)
    assert when - healed < 3.0
    assert sim.a.wg_endpoint == ("203.0.113.20", WG)
    assert sim.b.wg_endpoint == ("198.51.100.10", WG)


def test_path_that_stays_cut_is_retried_with_backoff_and_never_flaps() -> None:
    sim = easy_pair()
    upgraded(sim, 1.0)
    sim.a.data_every = sim.b.data_every = 0.05
    sim.run(5.0)
    sim.cut = True
    sim.run(200.0)
    assert sim.on_relay()
    # One fallback each, then only failed attempts (no SetEndpoint to a direct address).
    for site in (sim.a, sim.b):
        sets = [a.endpoint for _, a in actions_of(site, SetEndpoint)]
        assert sets.count(site.relay_endpoint) >= 1
        assert len(sets) <= 3, sets  # direct, relay (and at most a repeat of relay)


def path_probes(site: Site, since: float) -> list[tuple[float, SendProbe]]:
    """Probes on the direct path (everything but the relay mapping's keepalives)."""
    return [
        (t, a)
        for t, a in actions_of(site, SendProbe, since)
        if a.destination != site.relay_endpoint
    ]


def relay_keepalives(site: Site, since: float) -> list[tuple[float, SendProbe]]:
    return [
        (t, a)
        for t, a in actions_of(site, SendProbe, since)
        if a.destination == site.relay_endpoint and a.data == MAGIC
    ]


@pytest.mark.parametrize("bravo_keepalive", [25.0, None], ids=["both", "alpha-only"])
def test_keepalives_alone_never_make_a_path_suspect(bravo_keepalive: float | None) -> None:
    sim = easy_pair()
    sim.a.keepalive, sim.b.keepalive = 25.0, bravo_keepalive
    upgraded(sim, 1.0)
    sim.run(5.0)
    start = sim.now
    rx = sim.b.rx
    sim.run(600.0)
    for site in (sim.a, sim.b):
        probes = path_probes(site, start)
        assert probes == [], f"{site.name}: {len(probes) / 10} probes a minute"
        # Only the relay mapping's keepalives: one every 20 s, 3 a minute.
        assert len(relay_keepalives(site, start)) == 30
        assert site.core.status(sim.now)["peers"][sim.peer(site).name]["suspect"] is False
    assert sim.direct() and sim.paths() == ("direct", "direct")
    assert sim.b.rx - rx >= 20 * KEEPALIVE  # alpha's keepalives did flow, on the direct path


def test_idle_direct_path_with_occasional_answered_data_sends_no_probes() -> None:
    sim = easy_pair()
    sim.a.keepalive = sim.b.keepalive = 25.0
    upgraded(sim, 1.0)
    sim.run(5.0)
    start = sim.now
    for _ in range(20):  # a request and its answer every 30 s
        sim.send_wg(sim.a, 300)
        sim.run(0.1)
        sim.send_wg(sim.b, 1200)
        sim.run(29.9)
    assert path_probes(sim.a, start) == path_probes(sim.b, start) == []


def _one_way_data(sim: Sim) -> None:
    """4 s of alpha streaming data that bravo never answers (one-way UDP)."""
    for _ in range(40):
        sim.a.tx += 500
        sim.b.rx += 500
        sim.run(0.1)


def test_suspect_path_that_answers_pings_stays_direct() -> None:
    """Data sent and nothing heard, but the path itself is fine: the check pings prove it."""
    sim = easy_pair()
    upgraded(sim, 1.0)
    sim.run(1.0)
    start = sim.now
    _one_way_data(sim)
    assert sim.paths() == ("direct", "direct")
    assert actions_of(sim.a, SendProbe, start)  # it did check
    assert actions_of(sim.a, SetEndpoint, start) == []


def test_direct_path_held_60_s_forgets_earlier_failures() -> None:
    sim = easy_pair()
    upgraded(sim, 1.0)
    sim.a.data_every = sim.b.data_every = 0.1
    for _ in range(2):  # two fallbacks in a row: the next wait would be 4 s
        sim.cut = True
        sim.run(3.0)
        sim.cut = False
        upgraded(sim, 10.0)
    assert sim.a.core.status(sim.now)["peers"]["bravo"]["failures"] == 2
    sim.run(61.0)
    assert sim.a.core.status(sim.now)["peers"]["bravo"]["failures"] == 0
    cut = sim.now
    sim.cut = True
    sim.run(3.0)
    fell = _fell_back(sim.a, cut)
    sim.cut = False
    sim.run(3.0)
    offer = next(t for t, c in controls(sim.a, cut) if c.type == "offer")
    assert offer - fell == pytest.approx(2.0, abs=STEP * 1.5)


# --- forgeries, replays, strangers -----------------------------------------------------------


def probing_pair() -> Sim:
    """A pair whose attempt has started (offer and answer exchanged) but validated nothing:
    bravo's pings are cut, alpha's go nowhere yet."""
    sim = easy_pair()
    sim.cut = True
    sim.run(0.35)
    return sim


def endpoints(sim: Sim) -> tuple[Address | None, Address | None]:
    return sim.a.wg_endpoint, sim.b.wg_endpoint


def test_probe_with_wrong_key_is_dropped_and_counted() -> None:
    sim = probing_pair()
    session, key = offer_key(sim)
    forged = encode_probe(Probe(PING, session, 1), bytes(32))
    before = endpoints(sim)
    assert sim.b.core.on_probe(("198.51.100.10", WG), forged, sim.now) == []
    assert counters(sim.b)["dropped_probe_forged"] == 1
    unknown = encode_probe(Probe(PING, bytes(8), 1), key)
    assert sim.b.core.on_probe(("198.51.100.10", WG), unknown, sim.now) == []
    assert sim.b.core.on_probe(("198.51.100.10", WG), b"\xffMWP", sim.now) == []
    assert counters(sim.b)["dropped_probe_unknown"] == 2
    assert endpoints(sim) == before


def _alpha_alone() -> tuple[Traversal, bytes, bytes, list[Action]]:
    """Alpha's core on its own, in an attempt with bravo (answer given), at its first pings."""
    rng = random.Random(7)
    core = Traversal(
        "alpha",
        KEY_ALPHA,
        [PeerConfig("bravo", KEY_BETA, "10.200.0.2", (RELAY, 40001))],
        rng.randbytes,
    )
    core.set_candidates([("10.1.0.2", WG), ("198.51.100.10", WG)])
    (offer_action,) = core.tick(T0, T0 + WALL)
    assert isinstance(offer_action, SendControl)
    offer = decode_control(offer_action.data)
    assert offer.key is not None
    answer = Control("answer", "bravo", offer.session, candidates=(("203.0.113.20", WG),))
    assert core.on_control("10.200.0.2", encode_control(answer), T0 + 0.05, T0 + WALL) == []
    pings = core.tick(T0 + 0.3, T0 + 0.3 + WALL)
    return core, offer.session, offer.key, pings


def test_replayed_or_misaddressed_pongs_prove_nothing() -> None:
    core, session, key, pings = _alpha_alone()
    (ping,) = [a for a in pings if isinstance(a, SendProbe)]
    seq = decode_probe(ping.data, key).seq
    pong = encode_probe(Probe(PONG, session, seq, ("198.51.100.10", WG)), key)
    bravo = ("203.0.113.20", WG)
    # A copy from another address first: dropped, and it must not use up the genuine one.
    assert core.on_probe(("198.51.100.66", WG), pong, T0 + 0.33) == []
    assert core.counters["dropped_probe_unexpected"] == 1
    assert core.on_probe(bravo, pong, T0 + 0.34) == []
    # The same pong again: a replay.
    assert core.on_probe(bravo, pong, T0 + 0.35) == []
    assert core.counters["dropped_probe_unexpected"] == 2
    # A pong for a sequence number never sent.
    never = encode_probe(Probe(PONG, session, seq + 1000, ("198.51.100.10", WG)), key)
    assert core.on_probe(bravo, never, T0 + 0.36) == []
    assert core.counters["dropped_probe_unexpected"] == 3
    # The genuine pong validated the path: after the grace, alpha nominates it.
    actions = core.tick(T0 + 0.5, T0 + 0.5 + WALL)
    sets = [a for a in actions if isinstance(a, SetEndpoint)]
    assert sets == [SetEndpoint("bravo", KEY_BETA, bravo)]
    nominate = decode_control(next(a for a in actions if isinstance(a, SendControl)).data)
    assert nominate.type == "nominate" and nominate.use == ("198.51.100.10", WG)


def test_replayed_pings_are_not_answered_from_anywhere() -> None:
    sim = probing_pair()
    session, key = offer_key(sim)
    ping = encode_probe(Probe(PING, session, 77), key)
    alpha = ("198.51.100.10", WG)
    (pong,) = sim.b.core.on_probe(alpha, ping, sim.now)
    assert isinstance(pong, SendProbe) and pong.destination == alpha
    before = endpoints(sim)
    for source in (("192.0.2.99", 4444), alpha):
        assert sim.b.core.on_probe(source, ping, sim.now + 0.01) == []
    assert counters(sim.b)["dropped_probe_replay"] == 2
    # And the third address is no address bravo would accept in a nomination.
    nominate = Control("nominate", "alpha", session, use=("192.0.2.99", 4444))
    assert sim.b.core.on_control("10.200.0.1", encode_control(nominate), sim.now, 0.0) == []
    assert endpoints(sim) == before


def test_control_from_strangers_and_impostors_changes_nothing() -> None:
    sim = probing_pair()
    session, key = offer_key(sim)
    alpha = ("198.51.100.10", WG)
    sim.b.core.on_probe(alpha, encode_probe(Probe(PING, session, 5), key), sim.now)
    before = endpoints(sim)
    nominate = encode_control(Control("nominate", "alpha", session, use=alpha))
    offer = encode_control(Control("offer", "alpha", bytes(8), bytes(32), (alpha,), 0.0))
    fallback = encode_control(Control("fallback", "alpha", session))
    unknown = encode_control(Control("nominate", "charlie", session, use=alpha))
    for source, datagram in (
        ("10.200.0.9", nominate),  # right name, wrong overlay address
        ("10.200.0.9", offer),
        ("10.200.0.9", fallback),
        ("10.200.0.1", unknown),  # a peer this site does not have
        ("10.200.0.9", unknown),
    ):
        assert sim.b.core.on_control(source, datagram, sim.now, sim.now + WALL) == []
    assert counters(sim.b)["dropped_control_stranger"] == 5
    for datagram in (b"", b"{}", b"\xff" * 40, encode_probe(Probe(PING, session, 1), key)):
        assert sim.b.core.on_control("10.200.0.1", datagram, sim.now, sim.now + WALL) == []
    assert counters(sim.b)["dropped_control_malformed"] == 4
    assert endpoints(sim) == before
    assert sim.paths() == ("relay", "relay")


def test_nominations_bravo_must_refuse() -> None:
    sim = probing_pair()
    session, key = offer_key(sim)
    alpha = ("198.51.100.10", WG)
    sim.b.core.on_probe(alpha, encode_probe(Probe(PING, session, 5), key), sim.now)
    before = endpoints(sim)
    for message in (
        Control("nominate", "alpha", session, use=("198.51.100.10", 61999)),  # never pinged
        Control("nominate", "alpha", session, use=("10.1.0.2", WG)),  # never pinged
        Control("nominate", "alpha", bytes(8), use=alpha),  # another session
    ):
        assert sim.b.core.on_control("10.200.0.1", encode_control(message), sim.now, 0.0) == []
    assert counters(sim.b)["dropped_control_unexpected"] == 3
    assert endpoints(sim) == before
    # The one that is right is accepted.
    ok = Control("nominate", "alpha", session, use=alpha)
    actions = sim.b.core.on_control("10.200.0.1", encode_control(ok), sim.now, 0.0)
    assert SetEndpoint("alpha", KEY_ALPHA, alpha) in actions


def test_messages_out_of_turn_are_dropped_and_counted() -> None:
    sim = probing_pair()
    session, _ = offer_key(sim)
    alpha, bravo = sim.a.core, sim.b.core
    # Bravo offers to its controlling peer, or alpha answers: each side refuses the other's role.
    offer = Control("offer", "bravo", bytes(8), bytes(32), (("203.0.113.20", WG),), 0.0)
    assert alpha.on_control("10.200.0.2", encode_control(offer), sim.now, 0.0) == []
    answer = Control("answer", "alpha", session, candidates=(("198.51.100.10", WG),))
    assert bravo.on_control("10.200.0.1", encode_control(answer), sim.now, 0.0) == []
    # An answer for another session, or when no offer is out.
    stale = Control("answer", "bravo", bytes(8), candidates=())
    assert alpha.on_control("10.200.0.2", encode_control(stale), sim.now, 0.0) == []
    again = Control("answer", "bravo", session, candidates=())
    assert alpha.on_control("10.200.0.2", encode_control(again), sim.now, 0.0) == []
    # A fallback while on the relay anyway, and a nomination sent to the controlling side.
    fallback = Control("fallback", "bravo", session)
    assert alpha.on_control("10.200.0.2", encode_control(fallback), sim.now, 0.0) == []
    nominate = Control("nominate", "bravo", session, use=("198.51.100.10", WG))
    assert alpha.on_control("10.200.0.2", encode_control(nominate), sim.now, 0.0) == []
    assert counters(sim.a)["dropped_control_unexpected"] == 5
    assert counters(sim.b)["dropped_control_unexpected"] == 1
    assert sim.paths() == ("relay", "relay")


def test_pongs_are_rate_limited_per_peer() -> None:
    sim = probing_pair()
    session, key = offer_key(sim)
    alpha = ("198.51.100.10", WG)
    now = sim.now

    def answered(first: int, count: int, when: float) -> int:
        pongs = 0
        for seq in range(first, first + count):
            ping = encode_probe(Probe(PING, session, seq), key)
            pongs += len(sim.b.core.on_probe(alpha, ping, when))
        return pongs

    assert answered(1000, 80, now) == traversal.MAX_PONGS_PER_SECOND
    assert counters(sim.b)["dropped_probe_rate"] == 80 - traversal.MAX_PONGS_PER_SECOND
    assert answered(2000, 80, now + 0.2) == traversal.MAX_PONGS_PER_SECOND // 5
    assert answered(3000, 80, now + 10.0) == traversal.MAX_PONGS_PER_SECOND  # never more


# --- restarts --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["alpha", "bravo"])
def test_a_restarted_sidecar_says_hello_and_both_sides_agree_again(side: str) -> None:
    """Without the hello, a restarted bravo (which never offers) would sit on its relay in its
    own state while alpha's direct packets make its WireGuard roam to the direct endpoint."""
    sim = easy_pair()
    upgraded(sim, 1.0)
    sim.a.data_every = sim.b.data_every = 0.05
    sim.run(2.0)
    site = sim.sites[side]
    peer = sim.peer(site)
    restarted = sim.now
    sim.restart(site)
    when = sim.run_until(
        lambda: (
            sim.paths() == ("direct", "direct")
            and sim.direct()
            and bool(actions_of(site, SetEndpoint, restarted + 0.01))
        ),
        3.0,
    )
    assert when - restarted < 1.5
    # The peer followed to its relay first ("peer restarted"), then both upgraded again.
    logs = [a.text for _, a in actions_of(peer, Log, restarted)]
    assert logs[0] == "relay (peer restarted)", logs
    assert any(text.startswith("direct via") for text in logs[1:]), logs
    sim.run(5.0)
    assert sim.paths() == ("direct", "direct") and sim.direct()
    # (and one more with the restarted side's new session, which brings its handshake)
    assert counters(peer)["hello_repeated"] >= len(traversal.HELLO_AT) - 1


@pytest.mark.parametrize("stopping", ["alpha", "bravo"])
def test_a_sidecar_stopping_before_the_start_leaves_no_conntrack_clash(stopping: str) -> None:
    """Ansible restarts sidecars while attempts are under way. A sidecar that stops between
    the answer and the agreed start says bye; its peer drops the attempt instead of probing
    alone (its pings would reach the stopped site's Linux NAT first: a clash for 30 s). The
    restarted sidecar's hello brings the next attempt, which goes direct at once."""
    sim = easy_pair(clash_a=True, clash_b=True)
    site = sim.sites[stopping]
    peer = sim.peer(site)
    sim.run_until(lambda: bool(controls(sim.b)), 0.2)  # bravo answered; the start is ahead
    sim.carry_out(site, site.core.stop())
    deaf = Traversal(site.name, site.key, [], bytes)  # the stopped sidecar: hears nothing
    site.core, stopped = deaf, sim.now
    sim.run(1.0)
    assert actions_of(peer, SendProbe, stopped) == []
    assert [a.text for _, a in actions_of(peer, Log, stopped)] == ["peer stopped: attempt dropped"]
    started = sim.now
    sim.restart(site)
    when = upgraded(sim, 2.0)
    assert when - started < 1.0
    assert sim.a.nat.clashes == sim.b.nat.clashes == 0


def test_a_lost_nomination_leaves_no_disagreement() -> None:
    """Alpha validates and goes direct, but its nomination never reaches bravo (a relayed path
    that just broke). Alpha's direct packets make bravo's WireGuard roam to alpha's address;
    once bravo's attempt has failed and its backoff run out, bravo follows: both sides direct,
    and their states say so."""
    sim = easy_pair()
    send_wg = sim.send_wg

    def losing_nominations(site: Site, size: int, control: bytes | None = None) -> None:
        if control is None or decode_control(control).type != "nominate":
            send_wg(site, size, control)

    sim.send_wg = losing_nominations  # type: ignore[method-assign]
    sim.a.data_every = sim.b.data_every = 0.1
    sim.run(1.0)
    assert sim.paths() == ("direct", "relay")
    when = sim.run_until(lambda: sim.paths() == ("direct", "direct"), 10.0)
    assert when - T0 < traversal.ATTEMPT_TIME + traversal.BACKOFF_MIN + 1.5
    assert "followed the peer to the direct path" in [a.text for _, a in actions_of(sim.b, Log)]
    sim.run(10.0)
    assert sim.paths() == ("direct", "direct") and sim.direct()
    assert counters(sim.a)["fallbacks"] == 0


def test_offers_whose_answers_are_lost_back_off() -> None:
    """Bravo's answers never arrive (a relayed path broken one way): bravo probes alone after
    each offer it answers, so alpha's repeated offers must back off like failed attempts."""
    sim = easy_pair()
    send_wg = sim.send_wg

    def losing_answers(site: Site, size: int, control: bytes | None = None) -> None:
        if control is None or decode_control(control).type != "answer":
            send_wg(site, size, control)

    sim.send_wg = losing_answers  # type: ignore[method-assign]
    sim.run(60.0)
    offers = [t for t, c in controls(sim.a) if c.type == "offer"]
    gaps = [round(b - a - OFFER_TIMEOUT, 1) for a, b in itertools.pairwise(offers)]
    assert gaps == [traversal.OFFER_RETRY, 2, 8, 32]
    assert sim.on_relay()


def test_hello_from_a_starting_peer_brings_the_offer_forward() -> None:
    """Bravo's sidecar starts after alpha's first offer was lost: its hello makes alpha offer
    at once, not after the offer timeout."""
    sim = easy_pair()
    original = sim.b.core.on_control
    sim.b.core.on_control = lambda *args: []  # type: ignore[method-assign]  # not running yet
    sim.run(0.4)
    assert [c.type for _, c in controls(sim.a)] == ["offer"]
    sim.run(OFFER_TIMEOUT)  # the offer timed out: alpha waits OFFER_RETRY before the next one
    sim.b.core.on_control = original  # type: ignore[method-assign]
    started = sim.now
    sim.restart(sim.b)
    when = upgraded(sim, 2.0)
    offers = [t for t, c in controls(sim.a, started) if c.type == "offer"]
    assert offers and offers[0] - started < 0.1
    assert when - started < 1.0


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["alpha", "bravo"])
def test_moved_relay_puts_the_peer_back_on_it_and_the_pair_upgrades_again(side: str) -> None:
    sim = easy_pair()
    upgraded(sim, 1.0)
    sim.a.data_every = sim.b.data_every = 0.1
    sim.run(2.0)
    site = sim.sites[side]
    peer = sim.peer(site)
    moved = (RELAY, 40100 + len(side))
    site.relay_endpoint = moved
    before = sim.now
    # As the daemon's reload does: with WireGuard's endpoints (direct here: a new session,
    # through the relay, which has not seen the one made on the direct path).
    actions = site.core.configure(
        [PeerConfig(peer.name, peer.key, peer.overlay, moved)], {peer.name: site.wg_endpoint}
    )
    assert actions[:2] == [
        SetEndpoint(peer.name, peer.key, moved),
        ResetSession(peer.name, peer.key),
    ]
    sim.carry_out(site, actions)
    assert site.wg_endpoint == moved
    assert site.core.status(sim.now)["peers"][peer.name]["path"] == "relay"
    # Both sides end up direct again, and agree about it.
    when = upgraded(sim, 5.0)
    assert when - before < 4.0
    sim.run(5.0)
    assert sim.paths() == ("direct", "direct") and sim.direct()


def test_configure_adds_and_removes_peers_and_repeats_nothing() -> None:
    config = PeerConfig("bravo", KEY_BETA, "10.200.0.2", (RELAY, 40001))
    core = Traversal("alpha", KEY_ALPHA, [config], bytes)
    assert core.configure([config]) == []  # unchanged: nothing to do
    charlie = PeerConfig("charlie", "B" * 43 + "=", "10.200.0.3", (RELAY, 40003))
    actions = core.configure([config, charlie])
    assert [a for a in actions if not isinstance(a, Log)] == [
        SetEndpoint("charlie", charlie.public_key, (RELAY, 40003)),
    ]
    assert core.configure([charlie]) == []
    assert set(core.links) == {"charlie"}
    assert core.configure([]) == []
    assert core.links == {}


def test_status_is_json_and_says_what_happened() -> None:
    sim = easy_pair()
    upgraded(sim, 1.0)
    status = sim.a.core.status(sim.now)
    text = json.dumps(status)
    assert json.loads(text) == status
    peer = status["peers"]["bravo"]
    assert peer["path"] == "direct" and peer["endpoint"] == "203.0.113.20:51820"
    assert peer["relay_endpoint"] == "198.51.100.200:40001"
    assert peer["upgrades"] == peer["attempts"] == 1
    assert peer["rtt_ms"] == pytest.approx(40.0, abs=STEP * 1000 + 1)


# --- robustness ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(datagram=st.binary(max_size=120), source=st.sampled_from(["10.200.0.1", "10.200.0.9"]))
def test_any_datagram_is_dropped_or_handled_never_raises(datagram: bytes, source: str) -> None:
    sim = _shared_probing_pair()
    session, _ = offer_key(sim)
    for data in (datagram, b"\xffMWP" + datagram, b"\xffMWP\x01\x00" + session + datagram):
        sim.b.core.on_probe(("192.0.2.7", 9), data, sim.now)
        sim.b.core.on_control(source, data, sim.now, sim.now + WALL)


_SHARED: list[Sim] = []


def _shared_probing_pair() -> Sim:
    if not _SHARED:
        _SHARED.append(probing_pair())
    return _SHARED[0]


# --- relay failover ------------------------------------------------------------------------------

STANDBY = "198.51.100.201"


def _bravo(mode: str, direct: Address | None = None, key: str = KEY_BETA) -> PeerConfig:
    """Bravo as alpha's peer: on relay r1 (port 40001), its standby on r2 (port 40101)."""
    return PeerConfig(
        "bravo",
        key,
        "10.200.0.2",
        (RELAY, 40001),
        relay="r1",
        standby_endpoint=(STANDBY, 40101),
        standby_relay="r2",
        mode=mode,
        direct_endpoint=direct,
    )


def _failover_core(upgrade: bool = False) -> Traversal:
    """Alpha with bravo on relay r1, its standby on r2 (:func:`_bravo`)."""
    peer = _bravo("punch" if upgrade else "relay")
    return Traversal("alpha", KEY_ALPHA, [peer], random.Random(3).randbytes)


def _seconds(core: Traversal, start: float, seconds: int, answering: set[str]) -> list[Action]:
    """`seconds` of the daemon's relay checks (each relay asked every second; those in
    `answering` answer at once), ticking the core in between."""
    actions: list[Action] = []
    for second in range(seconds):
        now = start + second
        for relay in ("r1", "r2"):
            core.relay_asked(relay, now)
            if relay in answering:
                core.relay_answered(relay, now + 0.01)
        for step in range(10):
            actions += core.tick(now + step / 10, now + step / 10 + WALL)
    return actions


def test_a_relayed_peer_moves_to_its_standby_relay_when_its_relay_dies() -> None:
    core = _failover_core()
    assert _seconds(core, T0, 5, {"r1", "r2"}) == []
    # r1 dies: nothing for RELAY_DEAD_AFTER (4 s), then one move, with a new session.
    died = T0 + 5
    actions = _seconds(core, died, 3, {"r2"})
    assert not [a for a in actions if isinstance(a, SetEndpoint)]
    actions = _seconds(core, died + 3, 3, {"r2"})
    moves = [a for a in actions if isinstance(a, SetEndpoint)]
    assert moves == [SetEndpoint("bravo", KEY_BETA, (STANDBY, 40101))]
    reset = actions.index(traversal.ResetSession("bravo", KEY_BETA))
    # Then something for WireGuard to send to bravo (a hello): it starts the new session
    # through the standby at once, which proves both sites' addresses there.
    after = actions[reset + 1]
    assert isinstance(after, traversal.SendControl) and after.peer == "bravo"
    assert decode_control(after.data).type == "hello"
    status = core.status(died + 6)["peers"]["bravo"]
    assert status["on_standby"] and status["relay"] == "r2"
    assert status["relay_endpoint"] == f"{STANDBY}:40101"
    # r1 returns: nothing moves back (no flap); it stays the plan's choice for a fallback.
    assert _seconds(core, died + 6, 60, {"r1", "r2"}) == []
    assert core.counters["relays_down"] == 1 and core.counters["relays_back"] == 1


def test_with_both_relays_down_nothing_moves() -> None:
    core = _failover_core()
    _seconds(core, T0, 2, {"r1", "r2"})
    assert not [a for a in _seconds(core, T0 + 2, 20, set()) if isinstance(a, SetEndpoint)]


def test_a_peer_the_plan_keeps_relayed_never_offers_nor_follows_to_direct() -> None:
    core = _failover_core(upgrade=False)
    core.set_candidates([("10.1.0.2", WG), ("198.51.100.10", WG)])
    assert core.links["bravo"].controlling  # alpha's key is the smaller: it would offer
    actions = _seconds(core, T0, 10, {"r1", "r2"})
    assert not [a for a in actions if isinstance(a, SendControl)]
    assert core.on_counters("bravo", 100, 100, T0 + 10.5, ("203.0.113.20", WG)) == []


def test_a_direct_peer_whose_relay_died_falls_back_to_the_standby() -> None:
    core = _failover_core(upgrade=True)
    link = core.links["bravo"]
    _seconds(core, T0, 2, {"r1", "r2"})
    core._to_direct(link, ("203.0.113.20", WG), 0.01, T0 + 2)
    actions = _seconds(core, T0 + 2, 6, {"r2"})
    # Direct: only where a fallback would go changes.
    assert not [a for a in actions if isinstance(a, SetEndpoint | traversal.ResetSession)]
    assert link.path == "direct" and link.on_standby
    fallback = core._fall_back(link, T0 + 9, "test")
    assert SetEndpoint("bravo", KEY_BETA, (STANDBY, 40101)) in fallback
    # The standby relay has seen no handshake of the pair: a new session, through it.
    assert traversal.ResetSession("bravo", KEY_BETA) in fallback


def test_a_fallback_goes_back_to_the_plans_relay_once_it_is_up() -> None:
    core = _failover_core(upgrade=True)
    link = core.links["bravo"]
    _seconds(core, T0, 2, {"r1", "r2"})
    _seconds(core, T0 + 2, 6, {"r2"})  # r1 down: bravo moves to r2
    assert link.on_standby
    _seconds(core, T0 + 8, 2, {"r1", "r2"})  # r1 back: nothing moves
    core._to_direct(link, ("203.0.113.20", WG), 0.01, T0 + 10)
    fallback = core._fall_back(link, T0 + 11, "test")
    assert SetEndpoint("bravo", KEY_BETA, (RELAY, 40001)) in fallback
    assert traversal.ResetSession("bravo", KEY_BETA) in fallback
    assert not link.on_standby


def test_a_restart_after_a_failover_starts_the_session_anew_on_the_plans_relay() -> None:
    core = _failover_core()
    (peer,) = [link.config for link in core.links.values()]
    core.configure([])
    back = core.configure([peer], {"bravo": (STANDBY, 40101)})
    assert SetEndpoint("bravo", KEY_BETA, (RELAY, 40001)) in back
    assert traversal.ResetSession("bravo", KEY_BETA) in back
    core.configure([])
    assert not [
        a
        for a in core.configure([peer], {"bravo": (RELAY, 40001)})
        if isinstance(a, traversal.ResetSession)
    ]


def test_a_relay_silent_while_the_other_was_not_heard_since_moves_nothing() -> None:
    # Both relays stop answering, one a little before the other (or this site's own WireGuard
    # went away): the other relay has not answered since, so it is no better.
    core = _failover_core()
    _seconds(core, T0, 2, {"r1", "r2"})
    core.relay_asked("r1", T0 + 2)
    actions = []
    for step in range(80):
        now = T0 + 2.5 + step / 10
        if step % 10 == 0:
            core.relay_asked("r1", now)
            core.relay_asked("r2", now)
        actions += core.tick(now, now + WALL)
    assert not [a for a in actions if isinstance(a, SetEndpoint)]
    assert core.relays_down == {"r1", "r2"}


def _asking(core: Traversal, start: float, seconds: int, answers: dict[str, float]) -> list[Action]:
    """Like :func:`_seconds`, but each relay in ``answers`` answers only from that moment on."""
    actions: list[Action] = []
    for second in range(seconds):
        now = start + second
        for relay in ("r1", "r2"):
            core.relay_asked(relay, now)
            if relay in answers and now >= answers[relay]:
                core.relay_answered(relay, now + 0.01)
        for step in range(10):
            actions += core.tick(now + step / 10, now + step / 10 + WALL)
    return actions


def test_a_relay_whose_first_handshake_is_lost_after_wireguard_returns_is_not_down() -> None:
    """This site's WireGuard went away (the asks could not be sent) and came back: every relay
    needs a new handshake, and one whose first initiation was lost answers only after
    WireGuard's 5 s retry. The other relay answering at once proves nothing about it."""
    core = _failover_core()
    _seconds(core, T0, 3, {"r1", "r2"})
    core.relay_asked("r1", T0 + 3)  # asked; then WireGuard goes: the answer never comes
    core.relay_asked("r2", T0 + 3)
    core.wireguard_gone()
    back = T0 + 10
    actions = _asking(core, back, 8, {"r2": back, "r1": back + 5.4})
    assert not [a for a in actions if isinstance(a, SetEndpoint | traversal.ResetSession)]
    assert core.relays_down == set()


def test_a_relay_dead_since_the_start_is_found_down_once_its_handshakes_had_time() -> None:
    core = _failover_core()
    unheard = round(traversal.RELAY_DEAD_UNHEARD)
    actions = _asking(core, T0, unheard, {"r2": T0})
    assert not [a for a in actions if isinstance(a, SetEndpoint)]
    actions = _asking(core, T0 + unheard, 2, {"r2": T0})
    assert [a for a in actions if isinstance(a, SetEndpoint)] == [
        SetEndpoint("bravo", KEY_BETA, (STANDBY, 40101))
    ]
    assert core.relays_down == {"r1"}


# --- the grace after a switch: relayed datagrams in flight ------------------------------------


def _longest_on_relay(sim: Sim, site: Site, seconds: float) -> float:
    """Run ``seconds``; the longest time ``site``'s WireGuard spent on its relay endpoint."""
    longest = 0.0
    since: float | None = None
    for _ in range(round(seconds / STEP)):
        sim.run(STEP)
        if site.wg_endpoint == site.relay_endpoint:
            since = sim.now if since is None else since
            longest = max(longest, sim.now - since)
        else:
            since = None
    return longest


def test_relayed_datagrams_in_flight_at_the_switch_do_not_pull_the_pair_back() -> None:
    """A slow relay and data both ways: datagrams relayed before the switch arrive after it,
    and WireGuard roams back to the relay. In the grace the sidecar samples every 100 ms and
    sets the direct endpoint again each time; the pair stays direct, nothing falls back, and
    WireGuard spends at most about one sample on the relay each time."""
    sim = easy_pair(relay_delay=0.2)
    sim.a.data_every = sim.b.data_every = 0.02
    switched = upgraded(sim, 2.0)
    on_relay = {site.name: _longest_on_relay(sim, site, 3.0) for site in (sim.a, sim.b)}
    reasserted = {site.name: counters_of(site, "endpoint_reasserted") for site in (sim.a, sim.b)}
    assert sum(reasserted.values()) >= 1, reasserted
    assert max(on_relay.values()) <= SAMPLE_GRACE + 2 * STEP, on_relay
    assert sim.direct() and sim.paths() == ("direct", "direct")
    for site in (sim.a, sim.b):
        assert counters_of(site, "fallbacks") == 0
        sets = [a.endpoint for _, a in actions_of(site, SetEndpoint, switched - 1.0)]
        assert site.relay_endpoint not in sets  # every SetEndpoint was the direct one
    assert not sim.a.core.reasserting(sim.now)


def counters_of(site: Site, name: str) -> int:
    """A per-peer counter of ``site``'s only link."""
    (link,) = site.core.links.values()
    return link.counters[name]


def test_an_endpoint_on_the_relay_is_set_back_in_the_grace_and_followed_after_it() -> None:
    core = _failover_core(upgrade=True)
    link = core.links["bravo"]
    direct = ("203.0.113.20", WG)
    core._to_direct(link, direct, 0.01, T0)
    assert core.reasserting(T0 + 0.5)
    # In the grace: WireGuard roamed to the relay (or the standby relay): set it back.
    for at, where in ((T0 + 0.5, (RELAY, 40001)), (T0 + 1.0, (STANDBY, 40101))):
        assert core.on_counters("bravo", 100, 100, at, where) == [
            SetEndpoint("bravo", KEY_BETA, direct)
        ]
    assert link.counters["endpoint_reasserted"] == 2 and link.path == "direct"
    core.tick(T0 + traversal.REASSERT_GRACE, T0 + WALL)
    assert not core.reasserting(T0 + traversal.REASSERT_GRACE)
    # After it: the peer sends through the relay; follow it there.
    actions = core.on_counters("bravo", 200, 200, T0 + 2.5, (RELAY, 40001))
    assert SetEndpoint("bravo", KEY_BETA, (RELAY, 40001)) in actions
    assert "relay (peer is on the relay) via r1" in [a.text for a in actions if isinstance(a, Log)]
    assert link.path == "relay" and link.counters["endpoint_reasserted"] == 2


def test_a_fallback_starts_a_new_session_through_the_relay() -> None:
    """A relay forwards a session only after it forwarded its handshake, and the pair's
    session may have been made or rekeyed on the direct path."""
    core = _failover_core(upgrade=True)
    link = core.links["bravo"]
    core._to_direct(link, ("203.0.113.20", WG), 0.01, T0)
    actions = core._fall_back(link, T0 + 5, "test")
    assert actions[:2] == [
        SetEndpoint("bravo", KEY_BETA, (RELAY, 40001)),
        ResetSession("bravo", KEY_BETA),
    ]


def test_one_relay_keepalive_per_relay_endpoint_for_many_direct_peers() -> None:
    """Peers relayed through one relay share this site's endpoint there: one NAT mapping,
    so one keepalive every 20 s, however many of them are direct."""
    peers = [
        PeerConfig(f"p{i}", f"{chr(66 + i)}" * 43 + "=", f"10.200.0.{10 + i}", (RELAY, 40001))
        for i in range(5)
    ]
    core = Traversal("alpha", KEY_ALPHA, peers, bytes)
    for i, link in enumerate(core.links.values()):
        core._to_direct(link, ("203.0.113.20", 50000 + i), 0.01, T0)
    sent = [
        (t, a)
        for t in range(0, 60_000, 100)
        for a in core.tick(T0 + t / 1000, WALL + T0 + t / 1000)
        if isinstance(a, SendProbe)
    ]
    assert [t for t, _ in sent] == [0, 20_000, 40_000]
    assert {a.destination for _, a in sent} == {(RELAY, 40001)}


# --- direct peers (mode direct) -----------------------------------------------------------------

DIRECT = ("203.0.113.20", WG)


def _direct_peer(direct: Address | None = DIRECT, key: str = KEY_BETA) -> PeerConfig:
    return _bravo("direct", direct, key)


@pytest.mark.parametrize(
    ("live", "direct", "path", "endpoint"),
    [
        ({"bravo": ("203.0.113.20", 61000)}, DIRECT, "direct", ("203.0.113.20", 61000)),
        ({}, DIRECT, "direct", DIRECT),  # WireGuard could not be read
        (None, None, "direct", None),  # only the peer knows where this side is
        ({"bravo": (RELAY, 40001)}, DIRECT, "relay", (RELAY, 40001)),  # an earlier fallback
        ({"bravo": (STANDBY, 40101)}, DIRECT, "relay", (STANDBY, 40101)),
    ],
    ids=["learned", "unread", "unknown", "on-its-relay", "on-its-standby"],
)
def test_a_direct_peer_is_not_moved_at_start(
    live: dict[str, Address] | None, direct: Address | None, path: str, endpoint: Address | None
) -> None:
    core = Traversal("alpha", KEY_ALPHA, [], random.Random(1).randbytes)
    actions = core.configure([_direct_peer(direct)], live)
    assert not [a for a in actions if isinstance(a, SetEndpoint | ResetSession)]
    status = core.status(T0)["peers"]["bravo"]
    assert (status["mode"], status["path"]) == ("direct", path)
    assert status["endpoint"] == (None if endpoint is None else format_endpoint(*endpoint))
    assert status["on_standby"] == (endpoint == (STANDBY, 40101))
    # The controlling side (alpha) gives a direct path its check pings' session and key.
    watches = [decode_control(a.data) for a in actions if isinstance(a, SendControl)]
    assert [w.type for w in watches] == (["watch"] if path == "direct" else [])
    # Nothing moves it on the first ticks either.
    ticks = [a for t in range(0, 3000, 20) for a in core.tick(T0 + t / 1000, WALL + T0)]
    assert not [a for a in ticks if isinstance(a, SetEndpoint | ResetSession)]


def test_a_direct_peer_on_no_endpoint_learns_the_one_wireguard_roams_to() -> None:
    core = Traversal("bravo", KEY_BETA, [], bytes)
    core.configure([_direct_peer(None, KEY_ALPHA)])
    assert core.on_counters("bravo", 0, 0, T0, None) == []
    assert core.on_counters("bravo", 148, 92, T0 + 1, ("198.51.100.10", 4500)) == []
    link = core.links["bravo"]
    assert link.path == "direct" and link.endpoint == ("198.51.100.10", 4500)
    assert not core.links["bravo"].controlling  # bravo waits for alpha's watch: no message
    assert core.status(T0)["peers"]["bravo"]["endpoint"] == "198.51.100.10:4500"


def test_a_reload_keeps_a_direct_peer_and_its_session() -> None:
    core = Traversal("alpha", KEY_ALPHA, [], random.Random(2).randbytes)
    core.configure([_direct_peer()], {"bravo": DIRECT})
    session = core.links["bravo"].session
    moved = dataclasses.replace(_direct_peer(), relay_endpoint=(RELAY, 40009))
    actions = core.configure([moved], {"bravo": DIRECT})
    assert not [a for a in actions if isinstance(a, SetEndpoint | ResetSession)]
    assert core.links["bravo"].path == "direct" and core.links["bravo"].session == session
    # On the relay the plan no longer gives it: onto the new one, a new session there.
    core.configure([_direct_peer()], {"bravo": (RELAY, 40009)})
    assert core.links["bravo"].path == "relay"


def test_a_direct_pair_is_watched_falls_back_when_its_path_dies_and_upgrades_again() -> None:
    sim = easy_pair(mode="direct")
    sim.a.data_every = sim.b.data_every = 0.05
    sim.run(3.0)
    assert sim.paths() == ("direct", "direct") and sim.direct()
    assert sim.a.wg_endpoint == ("203.0.113.20", WG)
    assert sim.b.wg_endpoint == ("198.51.100.10", WG)
    for site in (sim.a, sim.b):
        assert actions_of(site, SetEndpoint) == []  # never moved to its relay
    session = sim.a.core.links["bravo"].session
    assert session is not None and sim.b.core.links["alpha"].session == session  # the watch
    cut, back = _cut_the_direct_path(sim)
    # Whoever noticed first started a session through the relay, which never saw the pair.
    first = min((sim.a, sim.b), key=lambda s: back[s.name])
    assert actions_of(first, ResetSession, cut)
    assert [c.type for _, c in controls(first, cut)].count("fallback") == 1
    # Healed: the controlling side offers after the backoff, and both go direct again.
    sim.cut = False
    healed = sim.now
    when = upgraded(sim, 5.0)
    assert when - healed < 3.0
    assert [c.type for _, c in controls(sim.a, healed)][:1] == ["offer"]
    sim.run(5.0)
    assert sim.direct() and sim.paths() == ("direct", "direct")


def test_a_direct_path_with_one_way_traffic_is_proven_by_check_pings() -> None:
    """The watch gave both sides a session: alpha's check pings are answered, no fallback."""
    sim = easy_pair(mode="direct")
    sim.a.data_every = sim.b.data_every = 0.1
    sim.run(2.0)  # both NATs have let the other in
    sim.a.data_every = sim.b.data_every = None
    start = sim.now
    _one_way_data(sim)
    assert sim.paths() == ("direct", "direct")
    assert path_probes(sim.a, start)  # it did check
    assert sim.b.core.links["alpha"].counters["pongs"] > 0
    assert actions_of(sim.a, SetEndpoint, start) == []


@pytest.mark.parametrize("side", ["alpha", "bravo"])
def test_a_restarted_sidecar_keeps_a_direct_pair_direct_and_agrees_a_new_session(
    side: str,
) -> None:
    sim = easy_pair(mode="direct")
    sim.a.data_every = sim.b.data_every = 0.05
    sim.run(3.0)
    site = sim.sites[side]
    restarted = sim.now
    sim.restart(site)
    sim.run(2.0)
    assert sim.paths() == ("direct", "direct") and sim.direct()
    for each in (sim.a, sim.b):
        assert actions_of(each, SetEndpoint, restarted) == []
    session = sim.a.core.links["bravo"].session
    assert session is not None and sim.b.core.links["alpha"].session == session


def test_hellos_from_the_run_a_pair_upgraded_with_move_nothing() -> None:
    """Both sidecars restarted one after the other (an Ansible run): the second never heard
    the first one's hellos, the two upgrade together, then a late hello of the first one's run
    arrives (a hello sent while the peer's WireGuard session was being started anew is
    delivered late or lost). It comes from the run the pair just upgraded with, which its offer
    or answer named: no move to the relay, which would cost a new WireGuard session there."""
    sim = easy_pair()
    upgraded(sim, 1.0)
    sim.restart(sim.a)
    sim.run(max(traversal.HELLO_AT) + 0.5)
    sim.restart(sim.b)
    sim.run_until(lambda: sim.paths() == ("direct", "direct") and sim.direct(), 5.0)
    late = encode_control(Control("hello", sim.a.core.name, sim.a.core.run))
    source = sim.b.core.links[sim.a.core.name].config.overlay_address
    actions = sim.b.core.on_control(source, late, sim.now, sim.wall(sim.b))
    assert actions == []
    assert counters(sim.b)["hello_repeated"] == 1


def test_the_side_that_switches_last_says_hello_with_its_new_session() -> None:
    """The side that accepts the nomination starts its WireGuard session anew on the direct
    path, then sends the peer a hello through it: an open site has no keepalive of its own,
    and the peer, still sending with the old keys, would start a new session only after 15 s
    without an answer."""
    sim = easy_pair()
    start = sim.now
    upgraded(sim, 5.0)
    accepting = next(s for s in (sim.a, sim.b) if not s.core.links[sim.peer(s).name].controlling)
    [(reset_at, _)] = actions_of(accepting, ResetSession, start)
    hellos = [t for t, c in controls(accepting, reset_at) if c.type == "hello"]
    assert hellos and hellos[0] == reset_at


def test_at_most_four_ports_an_attempt_are_learned_from_pings_and_never_the_overlay() -> None:
    """Authentic pings from ports bravo never offered: each is pinged back at once, up to
    MAX_PEER_REFLEXIVE in an attempt; one from bravo's overlay address came through the
    tunnel and teaches nothing."""
    core, session, key, _ = _alpha_alone()
    link = core.links["bravo"]
    offered = link.remote_candidates
    tunnel = encode_probe(Probe(PING, session, 1), key)
    core.on_probe((link.config.overlay_address, WG), tunnel, T0 + 0.31)
    learned = []
    for n in range(MAX_PEER_REFLEXIVE + 2):
        source = ("203.0.113.20", 40000 + n)
        actions = core.on_probe(source, encode_probe(Probe(PING, session, 2 + n), key), T0 + 0.32)
        if any(isinstance(a, SendProbe) and a.destination == source and
               decode_probe(a.data, key).kind == PING for a in actions):  # fmt: skip
            learned.append(source)
    assert learned == [("203.0.113.20", 40000 + n) for n in range(MAX_PEER_REFLEXIVE)]
    assert link.remote_candidates == (*offered, *learned)
    assert link.counters["peer_reflexive"] == MAX_PEER_REFLEXIVE
