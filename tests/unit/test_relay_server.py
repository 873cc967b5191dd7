"""The relay service (meshwright.relay.server) on loopback: one UDP port per site, deliveries out
of the receiver's port, reloads that keep what is unchanged, and a restart that keeps sessions.

Messages come from wg_messages (real formats, mac1 computed independently).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from wg_messages import initiation, public_key, response, transport

from meshwright.relay import server as relay_server
from meshwright.relay.messages import MAPPING_KEEPALIVE
from meshwright.relay.server import RelayConfigError, RelayServer, parse_config
from meshwright.relay.sites import SESSION_TTL
from meshwright.relay.wgstun import relay_alive

DEADLINE = 10.0
KEYS = {name: public_key() for name in ("a", "b", "c")}


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], object], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, f"not within {DEADLINE} s: {what}"
        time.sleep(0.02)


class Harness:
    """A RelayServer in a thread, its sites as plain UDP sockets on 127.0.0.1."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.config = tmp_path / "relay.json"
        self.state = tmp_path / "state.json"
        self.ports = {name: free_udp_port() for name in KEYS}
        self.sockets: dict[str, socket.socket] = {}
        for name in KEYS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(2)
            self.sockets[name] = sock
        self.logs: list[str] = []
        self.server: RelayServer | None = None
        self.thread: threading.Thread | None = None
        # serve_forever installs signal handlers, which only the main thread may do.
        monkeypatch.setattr(signal, "signal", lambda *_: None)

    def address(self, name: str) -> tuple[str, int]:
        host, port = self.sockets[name].getsockname()
        return (str(host), int(port))

    def write(self, names: str = "ab", **extra: Any) -> None:
        sites = [{"name": n, "port": self.ports[n], "public_key": b64(KEYS[n])} for n in names]
        self.config.write_text(json.dumps({"address": "127.0.0.1", "sites": sites, **extra}))

    def start(self) -> RelayServer:
        server = RelayServer(self.config, self.state, log=self.logs.append)
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, name="relay", daemon=True)
        self.thread.start()
        wait_for(lambda: server.core is not None and server.ports, "the relay's first reload")
        return server

    def reload(self) -> None:
        server = self.server
        assert server is not None
        count = len(self.logs)
        server._reload = True  # what SIGHUP does
        wait_for(lambda: len(self.logs) > count, "the reload")

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server._stop = True
            self.thread.join(timeout=5)
            assert not self.thread.is_alive()
        self.server = self.thread = None

    def send(self, sender: str, datagram: bytes) -> None:
        self.sockets[sender].sendto(datagram, ("127.0.0.1", self.ports[sender]))

    def expect(self, receiver: str, datagram: bytes) -> None:
        """``datagram`` arrives at ``receiver``, from the relay's port for ``receiver``."""
        assert self.sockets[receiver].recvfrom(2048) == (
            datagram,
            ("127.0.0.1", self.ports[receiver]),
        )

    def relay(self, sender: str, receiver: str, datagram: bytes) -> None:
        self.send(sender, datagram)
        self.expect(receiver, datagram)

    def pair(self, i: str, r: str, i_index: int, r_index: int) -> None:
        """A full handshake and data both ways, i initiating (r's address known already)."""
        self.relay(i, r, initiation(KEYS[r], i_index))
        self.relay(r, i, response(KEYS[i], r_index, i_index))
        self.relay(i, r, transport(r_index))
        self.relay(r, i, transport(i_index))

    def saved(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state.read_text())
        return data


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    made = Harness(tmp_path, monkeypatch)
    try:
        yield made
    finally:
        made.stop()
        for sock in made.sockets.values():
            sock.close()


def bootstrap(h: Harness) -> None:
    """a and b prove each other: a's first initiation goes nowhere, b's reaches a's claim."""
    h.send("a", initiation(KEYS["b"], 0xA0))
    server = h.server
    assert server is not None
    wait_for(lambda: server.core and server.core.counters["dropped_no_destination"], "a's claim")
    h.relay("b", "a", initiation(KEYS["a"], 0xB0))
    h.relay("a", "b", response(KEYS["b"], 0xA1, 0xB0))
    h.relay("b", "a", transport(0xA1))
    h.relay("a", "b", transport(0xB0))


