"""Tests for meshwright.site.nat: classification on recorded observations, and the probe itself
against a tiny RFC 5780 responder on loopback. Traffic goes only to 127.0.0.0/8."""

from __future__ import annotations

import json
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import pytest

from meshwright.site.nat import probe as natprobe
from meshwright.site.nat.classify import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    BLOCKED,
    EASY,
    ENDPOINT_INDEPENDENT,
    FAILED,
    HARD,
    OK,
    OPEN,
    TIMEOUT,
    UNKNOWN,
    Binding,
    Observations,
    classify,
)
from meshwright.site.nat.probe import Retransmission, StunRelay
from meshwright.wire import stun

Address = tuple[str, int]

# --- classification on recorded observations --------------------------------------------------

LOCAL: Address = ("10.0.0.5", 50000)
PUBLIC = "198.51.100.77"
A1, A2, B1 = "198.51.100.10", "198.51.100.11", "203.0.113.20"
# A relay "a" with two addresses and two ports (RFC 5780 capable) and a relay "b" with one.
SERVERS_A: tuple[Address, ...] = ((A1, 3478), (A1, 3479), (A2, 3478), (A2, 3479))
SERVERS_AB: tuple[Address, ...] = ((A1, 3478), (A1, 3479), (B1, 3478), (B1, 3479))
OTHER_A: Address = (A2, 3479)

Nat = Callable[[Address], Address]


def no_nat(server: Address) -> Address:
    return LOCAL


def eim(server: Address) -> Address:
    return (PUBLIC, 61000)


def adm(server: Address) -> Address:
    # One mapping per server address, whatever the port.
    return (PUBLIC, {A1: 61000, A2: 61007, B1: 61019}[server[0]])


def apdm_ports(ports: Sequence[int], servers: Sequence[Address] = SERVERS_A) -> Nat:
    # One mapping per server address and port, allocated in the order given.
    table = dict(zip(servers, ports, strict=True))
    return lambda server: (PUBLIC, table[server])


apdm = apdm_ports([61000, 61001, 61002, 61003])


def relay_of(server: Address) -> str:
    return "b" if server[0] == B1 else "a"


def observations(
    nat: Nat | None,
    *,
    servers: Sequence[Address] = SERVERS_A,
    filtering: tuple[bool | None, bool | None] | None = None,
    other: bool = True,
    hairpin: bool | None = None,
    local: Address = LOCAL,
) -> Observations:
    """What a probe would have recorded behind the NAT `nat` (None: UDP blocked).

    `filtering` gives (test II got in, test III got in); None for a test means it was not run.
    """
    bindings: list[Binding] = []
    for index, server in enumerate(servers):
        if nat is None:
            bindings.append(Binding(relay_of(server), server, TIMEOUT, tries=4))
            continue
        bindings.append(
            Binding(
                relay_of(server),
                server,
                OK,
                mapped=nat(server),
                source=server,
                other_address=OTHER_A if other and relay_of(server) == "a" else None,
                rtt_ms=20.0 + index if relay_of(server) == "a" else 5.0 + index,
            )
        )
        if index == 0 and filtering is not None:
            for got_in, change_ip, source in (
                (filtering[0], True, OTHER_A),
                (filtering[1], False, (server[0], OTHER_A[1])),
            ):
                if got_in is None:
                    continue
                bindings.append(
                    Binding(
                        relay_of(server),
                        server,
                        OK if got_in else TIMEOUT,
                        mapped=nat(server) if got_in else None,
                        source=source if got_in else None,
                        change_ip=change_ip,
                        change_port=True,
                    )
                )
    return Observations(local_address=local, bindings=tuple(bindings), hairpin=hairpin)


# Short names for the table below.
EI, AD, APD = ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT


