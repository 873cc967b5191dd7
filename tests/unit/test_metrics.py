"""Prometheus metrics of the relay service and the traversal sidecar (meshwright.metrics).

The real daemons serve them: a RelayServer forwarding real WireGuard-shaped datagrams between
two loopback sockets, and a TraversalDaemon whose core went direct in the traversal tests'
simulated network (a real upgrade, not a hand-set state). Each is scraped over HTTP from its
own prometheus_client server on 127.0.0.1 and the exposition is checked by the real
`promtool check metrics` (Debian's package `prometheus`); the example scrape configuration and
alerting rules by `promtool check config`, `check rules` and `test rules`. Without promtool
the tests fail: they never skip.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_fakes import FakeProbes
from test_sidecar_traversal import KEY_ALPHA, KEY_BETA, RELAY, easy_pair
from tls_harness import make_cert

from meshwright.lab.topology import load_topology
from meshwright.metrics import (
    MetricsEndpoint,
    MetricsSetting,
    parse_setting,
    relay_families,
    sidecar_families,
)
from meshwright.relay.server import RelayServer
from meshwright.relay.sites import DROP_REASONS, MAPPING_KEEPALIVE
from meshwright.site.sidecar.config import SidecarConfigError, parse_traversal
from meshwright.site.sidecar.daemon import TraversalDaemon
from meshwright.wire.frames import encode

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs/examples/prometheus"
DEADLINE = 10.0
WALL_NOW = 1_764_526_100.0  # the sidecar's wall clock in the test
KEY_CHARLIE = "cccc" + "a" * 39 + "="

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def promtool() -> str:
    found = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(found).exists(), "promtool is missing: install prometheus (make deb)"
    return found


def run_promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    """promtool's output; the test fails with it when promtool finds anything."""
    done = subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, cwd=cwd, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> tuple[str, str]:
    """The exposition served on 127.0.0.1:port and its content type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read().decode(), answer.headers["Content-Type"]


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, f"not within {DEADLINE} s: {what}"
        time.sleep(0.05)


def refused(port: int) -> bool:
    try:
        scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


# --- WireGuard messages, for the relay (mac1 computed here, not by the relay's code) ----------


def mac1(receiver_public_key: bytes, body: bytes) -> bytes:
    key = hashlib.blake2s(b"mac1----" + receiver_public_key).digest()
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


def initiation(receiver_key: bytes, sender_index: int) -> bytes:
    body = struct.pack("<BxxxI", 1, sender_index) + os.urandom(32 + 48 + 28)
    return body + mac1(receiver_key, body) + bytes(16)


def response(receiver_key: bytes, sender_index: int, receiver_index: int) -> bytes:
    body = struct.pack("<BxxxII", 2, sender_index, receiver_index) + os.urandom(32 + 16)
    return body + mac1(receiver_key, body) + bytes(16)


def transport(receiver_index: int, counter: int) -> bytes:
    return struct.pack("<BxxxIQ", 4, receiver_index, counter) + os.urandom(32)


# --- the relay ---------------------------------------------------------------------------------


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture
def relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A real RelayServer on loopback: sites easy1 and hard1 (a port each), the TLS relay with
    one UDP-blocked site known (without a port of its own), metrics on a free port."""
    key_a, key_b = os.urandom(32), os.urandom(32)
    ports = (free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM))
    metrics_port, tls_port = free_port(), free_port()
    relay_cert = make_cert(tmp_path, "relay", usages=(ExtendedKeyUsageOID.SERVER_AUTH,))
    site_cert = make_cert(tmp_path, "blocked")
    config = tmp_path / "relay.json"
    config.write_text(
        json.dumps(
            {
                "address": "127.0.0.1",
                "sites": [
                    {"name": "easy1", "port": ports[0], "public_key": b64(key_a)},
                    {"name": "hard1", "port": ports[1], "public_key": b64(key_b)},
                ],
                "tls": {
                    "port": tls_port,
                    "listen": ["127.0.0.1"],
                    "sites": {"blocked": site_cert.pem},
                    "certificate": str(relay_cert.certificate),
                    "key": str(relay_cert.key),
                },
                "metrics": {"address": "127.0.0.1", "port": metrics_port},
            }
        )
    )
    logs: list[str] = []
    # serve_forever installs signal handlers, which only the main thread may do.
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    server = RelayServer(config, tmp_path / "state.json", log=logs.append)
    thread = threading.Thread(target=server.serve_forever, name="relay", daemon=True)
    thread.start()
    wait_for(lambda: not refused(metrics_port), "the relay serves its metrics")
    try:
        yield {
            "server": server,
            "keys": (key_a, key_b),
            "ports": ports,
            "metrics_port": metrics_port,
            "tls_port": tls_port,
            "site_cert": site_cert,
            "logs": logs,
        }
    finally:
        server._stop = True
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_relay_metrics_count_what_the_relay_forwarded_and_dropped(relay: dict[str, Any]) -> None:
    key_a, key_b = relay["keys"]
    port_a, port_b = relay["ports"]
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as site_a,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as site_b,
    ):
        for sock in (site_a, site_b):
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)

        def to_a(datagram: bytes) -> None:  # from B through its port: out of A's, to A
            site_b.sendto(datagram, ("127.0.0.1", port_b))
            assert site_a.recvfrom(2048) == (datagram, ("127.0.0.1", port_a))

        def to_b(datagram: bytes) -> None:
            site_a.sendto(datagram, ("127.0.0.1", port_a))
            assert site_b.recvfrom(2048) == (datagram, ("127.0.0.1", port_b))

        # A's first initiation finds no B yet (dropped, remembered); B's reaches A; A answers
        # (B proven); B's first data proves A; then data both ways.
        site_a.sendto(initiation(key_b, 0xA0), ("127.0.0.1", port_a))
        time.sleep(0.1)
        to_a(initiation(key_a, 0xB0))
        to_b(response(key_b, 0xA1, 0xB0))
        to_a(transport(0xA1, 0))
        to_b(transport(0xB0, 0))
        site_a.sendto(b"\x09junk", ("127.0.0.1", port_a))  # no WireGuard message: malformed
        site_b.sendto(MAPPING_KEEPALIVE, ("127.0.0.1", port_b))  # a sidecar on a direct path
        # The UDP-blocked site's TLS session, and a frame for a port that is not its own.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.load_cert_chain(relay["site_cert"].certificate, relay["site_cert"].key)
        tcp = socket.create_connection(("127.0.0.1", relay["tls_port"]), timeout=5)
        with context.wrap_socket(tcp) as session:
            session.sendall(encode(port_a, b"not yours"))

            def published(found: Samples) -> bool:
                keepalives = {"site": "hard1"}
                dropped = {"reason": "port_not_allowed"}
                return (
                    value(found, "meshwright_relay_mapping_keepalives_total", **keepalives) == 1
                    and value(found, "meshwright_relay_tls_dropped_frames_total", **dropped) == 1
                )

            wait_for(
                lambda: published(samples(scrape(relay["metrics_port"])[0])),
                "the loop publishes the counters",
            )
            text, content_type = scrape(relay["metrics_port"])
    found = samples(text)
    easy1, hard1 = {"site": "easy1"}, {"site": "hard1"}
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(found, "meshwright_relay_sites") == 2
    assert value(found, "meshwright_relay_sessions") >= 2
    # What each site sent: easy1 a response and data (its first initiation went nowhere), hard1
    # an initiation and data; and what each was sent.
    size_a = len(response(key_b, 1, 1)) + len(transport(1, 0))
    size_b = len(initiation(key_a, 1)) + len(transport(1, 0))
    assert value(found, "meshwright_relay_forwarded_packets_total", **easy1) == 2
    assert value(found, "meshwright_relay_forwarded_packets_total", **hard1) == 2
    assert value(found, "meshwright_relay_forwarded_bytes_total", **easy1) == size_a
    assert value(found, "meshwright_relay_forwarded_bytes_total", **hard1) == size_b
    assert value(found, "meshwright_relay_delivered_packets_total", **easy1) == 2
    assert value(found, "meshwright_relay_delivered_bytes_total", **easy1) == size_b
    assert value(found, "meshwright_relay_delivered_bytes_total", **hard1) == size_a
    assert value(found, "meshwright_relay_kernel_forwarded_packets_total", **easy1) == 0
    drops = {
        (dict(labels)["site"], dict(labels)["reason"]): count
        for (name, labels), count in found.items()
        if name == "meshwright_relay_dropped_packets_total"
    }
    # Every reason is there from the start, at 0, so that rate() sees the first drop.
    reasons = (*DROP_REASONS, "send_error")
    assert drops == {
        **{(site, reason): 0.0 for site in ("easy1", "hard1") for reason in reasons},
        ("easy1", "no_destination"): 1.0,
        ("easy1", "malformed"): 1.0,
    }
    for site in (easy1, hard1):
        assert value(found, "meshwright_relay_site_confirmed", **site) == 1
    assert value(found, "meshwright_relay_tls_connected", site="blocked") == 1
    assert value(found, "meshwright_relay_tls_frames_total", direction="received") == 0
    frame = len(encode(port_a, b"not yours"))
    assert value(found, "meshwright_relay_tls_received_bytes_total") == frame
    assert value(found, "process_open_fds") > 0  # the daemon's own, from prometheus_client
    assert "# TYPE meshwright_relay_forwarded_packets_total counter" in text
    assert "# HELP meshwright_relay_forwarded_packets_total " in text
    assert run_promtool("check", "metrics", stdin=text) == ""


