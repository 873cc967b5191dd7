"""Kernel forwarding of proven relayed sessions (meshwright.relay.kernel).

The rules' derivation is checked on the pure per-site core; then the real relay service, with
nftables and three wireguard-go sites in network namespaces this module creates and deletes,
shows that WireGuard's transport data goes through the kernel (one port per site, sessions told
apart by index), handshakes through the code, and the counters still count. The namespaces are
joined only to each other (no route anywhere else). Needs root, nft, wireguard-go and wg:
without them these tests fail, never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_relay_sites import A2, ADDRESS, KEYS, bootstrapped, handshake
from wg_messages import initiation, response, transport
from wireguard_tools import WireguardKey

from meshwright.lab.netns import RELAY, RelayLine
from meshwright.relay import kernel
from meshwright.relay.sites import SESSION_TTL, Delivery, Limits, Relay

PORTS = {"a": 40000, "b": 40001, "c": 40002, "d": 40003}


def route(sender: str, receiver: str, index: int, source: object = None) -> kernel.Route:
    return kernel.Route(
        PORTS[sender],
        ADDRESS[sender] if source is None else source,  # type: ignore[arg-type]
        index,
        ADDRESS[receiver],
        PORTS[receiver],
        RELAY,
    )


# -- which routes exist ---------------------------------------------------------------------------


def test_a_proven_session_has_a_route_each_way_keyed_by_index() -> None:
    relay = bootstrapped()  # a's index 0xA1 for b, b's index 0xB0 for a, proven
    assert kernel.routes(RELAY, PORTS, relay, 1.0) == {
        (40000, 0xB0): route("a", "b", 0xB0),
        (40001, 0xA1): route("b", "a", 0xA1),
    }


def test_one_port_carries_a_sites_sessions_with_several_peers() -> None:
    relay = bootstrapped("abc")
    handshake(relay, "c", "a", 0xC0, 0xA2, 1.0)
    found = kernel.routes(RELAY, PORTS, relay, 2.0)
    # a sends to b and to c on its one port, from one address: the index tells them apart.
    assert found[(40000, 0xB0)].out_port == 40001
    assert found[(40000, 0xC0)] == route("a", "c", 0xC0)
    assert found[(40002, 0xA2)] == route("c", "a", 0xA2)


def test_a_new_sessions_first_data_is_left_to_the_code() -> None:
    relay = bootstrapped()
    # b answers a's new initiation: b's index 0xB5 is not proven until a's first data uses it
    # (that data proves where b answered from), so it has no route yet.
    relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 0xA5), 1.0)
    relay.receive("b", ADDRESS["b"], response(KEYS["a"], 0xB5, 0xA5), 1.1)
    found = kernel.routes(RELAY, PORTS, relay, 1.2)
    assert (40000, 0xB5) not in found and (40001, 0xA5) in found
    assert relay.receive("a", ADDRESS["a"], transport(0xB5), 1.2) == Delivery("b", ADDRESS["b"])
    assert (40000, 0xB5) in kernel.routes(RELAY, PORTS, relay, 1.3)


def test_routes_follow_a_site_that_moved_and_the_move_is_signalled() -> None:
    relay = bootstrapped()
    relay.moved.clear()
    assert relay.receive("a", A2, initiation(KEYS["b"], 0xA9), 5.1) == Delivery("b", ADDRESS["b"])
    assert relay.moved == set()  # a claim moves nothing
    installed = kernel.routes(RELAY, PORTS, relay, 5.1)
    assert relay.receive("b", ADDRESS["b"], response(KEYS["a"], 0xB9, 0xA9), 5.2) == Delivery(
        "a", A2
    )
    # b's answer proved A2: what the kernel must stop doing changed before it is sent on.
    assert relay.moved == {"a"}
    assert kernel.withdraw_sites(installed, [PORTS["a"]]) == installed
    assert kernel.withdraw_sites(installed, [PORTS["c"]]) == {}
    found = kernel.routes(RELAY, PORTS, relay, 5.3)
    assert found[(40000, 0xB0)].source == A2
    assert found[(40001, 0xA1)].destination == A2


def test_no_route_for_a_tls_site_ipv6_or_an_ended_session() -> None:
    tls_b = ("tls:b", 40001)  # a UDP-blocked site: its frames' pseudo-address
    relay = Relay({n: KEYS[n] for n in "ab"}, confirmed={"a": ADDRESS["a"], "b": tls_b})
    assert relay.receive("a", ADDRESS["a"], initiation(KEYS["b"], 1), 1.0) == Delivery("b", tls_b)
    assert relay.receive("b", tls_b, response(KEYS["a"], 2, 1), 1.1) == Delivery("a", ADDRESS["a"])
    assert relay.receive("a", ADDRESS["a"], transport(2), 1.2) == Delivery("b", tls_b)
    assert len(relay.proven_sessions(1.3)) == 2
    assert kernel.routes(RELAY, PORTS, relay, 1.3) == {}
    assert kernel.routes("2001:db8::10", PORTS, bootstrapped(), 1.0) == {}
    assert kernel.routes(RELAY, PORTS, bootstrapped(), 0.3 + SESSION_TTL) == {}


def test_the_index_is_matched_as_its_bytes_are_on_the_wire() -> None:
    # WireGuard writes the index little-endian; nftables' raw payload reads network order.
    assert kernel.wire_index(0x12345678) == 0x78563412
    message = transport(0x12345678)
    assert int.from_bytes(message[4:8], "big") == kernel.wire_index(0x12345678)
    script = kernel.install({}, {(40000, 0x12345678): route("a", "b", 0x12345678)}, Limits())
    assert f"i40000 {{ 0x78563412 : {kernel.MARK | 40001:#x} }}" in script


def test_install_and_withdraw_change_only_what_differs() -> None:
    limits = Limits(packets_per_second=1000, bytes_per_second=2e6)
    ab, ba = route("a", "b", 7), route("b", "a", 8)
    wanted = {ab.key: ab, ba.key: ba}
    script = kernel.install({}, wanted, limits)
    arrive = "add rule ip meshwright_forward a40000 ip saddr 198.51.100.10 udp sport 51820"
    assert f"{arrive} meta mark set @th,96,32 map @i40000" in script
    assert "rate over 1000/second burst 1000 packets" in script
    assert "rate over 2000000 bytes/second" in script
    assert 'limit name "lp40000" counter name "d40000" drop' in script
    assert (
        'counter name "f40000" notrack ip frag-off set 0 udp dport . meta mark vmap @deliver'
        in script
    )
    assert 'counter name "g40001" ip daddr set 203.0.113.20 udp dport set 51820 accept' in script
    assert f"ip saddr set {RELAY} udp sport set 40001" in script
    # One deliver element per direction of a pair, counting what the kernel forwarded.
    assert (
        f"deliver {{ 40000 . {kernel.MARK | 40001:#x} : jump t40001,"
        f" 40001 . {kernel.MARK | 40000:#x} : jump t40000 }}"
    ) in script
    assert f"leave {{ {kernel.MARK | 40001:#x} : jump l40001 }}" in script
    assert "arrive { 40000 : jump a40000 }" in script
    # Nothing to do once installed.
    assert kernel.withdraw(wanted, wanted) == "" and kernel.install(wanted, wanted, limits) == ""
    # b moved: both routes differ, both go (at once), and the chains are written anew.
    moved = ("203.0.113.99", 61000)
    ab2, ba2 = ab._replace(destination=moved), ba._replace(source=moved)
    wanted2 = {ab2.key: ab2, ba2.key: ba2}
    assert kernel.withdraw(wanted, wanted2) == (
        "delete element ip meshwright_forward i40000 { 0x7000000 }\n"
        "delete element ip meshwright_forward i40001 { 0x8000000 }\n"
        "delete element ip meshwright_forward deliver"
        f" {{ 40000 . {kernel.MARK | 40001:#x}, 40001 . {kernel.MARK | 40000:#x} }}\n"
    )
    script = kernel.install({}, wanted2, limits)
    assert "flush chain ip meshwright_forward t40001" in script
    assert "ip daddr set 203.0.113.99 udp dport set 61000" in script
    assert "ip saddr 203.0.113.99 udp sport 61000 meta mark set @th,96,32 map @i40001" in script
    # A second session of an installed sender to an installed receiver adds an element only,
    # and its direction's deliver element stays while either session's route is in.
    ab3 = route("a", "b", 9)
    both = {**wanted, ab3.key: ab3}
    script = kernel.install(wanted, both, limits)
    assert script == (
        f"add element ip meshwright_forward i40000 {{ 0x9000000 : {kernel.MARK | 40001:#x} }}\n"
    )
    assert kernel.withdraw(both, {ab3.key: ab3, ba.key: ba}) == (
        "delete element ip meshwright_forward i40000 { 0x7000000 }\n"
    )
    assert kernel.directions(both) == {(40000, 40001), (40001, 40000)}


def deliver_element(port: int, out_port: int, packets: int, octets: int) -> list[object]:
    """One element of the deliver map as ``nft -j`` 1.0.6 shows it (the mark as a number)."""
    value = {"concat": [port, kernel.MARK | out_port]}
    counter = {"packets": packets, "bytes": octets}
    return [{"elem": {"val": value, "counter": counter}}, {"jump": {"target": f"t{out_port}"}}]


def test_counters_are_read_from_nft_json() -> None:
    # nftables counts whole IPv4 packets: 28 bytes of headers each more than the UDP payload.
    counters = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"counter": {"table": kernel.TABLE, "name": "f40000", "packets": 7, "bytes": 900}},
            {"counter": {"table": kernel.TABLE, "name": "d40000", "packets": 2, "bytes": 50}},
            {"counter": {"table": kernel.TABLE, "name": "g40001", "packets": 6, "bytes": 800}},
            {"counter": {"table": "other", "name": "f40002", "packets": 5, "bytes": 5}},
            {"counter": {"table": kernel.TABLE, "name": "xyz", "packets": 5, "bytes": 5}},
        ]
    }
    deliver = {
        "map": {
            "family": "ip",
            "name": "deliver",
            "table": kernel.TABLE,
            "type": ["inet_service", "mark"],
            "map": "verdict",
            "elem": [
                deliver_element(40000, 40001, 4, 500),
                deliver_element(40000, 40002, 3, 400),
                [{"elem": {"val": {"concat": [40003, 7]}, "counter": {"packets": 1, "bytes": 1}}}],
            ],
            "stmt": [{"counter": None}],
        }
    }
    # LISTING is two commands: nft prints one document for each, a line each.
    listing = json.dumps(counters) + "\n" + json.dumps({"nftables": [deliver]}) + "\n"
    assert "; list map ip meshwright_forward deliver" in kernel.LISTING
    assert kernel.counters(listing) == kernel.Counts(
        {40000: (7, 900 - 7 * 28)},
        {40000: 2},
        {40001: (6, 800 - 6 * 28)},
        {(40000, 40001): (4, 500 - 4 * 28), (40000, 40002): (3, 400 - 3 * 28)},
    )
    assert kernel.counters(json.dumps(counters)).directions == {}  # an empty map shows no elem
    with pytest.raises(ValueError):
        kernel.counters("not json")
    with pytest.raises(ValueError):
        kernel.counters(json.dumps(counters) + "\n{truncated")


# -- the real thing: nftables, the relay service, three wireguard-go sites -------------------------

SOCKETS = Path("/var/run/wireguard")
LINE = RelayLine(f"mwk{os.getpid() % 100000}", sites="abc")
PREFIX = LINE.prefix
OVERLAY = {"a": "10.77.0.1", "b": "10.77.0.2", "c": "10.77.0.3"}


def ns(name: str, *argv: str, check: bool = True) -> str:
    return LINE.run(name, *argv, check=check)


def wait_for(what: str, condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def network() -> Iterator[None]:
    """a, b and c, each on its own link to r (the relay): meshwright.lab.netns."""
    if os.geteuid() != 0:
        pytest.fail("test_relay_kernel needs root (network namespaces, nftables)")
    for tool in ("nft", "wireguard-go", "wg", "ip", "ping"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install -y nftables wireguard-go iputils-ping")
    LINE.up()
    try:
        yield
    finally:
        LINE.down()


@dataclass
class Site:
    name: str
    key: WireguardKey
    process: subprocess.Popen[bytes]

    @property
    def interface(self) -> str:
        return f"{PREFIX}w{self.name}"


@pytest.fixture(scope="module")
def sites(network: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    """wireguard-go on a, b and c, each the others' peer through the relay: every peer's
    endpoint is the relay's address and the site's own port."""
    work = tmp_path_factory.mktemp("kernel")
    made: dict[str, Site] = {}
    try:
        for name in "abc":
            interface = f"{PREFIX}w{name}"
            process = LINE.popen(
                name,
                ["wireguard-go", "-f", interface],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            made[name] = Site(name, WireguardKey.generate(), process)
            wait_for("wireguard-go's socket", (SOCKETS / f"{interface}.sock").exists, 10)
        for name, site in made.items():
            key_file = work / f"{name}.key"
            key_file.write_text(str(site.key) + "\n")
            key_file.chmod(0o600)
            ns(name, "wg", "set", site.interface, "listen-port", "51820")
            ns(name, "wg", "set", site.interface, "private-key", str(key_file))
            for peer in "abc".replace(name, ""):
                ns(
                    name,
                    *("wg", "set", site.interface, "peer", str(made[peer].key.public_key())),
                    *("endpoint", f"{RELAY}:{PORTS[name]}"),
                    *("allowed-ips", f"{OVERLAY[peer]}/32", "persistent-keepalive", "25"),
                )
            ns(name, "ip", "addr", "add", f"{OVERLAY[name]}/24", "dev", site.interface)
            ns(name, "ip", "link", "set", site.interface, "up")
        yield made
    finally:
        for site in made.values():
            site.process.terminate()
            site.process.wait(timeout=10)
            (SOCKETS / f"{site.interface}.sock").unlink(missing_ok=True)


@dataclass
class RelayProcess:
    process: subprocess.Popen[str]
    state: Path

    def counters(self, site: str) -> dict[str, int]:
        data = json.loads(self.state.read_text())
        counters: dict[str, int] = data["sites"][site]["counters"]
        return counters

    def pairs(self) -> dict[str, dict[str, int]]:
        pairs: dict[str, dict[str, int]] = json.loads(self.state.read_text())["pairs"]
        return pairs

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        _, errors = self.process.communicate(timeout=10)
        return errors


@pytest.fixture
def start_relay(sites: dict[str, Site], tmp_path: Path) -> Iterator[Callable[[bool], RelayProcess]]:
    started: list[RelayProcess] = []
    state = tmp_path / "state.json"

    def start(forwarding: bool) -> RelayProcess:
        """The relay service in r; a restart keeps the state file (what it learned)."""
        LINE.forwarding(forwarding)
        config = tmp_path / "relay.json"
        entries = [
            {"name": n, "port": PORTS[n], "public_key": str(sites[n].key.public_key())}
            for n in "abc"
        ]
        config.write_text(json.dumps({"address": RELAY, "sites": entries, "kernel": True}))
        process = LINE.popen(
            "r",
            [
                *(sys.executable, "-m", "meshwright.cli", "relay"),
                *("--config", str(config), "--state", str(state)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        relay = RelayProcess(process, state)
        started.append(relay)
        wait_for("the relay's state file", lambda: state.exists() and "sites" in state.read_text())
        return relay

    yield start
    for relay in started:
        if relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait()


def ping(source: str, target: str, count: int) -> int:
    """Pings from ``source``'s overlay address to ``target``'s; how many were answered."""
    out = ns(
        source,
        *("ping", "-q", "-n", "-c", str(count), "-i", "0.01", "-W", "1", OVERLAY[target]),
        check=False,
    )
    for line in out.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(f"no ping summary: {out}")


def kernel_sessions() -> int:
    """How many session directions the kernel forwards (elements of the index maps)."""
    shown = ns("r", "nft", "-j", "list", "table", "ip", kernel.TABLE, check=False)
    if not shown:
        return 0  # no table (yet)
    listing = json.loads(shown)
    return sum(
        len(item["map"].get("elem", []))
        for item in listing["nftables"]
        if "map" in item and item["map"]["name"].startswith("i")
    )


def test_transport_data_goes_through_the_kernel_and_is_counted(
    start_relay: Callable[[bool], RelayProcess],
) -> None:
    relay = start_relay(True)
    for pair in ("ab", "ac", "bc"):
        wait_for(f"a ping {pair} through the relay", lambda: ping(pair[0], pair[1], 1) == 1)  # noqa: B023
    # Three pairs, two directions each (a rekeyed pair may briefly have more).
    wait_for("the sessions' routes in the kernel", lambda: kernel_sessions() >= 6, 10)
    before = {n: relay.counters(n) for n in "abc"}
    pairs_before = relay.pairs()
    assert set(pairs_before) == {"a--b", "a--c", "b--c"}
    assert ping("a", "b", 300) == 300
    assert ping("a", "c", 200) == 200
    time.sleep(1.5)  # the counters are folded in once a second
    after = {n: relay.counters(n) for n in "abc"}
    pairs_after = relay.pairs()

    def grew(site: str, counter: str) -> int:
        return after[site][counter] - before[site][counter]

    def pair_grew(pair: str, counter: str) -> int:
        return pairs_after[pair][counter] - pairs_before[pair][counter]

    # Each pair's counters grew by its pings, both ways, all of them by the kernel (only the
    # persistent keepalives may add a few).
    assert 600 <= pair_grew("a--b", "kernel_forwarded") <= pair_grew("a--b", "forwarded") <= 612
    assert 400 <= pair_grew("a--c", "kernel_forwarded") <= pair_grew("a--c", "forwarded") <= 412
    assert pair_grew("b--c", "forwarded") <= 6
    # The pairs' counts are the sites' counts, split by receiver: the same packets and bytes.
    for counter in ("forwarded", "forwarded_bytes", "kernel_forwarded"):
        by_pairs = sum(pair_grew(pair, counter) for pair in pairs_after)
        assert by_pairs == sum(grew(site, counter) for site in "abc"), counter

    # a's 500 echo requests leave on a's one port, to b and to c; the replies come back.
    assert 500 <= grew("a", "kernel_forwarded") == grew("a", "forwarded") <= 510, (before, after)
    assert 300 <= grew("b", "kernel_forwarded") <= 305
    assert 200 <= grew("c", "kernel_forwarded") <= 205
    assert 300 <= grew("b", "delivered") <= 305 and 500 <= grew("a", "delivered") <= 510
    assert grew("a", "forwarded_bytes") > 500 * 100
    # Everything came from the relay's port for the site: no site learned another endpoint.
    for name in "abc":
        shown = ns(name, "wg", "show", f"{PREFIX}w{name}", "endpoints").split()
        assert shown[1::2] == [f"{RELAY}:{PORTS[name]}"] * 2, shown
    # A restart restores the confirmed addresses and sessions: traffic flows at once, through
    # the kernel again, without waiting for a handshake.
    assert "kernel forwarding on" in relay.stop()
    assert kernel.TABLE not in ns("r", "nft", "list", "tables")
    relay = start_relay(True)
    wait_for("the restored routes in the kernel", lambda: kernel_sessions() >= 6, 10)
    before_b = relay.counters("b")
    assert ping("a", "b", 50) == 50
    time.sleep(1.5)
    assert relay.counters("b")["kernel_forwarded"] - before_b["kernel_forwarded"] >= 50
    # The restored sessions' pairs count from the restart on.
    assert 100 <= relay.pairs()["a--b"]["kernel_forwarded"] <= 112
    relay.stop()


def test_without_ip_forward_the_code_forwards_the_same(
    start_relay: Callable[[bool], RelayProcess],
) -> None:
    relay = start_relay(False)
    wait_for("a ping through the relay", lambda: ping("a", "c", 1) == 1)
    before = relay.counters("a")
    assert ping("a", "c", 100) == 100
    time.sleep(1.5)
    after = relay.counters("a")
    assert after["kernel_forwarded"] == 0
    assert after["forwarded"] - before["forwarded"] >= 100
    a_c = relay.pairs()["a--c"]
    assert a_c["forwarded"] >= 200 and a_c["kernel_forwarded"] == 0
    assert "net.ipv4.ip_forward is not 1" in relay.stop()
