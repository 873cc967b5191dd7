"""`meshwright sidecar`: carries a UDP-blocked site's WireGuard datagrams to its relays over TLS.

A site whose network drops UDP (its pairs are ``relay-tcp``) cannot reach its relay allocation
ports. Its WireGuard instead uses ``127.0.0.1:<allocation port>`` as the endpoint of each such
peer, and this service, on the same host, carries the datagrams over one TLS connection per relay
to the relay's TCP port 443 (:mod:`meshwright.relay.tls` is the other end), in the frames of
:mod:`meshwright.wire.frames`. The configuration (JSON, written by the playbook)::

    {"relays": {"relay1": {"address": "198.51.100.10", "port": 443,
                           "fingerprint": "sha256:<hex of the SHA-256 of the relay's DER cert>",
                           "standby_fingerprint": "sha256:<hex>"}},
     "peers": [{"name": "hard1", "relay": "relay1", "port": 40003}],
     "certificate": "/etc/meshwright/sidecar.crt", "key": "/etc/meshwright/sidecar.key",
     "wireguard_port": 51820}

For each peer a UDP socket is bound on ``127.0.0.1:<port>``. What arrives there from
``127.0.0.1:<wireguard_port>`` goes to the peer's relay as a frame for ``port``; anything from
another source is dropped and counted. Frames from the relay for ``port`` go out of that socket
to ``127.0.0.1:<wireguard_port>``, so WireGuard sees its peer's endpoint answer.

The relay is authenticated by its pinned certificate fingerprint, not by a CA: the handshake
runs with ``CERT_NONE`` and the SHA-256 of the DER certificate the relay presented is compared
with the pins right after it, before any frame is sent; a mismatch closes the connection (and is
retried with backoff, in case the pins are updated by a reload). Two pins: the certificate the
relay serves and its standby, so that a relay can rotate its certificate (serve the standby)
before the sites' configurations catch up; a reload that only changes the pins keeps a
connection whose certificate is still pinned. Relays are addressed by IP and
make their own self-signed certificates, so there is no name to check and no CA to run; a CA
would also let whoever holds its key impersonate every relay, while a pin trusts exactly one
certificate. The site authenticates with its own certificate and key (see
:mod:`meshwright.relay.tls` for what that certificate must look like).

Connections: TLS 1.3 only, TCP_NODELAY and TCP keepalive on. A lost connection is retried after
0.5 s, doubling to 30 s, each delay jittered (between half and all of it); the backoff resets
once the relay has answered a frame on a new connection (the first keepalive), which proves it
accepted the certificate. A keepalive frame goes out every 30 s and the relay answers each one;
a relay silent for 90 s is considered gone. While a relay is not connected, WireGuard's
datagrams for it are dropped and counted: WireGuard retransmits its handshakes itself, and a
queue would only deliver stale ones. Writes are queued up to a bound; beyond it frames are
dropped and counted, never reordered. The datagrams read in one wake-up (up to 256 per peer
socket) go out together on the next writable event, or as soon as 64 KiB are queued: a few TLS
records and one send for all of them, not one each per datagram. The peer sockets get 4 MiB
buffers where the system allows (:func:`meshwright.wire.stream.widen_buffers`).

One thread, one ``selectors`` loop, non-blocking sockets. SIGHUP re-reads the configuration
(unchanged peers keep their sockets, unchanged relays their connections; a changed certificate
or key reconnects all), SIGTERM stops, counters go to stderr every 60 s. Standard library only:
it runs on Debian's python3.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import random
import selectors
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from meshwright.wire.endpoint import format_endpoint
from meshwright.wire.frames import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PAYLOAD,
    KEEPALIVE_PORT,
    MAX_PAYLOAD,
    FrameError,
    fingerprint,
)
from meshwright.wire.stream import PEER_CLOSED, FramedStream, Frames, tune, widen_buffers

from .config import Config, PeerSpec, SidecarConfigError, TlsRelay, load_config

__all__ = ["Config", "PeerSpec", "Sidecar", "SidecarConfigError", "TlsRelay", "load_config"]

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
CONNECT_TIMEOUT = 10.0  # TCP connect and TLS handshake together
SILENT_TIMEOUT = 3 * KEEPALIVE_INTERVAL  # the relay answers every keepalive
MAX_BUFFER = 256 * 1024
LOG_INTERVAL = 60.0
_BATCH = 256  # datagrams or reads per wake-up, so one busy peer cannot starve the others

_IDLE, _CONNECTING, _HANDSHAKE, _OPEN = "idle", "connecting", "handshake", "open"
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def client_context(certificate: Path, key: Path) -> ssl.SSLContext:
    """The site's TLS context: its certificate, and no CA (the relay is checked by its pin)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the pin is compared right after the handshake
    context.load_cert_chain(certificate, key)
    return context


