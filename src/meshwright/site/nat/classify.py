"""NAT behaviour discovery: RFC 4787 terms, measured with the RFC 5780 method.

Two layers, two modules:

* this one, pure classification, no I/O: :class:`Binding` and :class:`Observations` record what a
  probe saw, and :func:`classify` turns them into a :class:`NatReport` (the ``mesh_nat`` fact);
* :mod:`meshwright.site.nat.probe`, the I/O: :func:`~meshwright.site.nat.probe.observe` runs the
  tests against the relays' STUN service from two UDP sockets of its own (never the WireGuard
  port) and :func:`~meshwright.site.nat.probe.probe` is ``classify(observe(...))``.

The *mapping socket* sends every Binding request except the filtering tests; its local address is
the reported ``local_address``. The *filtering socket* (same bind address, its own port) sends only
the RFC 5780 filtering tests, and only to each relay's primary endpoint. One socket for both
breaks the mapping test: a test answer from the relay's alternate endpoint that the NAT drops still
leaves a Linux conntrack entry (alternate -> our public port, unreplied), so our later request
from that public port to the alternate endpoint clashes with it and the NAT moves it to a new
port: an endpoint-independent mapping looks endpoint-dependent (home routers do the same). And a
request to an alternate endpoint would open the very filter the tests are meant to find.

The probe runs in four rounds, because the order of the packets changes what the NAT lets in:

1. a Binding request to each relay's primary address and port (RTT, mapping, OTHER-ADDRESS);
2. the filtering tests (CHANGE-REQUEST), from the filtering socket. They still run before
   anything reaches an alternate endpoint, in case a NAT filters per host rather than per mapping;
3. a Binding request to every other address and port of every relay, in a fixed order. These
   give the mapping tests and the mapped ports of successive destinations (port allocation);
4. the hairpin test: a request from the mapping socket to its own mapped address. It comes last:
   whatever state it leaves on the NAT for our public port (a hairpinning NAT translates it twice)
   must not meet a mapping test.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations, pairwise
from typing import Any

from meshwright.wire.endpoint import format_endpoint

__all__ = [
    "ADDRESS_AND_PORT_DEPENDENT",
    "ADDRESS_DEPENDENT",
    "BLOCKED",
    "EASY",
    "ENDPOINT_INDEPENDENT",
    "FAILED",
    "HARD",
    "OK",
    "OPEN",
    "TIMEOUT",
    "UNKNOWN",
    "Binding",
    "NatReport",
    "Observations",
    "PortAllocation",
    "classify",
]

Address = tuple[str, int]

# Mapping and filtering behaviours (RFC 4787 sections 4.1 and 5).
ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
UNKNOWN = "unknown"

# NAT classes, as the planner uses them.
OPEN = "open"
EASY = "easy"
HARD = "hard"
BLOCKED = "blocked"

# Outcomes of one Binding transaction.
OK = "ok"  # a success response arrived
TIMEOUT = "timeout"  # nothing arrived before the retransmission schedule ran out
FAILED = "failed"  # an error response, an ICMP port unreachable, or the request could not go out

# Port allocation: "sequential" needs a constant step no bigger than this between new mappings.
MAX_SEQUENTIAL_DELTA = 16
MIN_ALLOCATION_SAMPLES = 3


# --- observations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One Binding transaction as the probe saw it.

    ``server`` is where the request went; ``source`` is where the response came from (it differs
    from ``server`` when a CHANGE-REQUEST was honoured). ``mapped`` is XOR-MAPPED-ADDRESS, or
    MAPPED-ADDRESS when a server sent only that. ``local`` is the local address the request left
    from, when known: on a multi-homed host it can differ from :attr:`Observations.local_address`
    in the address, and the filtering tests leave from a socket of their own (another port).
    """

    relay: str
    server: Address
    outcome: str = TIMEOUT
    mapped: Address | None = None
    source: Address | None = None
    other_address: Address | None = None
    rtt_ms: float | None = None
    change_ip: bool = False
    change_port: bool = False
    tries: int = 1
    error: str | None = None
    local: Address | None = None

    @property
    def answered(self) -> bool:
        return self.outcome == OK

    @property
    def is_change_test(self) -> bool:
        return self.change_ip or self.change_port