def test_sites_bootstrap_and_deliveries_leave_from_the_receivers_port(harness: Harness) -> None:
    harness.write("abc")
    harness.start()
    bootstrap(harness)
    # c joins: its initiation to a goes to a's confirmed address, a's answer proves c.
    harness.pair("c", "a", 0xC0, 0xA2)
    # a talks to b and c from one address to its one port: the index tells them apart.
    harness.relay("a", "b", transport(0xB0, 5))
    harness.relay("a", "c", transport(0xC0, 5))
    harness.send("b", MAPPING_KEEPALIVE)  # counted, never forwarded
    server = harness.server
    assert server is not None and server.core is not None
    core = server.core
    wait_for(lambda: core.site_counters("b")["keepalives"], "the keepalive")
    harness.stop()
    state = harness.saved()
    assert state["address"] == "127.0.0.1"
    for name in "abc":
        site = state["sites"][name]
        assert site["port"] == harness.ports[name]
        assert site["public_key"] == b64(KEYS[name])
        assert site["confirmed"] == list(harness.address(name))
    a, b = state["sites"]["a"]["counters"], state["sites"]["b"]["counters"]
    assert (a["forwarded"], a["delivered"], a["dropped_no_destination"]) == (6, 4, 1)
    assert (b["forwarded"], b["keepalives"], b["kernel_forwarded"]) == (2, 1, 0)
    assert b["delivered_bytes"] == len(response(KEYS["b"], 1, 1)) + 2 * len(transport(1))
    assert {(o, p) for o, p, _ in state["sessions"]} == {
        ("a", "b"),
        ("b", "a"),
        ("a", "c"),
        ("c", "a"),
    }