class _Peer:
    """The selector data of one peer's local UDP socket."""

    __slots__ = ("sock", "spec")

    def __init__(self, spec: PeerSpec, sock: socket.socket) -> None:
        self.spec, self.sock = spec, sock


class _Link(FramedStream):
    """The selector data of the connection to one relay, and its reconnect state."""

    __slots__ = (
        "answered",
        "backoff",
        "last_keepalive",
        "last_received",
        "next_attempt",
        "presented",
        "spec",
        "started",
        "state",
    )

    def __init__(self, spec: TlsRelay, now: float) -> None:
        super().__init__()
        self.spec = spec
        self.state = _IDLE
        self.backoff = MIN_BACKOFF
        self.next_attempt = now
        self.reset(now)

    def reset(self, now: float) -> None:
        """The per-connection state, fresh."""
        self.reset_stream()
        self.presented: str | None = None  # the pinned fingerprint this connection was shown
        self.answered = False  # the relay sent a frame on this connection
        self.started = now
        self.last_received = now
        self.last_keepalive = now


def _same_but_pins(spec: TlsRelay, link: _Link) -> bool:
    """Whether ``spec`` differs from the link's only in pins that still cover its connection."""
    same_relay = (spec.name, spec.address, spec.port) == (
        link.spec.name,
        link.spec.address,
        link.spec.port,
    )
    return same_relay and link.presented is not None and link.presented in spec.pins