@dataclass(frozen=True)
class Observations:
    """Everything one probe run measured, with no interpretation.

    ``bindings`` keeps the order in which the first request of each transaction was sent; the
    port-allocation analysis depends on it. Filtering tests are the bindings with change flags.
    ``hairpin`` is None when the test was not run. ``tcp`` maps relay name to whether a TCP
    connection (port 443 by default) succeeded; it is empty when that test was not run.
    """

    local_address: Address | None
    bindings: tuple[Binding, ...] = ()
    hairpin: bool | None = None
    tcp: Mapping[str, bool] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    ignored_packets: int = 0
    filtering_skipped: str | None = None


@dataclass(frozen=True)
class PortAllocation:
    kind: str  # "preserved" | "sequential" | "random" | "unknown"
    delta: int | None
    samples: tuple[int, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "delta": self.delta,
            "samples": list(self.samples),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class NatReport:
    """The classification of one host's NAT; :meth:`to_dict` is the ``mesh_nat`` fact."""

    udp: bool
    nat_class: str
    behind_nat: bool | None
    local_address: Address | None
    public_addresses: tuple[str, ...]
    mapping: str
    mapping_reason: str
    filtering: str
    filtering_reason: str
    hairpinning: bool | None
    port_preservation: bool
    port_allocation: PortAllocation
    rtt_ms: Mapping[str, float]
    best_relay: str | None
    tcp443: Mapping[str, bool]
    mappings: tuple[tuple[str, Address, Address], ...] = ()
    errors: tuple[str, ...] = ()
    ignored_packets: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "udp": self.udp,
            "nat_class": self.nat_class,
            "behind_nat": self.behind_nat,
            "local_address": _address_dict(self.local_address),
            "public_addresses": list(self.public_addresses),
            "mapping": self.mapping,
            "mapping_reason": self.mapping_reason,
            "filtering": self.filtering,
            "filtering_reason": self.filtering_reason,
            "hairpinning": self.hairpinning,
            "port_preservation": self.port_preservation,
            "port_allocation": self.port_allocation.to_dict(),
            "rtt_ms": dict(self.rtt_ms),
            "best_relay": self.best_relay,
            "tcp443": dict(self.tcp443),
            "mappings": [
                {"relay": relay, "server": _address_dict(server), "mapped": _address_dict(mapped)}
                for relay, server, mapped in self.mappings
            ],
            "errors": list(self.errors),
            "ignored_packets": self.ignored_packets,
        }

    def failure_message(self) -> str:
        """A one-paragraph message naming every relay address tried and what happened."""
        if not self.errors:
            return "no relay answered over UDP" if not self.udp else ""
        head = "no relay answered over UDP" if not self.udp else "some relay probes failed"
        return head + ": " + "; ".join(self.errors)


def _address_dict(address: Address | None) -> dict[str, Any] | None:
    return None if address is None else {"ip": address[0], "port": address[1]}


# --- classification ---------------------------------------------------------------------------


