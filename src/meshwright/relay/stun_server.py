"""The relays' STUN service: Binding over UDP (RFC 8489) with RFC 5780 behaviour discovery.

Standard library only, like :mod:`meshwright.wire.stun`, because this file is copied to relays that
have Debian's python3 and nothing else.

Layout: :class:`StunResponder` decides what to answer (no sockets, unit-testable),
:class:`StunServer` owns one UDP socket per (address, port) and a ``selectors`` loop, and
:func:`main` is the ``meshwright stun-server`` command.

Behaviour, with the RFC text it follows (docs/relays.md, "The STUN service", says where and why
we deviate):

* Every Binding success carries XOR-MAPPED-ADDRESS *and* MAPPED-ADDRESS (RFC 5780 section 6.1:
  "The server MUST include both MAPPED-ADDRESS and XOR-MAPPED-ADDRESS in its Response"),
  RESPONSE-ORIGIN (the address:port it is really sent from), SOFTWARE and FINGERPRINT.
* Classic RFC 3489 requests (no magic cookie), over UDP only as in RFC 3489, are answered as
  RFC 8489 section 11 says: the 16-byte transaction id echoed, MAPPED-ADDRESS instead of
  XOR-MAPPED-ADDRESS, plus RFC 3489's SOURCE-ADDRESS and CHANGED-ADDRESS (the same values as
  RESPONSE-ORIGIN and OTHER-ADDRESS) and nothing RFC 3489 lacks (SOFTWARE, FINGERPRINT), since
  its parsers reject or trip over them. CHANGE-REQUEST means the same in both RFCs, so classic
  clients get the same NAT tests; RESPONSE-ADDRESS, a reflection tool, is unknown (420).
* OTHER-ADDRESS and changing the source need a second IP of the same family. RFC 5780 section
  6: "If a server cannot allocate the same ports on two different IP address, then it MUST NOT
  include an OTHER-ADDRESS attribute in any Response and MUST respond with a 420 (Unknown
  Attribute) to any Request with a CHANGE-REQUEST attribute"; section 7.4 says OTHER-ADDRESS
  "MUST NOT be inserted into a Binding Response unless the server has a second IP address".
  So with one address we still listen on both ports, but never send OTHER-ADDRESS and answer
  a CHANGE-REQUEST that asks for a change (change-port too) with 420 listing CHANGE-REQUEST
  (0x0003). We do not fake change-port from the alternate port: a client cannot learn that
  port without OTHER-ADDRESS.
* Deviation: a CHANGE-REQUEST with *no* flag set asks for nothing we cannot do (RFC 5780 Table
  1, row "none": the usual source), so it is served everywhere -- on one address and over TCP
  too. Clients such as stund's always send one; coturn serves it too.
* With two or more addresses, each address's alternate is the next configured address of the
  same family (cyclically); the alternate port of the primary port is the alt port and vice
  versa. CHANGE-REQUEST picks the source socket as in RFC 5780 section 6.1 Table 1.
* RESPONSE-PORT (RFC 5780 section 7.5) is honoured over UDP, with one address or more: the
  answer goes to the request's source IP at that port ("If RESPONSE-PORT is present, the server
  sends the response to that port instead of the originating port", section 6.1). We read
  "response" as RFC 8489 does, success or error, so a 420 for another attribute goes there
  too: coturn's turnutils_stunclient listens only on that port and otherwise never completes.
  Port 0 cannot be delivered to: 400 to the source port. Over TCP an answer can only go back on
  the connection, so there RESPONSE-PORT gets 420, which section 5 tells clients to expect.
* A request with unknown comprehension-required attributes (0x0000-0x7FFF) gets 420 with
  UNKNOWN-ATTRIBUTES (RFC 8489 sections 6.3.1 and 14.9). That includes PADDING, which RFC 5780
  makes optional for servers and which we do not implement; 420 is how RFC 5780 clients detect
  that. MESSAGE-INTEGRITY/USERNAME are understood but not checked: this server is
  unauthenticated, as RFC 8489 allows for Binding. CHANGE-REQUEST with a flag over TCP keeps its
  420 too (coturn answers 400 there): a connection has one source.
* Everything else that is not a well-formed Binding request is dropped without an answer and
  counted: non-STUN, malformed (a bad CHANGE-REQUEST or RESPONSE-PORT value too), other classes
  (indications, responses) and other methods. Dropping rather than sending 400 keeps the
  server from reflecting junk at spoofed sources.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import json
import logging
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from meshwright.relay.admission import SourceSlots, source_key
from meshwright.wire import stun
from meshwright.wire.endpoint import format_endpoint

__all__ = [
    "DEFAULT_ALT_PORT",
    "DEFAULT_BURST",
    "DEFAULT_MAX_SOURCES",
    "DEFAULT_PORT",
    "DEFAULT_RATE",
    "SOFTWARE",
    "Outcome",
    "RateLimiter",
    "StunResponder",
    "StunServer",
    "main",
    "serve",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]

DEFAULT_PORT = 3478
DEFAULT_ALT_PORT = 3479
DEFAULT_RATE = 50.0
DEFAULT_BURST = 100.0
DEFAULT_MAX_SOURCES = 65536
DEFAULT_LOG_INTERVAL = 300.0
SOFTWARE = "meshwright"

UNKNOWN_ATTRIBUTES = 0x000A
# Comprehension-required attributes RFC 8489 defines (section 18.3.1), plus RFC 5780's
# CHANGE-REQUEST and RESPONSE-PORT (UDP only: see handle()); a request may carry them and still
# be answered. USERHASH and PASSWORD-ALGORITHM(S) have no constant in the codec.
_UNDERSTOOD = frozenset(
    {
        stun.MAPPED_ADDRESS,
        stun.USERNAME,
        stun.MESSAGE_INTEGRITY,
        stun.ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        stun.REALM,
        stun.NONCE,
        stun.MESSAGE_INTEGRITY_SHA256,
        0x001D,  # PASSWORD-ALGORITHM
        0x001E,  # USERHASH
        stun.XOR_MAPPED_ADDRESS,
        stun.CHANGE_REQUEST,
        stun.RESPONSE_PORT,
    }
)
_COMPREHENSION_OPTIONAL = 0x8000

# Reasons a datagram gets no answer; each is counted as "dropped_<reason>".
DROP_REASONS = ("not_stun", "malformed", "not_request", "not_binding", "rate_limited")


@dataclass(frozen=True)
class Outcome:
    """What to do with one datagram: send ``response`` from local ``send_from``, or drop it.

    ``reason`` is "success", "error_420", "error_400" or one of :data:`DROP_REASONS`.
    ``response_port``, when set, replaces the source's port as the destination (RESPONSE-PORT).
    """

    reason: str
    response: bytes | None = None
    send_from: Address | None = None
    response_port: int | None = None

    @property
    def dropped(self) -> bool:
        return self.response is None


class RateLimiter:
    """Token buckets per source, in an LRU table of at most ``max_sources`` entries.

    Evicting the least recently seen source bounds memory; an evicted source comes back with a
    full bucket, so a flood of spoofed sources can only make limiting laxer, never grow memory.
    IPv6 sources are keyed by their /64, since one host usually owns a whole /64.
    """

    def __init__(
        self,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        max_sources: int = DEFAULT_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_sources = max_sources
        self.evictions = 0
        self._clock = clock
        # key -> [tokens, last refill time]
        self._buckets: collections.OrderedDict[str | bytes, list[float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str) -> bool:
        """Take one token for ip; False if its bucket is empty."""
        now = self._clock()
        key = source_key(ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
                self.evictions += 1
            bucket = self._buckets[key] = [self.burst, now]
        else:
            self._buckets.move_to_end(key)
            # max() guards against a clock that steps back.
            elapsed = max(0.0, now - bucket[1])
            bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False


def _normalise(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified or ip.is_multicast:
        # RESPONSE-ORIGIN and OTHER-ADDRESS must name a concrete unicast address.
        raise ValueError(f"not a usable unicast address: {address!r}")
    return str(ip)


def _pack_address(address: Address) -> bytes:
    # Plain MAPPED-ADDRESS encoding (RFC 8489 14.1); the codec only builds the XOR form.
    ip = ipaddress.ip_address(address[0])
    family = 0x01 if ip.version == 4 else 0x02
    return struct.pack("!BBH", 0, family, address[1]) + ip.packed


class StunResponder:
    """Answers Binding requests for a server listening on ``addresses`` x {port, alt_port}.

    Pure apart from the rate limiter's clock: :meth:`handle` takes a datagram and returns an
    :class:`Outcome`; counters accumulate in :attr:`stats`.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        port: int = DEFAULT_PORT,
        alt_port: int = DEFAULT_ALT_PORT,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        max_sources: int = DEFAULT_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
        software: str = SOFTWARE,
    ) -> None:
        if isinstance(addresses, str):
            raise TypeError("addresses must be a sequence of strings, not one string")
        normalised = [_normalise(address) for address in addresses]
        if not normalised:
            raise ValueError("at least one address is needed")
        if len(set(normalised)) != len(normalised):
            raise ValueError("duplicate address")
        for value in (port, alt_port):
            if not isinstance(value, int) or not 1 <= value <= 0xFFFF:
                raise ValueError(f"port out of range: {value!r}")
        if port == alt_port:
            raise ValueError("port and alt_port must differ")

        self.addresses: tuple[str, ...] = tuple(normalised)
        self.port = port
        self.alt_port = alt_port
        self.software = software
        self.limiter = RateLimiter(rate, burst, max_sources, clock)
        self._locals = frozenset(self.listen_addresses)
        # RFC 5780 needs the alternate IP to be reachable the same way, so pair within a family.
        self.alternate_ip: dict[str, str] = {}
        for version in (4, 6):
            group = [a for a in self.addresses if ipaddress.ip_address(a).version == version]
            if len(group) >= 2:
                for index, address in enumerate(group):
                    self.alternate_ip[address] = group[(index + 1) % len(group)]
        self.stats: dict[str, int] = dict.fromkeys(
            ["received", "success", "error_420", "error_400", "classic"]
            + [f"dropped_{reason}" for reason in DROP_REASONS]
            + ["rate_limit_evictions", "send_errors", "receive_errors", "internal_errors"],
            0,
        )

    @property
    def listen_addresses(self) -> list[Address]:
        """Every (address, port) the server needs a socket on."""
        return [(a, p) for a in self.addresses for p in (self.port, self.alt_port)]

    def other_port(self, port: int) -> int:
        return self.alt_port if port == self.port else self.port

    def other_address(self, local: Address) -> Address | None:
        """OTHER-ADDRESS for a request that arrived on local, or None without an alternate IP."""
        alternate = self.alternate_ip.get(local[0])
        return None if alternate is None else (alternate, self.other_port(local[1]))

    def _drop(self, reason: str) -> Outcome:
        self.stats[f"dropped_{reason}"] += 1
        return Outcome(reason)

    def handle(
        self, data: bytes, source: Address, local: Address, *, stream: Address | None = None
    ) -> Outcome:
        """Decide the answer to datagram data from source that arrived on local.

        With ``stream`` (the local end of a TCP connection; ``local`` is then the UDP socket of
        the same address) the answer goes back on that connection: its origin is the stream,
        and CHANGE-REQUEST asking for a change and RESPONSE-PORT, which cannot be honoured on a
        connection, get a 420; classic RFC 3489 requests, UDP-only, are not STUN there.
        Never raises for any data; ValueError only if local is not one of our sockets.
        """
        if local not in self._locals:
            # Slow path only for spellings like "::0001"; the server passes canonical keys.
            local = (str(ipaddress.ip_address(local[0])), local[1])
            if local not in self._locals:
                raise ValueError(f"{local!r} is not one of this server's addresses")
        self.stats["received"] += 1

        # Rate limit before parsing, so a flood costs us as little CPU as possible.
        allowed = self.limiter.allow(source[0])
        self.stats["rate_limit_evictions"] = self.limiter.evictions
        if not allowed:
            return self._drop("rate_limited")
        # RFC 3489 defined Binding over UDP only; over TCP a cookie is what marks STUN.
        classic = stream is None
        if not stun.is_stun(data, classic=classic):
            return self._drop("not_stun")
        try:
            request = stun.decode(data, classic=classic)
        except stun.StunError:
            return self._drop("malformed")
        if request.cls != stun.REQUEST:
            return self._drop("not_request")
        if request.method != stun.BINDING:
            return self._drop("not_binding")
        if request.classic:
            self.stats["classic"] += 1

        # Each unknown type once, in order of appearance. Deduplicated with a dict: one UDP
        # datagram carries up to 16,371 attributes, and a list lookup per attribute made that
        # quadratic: a second of CPU per crafted request (found writing its fuzz target).
        unknown = list(
            dict.fromkeys(
                attribute.type
                for attribute in request.attributes
                if attribute.type < _COMPREHENSION_OPTIONAL and attribute.type not in _UNDERSTOOD
            )
        )
        change_ip, change_port = request.change_request() or (False, False)
        other = self.other_address(local) if stream is None else None
        if (change_ip or change_port) and other is None:
            # RFC 5780 section 6: a change we cannot make gets 420. One asking for no change is
            # served (a deviation: the RFC says any CHANGE-REQUEST; see the module docstring).
            unknown.append(stun.CHANGE_REQUEST)
        response_port = request.response_port()
        if response_port is not None and stream is not None:
            # A connection has one destination; RFC 5780 section 5: clients expect this 420.
            unknown.append(stun.RESPONSE_PORT)
            response_port = None
        origin = local if stream is None else stream
        if unknown:
            self.stats["error_420"] += 1
            error = self._error(request, 420, "Unknown Attribute", unknown)
            return Outcome("error_420", error, origin, response_port or None)
        if response_port == 0:
            # Nothing can be delivered to port 0: say so at the port the request came from.
            self.stats["error_400"] += 1
            return Outcome("error_400", self._error(request, 400, "Bad Request"), origin)

        send_from = origin
        if other is not None:
            # RFC 5780 section 6.1 Table 1: the flags pick the alternate IP and/or port.
            send_from = (other[0] if change_ip else local[0], other[1] if change_port else local[1])
        response = self._success(request, source, send_from, other)
        self.stats["success"] += 1
        return Outcome("success", response, send_from, response_port)

    def _success(
        self,
        request: stun.Message,
        source: Address,
        send_from: Address,
        other: Address | None,
    ) -> bytes:
        if request.classic:
            # The codec answers RFC 3489 clients as RFC 8489 section 11 says.
            return stun.binding_success(
                request, source, response_origin=send_from, other_address=other
            )
        # The codec's builder leaves out MAPPED-ADDRESS, which RFC 5780 6.1 requires, so
        # splice it in after XOR-MAPPED-ADDRESS and add FINGERPRINT only then.
        built = stun.binding_success(
            request,
            source,
            response_origin=send_from,
            other_address=other,
            software=self.software,
            fingerprint=False,
        )
        attributes = list(stun.decode(built).attributes)
        attributes.insert(1, stun.Attribute(stun.MAPPED_ADDRESS, _pack_address(source)))
        message = stun.Message(
            stun.BINDING, stun.SUCCESS_RESPONSE, request.transaction_id, tuple(attributes)
        )
        return stun.encode(message, fingerprint=True)

    def _error(
        self, request: stun.Message, code: int, reason: str, unknown: Sequence[int] = ()
    ) -> bytes:
        built = stun.binding_error(request, code, reason, fingerprint=False)
        attributes = list(stun.decode(built, classic=True).attributes)
        if unknown:
            types = list(unknown)
            if request.classic and len(types) % 2:
                # RFC 3489 11.2.10 repeats a type to fill 4 bytes; RFC 8489 14.9 pads instead.
                types.append(types[-1])
            value = b"".join(t.to_bytes(2, "big") for t in types)
            attributes.append(stun.Attribute(UNKNOWN_ATTRIBUTES, value))
        if request.classic:
            # No SOFTWARE or FINGERPRINT, as in the classic success (see the codec).
            message = stun.Message(
                stun.BINDING, stun.ERROR_RESPONSE, request.transaction_id, tuple(attributes)
            )
            return stun.encode(message)
        attributes.append(stun.Attribute(stun.SOFTWARE, self.software.encode("utf-8")))
        message = stun.Message(
            stun.BINDING, stun.ERROR_RESPONSE, request.transaction_id, tuple(attributes)
        )
        return stun.encode(message, fingerprint=True)


