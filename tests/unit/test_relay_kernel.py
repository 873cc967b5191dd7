"""Kernel forwarding of confirmed relayed sessions (meshwright.relay.kernel).

The rules' derivation is checked on the pure core; then the real relay service, with nftables
and two wireguard-go sites in network namespaces this module creates and deletes, shows that
WireGuard's transport data goes through the kernel, handshakes through the code, and the
counters still count. The namespaces are joined only to each other (no route anywhere else).
Needs root, nft, wireguard-go and wg: without them these tests fail, never skip.
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
from test_relay_forward import A1, B1, established, initiation, keys, response, transport
from wireguard_tools import WireguardKey

from meshwright.lab.netns import RELAY, RelayLine
from meshwright.relay import kernel
from meshwright.relay.forward import Allocation, Limits

__all__ = ["keys"]  # the fixture, used by name

PORTS = (40000, 40001)


# -- which routes exist ---------------------------------------------------------------------------


def test_a_confirmed_pair_has_a_route_each_way(keys: tuple[bytes, bytes]) -> None:
    allocation = established(keys)
    assert kernel.routes(RELAY, PORTS, allocation, 1.0) == {
        40000: kernel.Route(40000, A1, B1, 40001, RELAY),
        40001: kernel.Route(40001, B1, A1, 40000, RELAY),
    }


def test_data_to_a_side_waiting_for_an_answer_goes_through_the_code(
    keys: tuple[bytes, bytes],
) -> None:
    key_a, key_b = keys
    allocation = established(keys)
    # A starts a new handshake: B's answer, then A's first data, prove the addresses again, so
    # data *to* A (whose handshake waits) must reach the code until then; A's data need not.
    assert allocation.receive(0, A1, initiation(key_b, 0xA7), 21.0) == B1
    assert set(kernel.routes(RELAY, PORTS, allocation, 21.0)) == {40000}
    # B answers: now B's response waits for A's first data.
    assert allocation.receive(1, B1, response(key_a, 0xB7, 0xA7), 21.1) == A1
    assert set(kernel.routes(RELAY, PORTS, allocation, 21.1)) == {40001}
    assert allocation.receive(0, A1, transport(0xB7), 21.2) == B1
    assert set(kernel.routes(RELAY, PORTS, allocation, 21.2)) == {40000, 40001}


def test_a_route_follows_a_site_that_moved(keys: tuple[bytes, bytes]) -> None:
    key_a, key_b = keys
    allocation = established(keys)
    moved = ("203.0.113.21", 51820)
    assert allocation.receive(1, moved, initiation(key_a, 0xB8), 21.0) == A1
    assert allocation.receive(0, A1, response(key_b, 0xA8, 0xB8), 21.1) == moved
    assert allocation.receive(1, moved, transport(0xA8), 21.2) == A1
    assert kernel.routes(RELAY, PORTS, allocation, 21.2) == {
        40000: kernel.Route(40000, A1, moved, 40001, RELAY),
        40001: kernel.Route(40001, moved, A1, 40000, RELAY),
    }


def test_no_route_for_a_tls_site_ipv6_or_an_ended_session(keys: tuple[bytes, bytes]) -> None:
    tls = Allocation(keys, confirmed=(A1, ("tls:blocked", 40001)))
    tls.heard(0, 0.0)
    tls.heard(1, 0.0)
    assert kernel.routes(RELAY, PORTS, tls, 1.0) == {}
    v6 = Allocation(keys, confirmed=(("2001:db8::1", 51820), B1))
    v6.heard(0, 0.0)
    v6.heard(1, 0.0)
    assert kernel.routes(RELAY, PORTS, v6, 1.0) == {}
    assert kernel.routes("2001:db8::10", PORTS, established(keys), 1.0) == {}
    allocation = established(keys)
    allocation.heard(1, 100.0)  # B still talks, A fell silent at 0.3
    assert set(kernel.routes(RELAY, PORTS, allocation, 0.3 + kernel.ROUTE_IDLE)) == {40001}


def test_counters_are_read_from_nft_json() -> None:
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"counter": {"table": kernel.TABLE, "name": "f40000", "packets": 7, "bytes": 900}},
            {"counter": {"table": kernel.TABLE, "name": "d40000", "packets": 2, "bytes": 50}},
            {"counter": {"table": kernel.TABLE, "name": "f40001", "packets": 1, "bytes": 148}},
            {"counter": {"table": "other", "name": "f40002", "packets": 5, "bytes": 5}},
            {"counter": {"table": kernel.TABLE, "name": "xyz", "packets": 5, "bytes": 5}},
        ]
    }
    assert kernel.counters(json.dumps(listing)) == {40000: (7, 900, 2), 40001: (1, 148, 0)}
    with pytest.raises(ValueError):
        kernel.counters("not json")


def test_the_rules_name_the_route_and_the_limits() -> None:
    route = kernel.Route(40000, ("203.0.113.5", 51820), ("198.51.100.7", 51830), 40001, RELAY)
    script = kernel.install(route, Limits(packets_per_second=1000, bytes_per_second=2e6))
    assert "ip saddr 203.0.113.5 udp sport 51820" in script
    assert "ip daddr set 198.51.100.7 udp dport set 51830" in script
    assert f"ip saddr set {RELAY} udp sport set 40001" in script
    assert "limit rate over 1000/second" in script
    assert "limit rate over 2000000 bytes/second" in script
    assert "notrack" in script
    assert "arrive { 40000 : jump a40000 }" in script
    assert "flush chain ip meshwright_forward a40000" in kernel.withdraw(route)


# -- the real thing: nftables, the relay service, two wireguard-go sites ---------------------------

SOCKETS = Path("/var/run/wireguard")
LINE = RelayLine(f"mwk{os.getpid() % 100000}")
PREFIX = LINE.prefix


def ns(name: str, *argv: str, check: bool = True) -> str:
    return LINE.run(name, *argv, check=check)


def wait_for(what: str, condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def network() -> Iterator[None]:
    """a (203.0.113.5) -- r (the relay) -- b (198.51.100.7): meshwright.lab.netns."""
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
    """wireguard-go on a (10.77.0.1) and b (10.77.0.2), each other's peer through the relay."""
    work = tmp_path_factory.mktemp("kernel")
    made: dict[str, Site] = {}
    try:
        for name in ("a", "b"):
            interface = f"{PREFIX}w{name}"
            process = LINE.popen(
                name,
                ["wireguard-go", "-f", interface],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            made[name] = Site(name, WireguardKey.generate(), process)
            wait_for("wireguard-go's socket", (SOCKETS / f"{interface}.sock").exists, 10)
        for name, peer, port, address in (("a", "b", PORTS[0], 1), ("b", "a", PORTS[1], 2)):
            site, other = made[name], made[peer]
            key_file = work / f"{name}.key"
            key_file.write_text(str(site.key) + "\n")
            key_file.chmod(0o600)
            ns(name, "wg", "set", site.interface, "listen-port", "51820")
            ns(name, "wg", "set", site.interface, "private-key", str(key_file))
            ns(
                name,
                *("wg", "set", site.interface, "peer", str(other.key.public_key())),
                *("endpoint", f"{RELAY}:{port}", "allowed-ips", "10.77.0.0/24"),
                *("persistent-keepalive", "25"),
            )
            ns(name, "ip", "addr", "add", f"10.77.0.{address}/24", "dev", site.interface)
            ns(name, "ip", "link", "set", site.interface, "up")
        yield made
    finally:
        for site in made.values():
            site.process.terminate()
            site.process.wait(timeout=10)
            (SOCKETS / f"{site.interface}.sock").unlink(missing_ok=True)


@dataclass
class Relay:
    process: subprocess.Popen[str]
    state: Path

    def counters(self) -> dict[str, int]:
        data = json.loads(self.state.read_text())
        counters: dict[str, int] = data["allocations"]["a--b"]["counters"]
        return counters

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        _, errors = self.process.communicate(timeout=10)
        return errors


@pytest.fixture
def start_relay(sites: dict[str, Site], tmp_path: Path) -> Iterator[Callable[[bool], Relay]]:
    started: list[Relay] = []

    def start(forwarding: bool) -> Relay:
        LINE.forwarding(forwarding)
        config = tmp_path / "relay.json"
        allocation = {
            "a": "a",
            "b": "b",
            "address": RELAY,
            "ports": list(PORTS),
            "public_keys": [str(sites[n].key.public_key()) for n in ("a", "b")],
        }
        config.write_text(json.dumps({"allocations": [allocation], "kernel": True}))
        state = tmp_path / "state.json"
        state.unlink(missing_ok=True)
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
        relay = Relay(process, state)
        started.append(relay)
        wait_for("the relay's state file", state.exists, 10)
        return relay

    yield start
    for relay in started:
        if relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait()


def ping(count: int) -> int:
    """Pings from a's overlay address to b's; how many were answered."""
    out = ns(
        "a", "ping", "-q", "-n", "-c", str(count), "-i", "0.01", "-W", "1", "10.77.0.2", check=False
    )
    for line in out.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(f"no ping summary: {out}")


def tunnel_up() -> bool:
    return ping(1) == 1


def test_transport_data_goes_through_the_kernel_and_is_counted(
    start_relay: Callable[[bool], Relay],
) -> None:
    relay = start_relay(True)
    wait_for("a ping through the relay", tunnel_up)
    wait_for(
        "both routes in the kernel",
        lambda: ns("r", "nft", "list", "map", "ip", kernel.TABLE, "arrive").count("jump") == 2,
        10,
    )
    before = relay.counters()
    assert ping(300) == 300
    time.sleep(1.5)  # the counters are folded in once a second
    after = relay.counters()
    kernel_packets = after["kernel_forwarded"] - before.get("kernel_forwarded", 0)
    forwarded = after["forwarded"] - before["forwarded"]
    # 300 echo requests and 300 replies, perhaps a keepalive: all of them in the kernel.
    assert 600 <= kernel_packets == forwarded <= 610, (before, after)
    assert "kernel forwarding on" in relay.stop()
    assert kernel.TABLE not in ns("r", "nft", "list", "tables")


def test_without_ip_forward_the_code_forwards_the_same(
    start_relay: Callable[[bool], Relay],
) -> None:
    relay = start_relay(False)
    wait_for("a ping through the relay", tunnel_up)
    before = relay.counters()
    assert ping(100) == 100
    time.sleep(1.5)
    after = relay.counters()
    assert after.get("kernel_forwarded", 0) == 0
    assert after["forwarded"] - before["forwarded"] >= 200
    assert "net.ipv4.ip_forward is not 1" in relay.stop()
