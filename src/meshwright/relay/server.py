"""`meshwright relay`: the relay's forwarding service, the I/O around :mod:`.sites`.

Configuration
-------------

It reads the sites this relay serves from a JSON file (the relay role writes it)::

    {"address": "198.51.100.10",
     "sites": [{"name": "easy1", "port": 40000, "public_key": "<base64>"}, ...],
     "limits": {"packets_per_second": 50000, "bytes_per_second": 100000000},
     "kernel": true, "metrics": {...}, "tls": {...}}

Every site X has one port ``P_X`` (the same number on every relay) and the service binds one
UDP socket per site on ``address``. A datagram arriving on ``P_X`` is X's: :class:`.sites.Relay`
decides where it goes (the receiver is told by WireGuard's indices, an initiation's by its
mac1), and the service sends it, unchanged, out of the *receiver's* port to the receiver's
confirmed address. ``limits`` (optional, per sender site) are :class:`.messages.Limits`.

SIGHUP re-reads the file. New sites get a socket, removed ones lose theirs and their state; an
unchanged site keeps its socket, its confirmed address and its sessions, so a new site never
disturbs the others. A site whose public key changed (a rotation) keeps what was learned too; a
site whose port changed, or every site when ``address`` changed, starts afresh. A file that
cannot be used (bad JSON, two sites on one port or with one key) changes nothing, logged.

UDP-blocked sites
-----------------

With a ``"tls"`` section the service also listens on TCP 443 (``"port"``) for sites that cannot
send UDP (:mod:`.tls`: mutual TLS, each site known by its pinned certificate, and allowed only
its own port ``P_X`` in frames; :mod:`meshwright.site.sidecar` is the other end). What such a
site sends arrives as X's with the pseudo-address ``("tls:X", P_X)`` as its source; what is
sent to it (its confirmed address is that pseudo-address) becomes a frame on its connection.
Port 443 is shared with STUN over TCP: a connection that does not start a TLS handshake is
served as STUN (``"stun"``), so that a UDP-blocked site can still tell "UDP blocked" from "relay
down"::

    "tls": {"port": 443, "listen": ["198.51.100.10"], "sites": {"blocked": "<PEM>"},
            "certificate": "/etc/meshwright/relay-tls.crt", "key": "/etc/meshwright/relay-tls.key",
            "stun": {"addresses": ["198.51.100.10"], "port": 3478, "alt_port": 3479}}

State file
----------

Written every second when something changed (and at the first pass, and at exit) as compact
JSON, read at start::

    {"address": "198.51.100.10",
     "sites": {"easy1": {"port": 40000, "public_key": "<base64>",
                         "confirmed": ["203.0.113.5", 4500] | null,
                         "counters": {"forwarded": n, "forwarded_bytes": n,
                                      "kernel_forwarded": n, "keepalives": n,
                                      "delivered": n, "delivered_bytes": n,
                                      "dropped_<reason>": n, ...}}},
     "sessions": [["easy1", "easy2", 1234567], ...],
     "pairs": {"easy1--easy2": {"forwarded": n, "forwarded_bytes": n, "kernel_forwarded": n}}}

``confirmed`` is the site's proven address (a TLS site's is its pseudo-address) and
``sessions`` the proven index table (owner, peer, the index the peer sends to the owner): after
a restart both are restored, for the sites whose port (and the relay's address) did not change,
so relayed pairs carry traffic at once instead of waiting for their next handshake. The
counters count since the service started. Each site's count what *it sent* (what arrived on
its port, by the code or the kernel): ``forwarded``/``forwarded_bytes`` (of those,
``kernel_forwarded`` packets by the kernel), ``keepalives`` (the sidecar's 4-byte mapping
keepalive, :data:`.messages.MAPPING_KEEPALIVE`, never forwarded) and ``dropped_<reason>`` (the
reasons of :mod:`.sites`, ``rate_limited`` including the kernel's, and ``send_error``: the
socket refused the send); and what was sent *to it*: ``delivered``/``delivered_bytes``.
``public_key`` is there for :mod:`.wgstun`, which reads this file.

``pairs`` counts, by pair (``"a--b"``, a before b by name), the datagrams the relay forwarded
between the two sites, either way, by the code or the kernel: ``forwarded``/``forwarded_bytes``
(UDP payload; transport data, handshakes and cookie replies, as the sites' ``forwarded``) and
of those ``kernel_forwarded`` packets by the kernel. A pair is listed while it has a session
in the relay's index table (restored ones included) and once more after its last one expired
(or a site was removed): then it goes, so the file grows with the live relayed sessions, not
with the planned pairs. A pair that is not listed forwarded nothing since it was last seen;
one that meets again counts from zero. A direct pair is not listed at all.

In the seconds the file is not written, the loop touches it (sets its mtime: writing it costs
far more, 0.23 s at 10,000 sites), so its mtime says the loop ran within about a second.
WG-STUN answers sites only while it did (:data:`.wgstun.RELAY_SILENT_AFTER`), and sites take its
silence as this relay being down: a relay whose forwarding service died or hung is failed over
like a dead one. Run without ``--state``, the service proves nothing and this relay's WG-STUN,
if it runs, stays silent. A clean stop writes the file and then dates it back to 1970, so
WG-STUN falls silent at once instead of some seconds later; a restart writes it anew within a
second of starting, well before sites would take the silence for a dead relay.

Metrics
-------

With ``"metrics": {"address": "10.99.0.254", "port": 9588}`` it serves Prometheus metrics there
(:mod:`meshwright.metrics`, per site, label ``site``; absent is off), from the state the loop
publishes once a second.

Kernel forwarding
-----------------

With ``"kernel": true`` the kernel forwards the transport data of proven sessions
(:mod:`.kernel`: nftables rules keyed on the arrival port, the sender's confirmed address and
the receiver index, which this service installs once a second, follows and removes; it needs
CAP_NET_ADMIN and ``net.ipv4.ip_forward`` on, and stays on the code's path, saying why, when it
has neither). Handshakes, and each new session's first data, still come here. A datagram that
moves a confirmed address has the routes it invalidates withdrawn before it is sent on. The
rules' counters are folded into the sender's ``forwarded``, ``forwarded_bytes``,
``kernel_forwarded`` and ``dropped_rate_limited``, the receiver's ``delivered`` counters and
the pair's counters.

The standard library and, for its metrics, prometheus_client (pure Python, in the node
artifact): it runs on Debian's python3.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshwright.metrics import MetricsEndpoint, parse_setting, relay_families
from meshwright.relay.stun_server import StunResponder, StunStreams, StunTcpClient
from meshwright.wire.endpoint import format_endpoint
from meshwright.wire.stream import widen_buffers

from . import kernel
from .messages import FORWARDED, FORWARDED_BYTES, Address, Limits
from .sites import KERNEL_FORWARDED, Delivery, Relay
from .tls import TlsClients

__all__ = ["RelayConfigError", "RelayServer", "main"]

_BATCH = 256  # datagrams read from one socket per wake-up, so one busy site cannot starve others
_MAX_DATAGRAM = 65535
DELIVERED = "delivered"
DELIVERED_BYTES = "delivered_bytes"
_SEND_ERROR = "dropped_send_error"
_RATE_LIMITED = "dropped_rate_limited"


@dataclass(frozen=True)
class SiteSpec:
    """One entry of the configuration's ``sites``."""

    name: str
    port: int
    public_key: str  # base64, as WireGuard shows it