def classify(observations: Observations) -> NatReport:
    """Classify the NAT from recorded observations. Pure: no I/O, same input, same report.

    ``nat_class`` is decided by the first rule that matches:

    1. ``blocked``: no UDP response arrived at all (a TCP relay is the only way out);
    2. ``open``: filtering is endpoint-independent (anyone may send to our mapping), or there
       is no NAT (every mapped address equals the local address) and filtering was not measured
       as restrictive;
    3. ``easy``: no NAT but a stateful firewall filters by address (a punch opens it), or the
       mapping is endpoint-independent: the address learnt from a relay also works for peers;
    4. ``hard``: everything else: the mapping is endpoint-dependent (address-dependent or
       address-and-port-dependent), or it could not be measured; we assume the worst rather
       than guess, and ``mapping_reason`` says which it was.
    """
    local = observations.local_address
    answered = [b for b in observations.bindings if b.answered]
    with_mapping = [b for b in answered if b.mapped is not None]
    mapping_tests = [b for b in with_mapping if not b.is_change_test]
    udp = bool(answered)

    def local_of(binding: Binding) -> Address | None:
        return binding.local if binding.local is not None else local

    no_nat = bool(with_mapping) and all(same_address(b.mapped, local_of(b)) for b in with_mapping)
    behind_nat = None if not with_mapping else not no_nat
    mapping, mapping_reason, endpoint_dependent = _classify_mapping(mapping_tests, no_nat)
    filtering, filtering_reason = _classify_filtering(observations)
    if not udp:
        mapping_reason = filtering_reason = "no relay answered over UDP"

    if not udp:
        nat_class = BLOCKED
    elif filtering == ENDPOINT_INDEPENDENT or (no_nat and filtering == UNKNOWN):
        nat_class = OPEN
    elif no_nat or (mapping == ENDPOINT_INDEPENDENT and not endpoint_dependent):
        # endpoint_dependent is also set when the mapping changed but its kind is unknown.
        nat_class = EASY
    else:
        nat_class = HARD

    # From the mapping socket: the filtering tests' socket is the probe's, not a tunnel's.
    port_preservation = bool(mapping_tests) and all(
        (own := local_of(b)) is not None and b.mapped is not None and b.mapped[1] == own[1]
        for b in mapping_tests
    )
    allocation = _classify_allocation(mapping_tests, None if local is None else local[1])

    rtt: dict[str, float] = {}
    for binding in answered:
        if binding.rtt_ms is None or binding.is_change_test:
            continue
        best = rtt.get(binding.relay)
        if best is None or binding.rtt_ms < best:
            rtt[binding.relay] = round(binding.rtt_ms, 3)
    best_relay = min(rtt, key=lambda name: (rtt[name], name)) if rtt else None

    public = sorted({b.mapped[0] for b in with_mapping if b.mapped is not None}, key=_ip_sort_key)
    return NatReport(
        udp=udp,
        nat_class=nat_class,
        behind_nat=behind_nat,
        local_address=local,
        public_addresses=tuple(public),
        mapping=mapping,
        mapping_reason=mapping_reason,
        filtering=filtering,
        filtering_reason=filtering_reason,
        hairpinning=observations.hairpin,
        port_preservation=port_preservation,
        port_allocation=allocation,
        rtt_ms=dict(sorted(rtt.items())),
        best_relay=best_relay,
        tcp443=dict(sorted(observations.tcp.items())),
        mappings=tuple((b.relay, b.server, b.mapped) for b in mapping_tests if b.mapped),
        errors=observations.errors,
        ignored_packets=observations.ignored_packets,
    )


def _ip_sort_key(ip: str) -> tuple[int, int, str]:
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return (9, 0, ip)
    return (parsed.version, int(parsed), ip)


def _normal(address: Address | None) -> Address | None:
    # Compare addresses by value: "::ffff:0:1" and "::FFFF:0:1" are one address.
    if address is None:
        return None
    try:
        return str(ipaddress.ip_address(address[0].split("%", 1)[0])), address[1]
    except ValueError:
        return address


def same_address(a: Address | None, b: Address | None) -> bool:
    return a is not None and b is not None and _normal(a) == _normal(b)