@pytest.mark.parametrize(
    ("nat", "filtering", "mapping", "filter_kind", "nat_class"),
    [
        pytest.param(no_nat, (True, True), EI, EI, OPEN, id="no-nat"),
        pytest.param(no_nat, None, EI, UNKNOWN, OPEN, id="no-nat-unmeasured"),
        pytest.param(no_nat, (False, False), EI, APD, EASY, id="no-nat-firewall"),
        pytest.param(eim, (True, True), EI, EI, OPEN, id="full-cone"),
        pytest.param(eim, (False, True), EI, AD, EASY, id="eim-adf"),
        pytest.param(eim, (False, False), EI, APD, EASY, id="eim-apdf"),
        pytest.param(adm, (False, True), AD, AD, HARD, id="adm-adf"),
        pytest.param(adm, (False, False), AD, APD, HARD, id="adm-apdf"),
        pytest.param(apdm, (False, False), APD, APD, HARD, id="symmetric"),
        pytest.param(apdm, (True, True), APD, EI, OPEN, id="edm-eif"),
        pytest.param(None, None, UNKNOWN, UNKNOWN, BLOCKED, id="blocked"),
    ],
)
def test_classify_combinations(
    nat: Nat | None,
    filtering: tuple[bool, bool] | None,
    mapping: str,
    filter_kind: str,
    nat_class: str,
) -> None:
    report = classify(observations(nat, filtering=filtering))
    assert (report.mapping, report.filtering, report.nat_class) == (mapping, filter_kind, nat_class)
    assert report.udp is (nat is not None)
    assert report.mapping_reason and report.filtering_reason
    if nat is None:
        assert report.behind_nat is None
        assert report.public_addresses == ()
        assert report.best_relay is None
    else:
        assert report.behind_nat is (nat is not no_nat)
        assert report.public_addresses == ((LOCAL[0],) if nat is no_nat else (PUBLIC,))


def test_mapping_reasons_say_what_was_measured() -> None:
    assert "no NAT" in classify(observations(no_nat)).mapping_reason
    assert "4 server endpoints on 2 addresses" in classify(observations(eim)).mapping_reason
    reason = classify(observations(apdm)).mapping_reason
    assert "port alone" in reason and "198.51.100.10:3478" in reason
    reason = classify(observations(adm)).mapping_reason
    assert "server address" in reason and "not with the port" in reason


@pytest.mark.parametrize(
    ("nat", "mapping", "nat_class"),
    [
        (eim, ENDPOINT_INDEPENDENT, EASY),
        (adm, ADDRESS_DEPENDENT, HARD),
        (apdm_ports([61000, 61001, 61002, 61003], SERVERS_AB), ADDRESS_AND_PORT_DEPENDENT, HARD),
    ],
)
def test_relays_with_one_address_each(nat: Nat, mapping: str, nat_class: str) -> None:
    """No OTHER-ADDRESS anywhere: mapping from two relays and each relay's two ports."""
    report = classify(observations(nat, servers=SERVERS_AB, other=False))
    assert report.mapping == mapping
    assert report.filtering == UNKNOWN
    assert "OTHER-ADDRESS" in report.filtering_reason
    assert report.nat_class == nat_class


def test_one_relay_one_address_cannot_tell_eim_from_adm() -> None:
    report = classify(observations(eim, servers=((A1, 3478), (A1, 3479)), other=False))
    assert report.mapping == UNKNOWN
    assert "endpoint-independent and address-dependent" in report.mapping_reason
    # Not measured is not proven easy: assume the worst.
    assert report.nat_class == HARD


def test_address_dependence_without_a_port_pair_is_still_hard() -> None:
    report = classify(observations(adm, servers=((A1, 3478), (B1, 3478)), other=False))
    assert report.mapping == UNKNOWN
    assert "endpoint-dependent" in report.mapping_reason
    assert report.nat_class == HARD


def test_single_endpoint_mapping_unknown() -> None:
    report = classify(observations(eim, servers=((A1, 3478),), other=False))
    assert report.mapping == UNKNOWN
    assert "only one server endpoint" in report.mapping_reason


def test_filtering_ignores_a_server_that_ignores_change_request() -> None:
    base = observations(eim, filtering=(True, True))
    # Rewrite test II's answer to come from where the request went.
    bindings = tuple(replace(b, source=b.server) if b.change_ip else b for b in base.bindings)
    report = classify(replace(base, bindings=bindings))
    # Test III still answered from the other port, but test II proves nothing now.
    assert report.filtering == UNKNOWN
    assert "ignoring CHANGE-REQUEST" in report.filtering_reason


def test_filtering_error_response_is_inconclusive() -> None:
    base = observations(eim, filtering=(False, False))
    bindings = tuple(
        replace(b, outcome=FAILED, error="error response 420 Unknown Attribute")
        if b.is_change_test
        else b
        for b in base.bindings
    )
    report = classify(replace(base, bindings=bindings))
    assert report.filtering == UNKNOWN
    assert "420" in report.filtering_reason