def test_relay_moves_and_stops_its_metrics_on_reload(relay: dict[str, Any]) -> None:
    server: RelayServer = relay["server"]
    old = relay["metrics_port"]
    data = json.loads(server.config.read_text())
    new = free_port()
    data["metrics"]["port"] = new
    server.config.write_text(json.dumps(data))
    server._reload = True  # what SIGHUP does
    wait_for(lambda: server.metrics.port == new, "metrics on the new port")
    assert refused(old) and not refused(new)
    del data["metrics"]  # absent: off
    server.config.write_text(json.dumps(data))
    server._reload = True
    wait_for(lambda: server.metrics.port is None, "metrics off")
    assert refused(new)


def test_relay_tls_sessions_and_drops() -> None:
    state = {
        "sites": {},
        "tls": {
            "sites": {"blocked": True, "blocked2": False},
            "counters": {
                "frames_in": 10,
                "frames_out": 9,
                "bytes_in": 1200,
                "dropped_no_connection": 3,
                "closed_idle": 1,
                "handshakes": 2,
            },
        },
    }
    endpoint = MetricsEndpoint(lambda: relay_families(state), "relay")
    text = generate_latest(endpoint.registry).decode()
    found = samples(text)
    assert value(found, "meshwright_relay_tls_connected", site="blocked") == 1
    assert value(found, "meshwright_relay_tls_connected", site="blocked2") == 0
    assert value(found, "meshwright_relay_tls_frames_total", direction="received") == 10
    assert value(found, "meshwright_relay_tls_frames_total", direction="sent") == 9
    assert value(found, "meshwright_relay_tls_received_bytes_total") == 1200
    assert value(found, "meshwright_relay_tls_dropped_frames_total", reason="no_connection") == 3
    assert value(found, "meshwright_relay_tls_dropped_frames_total", reason="buffer_full") == 0
    assert value(found, "meshwright_relay_tls_closed_connections_total", reason="idle") == 1
    assert value(found, "meshwright_relay_sites") == 0
    assert run_promtool("check", "metrics", stdin=text) == ""