def _classify_mapping(bindings: Sequence[Binding], no_nat: bool) -> tuple[str, str, bool]:
    """(mapping, reason, endpoint-dependence seen) per RFC 5780 section 4.3, generalised.

    RFC 5780 compares the mapping for the primary address:port (test I), the alternate
    address:primary port (test II) and the alternate address:alternate port (test III). We do
    the same over every pair of servers that answered, whichever relay they belong to: a pair
    that differs only in the port shows port dependence; a pair on different addresses shows
    address dependence. That also works with relays of one address each (two relays give the
    address change, each relay's two ports give the port change).
    """
    if not bindings:
        return UNKNOWN, "no Binding response carried a mapped address", False
    if no_nat:
        return (
            ENDPOINT_INDEPENDENT,
            "no NAT: every mapped address equals the local address",
            False,
        )
    by_server: dict[Address, Address] = {}
    relay_of: dict[Address, str] = {}
    for binding in bindings:
        if binding.mapped is not None and binding.server not in by_server:
            by_server[binding.server] = binding.mapped
            relay_of[binding.server] = binding.relay
    servers = list(by_server)

    def show(server: Address) -> str:
        mapped = format_endpoint(*by_server[server])
        return f"{relay_of[server]} {format_endpoint(*server)} saw {mapped}"

    address_pairs = [(a, b) for a, b in combinations(servers, 2) if a[0] != b[0]]
    port_pairs = [(a, b) for a, b in combinations(servers, 2) if a[0] == b[0] and a[1] != b[1]]
    address_changed = [(a, b) for a, b in address_pairs if by_server[a] != by_server[b]]
    port_changed = [(a, b) for a, b in port_pairs if by_server[a] != by_server[b]]

    if port_changed:
        a, b = port_changed[0]
        return (
            ADDRESS_AND_PORT_DEPENDENT,
            f"mapping changed with the server port alone: {show(a)}, {show(b)}",
            True,
        )
    if address_changed:
        a, b = address_changed[0]
        if port_pairs:
            c, d = port_pairs[0]
            return (
                ADDRESS_DEPENDENT,
                f"mapping changed with the server address: {show(a)}, {show(b)}; "
                f"but not with the port: {show(c)}, {show(d)}",
                True,
            )
        return (
            UNKNOWN,
            f"mapping changed with the server address (endpoint-dependent): {show(a)}, "
            f"{show(b)}; no two ports of one server address answered, so whether it also "
            "depends on the port was not measured",
            True,
        )
    if address_pairs:
        mapped = format_endpoint(*by_server[servers[0]])
        addresses = len({server[0] for server in servers})
        return (
            ENDPOINT_INDEPENDENT,
            f"same mapping {mapped} from {len(servers)} server endpoints on {addresses} addresses",
            False,
        )
    if port_pairs:
        c, d = port_pairs[0]
        return (
            UNKNOWN,
            f"only one server address answered and the mapping did not change with its port "
            f"({show(c)}, {show(d)}): that fits endpoint-independent and address-dependent "
            "mapping alike",
            False,
        )
    return UNKNOWN, f"only one server endpoint answered ({show(servers[0])})", False


def _filter_result(binding: Binding, change_ip: bool) -> tuple[bool | None, str]:
    """(True: the changed response got in, False: nothing came, None: inconclusive, why)."""
    server = format_endpoint(*binding.server)
    if binding.outcome == TIMEOUT:
        return False, f"{binding.relay} {server}: no response"
    if not binding.answered:
        return None, f"{binding.relay} {server}: {binding.error or 'failed'}"
    source = binding.source
    if source is not None:
        # A server that ignores CHANGE-REQUEST answers from where we sent: that proves nothing.
        ip_ok = (source[0] != binding.server[0]) == change_ip
        if not ip_ok or source[1] == binding.server[1]:
            return None, (
                f"{binding.relay} {server}: answered from {format_endpoint(*source)}, "
                "ignoring CHANGE-REQUEST"
            )
        return True, f"{binding.relay} {server}: answered from {format_endpoint(*source)}"
    return True, f"{binding.relay} {server}: answered"