def test_filtering_skipped_reason_is_reported() -> None:
    base = observations(eim)
    report = classify(replace(base, filtering_skipped="a: OTHER-ADDRESS was already contacted"))
    assert report.filtering == UNKNOWN
    assert report.filtering_reason == "a: OTHER-ADDRESS was already contacted"


def test_filtering_success_on_any_relay_wins() -> None:
    # Relay "a" lost its test II answer; relay "b" got it: EIF (a response cannot be faked).
    base = observations(eim, servers=SERVERS_AB, filtering=(False, False))
    extra = Binding(
        "b", (B1, 3478), OK, mapped=(PUBLIC, 61000), source=("203.0.113.21", 3479),
        change_ip=True, change_port=True,
    )  # fmt: skip
    report = classify(replace(base, bindings=(*base.bindings, extra)))
    assert report.filtering == ENDPOINT_INDEPENDENT
    assert report.nat_class == OPEN


@pytest.mark.parametrize(
    ("nat", "servers", "kind", "delta"),
    [
        (no_nat, SERVERS_A, "preserved", None),
        (lambda s: (PUBLIC, LOCAL[1]), SERVERS_A, "preserved", None),
        (apdm_ports([61000, 61002, 61004, 61006]), SERVERS_A, "sequential", 2),
        (apdm_ports([61006, 61005, 61004, 61003]), SERVERS_A, "sequential", -1),
        (apdm_ports([61000, 40211, 52999, 1200]), SERVERS_A, "random", None),
        (apdm_ports([1000, 2000, 3000, 4000]), SERVERS_A, "random", None),
        (apdm_ports([61000, 61001, 61003, 61004]), SERVERS_A, "random", None),
        (apdm_ports([61000, 61001], SERVERS_A[:2]), SERVERS_A[:2], "unknown", None),
        (eim, SERVERS_A, "unknown", None),  # one mapping reused: no new allocations to see
        (adm, SERVERS_A, "unknown", None),  # two mappings only
        (None, SERVERS_A, "unknown", None),
    ],
)
def test_port_allocation(
    nat: Nat | None, servers: Sequence[Address], kind: str, delta: int | None
) -> None:
    allocation = classify(observations(nat, servers=servers)).port_allocation
    assert (allocation.kind, allocation.delta) == (kind, delta)
    assert allocation.reason


def test_port_allocation_uses_send_order() -> None:
    # Sequential in send order, whatever the server addresses sort to.
    servers = ((A2, 3479), (A1, 3478), (A2, 3478), (A1, 3479))
    nat = apdm_ports([61000, 61003, 61006, 61009], servers)
    allocation = classify(observations(nat, servers=servers)).port_allocation
    assert (allocation.kind, allocation.delta, allocation.samples) == (
        "sequential", 3, (61000, 61003, 61006, 61009),
    )  # fmt: skip


@pytest.mark.parametrize("hairpin", [True, False, None])
def test_hairpinning_is_reported(hairpin: bool | None) -> None:
    assert classify(observations(eim, hairpin=hairpin)).hairpinning is hairpin


@pytest.mark.parametrize(
    ("nat", "preserved"),
    [
        (no_nat, True),
        (lambda s: (PUBLIC, LOCAL[1]), True),
        (eim, False),
        (lambda s: (PUBLIC, LOCAL[1] if s[0] == A1 else 61000), False),
        (None, False),
    ],
)
def test_port_preservation(nat: Nat | None, preserved: bool) -> None:
    assert classify(observations(nat)).port_preservation is preserved


def test_filtering_tests_from_their_own_socket() -> None:
    # No NAT: the filtering tests leave from another port and map to it; that is still no NAT,
    # and port preservation is the mapping socket's.
    test_local = (LOCAL[0], LOCAL[1] + 1)
    base = observations(no_nat, filtering=(False, True))
    bindings = tuple(
        replace(b, local=test_local, mapped=test_local if b.answered else None)
        if b.is_change_test
        else b
        for b in base.bindings
    )
    report = classify(replace(base, bindings=bindings))
    assert report.behind_nat is False
    assert (report.filtering, report.nat_class) == (ADDRESS_DEPENDENT, EASY)
    assert report.port_preservation is True
    assert report.local_address == LOCAL
    assert all(mapped == LOCAL for _, _, mapped in report.mappings)