@dataclass(frozen=True)
class RelayConfig:
    address: str
    sites: dict[str, SiteSpec]
    limits: Limits


class _Port:
    """One site's port: its socket and what the service counts for it itself (the core counts
    the rest)."""

    __slots__ = ("counts", "delivered", "delivered_bytes", "sock", "spec")

    def __init__(self, spec: SiteSpec, sock: socket.socket | None) -> None:
        self.spec = spec
        self.sock = sock  # None: it could not be bound (logged); retried on the next reload
        self.delivered = 0
        self.delivered_bytes = 0
        self.counts: Counter[str] = Counter()  # the kernel's share, send errors

    def counters(self, core: Relay) -> dict[str, int]:
        counts = core.site_counters(self.spec.name)
        counts.update(self.counts)
        counts[KERNEL_FORWARDED] += 0
        counts[DELIVERED] = self.delivered
        counts[DELIVERED_BYTES] = self.delivered_bytes
        counts[_SEND_ERROR] += 0
        return dict(sorted(counts.items()))


class RelayConfigError(ValueError):
    """The configuration is unusable; the message names the entry and the value."""


def parse_config(data: Any) -> RelayConfig:
    """The forwarding part of the configuration; RelayConfigError names what is wrong."""
    if not isinstance(data, dict):
        raise RelayConfigError("the relay's configuration is not a JSON object")
    address = data.get("address")
    if not isinstance(address, str) or not address:
        raise RelayConfigError(f"address: {address!r} is not an address")
    try:
        limits = Limits(**(data.get("limits") or {}))
    except (TypeError, ValueError) as exc:
        raise RelayConfigError(f"limits: {exc}") from None
    sites: dict[str, SiteSpec] = {}
    ports: dict[int, str] = {}
    keys: dict[str, str] = {}
    entries = data.get("sites") or []
    if not isinstance(entries, list):
        raise RelayConfigError("sites: not a list")
    for position, entry in enumerate(entries):
        try:
            name, port, key = entry["name"], entry["port"], entry["public_key"]
            if not isinstance(name, str) or not name:
                raise ValueError(f"name {name!r} is not a name")
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
                raise ValueError(f"port {port!r} is not a port")
            if len(base64.b64decode(str(key), validate=True)) != 32:
                raise ValueError("the public key is not 32 bytes")
            for seen, what, value in ((sites, "name", name), (ports, "port", port)):
                if value in seen:
                    raise ValueError(f"{what} {value!r} is listed twice")
            if key in keys:
                raise ValueError(f"the public key is {keys[key]!r}'s too")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise RelayConfigError(f"sites[{position}]: {exc}") from None
        sites[name] = SiteSpec(name, port, str(key))
        ports[port] = name
        keys[key] = name
    return RelayConfig(address, sites, limits)