class Clock:
    """The relay service's clock: the real one, plus what the test skips ahead."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped


def test_pairs_count_apart_and_go_once_their_sessions_expired(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(relay_server, "time", clock)
    harness.write("abc")
    harness.start()
    bootstrap(harness)  # a-b: b's initiation, a's response, data both ways
    harness.pair("c", "a", 0xC0, 0xA2)
    for _ in range(3):
        harness.relay("a", "b", transport(0xB0, 1))
    harness.relay("c", "a", transport(0xA2, 1))
    handshakes = len(initiation(KEYS["a"], 1)) + len(response(KEYS["a"], 1, 1))
    data = len(transport(1))
    # a's one port carries both pairs; each counts what went between its two sites, either way.
    expected = {
        "a--b": {"forwarded": 7, "forwarded_bytes": handshakes + 5 * data, "kernel_forwarded": 0},
        "a--c": {"forwarded": 5, "forwarded_bytes": handshakes + 3 * data, "kernel_forwarded": 0},
    }
    wait_for(lambda: harness.saved().get("pairs") == expected, "the pairs' counts saved")
    state = harness.saved()
    assert sum(p["forwarded"] for p in state["pairs"].values()) == sum(
        s["counters"]["forwarded"] for s in state["sites"].values()
    )
    # Every session expires; a and b make a new one, which keeps a-b (counting on). a-c's
    # entry is written once more, then goes.
    clock.skipped = SESSION_TTL + 1
    harness.pair("a", "b", 0xA7, 0xB7)
    expected["a--b"]["forwarded"] += 4
    expected["a--b"]["forwarded_bytes"] += handshakes + 2 * data

    def a_c_gone() -> bool:
        harness.send("b", MAPPING_KEEPALIVE)  # activity: the state is written again
        return harness.saved().get("pairs") == {"a--b": expected["a--b"]}

    wait_for(a_c_gone, "a-c's entry gone")
    # A pair that meets again counts from zero.
    harness.pair("c", "a", 0xC8, 0xA8)
    wait_for(lambda: harness.saved()["pairs"].get("a--c", {}).get("forwarded") == 4, "a-c again")


def test_a_reload_keeps_unchanged_sites_and_restarts_a_moved_port(harness: Harness) -> None:
    harness.write("ab")
    server = harness.start()
    bootstrap(harness)
    socket_a = server.ports["a"].sock
    # c added, b's key rotated: a keeps its socket, both keep what was learned.
    KEYS["b"], old_b = public_key(), KEYS["b"]
    try:
        harness.write("abc")
        harness.reload()
        assert server.ports["a"].sock is socket_a and set(server.ports) == {"a", "b", "c"}
        harness.relay("a", "b", transport(0xB0, 1))  # the session from before the rotation
        harness.relay("b", "a", transport(0xA1, 1))
        # a moves to another port: a new socket, and a's state starts afresh.
        harness.ports["a"] = free_udp_port()
        harness.write("abc")
        harness.reload()
        assert server.ports["a"].sock is not socket_a
        assert server.core is not None and "a" not in server.core.confirmed
        harness.send("b", transport(0xA1, 2))  # a's sessions went with it
        harness.write("b")  # a and c removed
        harness.reload()
        assert set(server.ports) == {"b"}
    finally:
        KEYS["b"] = old_b
    assert "relay: 1 sites on 127.0.0.1" in harness.logs


def test_a_restart_restores_addresses_and_sessions(harness: Harness) -> None:
    harness.write("ab")
    harness.start()
    bootstrap(harness)
    harness.stop()
    server = harness.start()
    # No handshake: the restored sessions carry data at once.
    harness.relay("a", "b", transport(0xB0, 7))
    harness.relay("b", "a", transport(0xA1, 7))
    assert server.core is not None and server.core.counters["forwarded"] == 2
    harness.stop()
    # A site whose port changed while the relay was down starts afresh.
    harness.ports["b"] = free_udp_port()
    harness.write("ab")
    server = harness.start()
    assert server.core is not None and set(server.core.confirmed) == {"a"}
    assert server.core.sessions == []


def test_an_unusable_configuration_changes_nothing(harness: Harness) -> None:
    harness.write("ab")
    server = harness.start()
    harness.config.write_text("{not json")
    harness.reload()
    assert set(server.ports) == {"a", "b"}
    assert "keeping the current sites" in harness.logs[-1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("address"), "address"),
        (lambda d: d["sites"].append(dict(d["sites"][0], name="z")), "port 40000"),
        (lambda d: d["sites"].append(dict(d["sites"][0], port=1)), "name 'a'"),
        (lambda d: d["sites"][1].update(public_key=d["sites"][0]["public_key"]), "'a''s too"),
        (lambda d: d["sites"][0].update(public_key="AAAA"), "32 bytes"),
        (lambda d: d["sites"][0].update(port=0), "port 0"),
        (lambda d: d.update(limits={"packets_per_second": -1}), "limits"),
        (lambda d: d.update(limits={"nonsense": 1}), "limits"),
    ],
)
def test_parse_config_names_what_is_wrong(
    change: Callable[[dict[str, Any]], object], message: str
) -> None:
    data: dict[str, Any] = {
        "address": "198.51.100.10",
        "sites": [
            {"name": "a", "port": 40000, "public_key": b64(KEYS["a"])},
            {"name": "b", "port": 40001, "public_key": b64(KEYS["b"])},
        ],
    }
    assert set(parse_config(data).sites) == {"a", "b"}
    change(data)
    with pytest.raises(RelayConfigError, match=message):
        parse_config(data)


def test_the_idle_loop_keeps_the_state_file_fresh_for_wg_stun(harness: Harness) -> None:
    """WG-STUN answers sites only while the state file's mtime is recent: the loop sets it
    every second even when nothing changed, without rewriting the file."""
    harness.write("ab")
    harness.start()
    wait_for(harness.state.exists, "the first pass's save")
    saved = harness.state.read_text()
    for _ in range(2):
        os.utime(harness.state, (0, 0))  # as if the loop had stopped long ago
        wait_for(lambda: relay_alive(str(harness.state), time.time()), "the loop's touch")
    assert harness.state.read_text() == saved


def test_a_clean_stop_silences_wg_stun_at_once_and_keeps_the_state(harness: Harness) -> None:
    """A stopped service must not look alive for the seconds its last touch stays young: WG-STUN
    falls silent at once, so sites fail over sooner. What it learned is still there to restore."""
    harness.write("ab")
    harness.start()
    wait_for(lambda: relay_alive(str(harness.state), time.time()), "the first pass's save")
    harness.stop()
    assert not relay_alive(str(harness.state), time.time())
    assert set(json.loads(harness.state.read_text())["sites"]) == {"a", "b"}