def _classify_filtering(observations: Observations) -> tuple[str, str]:
    """(filtering, reason) per RFC 5780 section 4.4.

    Test II asks the server to answer from its other address and port, test III from its other
    port only. Any relay where test II got in proves endpoint-independent filtering (a response
    cannot be faked, and a lost one is not proof of anything, so successes win over failures).
    """
    tests: dict[str, dict[str, Binding]] = {}
    for binding in observations.bindings:
        if binding.change_ip and binding.change_port:
            tests.setdefault(binding.relay, {})["II"] = binding
        elif binding.change_port and not binding.change_ip:
            tests.setdefault(binding.relay, {})["III"] = binding
    if not tests:
        if observations.filtering_skipped:
            return UNKNOWN, observations.filtering_skipped
        if not any(b.other_address for b in observations.bindings if b.answered):
            return (
                UNKNOWN,
                "no relay returned OTHER-ADDRESS, so the RFC 5780 filtering tests could not run",
            )
        return UNKNOWN, "the RFC 5780 filtering tests were not run"

    notes: list[str] = []
    address_dependent: str | None = None
    port_dependent: str | None = None
    for relay in sorted(tests):
        pair = tests[relay]
        result_ii, why_ii = (
            _filter_result(pair["II"], change_ip=True) if "II" in pair else (None, "")
        )
        result_iii, why_iii = (
            _filter_result(pair["III"], change_ip=False) if "III" in pair else (None, "")
        )
        if result_ii:
            return ENDPOINT_INDEPENDENT, f"test II (change address and port): {why_ii}"
        if result_ii is False and result_iii and address_dependent is None:
            address_dependent = (
                f"test II (change address and port): {why_ii}; test III (change port): {why_iii}"
            )
        elif result_ii is False and result_iii is False and port_dependent is None:
            port_dependent = (
                f"test II (change address and port): {why_ii}; test III (change port): {why_iii}"
            )
        else:
            notes.extend(why for why in (why_ii, why_iii) if why)
    if address_dependent:
        return ADDRESS_DEPENDENT, address_dependent
    if port_dependent:
        return ADDRESS_AND_PORT_DEPENDENT, port_dependent
    return UNKNOWN, "filtering tests inconclusive: " + "; ".join(notes)


def _classify_allocation(bindings: Sequence[Binding], local_port: int | None) -> PortAllocation:
    """How the NAT picks the public port of a new mapping, from successive destinations.

    Only new mappings say anything about allocation: when several destinations share one
    mapping (endpoint-independent mapping), they are one sample, not several.
    """
    ports = tuple(b.mapped[1] for b in bindings if b.mapped is not None)
    if len(ports) < MIN_ALLOCATION_SAMPLES:
        return PortAllocation(
            UNKNOWN,
            None,
            ports,
            f"need {MIN_ALLOCATION_SAMPLES} mapped ports, have {len(ports)}",
        )
    if local_port is not None and all(port == local_port for port in ports):
        return PortAllocation("preserved", None, ports, "every mapped port is the local port")
    distinct: list[int] = []
    seen: set[Address] = set()
    for binding in bindings:
        if binding.mapped is not None and binding.mapped not in seen:
            seen.add(binding.mapped)
            distinct.append(binding.mapped[1])
    if len(distinct) < MIN_ALLOCATION_SAMPLES:
        return PortAllocation(
            UNKNOWN,
            None,
            ports,
            f"only {len(distinct)} distinct mapping(s) among {len(ports)} destinations: "
            "too few new mappings to see how ports are allocated",
        )
    deltas = {b - a for a, b in pairwise(distinct)}
    if len(deltas) == 1:
        (delta,) = deltas
        if 0 < abs(delta) <= MAX_SEQUENTIAL_DELTA:
            return PortAllocation(
                "sequential",
                delta,
                ports,
                f"{len(distinct)} new mappings, each {delta:+d} from the previous",
            )
    return PortAllocation(
        "random",
        None,
        ports,
        f"{len(distinct)} new mappings with no constant small step",
    )
