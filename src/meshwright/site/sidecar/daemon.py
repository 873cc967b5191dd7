"""The traversal daemon: the I/O around :class:`~.traversal.Traversal`.

One thread, one ``selectors`` loop. It owns:

* the control socket, UDP on this site's overlay address (``control_port``): messages to and
  from other sites' sidecars, inside WireGuard;
* the probe socket (:class:`~.rawudp.ProbeSocket`): probes from and to WireGuard's listen port;
* the WG-STUN client socket, also on the overlay address: every :data:`STUN_INTERVAL` it asks
  each relay where that relay sees WireGuard's socket (:mod:`meshwright.relay.wgstun`);
* WireGuard itself, through :class:`WireGuardControl`: each peer's counters and endpoint, every
  :data:`SAMPLE_BUSY` or :data:`SAMPLE_IDLE` seconds, and every :data:`SAMPLE_GRACE` while a
  peer is in the grace after a switch to direct (so that an endpoint a relayed datagram pulled
  back to the relay is set again within that); endpoint changes when the core decides them;
* the state file, rewritten atomically every second while something changes, which
  ``meshwright sidecar status`` prints; the same state, with WireGuard's handshake times and
  byte counters of the peers, is what its Prometheus metrics show
  (:mod:`meshwright.metrics`, when the configuration has ``metrics``).

Nothing here decides anything: every decision is the core's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import selectors
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from meshwright.metrics import MetricsEndpoint, sidecar_families
from meshwright.wire import stun
from meshwright.wire.endpoint import format_endpoint

from .config import SidecarConfigError, TraversalConfig, load_sidecar_file
from .rawudp import ProbeSocket
from .traversal import (
    Action,
    Log,
    PeerConfig,
    Remap,
    ResetSession,
    SendControl,
    SendProbe,
    SetEndpoint,
    Traversal,
)

__all__ = ["TraversalDaemon", "WireGuardControl"]

Address = tuple[str, int]
# WireGuard's counters: often while data flows on a direct path (fallback within 3 s), seldom
# when nothing moves (an idle sidecar costs next to nothing), and very often for the 2 s after
# a switch to direct: a relayed datagram that pulled the endpoint back to the relay then
# costs at most this long on the relay (each sample is one netlink dump of the interface).
SAMPLE_BUSY = 0.25
SAMPLE_IDLE = 1.0
SAMPLE_GRACE = 0.1
STUN_INTERVAL = 25.0  # libtelio re-polls WG-STUN every 25 s; mappings live longer than that
# With standby relays, each relay is asked every second too: an answer says it is up, and four
# missed ones (traversal.RELAY_DEAD_AFTER) move the peers on it to their standby.
RELAY_CHECK = 1.0
STATE_INTERVAL = 1.0
LOOP_INTERVAL = 0.25  # the longest sleep; the core's next_wakeup makes it shorter
IP_FREEBIND = 15


class WireGuardControl(Protocol):
    def sample(self) -> Mapping[str, tuple[Address | None, int, int, float | None]]:
        """Public key -> (endpoint, bytes received, bytes sent, latest handshake in wall-clock
        seconds or None for none yet) of every peer."""

    def set_endpoint(self, public_key: str, endpoint: Address) -> None: ...

    def reset_session(self, public_key: str) -> None: ...

    def close(self) -> None: ...


def local_addresses(excluded: Iterable[str]) -> list[str]:
    """This host's global IPv4 addresses, but on the excluded interfaces (WireGuard's)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "address", "show"], check=True, capture_output=True, text=True
    ).stdout
    skip = set(excluded) | {"lo"}
    found = []
    for link in json.loads(out or "[]"):
        if link.get("ifname") in skip:
            continue
        for info in link.get("addr_info", []):
            address = info.get("local")
            if address and not ipaddress.ip_address(address).is_loopback:
                found.append(address)
    return found