# --- the sidecar -------------------------------------------------------------------------------


class FakeWireGuard:
    """WireGuard as the daemon sees it: counters and handshakes to report, endpoints set."""

    def __init__(self, peers: dict[str, tuple[Any, int, int, float | None]]) -> None:
        self.peers = peers
        self.endpoints: list[tuple[str, tuple[str, int]]] = []

    def sample(self) -> dict[str, tuple[Any, int, int, float | None]]:
        return self.peers

    def set_endpoint(self, public_key: str, endpoint: tuple[str, int]) -> None:
        self.endpoints.append((public_key, endpoint))

    def close(self) -> None:
        pass


def traversal_config(tmp_path: Path, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "site": "alpha",
        "public_key": KEY_ALPHA,
        "overlay_address": "127.0.0.1",
        "control_port": free_port(socket.SOCK_DGRAM),
        "state_file": str(tmp_path / "state.json"),
        "peers": [
            {
                "name": "bravo",
                "public_key": KEY_BETA,
                "overlay_address": "10.200.0.2",
                "relay_endpoint": f"{RELAY}:40001",
            },
            {
                "name": "charlie",
                "public_key": KEY_CHARLIE,
                "overlay_address": "10.200.0.3",
                "relay_endpoint": f"{RELAY}:40003",
            },
        ],
        **({"metrics": metrics} if metrics is not None else {}),
    }


