"""The relay's TLS service: sites that cannot send UDP reach their relay port over TLS.

:class:`TlsClients` serves the TLS connections of the sites' sidecars
(:mod:`meshwright.site.sidecar`) inside a ``selectors`` loop that someone else owns, such as
:class:`.server.RelayServer`'s. Each connection carries :mod:`meshwright.wire.frames`:
``(the site's relay port, WireGuard datagram)``.

Who may connect
---------------

The server requires a client certificate (``CERT_REQUIRED``) and its trust store is exactly the
sites' own certificates (loaded as ``cadata``): a site's self-signed certificate is its own trust
anchor, so no CA exists whose key could mint new site identities. After the handshake the
certificate's :func:`.tcp.fingerprint` names the site, and that is what authorises: a
certificate that merely chains to a site's certificate (a site key can sign others, its
certificate says ``CA:TRUE``) has another fingerprint and is closed as ``unknown_certificate``.
A site may use only its own ports (the relay service gives each its one site port); frames for any
other port are dropped and counted.

A site certificate must be: X.509 v3, self-signed, currently valid (OpenSSL checks the dates),
``basicConstraints=critical,CA:TRUE``, and if it has ``keyUsage`` that must include
``digitalSignature`` and ``keyCertSign``, if it has ``extendedKeyUsage`` that must include
``clientAuth``. EC P-256 keys keep handshakes cheap. OpenSSL 3 also accepts an exact self-signed
match without ``CA:TRUE``, but older releases treat a trust anchor that is no CA differently, so
the playbook always makes ``CA:TRUE`` ones. The relay's own certificate is pinned by the
sidecars and may be anything OpenSSL can serve.

Only TLS 1.3, and no session tickets: every connection shows its certificate in full.

The connection's life
---------------------

accepted -> *sniff* (peek at the first bytes) -> *handshake* -> *open*. A stream whose first
bytes are not a TLS record header (a prefix of one counts as TLS) is STUN over TCP or junk: it
goes to ``on_other(sock, first_bytes)`` (the bytes were consumed from the socket, which is
non-blocking and no longer registered) or, without that callback, is closed. Handshake failures,
unknown certificates, malformed frame streams, connections idle longer than ``idle_timeout``
and connections that have not finished the handshake within ``handshake_timeout`` of their
accept (whatever trickle of bytes they send) are closed and counted as ``closed_<reason>``.
Until its handshake is done a connection is unproven, and one source (an IPv4 address or IPv6
/64) may hold at most ``max_unproven_per_source`` unproven connections
(:mod:`.admission`); more are closed at once as ``rejected_source_limit``. Together these keep
one host from filling the connection table that UDP-blocked sites need (docs/relays.md).

A site that connects again supersedes its older connection, make-before-break:
:meth:`TlsClients.send` goes to the newest from the moment it is proven, but the older one is
closed only after ``supersede_grace`` (1 s, by :meth:`TlsClients.close_idle`), or earlier when
the site closes it. Until then it is still read, its frames handed on, and what was queued on it
is still written: the datagrams in flight on it when the site switched, either way, arrive. A
sidecar replaces its connection when a certificate rotates (its own or the relay's) and does the
same on its side, so a live rotation drops nothing. A site holds at most one superseded
connection (a third connection closes the oldest at once), so the connection table is not
the site's to fill.

Writes are queued per connection, up to ``max_buffer`` bytes. The frames queued in one wake-up
of the loop (RelayServer drains up to 256 datagrams from a socket at a time) are written
together on the next ``EVENT_WRITE``, or as soon as a full batch of 64 KiB is queued: a few TLS
records and one send for many datagrams, where a record and a send per datagram took half the
relay's time (``bench/tls_relay_bench.py``). ``EVENT_WRITE`` is registered only while some are
pending. A full buffer drops the frame
(``dropped_buffer_full``): WireGuard copes with loss, a stalled loop would hurt every pair on
the relay.

Not thread-safe: call everything from the loop's thread. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import selectors
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from meshwright.relay.admission import SourceSlots
from meshwright.wire.frames import (
    KEEPALIVE_PAYLOAD,
    KEEPALIVE_PORT,
    MAX_PAYLOAD,
    FrameError,
    could_be_tls,
    fingerprint,
)
from meshwright.wire.stream import FramedStream, Frames, tune

__all__ = ["DEFAULT_IDLE_TIMEOUT", "TlsClients", "server_context", "site_fingerprints"]

DEFAULT_IDLE_TIMEOUT = 120.0
# A TLS 1.3 handshake takes one round trip and a signature: 5 s allows for a congested path.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_MAX_BUFFER = 512 * 1024
DEFAULT_MAX_CONNECTIONS = 1024
# How long a site's superseded connection may still deliver and flush: its frames in flight.
DEFAULT_SUPERSEDE_GRACE = 1.0
# Sites behind one NAT share a source; each holds one connection, briefly two on reconnect.
DEFAULT_MAX_UNPROVEN_PER_SOURCE = 16
_ACCEPT_BATCH = 64
_READ_BUDGET = 64  # reads per wake-up, so one busy site cannot starve the others
_FIRST_BYTES = 2048  # handed to on_other: as much as a STUN-over-TCP message may need
_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----"
)

_SNIFF, _HANDSHAKE, _OPEN = "sniff", "handshake", "open"
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

OnDatagram = Callable[[str, int, bytes], None]
OnOther = Callable[[socket.socket, bytes], None]


class _Listener:
    """The selector data of a listening socket that :meth:`TlsClients.listen` opened."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class _Connection(FramedStream):
    """The selector data of one client connection."""

    __slots__ = (
        "closed",
        "created",
        "fingerprint",
        "last_seen",
        "peer",
        "site",
        "source",
        "state",
    )

    sock: socket.socket

    def __init__(self, sock: socket.socket, peer: object, now: float) -> None:
        super().__init__(sock)
        self.peer = peer
        self.state = _SNIFF
        self.created = now
        self.last_seen = now
        self.site: str | None = None
        self.fingerprint: str | None = None
        self.closed = False
        # Who holds an unproven slot (SourceSlots) until the handshake; None once given back.
        self.source: str | None = None