class Sidecar:
    """The service; one thread, one selector. :meth:`stop` and :meth:`request_reload` may be
    called from other threads and signal handlers, everything else from the loop's thread."""

    def __init__(
        self,
        config: Path,
        *,
        log: Callable[[str], None] = print,
        host: str = "127.0.0.1",
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        log_interval: float = LOG_INTERVAL,
    ) -> None:
        self.config_path = config
        self.log = log
        self.host = host  # where the peer sockets bind and WireGuard is reached
        self.clock = clock
        self.rng = rng or random.Random()
        self.log_interval = log_interval
        self.counters: Counter[str] = Counter()
        self.config: Config | None = None
        self.selector = selectors.DefaultSelector()
        self._context: ssl.SSLContext | None = None
        self._credentials = b""  # digest of the certificate and key files in use
        self._peers: dict[str, _Peer] = {}
        self._routes: dict[tuple[str, int], _Peer] = {}  # (relay, port) -> peer
        self._links: dict[str, _Link] = {}
        # WireGuard's datagrams are read into this, one at a time: one byte more than a frame
        # may carry, so a longer datagram is cut there and still counted as too big.
        self._datagram = memoryview(bytearray(MAX_PAYLOAD + 1))
        self._reload = False
        self._stopping = False
        # A socketpair wakes select() up for stop(); PEP 475 would otherwise resume the wait.
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.selector.register(self._wake_read, _READ, None)

    # --- control (any thread) -------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return."""
        self._stopping = True
        self._wake()

    def request_reload(self) -> None:
        """Re-read the configuration from the loop soon (SIGHUP)."""
        self._reload = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full or closed: the loop is awake or gone
            self._wake_write.send(b"\0")

    def install_signals(self) -> None:
        """SIGHUP reloads, SIGTERM and SIGINT stop; main thread only."""
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())

    def status(self) -> dict[str, str]:
        """Relay -> connection state ("idle", "connecting", "handshake", "open")."""
        return {name: link.state for name, link in list(self._links.items())}

    # --- configuration --------------------------------------------------------------------

    def reload(self) -> bool:
        """Bring peers and relay connections to the file's; on error keep the current ones."""
        try:
            config = load_config(self.config_path)
            credentials = hashlib.sha256(
                config.certificate.read_bytes() + b"\0" + config.key.read_bytes()
            ).digest()
            context = client_context(config.certificate, config.key)
        except (OSError, ValueError, ssl.SSLError) as exc:
            self.counters["config_errors"] += 1
            self.log(f"sidecar: keeping the current configuration: {self.config_path}: {exc}")
            return False
        now = self.clock()
        self._context = context
        if credentials != self._credentials:
            self._credentials = credentials
            for name in list(self._links):
                self._drop_link(name)  # reconnect with the new certificate
        for name, peer in list(self._peers.items()):
            if config.peers.get(name) != peer.spec:
                self._close_peer(name)
        for name, spec in config.peers.items():
            if name not in self._peers:
                self._open_peer(spec)
        wanted = {spec.relay for spec in config.peers.values()}  # relays no peer uses stay idle
        for name, link in list(self._links.items()):
            relay = config.relays.get(name)
            if relay is not None and relay != link.spec and _same_but_pins(relay, link):
                link.spec = relay  # a rotation's new pins: this connection is still pinned
            elif name not in wanted or relay != link.spec:
                self._drop_link(name)
        for name in sorted(wanted):
            if name not in self._links:
                self._links[name] = _Link(config.relays[name], now)
        self._routes = {(p.spec.relay, p.spec.port): p for p in self._peers.values()}
        self.config = config
        self.log(f"sidecar: {len(self._peers)} peers over {len(self._links)} relays")
        return True

    def _open_peer(self, spec: PeerSpec) -> None:
        sock = socket.socket(
            socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM
        )
        try:
            widen_buffers(sock)
            sock.bind((self.host, spec.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.counters["bind_errors"] += 1
            where = format_endpoint(self.host, spec.port)
            self.log(f"sidecar: peer {spec.name}: cannot bind {where}: {exc}")
            return
        peer = _Peer(spec, sock)
        self.selector.register(sock, _READ, peer)
        self._peers[spec.name] = peer

    def _close_peer(self, name: str) -> None:
        peer = self._peers.pop(name)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(peer.sock)
        peer.sock.close()

    def _drop_link(self, name: str) -> None:
        link = self._links.pop(name)
        self._close_socket(link)

    # --- the loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until :meth:`stop`; reads the configuration first."""
        self.reload()
        next_log = self.clock() + self.log_interval
        logged: dict[str, int] = {}
        try:
            while not self._stopping:
                if self._reload:
                    self._reload = False
                    self.reload()
                timeout = self._timers(self.clock())
                for key, mask in self.selector.select(timeout):
                    data = key.data
                    if data is None:
                        self._drain_wake()
                    elif isinstance(data, _Peer):
                        self._from_wireguard(data)
                    elif isinstance(data, _Link):
                        self._link_event(data, mask)
                now = self.clock()
                if now >= next_log:
                    next_log = now + self.log_interval
                    if dict(self.counters) != logged:
                        logged = dict(self.counters)
                        self.log_counters()
        finally:
            self.close()

    def log_counters(self) -> None:
        state = json.dumps(self.status(), sort_keys=True)
        self.log(f"sidecar: relays {state} counters {json.dumps(self.counters, sort_keys=True)}")

    def close(self) -> None:
        for name in list(self._links):
            self._drop_link(name)
        for name in list(self._peers):
            self._close_peer(name)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self._wake_read)
        self._wake_read.close()
        self._wake_write.close()
        self.selector.close()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_read.recv(64):
                pass

    def _timers(self, now: float) -> float:
        """Start due connections, time out stuck or silent ones, send keepalives; returns how
        long select() may wait."""
        wait = 1.0
        for link in list(self._links.values()):
            if link.state == _IDLE:
                if now >= link.next_attempt:
                    self._connect(link, now)
                else:
                    wait = min(wait, link.next_attempt - now)
                    continue
            if link.state in (_CONNECTING, _HANDSHAKE):
                if now - link.started > CONNECT_TIMEOUT:
                    self._fail(link, "connect_timeout")
                continue
            if link.state == _OPEN:
                if now - link.last_received > SILENT_TIMEOUT:
                    self._fail(link, "relay_silent")
                elif now - link.last_keepalive >= KEEPALIVE_INTERVAL:
                    # Even while data flows out: only the answers show the relay is there.
                    link.last_keepalive = now
                    self._queue(link, KEEPALIVE_PORT, KEEPALIVE_PAYLOAD)
                    self.counters["keepalives_sent"] += 1
            if link.state == _IDLE:
                wait = min(wait, max(0.0, link.next_attempt - now))
        return max(0.0, wait)

    # --- WireGuard's side -----------------------------------------------------------------

    def _from_wireguard(self, peer: _Peer) -> None:
        config = self.config
        if config is None:
            return
        expected = (self.host, config.wireguard_port)
        link = self._links.get(peer.spec.relay)
        port = peer.spec.port
        buffer = self._datagram
        for _ in range(_BATCH):
            try:
                size, source = peer.sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # An ICMP error (WireGuard not listening yet) queued on the socket.
                self.counters["udp_errors"] += 1
                continue
            if source[:2] != expected:
                self.counters["dropped_foreign_source"] += 1
                continue
            if not 0 < size <= MAX_PAYLOAD:
                self.counters["dropped_bad_size"] += 1
                continue
            # Checked for every datagram: a full batch's write may have failed and closed it.
            if link is None or link.state != _OPEN:
                self.counters["dropped_disconnected"] += 1
                continue
            if self._queue(link, port, buffer[:size]):
                self.counters["datagrams_to_relay"] += 1

    def _to_wireguard(self, link: _Link, frames: list[tuple[int, bytes]]) -> None:
        config = self.config
        if config is None:
            return
        destination = (self.host, config.wireguard_port)
        relay = link.spec.name
        for port, payload in frames:
            if port == KEEPALIVE_PORT:
                self.counters["keepalives_answered"] += 1
                continue
            peer = self._routes.get((relay, port))
            if peer is None:
                self.counters["dropped_unknown_port"] += 1
                continue
            try:
                peer.sock.sendto(payload, destination)
                self.counters["datagrams_to_wireguard"] += 1
            except OSError:
                self.counters["dropped_send_error"] += 1

    # --- the relay's side -----------------------------------------------------------------

    def _connect(self, link: _Link, now: float) -> None:
        link.reset(now)
        self.counters["connect_attempts"] += 1
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                link.spec.address, link.spec.port, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            self._fail(link, "resolve_failed", str(exc))
            return
        link.sock = sock
        try:
            sock.setblocking(False)
            tune(sock, keepalive_idle=30)
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(code, errno.errorcode.get(code, str(code)))
            self.selector.register(sock, _WRITE, link)
        except OSError as exc:
            self._fail(link, "connect_failed", str(exc))
            return
        link.events = _WRITE
        link.state = _CONNECTING

    def _link_event(self, link: _Link, mask: int) -> None:
        if link.sock is None or self._links.get(link.spec.name) is not link:
            return  # closed earlier in this batch of events
        try:
            if link.state == _OPEN:
                if mask & _READ or link.read_wants_write:
                    self._read(link)
                if link.state == _OPEN and mask & _WRITE and link.out:
                    self._flush(link)
            elif link.state == _HANDSHAKE:
                self._handshake(link)
            elif link.state == _CONNECTING:
                self._connected(link)
        except Exception as exc:
            # Never crash the site's tunnels on a bug: drop this connection and retry it.
            self._fail(link, "internal_error", repr(exc))

    def _connected(self, link: _Link) -> None:
        sock = link.sock
        assert sock is not None and self._context is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(link, "connect_failed", errno.errorcode.get(code, str(code)))
            return
        error = link.start_tls(self.selector, self._context, server_side=False)
        if error is not None:
            link.sock = None  # closed
            self._fail(link, "handshake_failed", str(error))
            return
        link.state = _HANDSHAKE
        self._handshake(link)

    def _handshake(self, link: _Link) -> None:
        sock: ssl.SSLSocket = link.sock  # type: ignore[assignment]
        try:
            done = link.handshake()
        except (ssl.SSLError, OSError) as exc:
            self._fail(link, "handshake_failed", str(exc))
            return
        if not done:
            self._set_events(link)
            return
        der = sock.getpeercert(binary_form=True)
        presented = fingerprint(der) if der else "none"
        if presented not in link.spec.pins:
            self._fail(
                link,
                "fingerprint_mismatch",
                f"the relay presented {presented}, the pins are {', '.join(link.spec.pins)}",
            )
            return
        link.presented = presented
        link.state = _OPEN
        now = self.clock()
        link.last_received = link.last_keepalive = now
        self.counters["connects"] += 1
        relay = format_endpoint(link.spec.address, link.spec.port)
        self.log(f"sidecar: connected to {link.spec.name} ({relay})")
        # Its answer proves the relay took our certificate (TLS 1.3 tells the client only later).
        self._queue(link, KEEPALIVE_PORT, KEEPALIVE_PAYLOAD)
        if link.state == _OPEN:
            self._read(link)

    def _read(self, link: _Link) -> None:
        ended = link.receive(_BATCH, self._heard, self._from_relay)
        if ended is None:
            self._set_events(link)
            return
        reason, error = ended
        if isinstance(error, FrameError):
            self._to_wireguard(link, error.frames)  # the good frames before the bad one
        # A read error is also how a relay that refused our certificate shows up under TLS 1.3.
        detail = "" if error is None else str(error)
        self._fail(link, "relay_closed" if reason == PEER_CLOSED else reason, detail)

    def _heard(self, link: _Link, size: int) -> None:
        link.last_received = self.clock()

    def _from_relay(self, link: _Link, frames: Frames) -> bool:
        if frames and not link.answered:
            link.answered = True
            link.backoff = MIN_BACKOFF  # the relay accepted us: the next loss retries fast
        self._to_wireguard(link, frames)
        return True

    def _queue(self, link: _Link, port: int, payload: bytes | memoryview) -> bool:
        if not link.queue(port, payload, MAX_BUFFER, self.selector):
            self.counters["dropped_buffer_full"] += 1
            return False
        if link.batch_full:
            self._flush(link)  # a full write's worth: no reason to wait for the loop
        return True

    def _flush(self, link: _Link) -> None:
        """Write what is queued (on an open link) and watch for what is still to do."""
        error = link.flush(self.selector)
        if error is not None:
            self._fail(link, "write_error", str(error))

    def _set_events(self, link: _Link) -> None:
        if link.sock is not None and link.state in (_HANDSHAKE, _OPEN):
            link.watch(self.selector)

    def _fail(self, link: _Link, reason: str, detail: str = "") -> None:
        """Close the connection and schedule the next attempt, backing off."""
        was_open = link.state == _OPEN
        self._close_socket(link)
        self.counters[f"disconnects_{reason}"] += 1
        delay = link.backoff / 2 + self.rng.uniform(0.0, link.backoff / 2)
        link.next_attempt = self.clock() + delay
        link.backoff = min(link.backoff * 2, MAX_BACKOFF)
        # Log state changes, not every retry of a relay that stays down.
        if was_open or reason == "fingerprint_mismatch" or link.backoff >= MAX_BACKOFF / 2:
            suffix = f": {detail}" if detail else ""
            self.log(f"sidecar: {link.spec.name}: {reason}{suffix}; retrying in {delay:.1f} s")

    def _close_socket(self, link: _Link) -> None:
        if link.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(link.sock)
            with contextlib.suppress(OSError):
                link.sock.close()
        link.sock = None
        link.state = _IDLE
        link.events = 0
        link.out = bytearray()