def test_per_binding_local_address_for_multihomed_hosts() -> None:
    # Two interfaces, no NAT: each mapping equals the address its request left from.
    second = ("10.9.0.5", LOCAL[1])
    base = observations(no_nat, servers=SERVERS_AB, other=False)
    bindings = tuple(
        replace(b, mapped=second, local=second) if b.relay == "b" else b for b in base.bindings
    )
    report = classify(replace(base, bindings=bindings))
    assert report.behind_nat is False
    assert report.nat_class == OPEN
    assert report.public_addresses == ("10.0.0.5", "10.9.0.5")


def test_rtt_best_relay_and_public_addresses() -> None:
    nat = apdm_ports([61000, 61001, 61002, 61003], SERVERS_AB)
    base = observations(nat, servers=SERVERS_AB, other=False)
    # A CGNAT pool: relay b sees another public address.
    bindings = tuple(
        replace(b, mapped=("198.51.100.9", 7)) if b.relay == "b" else b for b in base.bindings
    )
    report = classify(replace(base, bindings=bindings))
    assert report.rtt_ms == {"a": 20.0, "b": 7.0}
    assert report.best_relay == "b"
    assert report.public_addresses == ("198.51.100.9", PUBLIC)


def test_to_dict_is_json_and_complete() -> None:
    base = observations(eim, filtering=(False, True), hairpin=False)
    report = classify(replace(base, tcp={"b": False, "a": True}, errors=("x",), ignored_packets=2))
    fact = json.loads(json.dumps(report.to_dict()))
    assert set(fact) == {
        "udp", "nat_class", "behind_nat", "local_address", "public_addresses", "mapping",
        "mapping_reason", "filtering", "filtering_reason", "hairpinning", "port_preservation",
        "port_allocation", "rtt_ms", "best_relay", "tcp443", "mappings", "errors",
        "ignored_packets",
    }  # fmt: skip
    assert fact["local_address"] == {"ip": LOCAL[0], "port": LOCAL[1]}
    assert fact["tcp443"] == {"a": True, "b": False}
    assert fact["port_allocation"]["kind"] == "unknown"
    assert set(fact["port_allocation"]) == {"kind", "delta", "samples", "reason"}
    assert fact["mappings"][0] == {
        "relay": "a",
        "server": {"ip": A1, "port": 3478},
        "mapped": {"ip": PUBLIC, "port": 61000},
    }
    assert (fact["nat_class"], fact["hairpinning"], fact["ignored_packets"]) == (EASY, False, 2)


def test_classify_is_deterministic() -> None:
    obs = observations(apdm, filtering=(False, False), hairpin=True)
    assert classify(obs).to_dict() == classify(obs).to_dict()


# --- schedule and relay specs ------------------------------------------------------------------


def test_retransmission_schedules() -> None:
    rfc = natprobe.RFC8489_RETRANSMISSION
    assert rfc.send_offsets() == (0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5)
    assert rfc.give_up_after() == pytest.approx(39.5)
    default = natprobe.DEFAULT_RETRANSMISSION
    assert (default.rto, default.rc, default.rm) == (0.25, 4, 4)
    assert default.give_up_after() == pytest.approx(2.75)
    with pytest.raises(ValueError):
        Retransmission(0.0, 1, 1)


def test_relay_spec() -> None:
    spec = StunRelay.from_dict({"name": "r", "addresses": ["198.51.100.1"], "alt_port": None})
    assert spec == StunRelay("r", ("198.51.100.1",), 3478, None)
    assert StunRelay.from_dict({"name": "r", "address": "h"}).addresses == ("h",)
    with pytest.raises(ValueError):
        StunRelay("r", ())
    with pytest.raises(ValueError):
        StunRelay("r", ("a", "b", "c"))
    with pytest.raises(ValueError):
        StunRelay("r", ("a",), port=70000)


# --- the probe on loopback, against an in-test RFC 5780 responder ------------------------------

FAST = Retransmission(0.05, 3, 2)  # gives up after 0.25 s