def test_sidecar_metrics_show_a_real_upgrade(tmp_path: Path) -> None:
    # alpha and bravo go direct in the traversal tests' simulated network of NATs.
    sim = easy_pair()
    sim.run(1.0)
    assert sim.paths() == ("direct", "direct")
    port = free_port()
    config = parse_traversal(traversal_config(tmp_path, {"address": "127.0.0.1", "port": port}))
    assert sim.a.wg_endpoint is not None
    wireguard = FakeWireGuard(
        {
            KEY_BETA: (sim.a.wg_endpoint, 123_456, 654_321, WALL_NOW - 42.5),
            KEY_CHARLIE: ((RELAY, 40003), 0, 148, None),  # never answered a handshake
            "a relay's key": (("198.51.100.10", 51820), 1, 2, WALL_NOW - 1),  # not a punch peer
        }
    )
    daemon = TraversalDaemon(
        config,
        wireguard,
        probes=FakeProbes(),  # type: ignore[arg-type]
        log=lambda _message: None,
        clock=lambda: sim.now,
        wall=lambda: WALL_NOW,
        addresses=list,
    )
    try:
        # The daemon takes over alpha's core as it stands; charlie is new and starts relayed.
        daemon.core = sim.a.core
        daemon.carry_out(daemon.core.configure(daemon._peer_configs()))
        assert wireguard.endpoints == [(KEY_CHARLIE, (RELAY, 40003))]
        daemon.sample(sim.now)
        daemon.write_state(sim.now)
        daemon.metrics.update(config.metrics)
        text, _ = scrape(port)
    finally:
        daemon.close()
    assert refused(port)
    found = samples(text)
    status = sim.a.core.status(sim.now)["peers"]
    assert value(found, "meshwright_sidecar_peer_path", peer="bravo", path="direct") == 1
    assert value(found, "meshwright_sidecar_peer_path", peer="bravo", path="relay") == 0
    assert value(found, "meshwright_sidecar_peer_path", peer="charlie", path="relay") == 1
    assert value(found, "meshwright_sidecar_peer_path", peer="charlie", path="direct") == 0
    rtt = value(found, "meshwright_sidecar_peer_rtt_seconds", peer="bravo")
    assert rtt == round(status["bravo"]["rtt_ms"] / 1000, 6) and 0.0 < rtt < 0.2
    assert ("meshwright_sidecar_peer_rtt_seconds", frozenset({("peer", "charlie")})) not in found
    assert value(found, "meshwright_sidecar_peer_handshake_age_seconds", peer="bravo") == 42.5
    assert value(found, "meshwright_sidecar_peer_handshake_age_seconds", peer="charlie") == (
        math.inf
    )
    assert value(found, "meshwright_sidecar_peer_received_bytes_total", peer="bravo") == 123_456
    assert value(found, "meshwright_sidecar_peer_sent_bytes_total", peer="bravo") == 654_321
    assert value(found, "meshwright_sidecar_peer_sent_bytes_total", peer="charlie") == 148
    assert value(found, "meshwright_sidecar_peer_upgrades_total", peer="bravo") == 1
    assert value(found, "meshwright_sidecar_peer_attempts_total", peer="bravo") >= 1
    assert value(found, "meshwright_sidecar_peer_fallbacks_total", peer="bravo") == 0
    assert value(found, "meshwright_sidecar_peer_upgrades_total", peer="charlie") == 0
    assert value(found, "meshwright_sidecar_peer_suspect", peer="bravo") == 0
    assert value(found, "meshwright_sidecar_dropped_messages_total", reason="probe_forged") == 0
    assert {dict(labels).get("peer") for (_, labels) in found} >= {"bravo", "charlie"}
    assert "a relay's key" not in text
    # The state file (meshwright sidecar status) holds WireGuard's view too.
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["wireguard"]["bravo"] == {
        "latest_handshake": WALL_NOW - 42.5,
        "rx_bytes": 123_456,
        "tx_bytes": 654_321,
    }
    assert run_promtool("check", "metrics", stdin=text) == ""


