"""The NAT probe's I/O: STUN transactions from the site's own sockets, to the relays' STUN service.

:mod:`.classify` makes every decision from what :func:`observe` records; :func:`probe` is
``classify(observe(...))``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from meshwright.wire import stun
from meshwright.wire.endpoint import format_endpoint

from .classify import (
    FAILED,
    OK,
    TIMEOUT,
    Address,
    Binding,
    NatReport,
    Observations,
    classify,
    same_address,
)

# --- I/O: relays and the retransmission schedule ------------------------------------------------


@dataclass(frozen=True)
class StunRelay:
    """A relay's STUN service: one or two addresses (IP literals or names), two ports."""

    name: str
    addresses: tuple[str, ...]
    port: int = 3478
    alt_port: int | None = 3479

    def __post_init__(self) -> None:
        # Accept a list from YAML; keep a tuple so the spec stays hashable.
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if not self.name:
            raise ValueError("relay name must not be empty")
        if not 1 <= len(self.addresses) <= 2:
            raise ValueError(f"relay {self.name}: give one or two addresses")
        for port in (self.port, self.alt_port):
            if port is not None and not 1 <= port <= 0xFFFF:
                raise ValueError(f"relay {self.name}: port {port} out of range")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StunRelay:
        addresses = data.get("addresses", data.get("address"))
        if isinstance(addresses, str):
            addresses = (addresses,)
        alt_port = data.get("alt_port", 3479)
        return cls(
            name=str(data["name"]),
            addresses=tuple(str(a) for a in addresses or ()),
            port=int(data.get("port", 3478)),
            alt_port=None if alt_port is None else int(alt_port),
        )


@dataclass(frozen=True)
class Retransmission:
    """RFC 8489 section 6.2.1: send at 0, RTO, 3 RTO, 7 RTO, ... (Rc requests in all), then
    wait Rm times the initial RTO after the last one before giving up."""

    rto: float = 0.25
    rc: int = 4
    rm: int = 4

    def __post_init__(self) -> None:
        if self.rto <= 0 or self.rc < 1 or self.rm < 1:
            raise ValueError("rto must be positive, rc and rm at least 1")

    def send_offsets(self) -> tuple[float, ...]:
        offsets, at, gap = [], 0.0, self.rto
        for _ in range(self.rc):
            offsets.append(at)
            at, gap = at + gap, gap * 2
        return tuple(offsets)

    def give_up_after(self) -> float:
        return self.send_offsets()[-1] + self.rm * self.rto


# The RFC's own schedule: 0.5 s, Rc 7, Rm 16; a dead relay costs 39.5 s.
RFC8489_RETRANSMISSION = Retransmission(0.5, 7, 16)
# Our default: 0.25 s, Rc 4, Rm 4: sends at 0, 0.25, 0.75 and 1.75 s, gives up at 2.75 s. Four
# tries ride out ordinary loss; a missing relay should not stall a playbook run for minutes.
DEFAULT_RETRANSMISSION = Retransmission()


# --- I/O: the exchange engine -----------------------------------------------------------------

# Linux only: ask for ICMP errors on an unconnected UDP socket (values from <linux/in.h>).
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EACCES: "sending not permitted (local firewall?)",
    errno.EPERM: "sending not permitted (local firewall?)",
    errno.EADDRNOTAVAIL: "address not available",
    errno.EAFNOSUPPORT: "address family not supported",
}
# What may answer a Binding request; a hairpinned request arrives as a request.
_ANSWERS = (stun.SUCCESS_RESPONSE, stun.ERROR_RESPONSE)
# Errors the kernel may report on a later call, unrelated to the destination of that call.
_ASYNC_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


def _describe(error: OSError | int) -> str:
    number = error if isinstance(error, int) else error.errno
    if isinstance(error, TimeoutError) or number == errno.ETIMEDOUT:
        return "timed out"
    if number in _ERRNO_TEXT:
        return _ERRNO_TEXT[number]
    if number:
        return os.strerror(number).lower()
    return str(error) or type(error).__name__


