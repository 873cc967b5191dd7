"""`meshwright sidecar`: carries a UDP-blocked site's WireGuard datagrams to its relays over TLS.

A site whose network drops UDP (its pairs are ``relay-tcp``) cannot reach its relay port. Its
WireGuard instead uses ``127.0.0.1:<local port of the relay>`` as the endpoint of every peer
relayed through that relay, and this service, on the same host, carries the datagrams over one
TLS connection per relay to the relay's TCP port 443 (:mod:`meshwright.relay.tls` is the other
end), in the frames of :mod:`meshwright.wire.frames`. The configuration (JSON, written by the
playbook)::

    {"relays": {"relay1": {"address": "198.51.100.10", "port": 443,
                           "fingerprint": "sha256:<hex of the SHA-256 of the relay's DER cert>",
                           "standby_fingerprint": "sha256:<hex>",
                           "site_port": 40003, "local_port": 41000}},
     "certificate": "/etc/meshwright/sidecar.crt", "key": "/etc/meshwright/sidecar.key",
     "wireguard_port": 51820}

``site_port`` is this site's port on the relays (the same number on every relay), ``local_port``
this relay's socket here (one per relay, chosen by the plan). For each relay a UDP socket is
bound on ``127.0.0.1:<local_port>``. What arrives there from ``127.0.0.1:<wireguard_port>`` goes
to the relay as a frame for ``site_port``, whichever peer it is for (the relay tells the peers
apart by WireGuard's session indices, as on UDP); anything from another source is dropped and
counted. Frames from the relay for ``site_port`` go out of that socket to
``127.0.0.1:<wireguard_port>``, so WireGuard sees its peers' endpoint answer; frames for any
other port are dropped and counted.

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
dropped and counted, never reordered. The datagrams read in one wake-up (up to 256 per local
socket) go out together on the next writable event, or as soon as 64 KiB are queued: a few TLS
records and one send for all of them, not one each per datagram. The local sockets get 4 MiB
buffers where the system allows (:func:`meshwright.wire.stream.widen_buffers`).

One thread, one ``selectors`` loop, non-blocking sockets. SIGHUP re-reads the configuration
(a relay whose local port is unchanged keeps its socket, one whose address, TLS port and pinned
certificate are unchanged keeps its connection, even with a new site port), SIGTERM stops,
counters go to stderr every 60 s. Standard library only: it runs on Debian's python3.

Replacing a connection is make-before-break. When a reload unpins the certificate an open
connection was shown, or changes the site's own certificate or key, that connection retires
rather than closes: WireGuard's datagrams keep going through it while the new one connects;
once the new one is open they go there, and the retiring one is still read (the relay may have
sent on it until it saw the new one; it does the same on its side, see
:mod:`meshwright.relay.tls`) and flushes what was queued on it, until the relay closes it or
:data:`RETIRE_GRACE` has passed. If the new one fails, or is not open within
:data:`CONNECT_TIMEOUT`, the retiring one is closed at once: a retired certificate keeps no
connection alive beyond the attempt to replace it. A relay with a new address or TLS port, or
no longer configured, is disconnected at once. Counted as ``connections_retired`` and
``retired_<why it ended>``.
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

from .config import Config, SidecarConfigError, TlsRelay, load_config

__all__ = ["Config", "Sidecar", "SidecarConfigError", "TlsRelay", "load_config"]

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
CONNECT_TIMEOUT = 10.0  # TCP connect and TLS handshake together
SILENT_TIMEOUT = 3 * KEEPALIVE_INTERVAL  # the relay answers every keepalive
# How long a replaced connection is still read once its replacement is open: what the relay
# sent on it until it saw the new one (it closes it itself after 1 s).
RETIRE_GRACE = 2.0
MAX_BUFFER = 256 * 1024
LOG_INTERVAL = 60.0
_BATCH = 256  # datagrams or reads per wake-up, so one busy relay cannot starve the others

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


class _Local:
    """The selector data of one relay's local UDP socket: WireGuard's endpoint for every peer
    relayed through it."""

    __slots__ = ("port", "relay", "sock")

    def __init__(self, relay: str, port: int, sock: socket.socket) -> None:
        self.relay, self.port, self.sock = relay, port, sock


class _Link(FramedStream):
    """The selector data of the connection to one relay, and its reconnect state."""

    __slots__ = (
        "answered",
        "backoff",
        "last_keepalive",
        "last_received",
        "next_attempt",
        "presented",
        "retire_at",
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
        self.retire_at = now  # when a retiring connection is closed at the latest
        self.reset(now)

    def reset(self, now: float) -> None:
        """The per-connection state, fresh."""
        self.reset_stream()
        self.presented: str | None = None  # the pinned fingerprint this connection was shown
        self.answered = False  # the relay sent a frame on this connection
        self.started = now
        self.last_received = now
        self.last_keepalive = now


def _same_relay(spec: TlsRelay, link: _Link) -> bool:
    """Whether ``spec`` names the relay the link connects to: the same address and TLS port."""
    return (spec.address, spec.port) == (link.spec.address, link.spec.port)


def _keeps_connection(spec: TlsRelay, link: _Link) -> bool:
    """Whether the link's connection serves ``spec`` too: the same relay address and TLS port,
    and a certificate that is still pinned (a connection still in its handshake is checked
    against ``spec``'s pins when it ends). Site and local ports are not the connection's."""
    return _same_relay(spec, link) and (link.presented is None or link.presented in spec.pins)


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
        self.host = host  # where the local sockets bind and WireGuard is reached
        self.clock = clock
        self.rng = rng or random.Random()
        self.log_interval = log_interval
        self.counters: Counter[str] = Counter()
        self.config: Config | None = None
        self.selector = selectors.DefaultSelector()
        self._context: ssl.SSLContext | None = None
        self._credentials = b""  # digest of the certificate and key files in use
        self._locals: dict[str, _Local] = {}  # by relay
        self._links: dict[str, _Link] = {}
        # By relay: the open connection a reload replaces, until the new one has taken over.
        self._retiring: dict[str, _Link] = {}
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
        """Relay -> connection state ("idle", "connecting", "handshake", "open"); a connection
        being replaced shows as "<relay> (retiring)"."""
        states = {name: link.state for name, link in list(self._links.items())}
        for name, link in list(self._retiring.items()):
            states[f"{name} (retiring)"] = link.state
        return states

    # --- configuration --------------------------------------------------------------------

    def reload(self) -> bool:
        """Bring local sockets and relay connections to the file's; on error keep the current
        ones."""
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
        renewed = credentials != self._credentials
        self._credentials = credentials
        # Closed before any is opened: two relays may swap local ports.
        for name, local in list(self._locals.items()):
            relay = config.relays.get(name)
            if relay is None or relay.local_port != local.port:
                self._close_local(name)
        for name, relay in config.relays.items():
            if name not in self._locals:
                self._open_local(relay)
        for name, link in list(self._links.items()):
            relay = config.relays.get(name)
            if relay is None or not _same_relay(relay, link):
                self._drop_link(name)  # nothing there to hand its datagrams over to
            elif renewed:
                self._replace_link(name, relay, now, "a new site certificate")
            elif not _keeps_connection(relay, link):
                self._replace_link(name, relay, now, "its certificate is no longer pinned")
            else:
                link.spec = relay  # new pins or ports: this connection still serves them
        for name, relay in sorted(config.relays.items()):
            if name not in self._links:
                self._links[name] = _Link(relay, now)
        self.config = config
        ports = ", ".join(f"{r.name} on {r.local_port}" for r in config.relays.values())
        self.log(f"sidecar: {len(self._links)} relays ({ports or 'none'})")
        return True

    def _open_local(self, relay: TlsRelay) -> None:
        sock = socket.socket(
            socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM
        )
        try:
            widen_buffers(sock)
            sock.bind((self.host, relay.local_port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.counters["bind_errors"] += 1
            where = format_endpoint(self.host, relay.local_port)
            self.log(f"sidecar: relay {relay.name}: cannot bind {where}: {exc}")
            return
        local = _Local(relay.name, relay.local_port, sock)
        self.selector.register(sock, _READ, local)
        self._locals[relay.name] = local

    def _close_local(self, name: str) -> None:
        local = self._locals.pop(name)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(local.sock)
        local.sock.close()

    def _drop_link(self, name: str) -> None:
        link = self._links.pop(name, None)
        if link is not None:
            self._close_socket(link)
        self._end_retiring(name, "dropped")

    def _replace_link(self, name: str, relay: TlsRelay, now: float, why: str) -> None:
        """Take the link out of service for a new one (which the caller adds); an open one
        retires, make-before-break (see the module's documentation)."""
        link = self._links.pop(name)
        if link.state != _OPEN:
            self._close_socket(link)  # it carries nothing yet: a fresh start
            return
        self._end_retiring(name, "replaced")  # one retiring connection per relay at most
        link.spec = relay  # a new site port applies to what it still carries
        link.retire_at = now + CONNECT_TIMEOUT  # the new one is open by then, or has failed
        self._retiring[name] = link
        self.counters["connections_retired"] += 1
        self.log(f"sidecar: {name}: {why}: reconnecting; the old connection carries on meanwhile")

    def _end_retiring(self, name: str, reason: str) -> None:
        """Close the relay's retiring connection, if it has one."""
        link = self._retiring.pop(name, None)
        if link is None:
            return
        self._close_socket(link)
        self.counters[f"retired_{reason}"] += 1
        self.log(f"sidecar: {name}: the old connection is closed ({reason})")

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
                    elif isinstance(data, _Local):
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
        for name in {*self._links, *self._retiring}:
            self._drop_link(name)
        for name in list(self._locals):
            self._close_local(name)
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
        """Start due connections, time out stuck or silent ones, send keepalives, close
        retiring ones whose time is up; returns how long select() may wait."""
        wait = 1.0
        for name, retiring in list(self._retiring.items()):
            if now >= retiring.retire_at:
                current = self._links.get(name)
                replaced = current is not None and current.state == _OPEN
                self._end_retiring(name, "grace_over" if replaced else "replacement_timeout")
            else:
                wait = min(wait, retiring.retire_at - now)
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

    def _from_wireguard(self, local: _Local) -> None:
        config = self.config
        if config is None:
            return
        expected = (self.host, config.wireguard_port)
        buffer = self._datagram
        for _ in range(_BATCH):
            try:
                size, source = local.sock.recvfrom_into(buffer)
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
            # Chosen for every datagram: a full batch's write may have failed and closed it.
            link = self._carrier(local.relay)
            if link is None:
                self.counters["dropped_disconnected"] += 1
                continue
            # Every peer's datagrams carry this site's port: the relay tells them apart.
            if self._queue(link, link.spec.site_port, buffer[:size]):
                self.counters["datagrams_to_relay"] += 1

    def _carrier(self, name: str) -> _Link | None:
        """The connection that takes WireGuard's datagrams for relay ``name``: the newest once
        it is open, until then the one it replaces; None when neither is open."""
        for link in (self._links.get(name), self._retiring.get(name)):
            if link is not None and link.state == _OPEN:
                return link
        return None

    def _to_wireguard(self, link: _Link, frames: list[tuple[int, bytes]]) -> None:
        config = self.config
        if config is None:
            return
        destination = (self.host, config.wireguard_port)
        local = self._locals.get(link.spec.name)
        for port, payload in frames:
            if port == KEEPALIVE_PORT:
                self.counters["keepalives_answered"] += 1
                continue
            if port != link.spec.site_port or local is None:
                self.counters["dropped_unknown_port"] += 1
                continue
            try:
                local.sock.sendto(payload, destination)
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
        name = link.spec.name
        if link.sock is None or (
            link is not self._links.get(name) and link is not self._retiring.get(name)
        ):
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
        retiring = self._retiring.get(link.spec.name)
        if retiring is not None:
            # WireGuard's datagrams come here from now on; the old one is read a while longer.
            retiring.retire_at = min(retiring.retire_at, now + RETIRE_GRACE)
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
        """Close the connection and schedule the next attempt, backing off; a retiring one is
        just closed, and goes too when its replacement fails."""
        name = link.spec.name
        if link is self._retiring.get(name):
            self._end_retiring(name, reason)
            return
        self._end_retiring(name, "replacement_failed")
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