_RECEIVE_BUFFER = 65536
# Datagrams read from one socket per wake-up, so one busy socket cannot starve the others.
_BATCH = 64
_MAX_LOGGED_INTERNAL_ERRORS = 10
# STUN over TCP (RFC 8489 section 6.2.2): lets a site whose network drops UDP learn that
# the relay is reachable at all, and from which address. Bounded in every dimension: a
# connection gets _TCP_ANSWER_SECONDS from its accept, then from each answer, to complete its
# next request (bytes that complete none extend nothing), and one source holds at most
# _TCP_PER_SOURCE connections (meshwright.relay.admission).
_TCP_MAX_CONNECTIONS = 256
_TCP_PER_SOURCE = 8
_TCP_ANSWER_SECONDS = 5.0
_TCP_MAX_BUFFER = 2048
_COOKIE = stun.MAGIC_COOKIE.to_bytes(4, "big")


@dataclass
class StunTcpClient:
    conn: socket.socket
    peer: Address
    local: Address
    buffer: bytearray
    deadline: float


class StunStreams:
    """STUN over TCP connections in a caller's ``selectors`` loop (RFC 8489 section 6.2.2).

    The STUN service uses it for its own TCP listener; the relay service, which owns TCP 443
    for its TLS relay, hands it the connections that turn out to speak STUN (:meth:`adopt`).
    A connection's registration data is its :class:`StunTcpClient`: the loop passes keys whose
    data is one to :meth:`read`, and calls :meth:`close_idle` about once a second.
    """

    def __init__(
        self,
        responder: StunResponder,
        selector: selectors.BaseSelector,
        stats: dict[str, int],
        clock: Callable[[], float] = time.monotonic,
        answer_seconds: float = _TCP_ANSWER_SECONDS,
    ) -> None:
        self.responder, self.selector, self.stats, self.clock = responder, selector, stats, clock
        self.answer_seconds = answer_seconds
        self.clients: dict[socket.socket, StunTcpClient] = {}
        self.slots = SourceSlots(_TCP_PER_SOURCE, _TCP_MAX_CONNECTIONS)

    def _count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    def accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        self.adopt(conn)

    def adopt(self, conn: socket.socket, first_bytes: bytes = b"") -> None:
        """Serve an accepted connection; ``first_bytes`` were already read from it."""
        try:
            conn.setblocking(False)
            peer, local = conn.getpeername()[:2], conn.getsockname()[:2]
        except OSError:
            conn.close()
            return
        refused = self.slots.take(peer[0])
        if refused is not None:
            self._count("tcp_refused" if refused == "total" else "tcp_refused_source")
            conn.close()
            return
        client = StunTcpClient(conn, peer, local, bytearray(), self.clock() + self.answer_seconds)
        self.clients[conn] = client
        self.selector.register(conn, selectors.EVENT_READ, client)
        if first_bytes:
            self._feed(client, first_bytes)

    def read(self, client: StunTcpClient) -> None:
        try:
            data = client.conn.recv(_TCP_MAX_BUFFER)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(client)
            return
        self._feed(client, data)

    def _feed(self, client: StunTcpClient, data: bytes) -> None:
        client.buffer += data
        # STUN over TCP has no framing of its own: the header's length field delimits.
        while len(client.buffer) >= stun.HEADER_SIZE:
            size = stun.HEADER_SIZE + int.from_bytes(client.buffer[2:4], "big")
            header_ok = client.buffer[0] & 0xC0 == 0 and client.buffer[4:8] == _COOKIE
            if size > _TCP_MAX_BUFFER or not header_ok:
                self._count("tcp_dropped")
                self.close(client)  # no way to resynchronise a byte stream
                return
            if len(client.buffer) < size:
                return
            message, client.buffer = bytes(client.buffer[:size]), client.buffer[size:]
            try:
                udp_local = (client.local[0], self.responder.port)
                outcome = self.responder.handle(
                    message, client.peer, udp_local, stream=client.local
                )
            except Exception:
                self._count("internal_errors")
                self.close(client)
                return
            if outcome.response is not None:
                try:
                    client.conn.sendall(outcome.response)
                except OSError:
                    self.close(client)
                    return
                client.deadline = self.clock() + self.answer_seconds

    def close_idle(self) -> None:
        """Close the connections whose time to complete a request has run out."""
        if not self.clients:
            return
        now = self.clock()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._count("tcp_timeouts")
            self.close(client)

    def close(self, client: StunTcpClient) -> None:
        if self.clients.pop(client.conn, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.conn)
        self.slots.give(client.peer[0])
        client.conn.close()

    def close_all(self) -> None:
        for client in list(self.clients.values()):
            self.close(client)