def site_fingerprints(sites: Mapping[str, str | bytes]) -> dict[str, str]:
    """Fingerprint -> site for ``sites`` (site -> PEM text of one or more certificates).

    ValueError when a site has no certificate or two sites share one. Several certificates for
    one site are all accepted: that is how a site's certificate is rotated without a gap.
    """
    by_fingerprint: dict[str, str] = {}
    for site, pem in sites.items():
        text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else str(pem)
        blocks = _PEM_CERTIFICATE.findall(text)
        if not blocks:
            raise ValueError(f"site {site!r}: no PEM certificate")
        for block in blocks:
            try:
                der = ssl.PEM_cert_to_DER_cert(block)
            except ValueError as exc:
                raise ValueError(f"site {site!r}: {exc}") from None
            pin = fingerprint(der)
            other = by_fingerprint.setdefault(pin, site)
            if other != site:
                raise ValueError(f"sites {other!r} and {site!r} have the same certificate")
    return by_fingerprint


def server_context(
    certificate: str | os.PathLike[str], key: str | os.PathLike[str], sites: Iterable[str | bytes]
) -> ssl.SSLContext:
    """The relay's TLS context: its own certificate, and exactly the sites' as trust anchors."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certificate, key)
    context.verify_mode = ssl.CERT_REQUIRED
    # No resumption: a resumed session would skip the certificate a site was removed with.
    context.num_tickets = 0
    cadata = "\n".join(
        block
        for pem in sites
        for block in _PEM_CERTIFICATE.findall(
            pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
        )
    )
    if cadata:  # with none, CERT_REQUIRED refuses everyone, as it should
        try:
            context.load_verify_locations(cadata=cadata)
        except ssl.SSLError as exc:
            raise ValueError(f"a site certificate is unusable: {exc}") from None
    return context


class TlsClients:
    """The sites' TLS connections, served from someone else's ``selectors`` loop.

    ``sites`` maps a site name to its certificate(s) in PEM, ``ports`` a site name to the
    ports it may use. ``on_datagram(site, port, payload)`` gets every frame a site
    sends for one of its ports; ``on_other(sock, first_bytes)`` gets non-TLS connections.
    Neither callback may block; exceptions from them are counted, never propagated.

    Use: :meth:`register` the loop's selector, then :meth:`listen` (or pass your own listening
    socket's accepted connections to :meth:`accept` / :meth:`adopt`); in the loop hand every key
    for which :meth:`owns` is true to :meth:`handle`, and call :meth:`close_idle` after every
    wake-up of the loop, at least once a second (it closes superseded connections when their
    grace is over, and scans for idle ones once a second).
    """

    def __init__(
        self,
        certificate: str | os.PathLike[str],
        key: str | os.PathLike[str],
        sites: Mapping[str, str | bytes],
        ports: Mapping[str, Iterable[int]],
        on_datagram: OnDatagram,
        on_other: OnOther | None = None,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_unproven_per_source: int = DEFAULT_MAX_UNPROVEN_PER_SOURCE,
        supersede_grace: float = DEFAULT_SUPERSEDE_GRACE,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.certificate, self.key = certificate, key
        self.on_datagram, self.on_other = on_datagram, on_other
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_buffer = max_buffer
        self.max_connections = max_connections
        self.supersede_grace = supersede_grace
        self._unproven = SourceSlots(max_unproven_per_source, max_connections)
        self.log = log or (lambda _message: None)
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.selector: selectors.BaseSelector | None = None
        self._listeners: list[socket.socket] = []
        self._connections: set[_Connection] = set()
        self._by_site: dict[str, _Connection] = {}
        # Site -> its superseded connection and when it is closed (at most one per site).
        self._superseded: dict[str, tuple[_Connection, float]] = {}
        self._context: ssl.SSLContext
        self._sites: dict[str, str] = {}  # fingerprint -> site
        self._ports: dict[str, frozenset[int]] = {}
        self._next_scan = 0.0
        self.update(sites, ports)

    # --- configuration --------------------------------------------------------------------

    def update(self, sites: Mapping[str, str | bytes], ports: Mapping[str, Iterable[int]]) -> None:
        """Replace the known sites and their ports (on SIGHUP); ValueError leaves all unchanged.

        The relay's certificate and key files are read again too. Connections of a site that
        is gone, or whose certificate is no longer listed, are closed (``closed_site_removed``);
        the others keep running with the new ports.
        """
        by_fingerprint = site_fingerprints(sites)
        checked = {
            site: frozenset(self._port(site, port) for port in site_ports)
            for site, site_ports in ports.items()
        }
        try:
            context = server_context(self.certificate, self.key, sites.values())
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"the relay's certificate or key: {exc}") from None
        self._context, self._sites, self._ports = context, by_fingerprint, checked
        for connection in list(self._connections):
            if connection.state == _OPEN and self._sites.get(connection.fingerprint or "") != (
                connection.site
            ):
                self._close(connection, "site_removed")

    @staticmethod
    def _port(site: str, port: object) -> int:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
            raise ValueError(f"site {site!r}: {port!r} is not a port")
        return port

    # --- wiring into the loop -------------------------------------------------------------

    def register(self, selector: selectors.BaseSelector) -> None:
        """Use ``selector`` (the loop's) for every socket from now on."""
        self.selector = selector

    def _selector(self) -> selectors.BaseSelector:
        if self.selector is None:
            raise RuntimeError("TlsClients.register(selector) first")
        return self.selector

    def listen(self, address: str, port: int, backlog: int = 128) -> socket.socket:
        """Open a listening socket whose connections this serves; OSError if it cannot bind."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen(backlog)
            sock.setblocking(False)
            self._selector().register(sock, _READ, _Listener(sock))
        except BaseException:
            sock.close()
            raise
        self._listeners.append(sock)
        return sock

    def owns(self, key: selectors.SelectorKey) -> bool:
        """Whether a key the loop's ``select()`` returned is for :meth:`handle`."""
        return isinstance(key.data, _Connection | _Listener)

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        """Serve one ready key that :meth:`owns`; never raises."""
        data = key.data
        if isinstance(data, _Listener):
            self.accept(data.sock)
            return
        connection: _Connection = data
        if connection.closed:
            return  # closed earlier in the same batch of events
        try:
            if connection.state == _OPEN:
                if mask & _READ or connection.read_wants_write:
                    self._read(connection)
                if not connection.closed and (mask & _WRITE) and connection.out:
                    self._flush(connection)
            elif connection.state == _HANDSHAKE:
                self._handshake(connection)
            else:
                self._sniff(connection)
        except Exception as exc:
            # A bug must not take every site's relay down: lose this connection, keep serving.
            self.log(f"relay tls: internal error on {connection.peer}: {exc!r}")
            self._close(connection, "internal_error")

    def accept(self, listening_socket: socket.socket) -> None:
        """Accept what is pending on a non-blocking listening socket (a batch at a time)."""
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listening_socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors, mostly: count it; the next wake-up tries again.
                self.counters["accept_errors"] += 1
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    return
                continue
            self.adopt(sock, peer)

    def adopt(self, sock: socket.socket, peer: object = None) -> None:
        """Serve an accepted TCP connection from its first byte on; never raises."""
        if len(self._connections) >= self.max_connections:
            self.counters["rejected_too_many"] += 1
            sock.close()
            return
        try:
            if peer is None:
                peer = sock.getpeername()
            source = str(peer[0])  # type: ignore[index]
        except (OSError, IndexError, TypeError):
            self.counters["accept_errors"] += 1
            sock.close()
            return
        refused = self._unproven.take(source)
        if refused is not None:
            self.counters[
                "rejected_source_limit" if refused == "source" else "rejected_too_many"
            ] += 1
            sock.close()
            return
        try:
            sock.setblocking(False)
            tune(sock, keepalive_idle=60)
            connection = _Connection(sock, peer, self.clock())
            self._selector().register(sock, _READ, connection)
        except (OSError, ValueError):
            self._unproven.give(source)
            self.counters["accept_errors"] += 1
            sock.close()
            return
        connection.source = source
        connection.events = _READ
        self._connections.add(connection)
        self.counters["accepted"] += 1

    def close_idle(self, now: float | None = None) -> None:
        """Close superseded connections whose grace is over, and connections idle too long or
        stuck in the handshake (at most one scan a second for those)."""
        now = self.clock() if now is None else now
        for connection, deadline in list(self._superseded.values()):
            if now >= deadline:
                self._close(connection, "superseded")
        if now < self._next_scan:
            return
        self._next_scan = now + 1.0
        for connection in list(self._connections):
            if connection.state != _OPEN:
                if now - connection.created > self.handshake_timeout:
                    self._close(connection, "handshake_timeout")
            elif now - connection.last_seen > self.idle_timeout:
                self._close(connection, "idle")

    def close(self) -> None:
        """Close every connection and the listening sockets this opened."""
        for connection in list(self._connections):
            self._close(connection, "shutdown")
        for sock in self._listeners:
            if self.selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(sock)
            sock.close()
        self._listeners.clear()

    @property
    def connected(self) -> dict[str, object]:
        """Connected sites -> their peer address (for status output)."""
        return {site: connection.peer for site, connection in self._by_site.items()}

    def disconnect(self, site: str) -> bool:
        """Close a site's current connection (it will reconnect); False if it has none."""
        connection = self._by_site.get(site)
        if connection is None:
            return False
        self._close(connection, "disconnected")
        return True

    # --- sending --------------------------------------------------------------------------

    def send(self, site: str, port: int, payload: bytes) -> bool:
        """Queue a frame to ``site``'s newest connection; False (counted) when it is dropped.

        It is written with the others queued in this wake-up, on the next writable event."""
        connection = self._by_site.get(site)
        if connection is None:
            self.counters["dropped_no_connection"] += 1
            return False
        size = len(payload)
        if not 0 < size <= MAX_PAYLOAD or not 0 < port <= 0xFFFF:
            self.counters["dropped_bad_size"] += 1
            return False
        return self._queue(connection, port, payload)

    def _queue(self, connection: _Connection, port: int, payload: bytes) -> bool:
        selector: selectors.BaseSelector = self.selector  # type: ignore[assignment]  # registered
        if not connection.queue(port, payload, self.max_buffer, selector):
            self.counters["dropped_buffer_full"] += 1
            return False
        self.counters["frames_out"] += 1
        if connection.batch_full:
            self._flush(connection)  # a full write's worth: no reason to wait for the loop
        return True

    def _flush(self, connection: _Connection) -> None:
        """Write what is queued (on an open connection) and watch for what is still to do."""
        if connection.flush(self.selector) is not None:  # type: ignore[arg-type]
            self._close(connection, "write_error")

    def _set_events(self, connection: _Connection) -> None:
        if not connection.closed:
            connection.watch(self.selector)  # type: ignore[arg-type]  # registered: not None

    # --- the connection's stages ----------------------------------------------------------

    def _sniff(self, connection: _Connection) -> None:
        sock = connection.sock
        try:
            head = sock.recv(8, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection, "error")
            return
        if not head:
            self._close(connection, "peer_closed")
            return
        # A partial record header counts as TLS: waiting for the rest would spin the loop on a
        # readable socket, and a wrong third byte fails the handshake anyway.
        if could_be_tls(head):
            self._start_tls(connection)
        else:
            self._hand_over(connection)

    def _hand_over(self, connection: _Connection) -> None:
        selector = self._selector()
        sock = connection.sock
        selector.unregister(sock)
        connection.closed = True
        self._connections.discard(connection)
        self._prove(connection)  # on_other applies limits of its own
        try:
            first = sock.recv(_FIRST_BYTES)
        except OSError:
            first = b""
        if self.on_other is None or not first:
            self.counters["closed_not_tls"] += 1
            sock.close()
            return
        self.counters["handed_over"] += 1
        try:
            self.on_other(sock, first)
        except Exception as exc:
            self.counters["callback_errors"] += 1
            self.log(f"relay tls: on_other failed: {exc!r}")
            sock.close()

    def _start_tls(self, connection: _Connection) -> None:
        if connection.start_tls(self._selector(), self._context, server_side=True) is not None:
            self._forget(connection, "handshake_failed")  # its plain socket is closed
            return
        connection.state = _HANDSHAKE
        self._handshake(connection)

    def _handshake(self, connection: _Connection) -> None:
        sock: ssl.SSLSocket = connection.sock  # type: ignore[assignment]
        try:
            done = connection.handshake()
        except ssl.SSLCertVerificationError:
            self._close(connection, "certificate_rejected")
            return
        except ssl.SSLError as exc:
            missing = exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
            self._close(connection, "no_certificate" if missing else "handshake_failed")
            return
        except OSError:
            self._close(connection, "handshake_failed")
            return
        if not done:
            self._set_events(connection)
            return
        der = sock.getpeercert(binary_form=True)
        pin = fingerprint(der) if der else ""
        site = self._sites.get(pin)
        if site is None:
            self._close(connection, "unknown_certificate")
            return
        connection.state, connection.site, connection.fingerprint = _OPEN, site, pin
        self._prove(connection)
        connection.last_seen = now = self.clock()
        older = self._by_site.get(site)
        self._by_site[site] = connection
        if older is not None:
            self._supersede(site, older, now)
        self.counters["handshakes"] += 1
        self.log(f"relay tls: {site} connected from {connection.peer}")
        self._set_events(connection)
        # The client may have sent frames right behind its Finished message.
        self._read(connection)

    def _supersede(self, site: str, older: _Connection, now: float) -> None:
        """Keep a site's older connection for ``supersede_grace``, out of :meth:`send`'s way:
        frames in flight on it, either way, are not lost to the switch."""
        oldest = self._superseded.get(site)
        if oldest is not None:
            self._close(oldest[0], "superseded")  # one per site, whatever a site does
        self._superseded[site] = (older, now + self.supersede_grace)

    def _read(self, connection: _Connection) -> None:
        ended = connection.receive(_READ_BUDGET, self._received, self._deliver)
        if ended is None:
            self._set_events(connection)
            return
        reason, error = ended  # "peer_closed", "read_error" or "frame_error"
        if isinstance(error, FrameError):
            self._deliver(connection, error.frames)  # the good frames before the bad one
        self._close(connection, reason)

    def _received(self, connection: _Connection, size: int) -> None:
        connection.last_seen = self.clock()
        self.counters["bytes_in"] += size

    def _deliver(self, connection: _Connection, frames: Frames) -> bool:
        """Hand a site's frames on; whether its connection is still open."""
        site = connection.site
        if site is None:
            return True
        allowed = self._ports.get(site, frozenset())
        on_datagram = self.on_datagram
        delivered = 0
        for port, payload in frames:
            if port in allowed:
                delivered += 1
                try:
                    on_datagram(site, port, payload)
                except Exception as exc:
                    self.counters["callback_errors"] += 1
                    if self.counters["callback_errors"] <= 10:
                        self.log(f"relay tls: on_datagram failed: {exc!r}")
            elif port == KEEPALIVE_PORT:
                self.counters["keepalives"] += 1
                self._queue(connection, KEEPALIVE_PORT, KEEPALIVE_PAYLOAD)
            else:
                self.counters["dropped_port_not_allowed"] += 1
            if connection.closed:
                break
        self.counters["frames_in"] += delivered
        return not connection.closed

    def _close(self, connection: _Connection, reason: str) -> None:
        if connection.closed:
            return
        if self.selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(connection.sock)
        with contextlib.suppress(OSError):
            connection.sock.close()
        if connection.state == _OPEN and connection.site is not None:
            self.log(f"relay tls: {connection.site} disconnected ({reason})")
        self._forget(connection, reason)

    def _prove(self, connection: _Connection) -> None:
        """Give back the connection's unproven slot, if it still holds one."""
        if connection.source is not None:
            self._unproven.give(connection.source)
            connection.source = None

    def _forget(self, connection: _Connection, reason: str) -> None:
        self._prove(connection)
        connection.closed = True
        self._connections.discard(connection)
        site = connection.site
        if site is not None:
            if self._by_site.get(site) is connection:
                del self._by_site[site]
            superseded = self._superseded.get(site)
            if superseded is not None and superseded[0] is connection:
                del self._superseded[site]
        self.counters[f"closed_{reason}"] += 1