class _Transaction:
    """One Binding request and its retransmissions, matched to its answer by transaction id."""

    def __init__(
        self,
        relay: str,
        server: Address,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        hairpin: bool = False,
        local: Address | None = None,
        software: str | None = None,
    ) -> None:
        self.relay = relay
        self.server = server
        self.change_ip = change_ip
        self.change_port = change_port
        self.hairpin = hairpin
        self.local = local
        self.txid = stun.new_transaction_id()
        self.payload = stun.binding_request(self.txid, change_ip, change_port, software)
        self.sent: list[float] = []
        self.done = False
        self.outcome = TIMEOUT
        self.error: str | None = None
        self.message: stun.Message | None = None
        self.source: Address | None = None
        self.rtt_ms: float | None = None
        self.ended: float | None = None

    def finish(self, outcome: str, now: float, error: str | None = None) -> None:
        self.done, self.outcome, self.ended = True, outcome, now
        if error is not None:
            self.error = error

    def binding(self) -> Binding:
        message = self.message
        mapped = other = None
        if message is not None:
            mapped = message.xor_mapped_address() or message.mapped_address()
            other = message.other_address()
        error = self.error
        if self.outcome == TIMEOUT:
            waited = (self.ended or 0.0) - (self.sent[0] if self.sent else 0.0)
            timeout = f"no response after {len(self.sent)} tries ({waited:.1f} s)"
            error = f"{error}; {timeout}" if error else timeout
        return Binding(
            relay=self.relay,
            server=self.server,
            outcome=self.outcome,
            mapped=mapped,
            source=self.source,
            other_address=other,
            rtt_ms=self.rtt_ms,
            change_ip=self.change_ip,
            change_port=self.change_port,
            tries=len(self.sent),
            error=error if self.outcome != OK else None,
            local=self.local,
        )


class _Exchange:
    """Runs batches of concurrent transactions over one socket.

    Anything on the socket that is not an answer to one of our transactions (not STUN, a
    foreign transaction id, an unexpected class) is dropped and counted in ``ignored``.
    """

    def __init__(
        self,
        sock: socket.socket,
        schedule: Retransmission,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.schedule = schedule
        self.clock = clock
        self.ignored = 0
        self.known: dict[bytes, _Transaction] = {}
        self.recverr = _enable_recverr(sock)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)

    def close(self) -> None:
        self.selector.close()

    def run(self, batch: Sequence[_Transaction]) -> None:
        offsets = self.schedule.send_offsets()
        give_up = self.schedule.give_up_after()
        start = self.clock()
        for transaction in batch:
            self.known[transaction.txid] = transaction
        while True:
            now = self.clock()
            next_event: float | None = None
            for transaction in batch:
                if transaction.done:
                    continue
                tries = len(transaction.sent)
                if tries < len(offsets) and now >= start + offsets[tries]:
                    self._send(transaction)
                    tries += 1
                if transaction.done:
                    continue
                if tries >= len(offsets) and now >= start + give_up:
                    transaction.finish(TIMEOUT, now)
                    continue
                due = start + (offsets[tries] if tries < len(offsets) else give_up)
                next_event = due if next_event is None else min(next_event, due)
            if next_event is None:
                break
            if self.selector.select(max(0.0, next_event - self.clock())):
                self._receive()

    def _send(self, transaction: _Transaction) -> None:
        transaction.sent.append(self.clock())
        for attempt in range(2):
            try:
                self.sock.sendto(transaction.payload, transaction.server)
                return
            except BlockingIOError:
                return  # a full send buffer is a lost packet; the schedule retries
            except OSError as error:
                if attempt == 0 and self.recverr and error.errno in _ASYNC_ERRNOS:
                    # Probably a queued ICMP error about another destination: read it, retry.
                    self._read_errors()
                    continue
                transaction.error = _describe(error)
                return

    def _receive(self) -> None:
        for _ in range(1024):  # bounded, so a flood cannot keep us here forever
            try:
                data, source = self.sock.recvfrom(stun.MAX_MESSAGE_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # An ICMP error surfacing on recv: the error queue says whose it is.
                self._read_errors()
                continue
            self._dispatch(data, (source[0], source[1]))
        self._read_errors()

    def _dispatch(self, data: bytes, source: Address) -> None:
        try:
            message = stun.decode(data)
        except stun.StunError:
            self.ignored += 1
            return
        transaction = self.known.get(message.transaction_id)
        if transaction is None or message.method != stun.BINDING:
            self.ignored += 1
            return
        if transaction.done:
            return  # a late answer to a retransmission of ours: not noise
        expected = (stun.REQUEST,) if transaction.hairpin else _ANSWERS
        if message.cls not in expected:
            self.ignored += 1
            return
        now = self.clock()
        transaction.message, transaction.source = message, source
        # From the latest copy sent: an answer to an earlier copy reads short, never long.
        transaction.rtt_ms = (now - transaction.sent[-1]) * 1000.0
        if message.cls == stun.ERROR_RESPONSE:
            code = message.error_code()
            text = f"error response {code[0]} {code[1]}".strip() if code else "error response"
            transaction.finish(FAILED, now, text)
        else:
            transaction.finish(OK, now)

    def _read_errors(self) -> None:
        """Drain the socket's error queue (Linux IP_RECVERR) and charge each ICMP error to its
        transaction: by the transaction id in the quoted payload, else by the destination."""
        if not self.recverr:
            return
        for _ in range(1024):
            try:
                data, ancillary, _flags, address = self.sock.recvmsg(
                    2048, 1024, _MSG_ERRQUEUE | getattr(socket, "MSG_DONTWAIT", 0)
                )
            except OSError:
                return
            number = 0
            for level, kind, payload in ancillary:
                if (level, kind) in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ) and len(payload) >= 4:
                    number = struct.unpack_from("=I", payload)[0]
            if not number:
                continue
            # Routers often quote only 8 bytes of the payload, too little for the id.
            owner = self.known.get(bytes(data[8:20])) if len(data) >= 20 else None
            if owner is not None:
                owners = [owner]
            else:
                destination = (address[0], address[1]) if address else None
                owners = [
                    t
                    for t in self.known.values()
                    if not t.done and same_address(t.server, destination)
                ]
            for transaction in owners:
                if transaction.done:
                    continue
                if number == errno.ECONNREFUSED:
                    # Port unreachable: the host is there and says no. Waiting will not help.
                    transaction.finish(
                        FAILED, self.clock(), "connection refused (ICMP port unreachable)"
                    )
                else:
                    # Host or network unreachable may be transient (ARP, a route flap): keep
                    # retrying, and name the error if nothing ever answers.
                    transaction.error = f"{_describe(number)} (ICMP)"