class RelayServer:
    """Forwards for every site in ``config``; one thread, one selector."""

    def __init__(
        self, config: Path, state: Path | None = None, log: Callable[[str], None] = print
    ) -> None:
        self.config, self.state, self.log = config, state, log
        self.selector = selectors.DefaultSelector()
        self.core: Relay | None = None  # made by the first usable configuration
        self.address = ""
        self.limits = Limits()
        self.ports: dict[str, _Port] = {}  # by site
        self.by_port: dict[int, _Port] = {}
        self.tls: TlsClients | None = None
        self.stun: StunStreams | None = None
        self.stats: dict[str, int] = {}
        self.tls_sites: tuple[str, ...] = ()
        # What a scrape reads (from the metrics thread): replaced whole, never changed.
        self.published: dict[str, Any] = {}
        self.metrics = MetricsEndpoint(lambda: relay_families(self.published), "relay", log)
        self._reload = True
        self._stop = False
        self._dirty = False
        # Kernel forwarding (None: off): the routes installed, and the last reading of the
        # rules' counters.
        self.kernel: dict[kernel.RouteKey, kernel.Route] | None = None
        self.kernel_counts = kernel.Counts.empty()
        self._restored = self._read_state()

    # --- configuration --------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        if self.state is None or not self.state.exists():
            return {}
        try:
            data = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return {}  # a damaged state file costs one handshake per session, nothing more
        return data if isinstance(data, dict) else {}

    def _make_core(self, config: RelayConfig) -> Relay:
        """The core for the first configuration, with what the state file says of the sites
        whose port (and the relay's address) are unchanged."""
        keys = {name: base64.b64decode(spec.public_key) for name, spec in config.sites.items()}
        restored = self._restored
        saved = restored.get("sites") if restored.get("address") == config.address else None
        confirmed: dict[str, Address] = {}
        for name, spec in config.sites.items():
            entry = saved.get(name) if isinstance(saved, dict) else None
            if not isinstance(entry, dict) or entry.get("port") != spec.port:
                continue
            address = entry.get("confirmed")
            if isinstance(address, list) and len(address) == 2:
                host, port = address
                if isinstance(host, str) and isinstance(port, int) and 0 <= port <= 0xFFFF:
                    confirmed[name] = (host, port)
        sessions = [
            (owner, peer, index)
            for owner, peer, index in _triples(restored.get("sessions"))
            if owner in confirmed and peer in confirmed
        ]
        self._restored = {}
        return Relay(keys, config.limits, confirmed, sessions)

    def reload(self) -> None:
        """Bring the sites to the file's; keep the unchanged ones untouched."""
        try:
            data = json.loads(self.config.read_text())
            config = parse_config(data)
            metrics = parse_setting(data.get("metrics"))
        except (OSError, ValueError) as exc:
            self.log(f"relay: keeping the current sites: {self.config}: {exc}")
            return
        self._kernel_switch(bool(data.get("kernel")))
        if self.core is None:
            self.core, self.address, self.limits = (
                self._make_core(config),
                config.address,
                config.limits,
            )
        core = self.core
        if config.limits != self.limits:
            core.update_limits(config.limits)
            self.limits = config.limits
            if self.kernel is not None:
                # The kernel's limit objects are made once: make the table anew.
                self._kernel_tick(time.monotonic(), install=False)
                self._kernel_switch(False)
                self._kernel_switch(True)
        moved = config.address != self.address
        self.address = config.address
        keys = {name: base64.b64decode(spec.public_key) for name, spec in config.sites.items()}
        # Sites gone, or on another port (or address): their sockets and their state go.
        restart = [
            name
            for name, opened in self.ports.items()
            if name not in config.sites or moved or config.sites[name].port != opened.spec.port
        ]
        for name in restart:
            self._close(name)
        if restart:
            core.update_sites({name: key for name, key in keys.items() if name not in restart})
        core.update_sites(keys)  # parse_config checked what would raise ValueError here
        for name, spec in config.sites.items():
            opened = self.ports.get(name)
            if opened is None or opened.sock is None:
                self._open(spec, opened)
            else:
                opened.spec = spec  # a key rotation: same port, what was learned stays
        self.by_port = {p.spec.port: p for p in self.ports.values()}
        core.moved.clear()  # what follows withdraws every route that changed
        self._kernel_withdraw(time.monotonic())
        tls = data.get("tls")
        if tls:
            try:
                self._serve_tls(tls)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.log(f"relay: TLS service not (re)configured: {exc!r}")
        self.metrics.update(metrics)
        self._dirty = True
        self.publish()
        self.log(f"relay: {len(self.ports)} sites on {self.address}")

    def _serve_tls(self, tls: dict[str, Any]) -> None:
        sites = {str(k): str(v) for k, v in (tls.get("sites") or {}).items()}
        # A TLS site may use its own port only.
        ports = {name: {self.ports[name].spec.port} for name in sites if name in self.ports}
        self.tls_sites = tuple(sorted(sites))
        if self.tls is not None:
            self.tls.update(sites, ports)
            return
        stun = tls.get("stun")
        if stun and self.stun is None:
            responder = StunResponder(
                list(stun["addresses"]),
                int(stun.get("port", 3478)),
                int(stun.get("alt_port", 3479)),
            )
            self.stun = StunStreams(responder, self.selector, self.stats)
        self.tls = TlsClients(
            tls["certificate"],
            tls["key"],
            sites,
            ports,
            self._from_tls,
            on_other=self.stun.adopt if self.stun is not None else None,
            log=self.log,
        )
        self.tls.register(self.selector)
        for address in tls.get("listen") or []:
            self.tls.listen(str(address), int(tls.get("port", 443)))

    def _open(self, spec: SiteSpec, opened: _Port | None) -> None:
        sock: socket.socket | None = socket.socket(
            socket.AF_INET6 if ":" in self.address else socket.AF_INET, socket.SOCK_DGRAM
        )
        assert sock is not None
        try:
            widen_buffers(sock)
            sock.bind((self.address, spec.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            sock = None
            where = format_endpoint(self.address, spec.port)
            self.log(f"relay: cannot open {spec.name}'s port {where}: {exc}")
        if opened is None:
            opened = self.ports[spec.name] = _Port(spec, sock)
        else:
            opened.spec, opened.sock = spec, sock
        if sock is not None:
            self.selector.register(sock, selectors.EVENT_READ, opened)

    def _close(self, name: str) -> None:
        opened = self.ports.pop(name)
        if opened.sock is not None:
            self.selector.unregister(opened.sock)
            opened.sock.close()

    # --- state ----------------------------------------------------------------------------

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        """The state file's content (see the module docstring); without the sessions and the
        pairs for the metrics."""
        core = self.core
        if core is None:
            return {"address": self.address, "sites": {}, "sessions": [], "pairs": {}}
        confirmed = core.confirmed
        snapshot: dict[str, Any] = {
            "address": self.address,
            "sites": {
                name: {
                    "port": opened.spec.port,
                    "public_key": opened.spec.public_key,
                    "confirmed": list(confirmed[name]) if name in confirmed else None,
                    "counters": opened.counters(core),
                }
                for name, opened in sorted(self.ports.items())
            },
        }
        if full:
            snapshot["sessions"] = [list(session) for session in core.sessions]
            snapshot["pairs"] = {
                f"{a}--{b}": dict(counts) for (a, b), counts in core.pair_counters().items()
            }
        return snapshot

    def publish(self) -> None:
        """Hand the metrics thread a fresh copy of the counters (when metrics are on)."""
        if self.metrics.setting is None:
            return
        tls = None
        if self.tls is not None:
            connected = set(self.tls.connected)
            tls = {
                "sites": {
                    site: site in connected for site in sorted({*self.tls_sites, *connected})
                },
                "counters": dict(self.tls.counters),
            }
        stats = self.core.stats() if self.core is not None else {}
        self.published = {**self.snapshot(full=False), "stats": stats, "tls": tls}

    def save(self) -> None:
        if self.state is None:
            return
        tmp = self.state.with_suffix(".tmp")
        # Compact: with thousands of sites and their sessions, indenting costs more than the
        # rest of writing it (read it with jq).
        tmp.write_text(json.dumps(self.snapshot(), separators=(",", ":")) + "\n")
        os.replace(tmp, self.state)

    def touch(self) -> None:
        """Show WG-STUN that the loop runs: the state file's mtime is now."""
        if self.state is None:
            return
        try:
            os.utime(self.state)
        except OSError:
            self.save()  # gone (removed under us): written anew, which is a touch too

    def say_stopped(self) -> None:
        """Show WG-STUN at once that the loop stopped: the state file's mtime is the epoch."""
        if self.state is not None:
            with contextlib.suppress(OSError):
                os.utime(self.state, (0, 0))

    def _activity(self) -> int:
        """Changes whenever the state file would: the counters' sum (every handshake, which is
        what changes sessions and addresses, is counted)."""
        core = self.core
        if core is None:
            return 0
        total = sum(core.counters.values())
        for opened in self.ports.values():
            total += opened.delivered + sum(opened.counts.values())
        return total

    # --- the loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload", True))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "_stop", True))
        next_save = 0.0
        last_activity = -1  # the first pass saves: the file WG-STUN watches is there at once
        try:
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self.reload()
                for key, mask in self.selector.select(timeout=1.0):
                    if self.tls is not None and self.tls.owns(key):
                        self.tls.handle(key, mask)
                    elif isinstance(key.data, StunTcpClient):
                        if self.stun is not None:
                            self.stun.read(key.data)
                    elif isinstance(key.data, _Port):
                        self._drain(key.data)
                now = time.monotonic()
                if self.tls is not None:
                    self.tls.close_idle(now)
                if self.stun is not None:
                    self.stun.close_idle()
                if now >= next_save:
                    next_save = now + 1.0
                    self._kernel_tick(now)
                    self.publish()
                    activity = self._activity()
                    if self._dirty or activity != last_activity:
                        self._dirty, last_activity = False, activity
                        self.save()
                    else:
                        self.touch()
                    if self.core is not None:
                        # Every pair's counts are in the state file now (a pair that counted
                        # since the last save changed the activity): those with no session
                        # left may go.
                        self.core.forget_idle_pairs()
        finally:
            self.metrics.close()
            self.save()
            self.say_stopped()
            for name in list(self.ports):
                self._close(name)
            self._kernel_switch(False)
            if self.tls is not None:
                self.tls.close()
            if self.stun is not None:
                self.stun.close_all()

    def _drain(self, opened: _Port) -> None:
        core = self.core
        sock = opened.sock
        if core is None or sock is None:
            return
        receive, site = core.receive, opened.spec.name
        for _ in range(_BATCH):
            try:
                datagram, source = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to forward
            delivery = receive(site, source[:2], datagram, time.monotonic())
            if core.moved:
                # An address moved: the kernel must stop forwarding to or from the old one
                # before what moved it is sent on.
                self._kernel_moved(core)
            if delivery is not None:
                self._deliver(opened, delivery, datagram)

    def _from_tls(self, site: str, port: int, payload: bytes) -> None:
        opened = self.by_port.get(port)
        core = self.core
        # TlsClients lets a site use its own port only; this holds whatever it is given.
        if opened is None or core is None or opened.spec.name != site:
            return
        delivery = core.receive(site, ("tls:" + site, port), payload, time.monotonic())
        if core.moved:
            self._kernel_moved(core)
        if delivery is not None:
            self._deliver(opened, delivery, payload)

    def _deliver(self, sender: _Port, delivery: Delivery, datagram: bytes) -> None:
        """Out of the receiver's port to where the core said (and to ``also``, when given)."""
        receiver = self.ports.get(delivery.site)
        if receiver is None:  # cannot be: the core serves the sites that have a port
            sender.counts[_SEND_ERROR] += 1
            return
        self._send(sender, receiver, datagram, delivery.address)
        if delivery.also is not None:  # an initiation, to a moved site too
            self._send(sender, receiver, datagram, delivery.also)

    def _send(self, sender: _Port, receiver: _Port, datagram: bytes, address: Address) -> None:
        if address[0].startswith("tls:"):
            if self.tls is None or not self.tls.send(address[0][4:], address[1], datagram):
                return  # counted by TlsClients
        else:
            sock = receiver.sock
            try:
                if sock is None:
                    raise OSError("no socket")
                sock.sendto(datagram, address)
            except OSError:
                sender.counts[_SEND_ERROR] += 1
                return
        receiver.delivered += 1
        receiver.delivered_bytes += len(datagram)

    # --- kernel forwarding (:mod:`.kernel`) ---------------------------------------------------

    def _nft(self, script: str) -> str:
        """Run an nft script (or, with a leading "-j", a listing); OSError/CalledProcessError."""
        if script.startswith("-j"):
            command = ["nft", *script.split()]
            done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=10)
        else:
            done = subprocess.run(
                ["nft", "-f", "-"],
                input=script,
                check=True,
                capture_output=True,
                text=True,
                timeout=10,
            )
        return done.stdout

    def _kernel_switch(self, on: bool) -> None:
        """Turn kernel forwarding on or off; on stays off, logged, when it cannot be."""
        if on == (self.kernel is not None):
            return
        if on:
            try:
                forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
                if forwarding != "1":
                    raise OSError("net.ipv4.ip_forward is not 1")
                self._nft(kernel.setup())
            except (OSError, subprocess.SubprocessError) as exc:
                self.log(f"relay: kernel forwarding off, forwarding in the relay's code: {exc}")
                return
            self.kernel, self.kernel_counts = {}, kernel.Counts.empty()
            self.log("relay: kernel forwarding on for proven sessions")
            return
        self.kernel = None
        try:
            self._nft(kernel.teardown())
        except (OSError, subprocess.SubprocessError) as exc:
            self.log(f"relay: could not remove the kernel forwarding rules: {exc}")

    def _kernel_wanted(self, now: float) -> dict[kernel.RouteKey, kernel.Route]:
        if self.core is None:
            return {}
        ports = {name: opened.spec.port for name, opened in self.ports.items()}
        return kernel.routes(self.address, ports, self.core, now)

    def _kernel_apply(self, script: str) -> bool:
        try:
            self._nft(script)
        except (OSError, subprocess.SubprocessError) as exc:
            # The code's path forwards everything the rules would have: nothing is lost.
            said = getattr(exc, "stderr", None) or ""
            self.log(f"relay: kernel forwarding off after a failed change: {exc} {said}".strip())
            self._kernel_switch(False)
            return False
        return True

    def _kernel_moved(self, core: Relay) -> None:
        """Withdraw, now, the installed routes from or to the sites whose address moved."""
        moved = [self.ports[name].spec.port for name in core.moved if name in self.ports]
        core.moved.clear()
        installed = self.kernel
        if installed is None or not moved:
            return
        stale = kernel.withdraw_sites(installed, moved)
        kept = {key: route for key, route in installed.items() if key not in stale}
        if stale and self._kernel_apply(kernel.withdraw(installed, kept)):
            for key in stale:
                installed.pop(key, None)
            self._kernel_forget_directions()

    def _kernel_withdraw(self, now: float) -> dict[kernel.RouteKey, kernel.Route]:
        """Remove, now, the installed routes that are no longer wanted as they are; the wanted
        routes."""
        wanted = self._kernel_wanted(now) if self.kernel is not None else {}
        installed = self.kernel
        if installed is None:
            return wanted
        script = kernel.withdraw(installed, wanted)
        if script and self._kernel_apply(script):
            for key in [k for k, route in installed.items() if wanted.get(k) != route]:
                del installed[key]
            self._kernel_forget_directions()
        return wanted

    def _kernel_forget_directions(self) -> None:
        """The last readings of the ``deliver`` elements just withdrawn go with them, so that
        an element made again counts from zero. What they counted since the last tick is lost:
        less than a second of a pair's kernel share, at a route's withdrawal (an address moved,
        the last session of a direction ended), where the sender's named counters lose
        nothing."""
        installed = self.kernel
        live = kernel.directions(installed) if installed is not None else set()
        last = self.kernel_counts.directions
        for direction in [d for d in last if d not in live]:
            del last[direction]

    def _kernel_tick(self, now: float, install: bool = True) -> None:
        """Fold the rules' counters into the sites', then bring the routes up to date."""
        if self.kernel is None:
            return
        try:
            counts = kernel.counters(self._nft(f"-j {kernel.LISTING}"))
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            self.log(f"relay: cannot read the kernel forwarding counters: {exc}")
            counts = self.kernel_counts
        last = self.kernel_counts
        heard: set[str] = set()
        for port, (packets, octets) in counts.forwarded.items():
            last_packets, last_octets = last.forwarded.get(port, (0, 0))
            sender = self.by_port.get(port)
            packets_new = _grown(packets, last_packets)
            if sender is not None and packets_new:
                sender.counts[FORWARDED] += packets_new
                sender.counts[FORWARDED_BYTES] += _grown(octets, last_octets)
                sender.counts[KERNEL_FORWARDED] += packets_new
                heard.add(sender.spec.name)
        for port, (packets, octets) in counts.delivered.items():
            last_packets, last_octets = last.delivered.get(port, (0, 0))
            receiver = self.by_port.get(port)
            if receiver is not None:
                receiver.delivered += _grown(packets, last_packets)
                receiver.delivered_bytes += _grown(octets, last_octets)
        for port, dropped in counts.dropped.items():
            sender = self.by_port.get(port)
            if sender is not None:
                sender.counts[_RATE_LIMITED] += _grown(dropped, last.dropped.get(port, 0))
        core = self.core
        for direction, (packets, octets) in counts.directions.items():
            last_packets, last_octets = last.directions.get(direction, (0, 0))
            sender, receiver = self.by_port.get(direction[0]), self.by_port.get(direction[1])
            packets_new = _grown(packets, last_packets)
            if core is not None and sender is not None and receiver is not None and packets_new:
                core.count_kernel(
                    sender.spec.name, receiver.spec.name, packets_new, _grown(octets, last_octets)
                )
        self.kernel_counts = counts
        if core is not None:
            for name in heard:
                core.heard(name, now)
        if not install:
            return
        wanted = self._kernel_withdraw(now)
        installed = self.kernel
        if installed is None:
            return  # a failed change turned it off
        script = kernel.install(installed, wanted, self.limits)
        if script and self._kernel_apply(script) and self.kernel is not None:
            self.kernel.update((k, r) for k, r in wanted.items() if k not in self.kernel)


def _grown(now: int, last: int) -> int:
    """What a counter gained; one below its last reading was made anew: all of it is new."""
    return now - last if now >= last else now


def _triples(value: object) -> list[tuple[str, str, int]]:
    """The state file's sessions, skipping anything malformed."""
    found = []
    for item in value if isinstance(value, list) else []:
        if (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and isinstance(item[2], int)
            and not isinstance(item[2], bool)
            and 0 <= item[2] <= 0xFFFFFFFF
        ):
            found.append((item[0], item[1], item[2]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshwright relay", description="forward WireGuard datagrams for the plan's sites"
    )
    parser.add_argument("--config", type=Path, default=Path("/etc/meshwright/relay.json"))
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        help="learned addresses, counters; its mtime tells WG-STUN this service runs",
    )
    args = parser.parse_args(argv)
    server = RelayServer(args.config, args.state, log=lambda m: print(m, file=sys.stderr))
    server.serve_forever()
    return 0