class StunServer:
    """One non-blocking UDP socket per (address, port), served by a ``selectors`` loop.

    Sockets are bound in the constructor, so a bad address fails there, not in the loop.
    :meth:`stop` may be called from another thread or a signal handler.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        port: int = DEFAULT_PORT,
        alt_port: int = DEFAULT_ALT_PORT,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        max_sources: int = DEFAULT_MAX_SOURCES,
        log_interval: float = DEFAULT_LOG_INTERVAL,
        tcp_port: int | None = None,
    ) -> None:
        self.responder = StunResponder(
            addresses, port, alt_port, rate=rate, burst=burst, max_sources=max_sources
        )
        self.log_interval = log_interval
        self._sockets: dict[Address, socket.socket] = {}
        self._listeners: dict[Address, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self._stats_requested = False
        self._buffer = bytearray(_RECEIVE_BUFFER)
        self._streams = StunStreams(self.responder, self._selector, self.stats)
        # A socketpair wakes select() up for stop(); PEP 475 would otherwise resume the wait.
        self._wake_read, self._wake_write = socket.socketpair()
        try:
            for wake in (self._wake_read, self._wake_write):
                wake.setblocking(False)
            self._selector.register(self._wake_read, selectors.EVENT_READ, None)
            for local in self.responder.listen_addresses:
                self._sockets[local] = self._bind(local)
                self._selector.register(self._sockets[local], selectors.EVENT_READ, local)
            if tcp_port is not None:
                for address in dict.fromkeys(a for a, _ in self.responder.listen_addresses):
                    local = (address, tcp_port)
                    self._listeners[local] = self._listen(local)
                    self._selector.register(self._listeners[local], selectors.EVENT_READ, "tcp")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _bind(local: Address) -> socket.socket:
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(local)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _listen(local: Address) -> socket.socket:
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(local)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def stats(self) -> dict[str, int]:
        return self.responder.stats

    @property
    def listen_addresses(self) -> list[Address]:
        return list(self._sockets)

    def stop(self) -> None:
        """Ask serve_forever() to return; safe from other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def request_stats_log(self) -> None:
        """Log the counters from the loop soon (for SIGUSR1)."""
        self._stats_requested = True
        self._wake()

    def _wake(self) -> None:
        # A full buffer or closed socket means the loop is already awake or gone.
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def log_stats(self) -> None:
        log.info("stun-server stats: %s", json.dumps(self.stats, sort_keys=True))

    def serve_forever(self) -> None:
        log.info(
            "stun-server listening on %s",
            ", ".join(format_endpoint(a, p) for a, p in self._sockets),
        )
        if self._listeners:
            log.info(
                "stun-server listening over TCP on %s",
                ", ".join(format_endpoint(a, p) for a, p in self._listeners),
            )
        next_log = time.monotonic() + self.log_interval if self.log_interval > 0 else None
        last_logged: dict[str, int] = {}
        while not self._stopping:
            timeout = None if next_log is None else max(0.0, next_log - time.monotonic())
            if self._streams.clients:  # wake up to close idle TCP connections
                timeout = 1.0 if timeout is None else min(timeout, 1.0)
            for key, _events in self._selector.select(timeout):
                if key.data is None:
                    self._drain_wake()
                elif key.data == "tcp":
                    self._streams.accept(key.fileobj)  # type: ignore[arg-type]
                elif isinstance(key.data, StunTcpClient):
                    self._streams.read(key.data)
                else:
                    self._drain(key.fileobj, key.data)  # type: ignore[arg-type]
            self._streams.close_idle()
            if self._stats_requested:
                self._stats_requested = False
                self.log_stats()
            if next_log is not None and time.monotonic() >= next_log:
                next_log = time.monotonic() + self.log_interval
                # Periodic logging only when something happened, to keep quiet relays quiet.
                if self.stats != last_logged:
                    last_logged = dict(self.stats)
                    self.log_stats()

    def _drain_wake(self) -> None:
        try:
            while self._wake_read.recv(64):
                pass
        except OSError:
            pass

    def _drain(self, sock: socket.socket, local: Address) -> None:
        view = memoryview(self._buffer)
        for _ in range(_BATCH):
            try:
                size, source = sock.recvfrom_into(self._buffer)
            except BlockingIOError:
                return
            except OSError:
                self.stats["receive_errors"] += 1
                return
            data = bytes(view[:size])
            # IPv6 sources come as (host, port, flowinfo, scope); keep the full tuple for the
            # reply, and give the responder just the address without any %scope.
            client = (source[0].split("%", 1)[0], source[1])
            try:
                outcome = self.responder.handle(data, client, local)
            except Exception:
                # A bug must not take the relay's STUN service down; count and move on.
                self.stats["internal_errors"] += 1
                if self.stats["internal_errors"] <= _MAX_LOGGED_INTERNAL_ERRORS:
                    log.exception("stun-server: failed to handle a datagram from %s", client)
                continue
            if outcome.response is None or outcome.send_from is None:
                continue
            destination = source
            if outcome.response_port is not None:
                # RESPONSE-PORT: same host (and IPv6 flow and scope), another port.
                destination = (source[0], outcome.response_port, *source[2:])
            try:
                self._sockets[outcome.send_from].sendto(outcome.response, destination)
            except OSError:
                # Includes a full send buffer: UDP answers are best effort anyway.
                self.stats["send_errors"] += 1

    def close(self) -> None:
        self._streams.close_all()
        self._selector.close()
        sockets = (*self._sockets.values(), *self._listeners.values())
        for sock in (*sockets, self._wake_read, self._wake_write):
            sock.close()
        self._sockets.clear()
        self._listeners.clear()

    def __enter__(self) -> StunServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(
    addresses: Sequence[str],
    port: int = DEFAULT_PORT,
    alt_port: int = DEFAULT_ALT_PORT,
    *,
    rate: float = DEFAULT_RATE,
    burst: float = DEFAULT_BURST,
    max_sources: int = DEFAULT_MAX_SOURCES,
    log_interval: float = DEFAULT_LOG_INTERVAL,
    tcp_port: int | None = None,
) -> dict[str, int]:
    """Serve until SIGTERM or SIGINT and return the final counters.

    Signal handlers (including SIGUSR1: log the counters) are installed only when called from
    the main thread, where Python allows it; elsewhere use StunServer and its stop().
    """
    with StunServer(
        addresses,
        port,
        alt_port,
        rate=rate,
        burst=burst,
        max_sources=max_sources,
        log_interval=log_interval,
        tcp_port=tcp_port,
    ) as server:
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {
                signal.SIGTERM: lambda _signum, _frame: server.stop(),
                signal.SIGINT: lambda _signum, _frame: server.stop(),
                signal.SIGUSR1: lambda _signum, _frame: server.request_stats_log(),
            }
            for signum, handler in handlers.items():
                previous[signum] = signal.signal(signum, handler)
        try:
            server.serve_forever()
        finally:
            for signum, handler in previous.items():
                # None means the old handler was not set from Python; the default is closest.
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            server.log_stats()
        return dict(server.stats)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def _address(text: str) -> str:
    try:
        return _normalise(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshwright stun-server",
        description="STUN Binding service (RFC 8489) with RFC 5780 NAT behaviour discovery.",
    )
    parser.add_argument(
        "--address",
        action="append",
        required=True,
        type=_address,
        help="local unicast address to serve on; repeat it. A second address of the same "
        "family enables OTHER-ADDRESS and CHANGE-REQUEST (RFC 5780).",
    )
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="primary port")
    parser.add_argument("--alt-port", type=_port, default=DEFAULT_ALT_PORT, help="alternate port")
    parser.add_argument(
        "--tcp-port",
        type=_port,
        help="also answer STUN over TCP on this port (e.g. 443, which UDP-blocked sites reach)",
    )
    parser.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help="requests/s allowed per source IP"
    )
    parser.add_argument(
        "--burst", type=float, default=DEFAULT_BURST, help="burst allowed per source IP"
    )
    parser.add_argument(
        "--max-sources",
        type=int,
        default=DEFAULT_MAX_SOURCES,
        help="source IPs tracked by the rate limiter before the least recent is forgotten",
    )
    parser.add_argument(
        "--log-interval",
        type=float,
        default=DEFAULT_LOG_INTERVAL,
        help="seconds between counter logs when they changed; 0 turns it off",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    # A no-op when the embedding program (or the meshwright CLI) already set logging up.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        serve(
            args.address,
            args.port,
            args.alt_port,
            rate=args.rate,
            burst=args.burst,
            max_sources=args.max_sources,
            log_interval=args.log_interval,
            tcp_port=args.tcp_port,
        )
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        log.error("stun-server: cannot listen: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