def test_sidecar_reload_moves_its_metrics_and_absent_is_off(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.json"
    first = free_port()
    data = traversal_config(tmp_path, {"address": "127.0.0.1", "port": first})
    path.write_text(json.dumps({"traversal": data}))
    config = parse_traversal(data)
    daemon = TraversalDaemon(
        config,
        FakeWireGuard({}),
        probes=FakeProbes(),  # type: ignore[arg-type]
        log=lambda _message: None,
        addresses=list,
        config_path=path,
    )
    try:
        daemon.metrics.update(config.metrics)
        daemon.write_state(0.0)
        assert "meshwright_sidecar_peer_path" in scrape(first)[0]
        second = free_port()
        data["metrics"]["port"] = second
        path.write_text(json.dumps({"traversal": data}))
        daemon.reload()
        assert not daemon._stopping  # a new metrics port is no reason to restart
        assert refused(first) and not refused(second)
        del data["metrics"]
        path.write_text(json.dumps({"traversal": data}))
        daemon.reload()
        assert refused(second) and daemon.metrics.port is None
    finally:
        daemon.close()


def test_empty_state_renders_valid_metrics() -> None:
    # Before the loop's first publication (and with no peer at all).
    for families in (lambda: relay_families({}), lambda: sidecar_families({}, WALL_NOW)):
        text = generate_latest(MetricsEndpoint(families, "test").registry).decode()
        assert run_promtool("check", "metrics", stdin=text) == ""


# --- settings ----------------------------------------------------------------------------------


def test_metrics_settings() -> None:
    assert parse_setting(None) is None
    assert parse_setting({"address": "10.99.0.2", "port": 9587}) == MetricsSetting(
        "10.99.0.2", 9587
    )
    assert parse_setting({"address": "fd00::0001", "port": 9587}) == MetricsSetting("fd00::1", 9587)
    for bad, message in (
        ([], "metrics: [] is not an object"),
        ({"address": "10.99.0.2"}, "metrics.port: None is not a port"),
        ({"address": "10.99.0.2", "port": True}, "metrics.port: True is not a port"),
        ({"address": "10.99.0.2", "port": 70000}, "metrics.port: 70000 is not a port"),
        ({"address": "mesh.example", "port": 1}, "metrics.address: 'mesh.example' is not an IP"),
        ({"port": 1}, "metrics.address: None is not an IP address"),
        ({"address": "0.0.0.0", "port": 1}, "metrics.address: '0.0.0.0' listens on every"),
        ({"address": "::", "port": 1}, "metrics.address: '::' listens on every address"),
        ({"address": "::1", "port": 1, "path": "/x"}, "metrics: unknown key 'path'"),
    ):
        with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
            parse_setting(bad)


def test_sidecar_configuration_names_a_bad_metrics_entry(tmp_path: Path) -> None:
    data = traversal_config(tmp_path, {"address": "127.0.0.1", "port": 0})
    with pytest.raises(SidecarConfigError, match=r"^traversal\.metrics\.port: 0 is not a port$"):
        parse_traversal(data)
    assert parse_traversal(traversal_config(tmp_path, None)).metrics is None


def test_a_port_in_use_is_logged_and_tried_again() -> None:
    logs: list[str] = []
    endpoint = MetricsEndpoint(lambda: [], "relay", logs.append)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint.update(MetricsSetting("127.0.0.1", port))
        assert endpoint.port is None
        assert logs[-1].startswith(f"relay: metrics not served on 127.0.0.1:{port}: ")
    endpoint.update(MetricsSetting("127.0.0.1", port))  # the next reload tries again
    try:
        assert endpoint.port == port and not refused(port)
    finally:
        endpoint.close()


# --- promtool and the examples -----------------------------------------------------------------


def test_promtool_checks_what_it_is_given() -> None:
    # A counter without _total and a metric without HELP: promtool must object (so that the
    # checks above mean something).
    done = subprocess.run(
        [promtool(), "check", "metrics"],
        input="# TYPE meshwright_test counter\nmeshwright_test 1\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "_total" in done.stdout + done.stderr


def test_example_scrape_configuration_and_alerting_rules(tmp_path: Path) -> None:
    # In a copy: promtool resolves rule_files next to the configuration.
    copy = tmp_path / "prometheus"
    shutil.copytree(EXAMPLES, copy)
    checked = run_promtool("check", "config", "prometheus.yml", cwd=copy)
    assert "SUCCESS: 1 rule files found" in checked
    assert "SUCCESS: 4 rules found" in run_promtool("check", "rules", "alerts.yml", cwd=copy)
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml", cwd=copy)
    # It scrapes every lab relay and every site whose NAT lets its pairs punch (endpoint-
    # independent mapping: the planner's easy and cgn classes), each at its overlay address.
    lab = load_topology(yaml.safe_load((ROOT / "inventory/lab/topology.yml").read_text()))
    wanted = {
        ("meshwright-relay", "relay", relay.name, lab.relay_overlay_address(relay.name), 9588)
        for relay in lab.relays
    } | {
        ("meshwright-sidecar", "site", site.name, lab.overlay_address(site.name), 9587)
        for site in lab.sites
        if site.nat in ("eim", "cgnat")
    }
    listed = set()
    for job in yaml.safe_load((copy / "prometheus.yml").read_text())["scrape_configs"]:
        for group in job["static_configs"]:
            ((kind, name),) = group["labels"].items()
            for target in group["targets"]:
                address, port = target.rsplit(":", 1)
                listed.add((job["job_name"], kind, name, f"{address}/24", int(port)))
    assert listed == wanted