def _enable_recverr(sock: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
    except OSError:
        return False
    return True


# --- I/O: the probe ---------------------------------------------------------------------------


def _resolve(host: str, family: socket.AddressFamily) -> str:
    """An IP literal for host in the socket's family; OSError with a readable text if none."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, family, socket.SOCK_DGRAM)
        except socket.gaierror as error:
            raise OSError(f"cannot resolve: {error.strerror or error}") from error
        if not infos:
            raise OSError("cannot resolve") from None
        return str(infos[0][4][0])
    wanted = 6 if family == socket.AF_INET6 else 4
    if ip.version != wanted:
        raise OSError(f"IPv{ip.version} address, but the probe socket is IPv{wanted}")
    return str(ip)


def _local_towards(
    destination: Address, family: socket.AddressFamily, bind_address: str, port: int
) -> Address | None:
    """The local address a packet to destination leaves from (no packet is sent)."""
    if not ipaddress.ip_address(bind_address).is_unspecified:
        return bind_address, port
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe_socket:
            # connect() on UDP only picks a route and a source address.
            probe_socket.connect(destination)
            return probe_socket.getsockname()[0], port
    except OSError:
        return None


def _tcp_check(relay: StunRelay, port: int, timeout: float) -> tuple[bool, list[str]]:
    errors: list[str] = []
    for host in relay.addresses:
        target = format_endpoint(host, port)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True, errors
        except TimeoutError:
            errors.append(f"{relay.name} {target}/tcp: timed out after {timeout:g} s")
        except OSError as error:
            errors.append(f"{relay.name} {target}/tcp: {_describe(error)}")
    return False, errors


def observe(
    relays: Sequence[StunRelay],
    *,
    local_port: int = 0,
    bind_address: str = "0.0.0.0",
    tcp_port: int | None = 443,
    retransmission: Retransmission = DEFAULT_RETRANSMISSION,
    tcp_timeout: float = 2.0,
    hairpin: bool = True,
    software: str | None = None,
) -> Observations:
    """Run the probe from two UDP sockets of its own and record what happened.

    ``local_port`` is the mapping socket's port (0: any); the filtering socket always takes an
    ephemeral one. ``tcp_port=None`` skips the TCP test, ``hairpin=False`` the hairpin test.
    Binding the sockets may raise OSError (for example, the port is taken); everything after
    that is recorded, never raised.
    """
    names = [relay.name for relay in relays]
    if len(set(names)) != len(names):
        raise ValueError("relay names must be unique")
    family = socket.AF_INET6 if ipaddress.ip_address(bind_address).version == 6 else socket.AF_INET
    with (
        socket.socket(family, socket.SOCK_DGRAM) as sock,
        socket.socket(family, socket.SOCK_DGRAM) as filter_sock,
    ):
        sock.bind((bind_address, local_port))
        filter_sock.bind((bind_address, 0))
        sock.setblocking(False)
        filter_sock.setblocking(False)
        ports = (sock.getsockname()[1], filter_sock.getsockname()[1])
        # TCP connects run in threads alongside the UDP rounds; they share nothing with them.
        with ThreadPoolExecutor(max_workers=max(1, len(relays))) as pool:
            tcp_jobs = (
                {
                    relay.name: pool.submit(_tcp_check, relay, tcp_port, tcp_timeout)
                    for relay in relays
                }
                if tcp_port is not None
                else {}
            )
            exchange = _Exchange(sock, retransmission)
            filter_exchange = _Exchange(filter_sock, retransmission)
            try:
                udp = _udp_rounds(
                    (exchange, filter_exchange),
                    relays,
                    family,
                    bind_address,
                    ports,
                    hairpin,
                    software,
                )
            finally:
                exchange.close()
                filter_exchange.close()
            tcp: dict[str, bool] = {}
            tcp_errors: list[str] = []
            for name, job in tcp_jobs.items():
                tcp[name], errors = job.result()
                if not tcp[name]:
                    tcp_errors.extend(errors)
    bindings, hairpin_result, udp_errors, local, skipped = udp
    return Observations(
        local_address=local,
        bindings=tuple(bindings),
        hairpin=hairpin_result,
        tcp=tcp,
        errors=tuple(udp_errors + tcp_errors),
        ignored_packets=exchange.ignored + filter_exchange.ignored,
        filtering_skipped=skipped,
    )


def _udp_rounds(
    exchanges: tuple[_Exchange, _Exchange],
    relays: Sequence[StunRelay],
    family: socket.AddressFamily,
    bind_address: str,
    ports: tuple[int, int],
    hairpin: bool,
    software: str | None,
) -> tuple[list[Binding], bool | None, list[str], Address | None, str | None]:
    """The four rounds of the module docstring. ``exchanges`` and ``ports`` are the mapping
    socket's and the filtering socket's, in that order."""
    exchange, filter_exchange = exchanges
    bound_port, filter_port = ports
    errors: list[str] = []
    locals_by_ip: dict[str, Address | None] = {}

    def local_for(server: Address, port: int) -> Address | None:
        if server[0] not in locals_by_ip:
            locals_by_ip[server[0]] = _local_towards(server, family, bind_address, bound_port)
        local = locals_by_ip[server[0]]
        return None if local is None else (local[0], port)

    def transaction(
        relay: str, server: Address, port: int = bound_port, **flags: bool
    ) -> _Transaction:
        return _Transaction(
            relay, server, local=local_for(server, port), software=software, **flags
        )

    addresses: dict[str, list[str]] = {}
    for relay in relays:
        addresses[relay.name] = []
        for host in relay.addresses:
            try:
                addresses[relay.name].append(_resolve(host, family))
            except OSError as error:
                errors.append(f"{relay.name} {host}: {error}")

    contacted: set[Address] = set()
    probes: list[_Transaction] = []  # mapping tests, in send order
    primary: dict[str, _Transaction] = {}

    # Round 1: each relay's primary endpoint, falling back to its next address.
    untried = {name: list(ips) for name, ips in addresses.items()}
    while True:
        batch = [
            transaction(relay.name, (untried[relay.name].pop(0), relay.port))
            for relay in relays
            if relay.name not in primary and untried[relay.name]
        ]
        if not batch:
            break
        exchange.run(batch)
        for item in batch:
            contacted.add(item.server)
            probes.append(item)
            if item.outcome == OK and item.binding().mapped is not None:
                primary[item.relay] = item

    # Round 2: the filtering tests, from the filtering socket, to primary endpoints only. Its
    # filter must be opened towards nothing the tests' answers come from: no relay's primary
    # may be another relay's alternate address (or its address with the alternate port).
    tests: list[_Transaction] = []
    skipped: list[str] = []
    candidates: list[tuple[str, Address, Address]] = []
    for relay in relays:
        first = primary.get(relay.name)
        other = first.binding().other_address if first else None
        if first is None or other is None:
            continue
        if other[0] == first.server[0] or other[1] == first.server[1]:
            skipped.append(
                f"{relay.name}: OTHER-ADDRESS {format_endpoint(*other)} does not differ from "
                f"{format_endpoint(*first.server)} in both address and port"
            )
        else:
            candidates.append((relay.name, first.server, other))
    targets = {server for _, server, _ in candidates}
    target_ips = {server[0] for server in targets}
    for name, server, other in candidates:
        if other[0] in target_ips or (server[0], other[1]) in targets:
            skipped.append(
                f"{name}: OTHER-ADDRESS {format_endpoint(*other)} is where another relay's "
                "filtering tests go, which would open the filter under test"
            )
        else:
            tests.append(transaction(name, server, filter_port, change_ip=True, change_port=True))
            tests.append(transaction(name, server, filter_port, change_port=True))
    filter_exchange.run(tests)

    # Round 3: every other endpoint of every relay: mapping tests and port allocation.
    batch = []
    for relay in relays:
        first = primary.get(relay.name)
        other = first.binding().other_address if first else None
        ips = list(addresses[relay.name])
        if other is not None and other[0] not in ips:
            ips.append(other[0])
        # The server knows its own alternate port better than the inventory does.
        alt_port = other[1] if other is not None else relay.alt_port
        relay_ports = [relay.port] + ([alt_port] if alt_port and alt_port != relay.port else [])
        for ip in ips:
            for port in relay_ports:
                if (ip, port) not in contacted:
                    contacted.add((ip, port))
                    batch.append(transaction(relay.name, (ip, port)))
    exchange.run(batch)
    probes.extend(batch)

    # Round 4: hairpin, after every mapping test (see the module docstring).
    hairpin_probe: _Transaction | None = None
    if hairpin and primary:
        mapped = next(iter(primary.values())).binding().mapped
        if mapped is not None:
            hairpin_probe = _Transaction("hairpin", mapped, hairpin=True, software=software)
            exchange.run([hairpin_probe])

    for item in probes:
        if item.outcome != OK:
            errors.append(f"{item.relay} {format_endpoint(*item.server)}: {item.binding().error}")
    first_probe = next(iter(primary.values()), probes[0] if probes else None)
    local = first_probe.local if first_probe else None
    if local is None and not ipaddress.ip_address(bind_address).is_unspecified:
        local = (bind_address, bound_port)
    bindings = [item.binding() for item in _in_send_order(probes, tests)]
    hairpin_result = None if hairpin_probe is None else hairpin_probe.outcome == OK
    skipped_text = "; ".join(skipped) if skipped and not tests else None
    return bindings, hairpin_result, errors, local, skipped_text


def _in_send_order(*groups: Iterable[_Transaction]) -> list[_Transaction]:
    return sorted(
        (item for group in groups for item in group),
        key=lambda item: item.sent[0] if item.sent else float("inf"),
    )


def probe(
    relays: Sequence[StunRelay],
    *,
    local_port: int = 0,
    bind_address: str = "0.0.0.0",
    tcp_port: int | None = 443,
    retransmission: Retransmission = DEFAULT_RETRANSMISSION,
    tcp_timeout: float = 2.0,
    hairpin: bool = True,
    software: str | None = None,
) -> NatReport:
    """Probe the NAT in front of this host and classify it: ``classify(observe(...))``.

    With no UDP answer at all the report has ``udp: False`` and ``errors`` names each relay
    address tried and what happened; :meth:`NatReport.failure_message` joins them.

    The default schedule (RTO 250 ms, Rc 4, Rm 4: a silent address costs 2.75 s per round) is
    deliberately shorter than RFC 8489's 39.5 s; pass ``RFC8489_RETRANSMISSION`` for that one.
    """
    return classify(
        observe(
            relays,
            local_port=local_port,
            bind_address=bind_address,
            tcp_port=tcp_port,
            retransmission=retransmission,
            tcp_timeout=tcp_timeout,
            hairpin=hairpin,
            software=software,
        )
    )