class TraversalDaemon:
    def __init__(
        self,
        config: TraversalConfig,
        wireguard: WireGuardControl,
        *,
        probes: ProbeSocket | None = None,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        addresses: Callable[[], list[str]] | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.wireguard = wireguard
        self.log = log
        self.clock = clock
        self.wall = wall
        self.counters: Counter[str] = Counter()
        self.core = Traversal(config.site, config.public_key, self._peer_configs(), os.urandom)
        self.probes = probes or ProbeSocket(config.listen_port)
        self._addresses = addresses or (lambda: local_addresses([config.interface]))
        self.selector = selectors.DefaultSelector()
        self.control = self._overlay_socket(config.control_port)
        self.stun_socket = self._overlay_socket(0)
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.probes, selectors.EVENT_READ, "probe")
        self.selector.register(self.stun_socket, selectors.EVENT_READ, "stun")
        self.mapped: dict[str, Address] = {}  # relay -> WireGuard socket as it sees it
        self.also_mapped: dict[str, tuple[Address, ...]] = {}  # relay -> more of its mappings
        self._stun_pending: dict[bytes, str] = {}
        self._stopping = False
        self._reload = False
        self._last_counters: dict[str, tuple[int, int]] = {}
        self._sampled_at = float("-inf")
        # Peer -> WireGuard's counters and latest handshake, as last sampled.
        self.wireguard_peers: dict[str, dict[str, Any]] = {}
        # What a scrape reads (from the metrics thread): replaced whole, never changed.
        self.published: dict[str, Any] = {}
        self.metrics = MetricsEndpoint(
            lambda: sidecar_families(self.published, self.wall()), "sidecar", log
        )
        self.config_path = config_path
        self._state_text = ""
        self._last_remap = float("-inf")

    def _overlay_socket(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)  # before WireGuard's address exists
        sock.bind((self.config.overlay_address, port))
        sock.setblocking(False)
        return sock

    def stop(self, *_: object) -> None:
        self._stopping = True

    def request_reload(self, *_: object) -> None:
        self._reload = True

    def reload(self) -> None:
        """Re-read the configuration: unchanged peers keep their path and state."""
        if self.config_path is None:
            return
        try:
            _, config = load_sidecar_file(self.config_path)
        except (OSError, SidecarConfigError) as exc:
            self.counters["config_errors"] += 1
            self.log(f"sidecar: keeping the current configuration: {exc}")
            return
        site_settings = ("site", "public_key", "interface", "listen_port", "overlay_address")
        if config is None or any(
            getattr(config, name) != getattr(self.config, name) for name in site_settings
        ):
            # Sockets and the probe filter depend on these: stop, and systemd starts the
            # service again with them (Restart=always); punch peers restart on their relays.
            self.log("sidecar: this site's own settings changed: restarting")
            self._stopping = True
            return
        self.config = config
        self.metrics.update(config.metrics)
        self.carry_out(self.core.configure(self._peer_configs(), self._live_endpoints()))
        self.refresh_candidates()
        self.ask_relays()
        self.log(f"sidecar: reloaded, {self._peers_text()}")

    def _peer_configs(self) -> list[PeerConfig]:
        return list(self.config.peers)

    def _peers_text(self) -> str:
        modes = Counter(p.mode for p in self.config.peers)
        return ", ".join(f"{n} {mode} peers" for mode, n in sorted(modes.items())) or "no peers"

    def _live_endpoints(self) -> dict[str, Address | None]:
        """WireGuard's endpoint for each peer now (none known when it cannot be read)."""
        try:
            sampled = self.wireguard.sample()
        except (OSError, RuntimeError):
            return {}
        return {
            p.name: sampled[p.public_key][0] for p in self.config.peers if p.public_key in sampled
        }

    # --- actions --------------------------------------------------------------------------

    def carry_out(self, actions: Iterable[Action]) -> None:
        overlay = {p.name: p.overlay_address for p in self.config.peers}
        for action in actions:
            try:
                if isinstance(action, SendControl):
                    destination = (overlay[action.peer], self.config.control_port)
                    self.control.sendto(action.data, destination)
                elif isinstance(action, SendProbe):
                    self.probes.send(action.destination, action.data)
                elif isinstance(action, SetEndpoint):
                    self.wireguard.set_endpoint(action.public_key, action.endpoint)
                elif isinstance(action, ResetSession):
                    self.wireguard.reset_session(action.public_key)
                elif isinstance(action, Remap):
                    self.remap()
                elif isinstance(action, Log):
                    self.log(f"sidecar: {action.peer}: {action.text}")
            except (OSError, RuntimeError) as exc:
                self.counters[f"{type(action).__name__.lower()}_errors"] += 1
                self.log(f"sidecar: {type(action).__name__} failed: {exc}")

    # --- candidates -----------------------------------------------------------------------

    def refresh_candidates(self) -> None:
        port = self.config.listen_port
        candidates: set[Address] = set()
        with contextlib.suppress(OSError, subprocess.CalledProcessError, ValueError):
            candidates |= {(a, port) for a in self._addresses() if a != self.config.overlay_address}
        candidates |= {(a, port) for a in self.config.public_addresses}
        candidates |= set(self.mapped.values())
        candidates |= {a for also in self.also_mapped.values() for a in also}
        self.core.set_candidates(candidates)

    def remap(self) -> None:
        """At most once a second: a fallback of several peers at once asks once."""
        now = self.clock()
        if now - self._last_remap >= 1.0:
            self._last_remap = now
            self.refresh_candidates()
            self.ask_relays()

    def ask_relays(self) -> None:
        now = self.clock()
        for relay in self.config.relays:
            request = stun.binding_request(software="meshwright sidecar")
            self._stun_pending[request[8:20]] = relay.name
            try:
                self.stun_socket.sendto(request, (relay.overlay_address, relay.port))
            except OSError:
                # This site's WireGuard is not up: that says nothing of the relay.
                self.core.wireguard_gone()
                continue
            self.core.relay_asked(relay.name, now)
        if len(self._stun_pending) > 64:
            self._stun_pending = dict(list(self._stun_pending.items())[-16:])

    def _on_stun(self) -> None:
        try:
            datagram, _ = self.stun_socket.recvfrom(2048)
            message = stun.decode(datagram)
        except (OSError, stun.StunError):
            self.counters["dropped_stun"] += 1
            return
        relay = self._stun_pending.pop(message.transaction_id, None)
        mapped = message.xor_mapped_address()
        if relay is None or mapped is None:
            self.counters["dropped_stun"] += 1
            return
        self.core.relay_answered(relay, self.clock())
        also = message.also_mapped()
        if self.mapped.get(relay) != mapped or self.also_mapped.get(relay) != also:
            self.mapped[relay], self.also_mapped[relay] = mapped, also
            more = f" (and {', '.join(format_endpoint(*a) for a in also)})" if also else ""
            self.log(f"sidecar: {relay} sees WireGuard at {format_endpoint(*mapped)}{more}")
            self.refresh_candidates()

    # --- the loop -------------------------------------------------------------------------

    def sample(self, now: float) -> bool:
        """Feed the counters to the core; True when a peer's counters moved."""
        self._sampled_at = now
        try:
            peers = self.wireguard.sample()
        except (OSError, RuntimeError) as exc:
            self.counters["sample_errors"] += 1
            self.log(f"sidecar: cannot read WireGuard: {exc}")
            return False
        names = {p.public_key: p.name for p in self.config.peers}
        moved = False
        seen: dict[str, dict[str, Any]] = {}
        for key, (endpoint, rx, tx, handshake) in peers.items():
            if key in names:
                moved = moved or self._last_counters.get(key) != (rx, tx)
                self._last_counters[key] = (rx, tx)
                seen[names[key]] = {"rx_bytes": rx, "tx_bytes": tx, "latest_handshake": handshake}
                self.carry_out(self.core.on_counters(names[key], rx, tx, now, endpoint))
        self.wireguard_peers = seen
        return moved

    def write_state(self, now: float) -> None:
        state = self.core.status(now)
        state["mapped"] = {r: format_endpoint(*m) for r, m in sorted(self.mapped.items())}
        state["also_mapped"] = {
            r: [format_endpoint(*a) for a in also]
            for r, also in sorted(self.also_mapped.items())
            if also
        }
        state["daemon_counters"] = dict(sorted(self.counters.items()))
        state["wireguard"] = dict(sorted(self.wireguard_peers.items()))
        self.published = state
        text = json.dumps(state, indent=2, sort_keys=True) + "\n"
        if text == self._state_text:
            return
        self._state_text = text
        path = self.config.state_file
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(text)
            temporary.replace(path)

    def serve_forever(self) -> None:
        self.metrics.update(self.config.metrics)
        self.refresh_candidates()
        self.ask_relays()
        # Every punch peer starts on its relay (whatever a previous run left is undone), every
        # direct one where WireGuard has it.
        self.carry_out(self.core.configure([]))
        self.carry_out(self.core.configure(self._peer_configs(), self._live_endpoints()))
        self.core.start(self.clock())
        self.log(f"sidecar: traversal for {self._peers_text()} on port {self.config.listen_port}")
        now = self.clock()
        next_sample, next_stun, next_state = now, now + STUN_INTERVAL, now
        next_check = now + RELAY_CHECK
        # The first offer waits for the relays' answers (or at most half a second).
        settle = now + 0.5
        while not self._stopping:
            if self._reload:
                self._reload = False
                self.reload()
            now = self.clock()
            wakeup = min(self.core.next_wakeup(now), next_sample, next_state, next_check)
            if now < settle:
                wakeup = min(wakeup, settle)
            wait = min(LOOP_INTERVAL, max(0.0, wakeup - now))
            for key, _ in self.selector.select(wait):
                if key.data == "control":
                    self._drain_control()
                elif key.data == "probe":
                    self._drain_probes()
                elif key.data == "stun":
                    self._on_stun()
            now = self.clock()
            if now >= settle or len(self.mapped) == len(self.config.relays):
                self.carry_out(self.core.tick(now, self.wall()))
            if self.core.reasserting(now):  # a switch to direct since the last sample, too
                next_sample = min(next_sample, self._sampled_at + SAMPLE_GRACE)
            if now >= next_sample:
                busy = self.sample(now)
                if self.core.reasserting(now):
                    next_sample = now + SAMPLE_GRACE
                else:
                    next_sample = now + (SAMPLE_BUSY if busy else SAMPLE_IDLE)
            if now >= next_stun:
                self.refresh_candidates()
                self.ask_relays()
                next_stun = now + STUN_INTERVAL
                next_check = now + RELAY_CHECK
            elif now >= next_check:
                next_check = now + RELAY_CHECK
                if any(p.standby_endpoint is not None for p in self.config.peers):
                    self.ask_relays()
            if now >= next_state:
                self.write_state(now)
                next_state = now + STATE_INTERVAL

    def _drain_control(self) -> None:
        for _ in range(64):
            try:
                datagram, source = self.control.recvfrom(4096)
            except BlockingIOError:
                return
            except OSError:
                self.counters["control_errors"] += 1
                return
            self.carry_out(self.core.on_control(source[0], datagram, self.clock(), self.wall()))

    def _drain_probes(self) -> None:
        for _ in range(256):
            try:
                received = self.probes.receive()
            except OSError:
                self.counters["probe_errors"] += 1
                return
            if received is None:
                return
            if self._through_wireguard(received.interface):
                # A ping to one of this site's LAN addresses, routed into the tunnel by the
                # peer (or its answer): it came through the relay, not a direct path.
                self.counters["dropped_probe_tunnel"] += 1
                continue
            self.carry_out(self.core.on_probe(received.source, received.payload, self.clock()))

    def _through_wireguard(self, interface: int) -> bool:
        if interface == 0:
            return False
        try:
            return socket.if_indextoname(interface) == self.config.interface
        except OSError:
            return False  # gone since it arrived: cannot tell (the core still checks the probe)

    def close(self) -> None:
        self.metrics.close()
        self.carry_out(self.core.stop())
        self.selector.close()
        self.control.close()
        self.stun_socket.close()
        self.probes.close()
        self.wireguard.close()


def install_signals(daemon: TraversalDaemon) -> None:
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    signal.signal(signal.SIGHUP, daemon.request_reload)


def read_state(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