class Responder:
    """A tiny STUN responder: listens on every (ip, port) of `ips` x two ports.

    With two addresses it behaves as an RFC 5780 server (OTHER-ADDRESS, CHANGE-REQUEST).
    `nat` fakes the mapped address a NAT would give, from (client, server endpoint index);
    `answer_change` decides whether to answer a (change_ip, change_port) request, as a NAT's
    filter would; `let_in`, when given, decides instead from (client, index of the endpoint the
    answer would come from); `junk` sends noise before every answer; `drop_first` drops the
    first copy of every transaction, to exercise retransmission. `log` records (endpoint,
    client) of every request, in arrival order; a packet on `sink` is logged as ("sink", client).
    """

    def __init__(
        self,
        ips: Sequence[str],
        *,
        other: bool = True,
        nat: Callable[[Address, int], Address] | None = None,
        answer_change: Callable[[bool, bool], bool] = lambda ip, port: True,
        let_in: Callable[[Address, int], bool] | None = None,
        junk: bool = False,
        drop_first: bool = False,
        sink: socket.socket | None = None,
    ) -> None:
        self.ips = list(ips)
        self.other = other and len(self.ips) == 2
        self.nat = nat
        self.answer_change = answer_change
        self.let_in = let_in
        self.sink = sink
        self.log: list[tuple[Address | str, Address]] = []
        self.junk = junk
        self.drop_first = drop_first
        self.seen: set[bytes] = set()
        self.requests: list[Address] = []
        self.sockets: dict[Address, socket.socket] = {}
        self.port, self.alt_port = self._bind_pair()
        self.endpoints = [(ip, port) for ip in self.ips for port in (self.port, self.alt_port)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _bind_pair(self) -> tuple[int, int]:
        # Both ports must be free on every address, as on a real RFC 5780 server.
        ports: list[int] = []
        while len(ports) < 2:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind((self.ips[0], 0))
            port = probe.getsockname()[1]
            probe.close()
            opened: list[socket.socket] = []
            try:
                for ip in self.ips:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    opened.append(sock)
                    sock.bind((ip, port))
            except OSError:
                for sock in opened:
                    sock.close()
                continue
            for ip, sock in zip(self.ips, opened, strict=True):
                self.sockets[(ip, port)] = sock
            ports.append(port)
        return ports[0], ports[1]

    def __enter__(self) -> Responder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()
        for sock in self.sockets.values():
            sock.close()

    def spec(self, name: str, addresses: Sequence[str] | None = None) -> StunRelay:
        return StunRelay(name, tuple(addresses or self.ips[:1]), self.port, self.alt_port)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for endpoint, sock in self.sockets.items():
                selector.register(sock, selectors.EVENT_READ, endpoint)
            if self.sink is not None:
                selector.register(self.sink, selectors.EVENT_READ, "sink")
            while not self._stop.is_set():
                for key, _ in selector.select(0.02):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    data, client = sock.recvfrom(2048)
                    if key.data == "sink":
                        self.log.append(("sink", (client[0], client[1])))
                    else:
                        self._answer(key.data, data, client)

    def _answer(self, endpoint: Address, data: bytes, client: Address) -> None:
        try:
            message = stun.decode(data)
        except stun.StunError:
            return
        if message.cls != stun.REQUEST:
            return
        if self.drop_first and message.transaction_id not in self.seen:
            self.seen.add(message.transaction_id)
            return
        self.requests.append(endpoint)
        self.log.append((endpoint, (client[0], client[1])))
        change_ip, change_port = message.change_request() or (False, False)
        ip, port = endpoint

        def flip(value: object, pair: Sequence[object]) -> object:
            return pair[1 - pair.index(value)] if len(pair) == 2 else value

        origin = (
            str(flip(ip, self.ips)) if change_ip else ip,
            int(str(flip(port, (self.port, self.alt_port)))) if change_port else port,
        )
        if change_ip or change_port:
            allowed = (
                self.let_in((client[0], client[1]), self.endpoints.index(origin))
                if self.let_in
                else self.answer_change(change_ip, change_port)
            )
            if not allowed:
                return
        other = (
            (str(flip(ip, self.ips)), int(str(flip(port, (self.port, self.alt_port)))))
            if self.other
            else None
        )
        mapped = (
            self.nat((client[0], client[1]), self.endpoints.index(endpoint))
            if self.nat
            else (client[0], client[1])
        )
        reply = self.sockets[origin]
        if self.junk:
            reply.sendto(b"not stun at all", client)
            reply.sendto(stun.binding_success(stun.new_transaction_id(), mapped), client)
        reply.sendto(
            stun.binding_success(message, mapped, response_origin=origin, other_address=other),
            client,
        )


@contextmanager
def tcp_listener() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def unused_port(ip: str, kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]


def test_probe_loopback_is_open() -> None:
    with Responder(["127.0.0.1", "127.0.0.2"]) as responder, tcp_listener() as tcp_port:
        started = time.monotonic()
        report = natprobe.probe(
            [responder.spec("r1", ["127.0.0.1", "127.0.0.2"])],
            bind_address="127.0.0.1",
            tcp_port=tcp_port,
            retransmission=FAST,
        )
        elapsed = time.monotonic() - started
    assert report.udp is True
    assert report.nat_class == OPEN
    assert report.behind_nat is False
    assert report.local_address is not None
    assert report.public_addresses == ("127.0.0.1",)
    assert all(mapped == report.local_address for _, _, mapped in report.mappings)
    assert len(report.mappings) == 4  # 2 addresses x 2 ports
    assert report.mapping == ENDPOINT_INDEPENDENT
    assert report.filtering == ENDPOINT_INDEPENDENT
    assert report.hairpinning is True
    assert report.port_preservation is True
    assert report.port_allocation.kind == "preserved"
    assert set(report.rtt_ms) == {"r1"} and report.rtt_ms["r1"] >= 0
    assert report.best_relay == "r1"
    assert report.tcp443 == {"r1": True}
    assert report.errors == ()
    assert report.ignored_packets == 0
    json.dumps(report.to_dict())
    # Test II and III answered at once; only the (untaken) timeouts could make this slow.
    assert elapsed < 1.0


def test_probe_filtering_tests_use_their_own_socket_and_run_before_alternates() -> None:
    with Responder(["127.0.0.1", "127.0.0.2"]) as responder:
        observed = natprobe.observe(
            [responder.spec("r1", ["127.0.0.1", "127.0.0.2"])],
            tcp_port=None,
            retransmission=FAST,
        )
    primary = ("127.0.0.1", responder.port)
    # Primary, then test II and III (sent to the primary), then the other endpoints.
    assert responder.requests[:3] == [primary] * 3
    assert primary not in responder.requests[3:]
    assert len(responder.requests) == 6
    # The tests come from a second port that sends nowhere else; the local address is the
    # mapping socket's, which never sends a filtering test.
    assert observed.local_address is not None
    mapping_port = observed.local_address[1]
    clients = [client[1] for _, client in responder.log]
    assert clients[0] == mapping_port and clients[3:] == [mapping_port] * 3
    assert clients[1] == clients[2] != mapping_port
    tests = [b for b in observed.bindings if b.is_change_test]
    assert [b.local for b in tests] == [("127.0.0.1", clients[1])] * 2
    assert all(b.local == observed.local_address for b in observed.bindings if not b.is_change_test)


class LinuxMasquerade:
    """A Linux MASQUERADE NAT in miniature: endpoint-independent mapping that keeps the local
    port, address-and-port-dependent filtering, and the conntrack clash. An inbound packet the
    filter drops still leaves an entry (its origin -> our public port); a later outbound packet
    from that public port to that origin would have the same reply tuple, so it gets a new port.
    """

    PUBLIC = "127.0.0.9"

    def __init__(self) -> None:
        self.unreplied: set[tuple[int, int]] = set()  # (public port, endpoint index)
        self.moved: dict[tuple[int, int], int] = {}

    def mapped(self, client: Address, index: int) -> Address:
        key = (client[1], index)
        if key in self.unreplied:
            return (self.PUBLIC, self.moved.setdefault(key, 50000 + len(self.moved)))
        return (self.PUBLIC, client[1])

    def let_in(self, client: Address, origin: int) -> bool:
        self.unreplied.add((client[1], origin))
        return False


def test_probe_dropped_test_answers_do_not_move_the_mapping() -> None:
    """Regression (podman NAT lab): with the filtering tests on the mapping socket, their dropped
    answers made an endpoint-independent mapping look address-and-port-dependent."""
    nat = LinuxMasquerade()
    with Responder(["127.0.0.1", "127.0.0.2"], nat=nat.mapped, let_in=nat.let_in) as responder:
        report = natprobe.probe(
            [responder.spec("r1", ["127.0.0.1", "127.0.0.2"])],
            tcp_port=None,
            retransmission=FAST,
            hairpin=False,
        )
    assert len(nat.unreplied) == 2  # both test answers were dropped...
    assert nat.moved == {}  # ...and no mapping test met their entries
    assert (report.mapping, report.filtering, report.nat_class) == (
        ENDPOINT_INDEPENDENT, ADDRESS_AND_PORT_DEPENDENT, EASY,
    )  # fmt: skip
    assert report.local_address is not None
    assert report.port_preservation is True
    assert {mapped for _, _, mapped in report.mappings} == {
        (LinuxMasquerade.PUBLIC, report.local_address[1])
    }


def test_probe_hairpin_runs_after_every_mapping_test() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.9", 0))
        public = sink.getsockname()
        with Responder(
            ["127.0.0.1", "127.0.0.2"], nat=lambda client, index: public, sink=sink
        ) as responder:
            report = natprobe.probe(
                [responder.spec("r1", ["127.0.0.1", "127.0.0.2"])],
                tcp_port=None,
                retransmission=FAST,
            )
    assert report.local_address is not None
    # Six Binding requests, then the hairpin request (sent three times, unanswered).
    sink_log = [("sink", report.local_address)] * FAST.rc
    assert responder.log[6:] == sink_log
    assert all(endpoint != "sink" for endpoint, _ in responder.log[:6])
    assert report.hairpinning is False  # it reached the sink, not our socket


def test_probe_skips_filtering_when_a_primary_is_another_relays_alternate() -> None:
    with Responder(["127.0.0.1", "127.0.0.2"]) as responder:
        # Two names for one server: b's primary address is a's OTHER-ADDRESS, and back.
        relays = [responder.spec("a", ["127.0.0.1"]), responder.spec("b", ["127.0.0.2"])]
        observed = natprobe.observe(relays, tcp_port=None, retransmission=FAST, hairpin=False)
    assert not any(b.is_change_test for b in observed.bindings)
    assert observed.filtering_skipped is not None
    assert "another relay's filtering tests" in observed.filtering_skipped
    assert classify(observed).filtering == UNKNOWN


def test_probe_two_single_address_relays_on_wildcard_socket() -> None:
    with ExitStack() as stack:
        one = stack.enter_context(Responder(["127.0.0.1"]))
        two = stack.enter_context(Responder(["127.0.0.2"]))
        report = natprobe.probe(
            [one.spec("one"), two.spec("two")], tcp_port=None, retransmission=FAST
        )
    assert report.nat_class == OPEN
    assert report.behind_nat is False
    assert report.mapping == ENDPOINT_INDEPENDENT
    assert report.filtering == UNKNOWN
    assert "OTHER-ADDRESS" in report.filtering_reason
    assert set(report.rtt_ms) == {"one", "two"}
    assert report.best_relay in {"one", "two"}
    assert len(report.mappings) == 4
    assert report.tcp443 == {}


def fake_symmetric_nat(client: Address, index: int) -> Address:
    # A new public port per server endpoint, 10 apart; the "public" address stays in 127/8.
    return ("127.0.0.9", 40000 + 10 * index)


def fake_cone_nat(client: Address, index: int) -> Address:
    return ("127.0.0.9", 40000)


@pytest.mark.parametrize(
    ("nat", "answer_change", "mapping", "filtering", "nat_class", "allocation"),
    [
        (fake_symmetric_nat, lambda ip, port: False, ADDRESS_AND_PORT_DEPENDENT,
         ADDRESS_AND_PORT_DEPENDENT, HARD, ("sequential", 10)),
        (fake_cone_nat, lambda ip, port: not ip, ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT,
         EASY, ("unknown", None)),
    ],
)  # fmt: skip
def test_probe_against_a_faked_nat(
    nat: Callable[[Address, int], Address],
    answer_change: Callable[[bool, bool], bool],
    mapping: str,
    filtering: str,
    nat_class: str,
    allocation: tuple[str, int | None],
) -> None:
    with Responder(["127.0.0.1", "127.0.0.2"], nat=nat, answer_change=answer_change) as responder:
        report = natprobe.probe(
            [responder.spec("r1", ["127.0.0.1", "127.0.0.2"])],
            tcp_port=None,
            retransmission=FAST,
        )
    assert (report.mapping, report.filtering, report.nat_class) == (mapping, filtering, nat_class)
    assert (report.port_allocation.kind, report.port_allocation.delta) == allocation
    assert report.behind_nat is True
    assert report.public_addresses == ("127.0.0.9",)
    assert report.port_preservation is False
    # The hairpin request went to 127.0.0.9:40000, where nothing listens.
    assert report.hairpinning is False
    assert report.errors == ()


def test_probe_names_a_dead_relay_and_still_classifies() -> None:
    refused = unused_port("127.0.0.3")
    with Responder(["127.0.0.1"]) as alive:
        started = time.monotonic()
        report = natprobe.probe(
            [alive.spec("alive"), StunRelay("dead", ("127.0.0.3",), refused, None)],
            tcp_port=None,
            retransmission=FAST,
        )
    assert time.monotonic() - started < 2.0
    assert report.udp is True
    assert report.errors == (
        f"dead 127.0.0.3:{refused}: connection refused (ICMP port unreachable)",
    )
    assert set(report.rtt_ms) == {"alive"}


def test_probe_with_no_answer_at_all_reports_every_address() -> None:
    refused = unused_port("127.0.0.3")
    tcp_refused = unused_port("127.0.0.3", socket.SOCK_STREAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        # Bound but never read: packets are accepted and never answered.
        silent.bind(("127.0.0.3", 0))
        quiet = silent.getsockname()[1]
        started = time.monotonic()
        report = natprobe.probe(
            [
                StunRelay("silent", ("127.0.0.3",), quiet, None),
                StunRelay("refusing", ("127.0.0.3",), refused, None),
            ],
            tcp_port=tcp_refused,
            tcp_timeout=0.5,
            retransmission=FAST,
        )
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert report.udp is False
    assert report.nat_class == BLOCKED
    assert report.behind_nat is None
    assert report.hairpinning is None
    assert report.tcp443 == {"refusing": False, "silent": False}
    assert re.fullmatch(
        rf"silent 127\.0\.0\.3:{quiet}: no response after 3 tries \(0\.[23] s\)", report.errors[0]
    )
    assert report.errors[1] == (
        f"refusing 127.0.0.3:{refused}: connection refused (ICMP port unreachable)"
    )
    assert f"silent 127.0.0.3:{tcp_refused}/tcp: connection refused" in report.errors
    message = report.failure_message()
    assert message.startswith("no relay answered over UDP: ")
    assert f"127.0.0.3:{quiet}" in message and f"127.0.0.3:{refused}" in message


def test_probe_falls_back_to_a_relays_second_address() -> None:
    with Responder(["127.0.0.1"]) as alive:
        # The dead first address listens nowhere on either port.
        spec = StunRelay("r", ("127.0.0.3", "127.0.0.1"), alive.port, alive.alt_port)
        report = natprobe.probe([spec], tcp_port=None, retransmission=FAST)
    assert report.udp is True
    assert report.rtt_ms.keys() == {"r"}
    assert any(error.startswith("r 127.0.0.3:") for error in report.errors)
    assert {server for _, server, _ in report.mappings} == {
        ("127.0.0.1", alive.port),
        ("127.0.0.1", alive.alt_port),
    }


def test_probe_ignores_noise_and_counts_it() -> None:
    with Responder(["127.0.0.1", "127.0.0.2"], junk=True) as responder:
        report = natprobe.probe(
            [responder.spec("r1", ["127.0.0.1", "127.0.0.2"])],
            tcp_port=None,
            retransmission=FAST,
        )
    assert report.nat_class == OPEN
    assert report.filtering == ENDPOINT_INDEPENDENT
    # Two noise packets before each of 6 answers.
    assert report.ignored_packets == 12


def test_probe_retransmits() -> None:
    with Responder(["127.0.0.1"], drop_first=True) as responder:
        observed = natprobe.observe([responder.spec("r1")], tcp_port=None, retransmission=FAST)
    assert [b.tries for b in observed.bindings] == [2, 2]
    assert all(b.answered for b in observed.bindings)
