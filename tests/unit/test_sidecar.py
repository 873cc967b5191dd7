"""Tests for meshwright.site.sidecar: a UDP-blocked site's WireGuard over TLS to its relays.

Everything runs on 127.0.0.1 with real sockets and real TLS: the relay side is TlsClients in a
small selectors loop of its own (standing in for RelayServer, with a UDP socket per allocation
port for "the other site"), "WireGuard" is a UDP socket the test owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from tls_harness import DEADLINE, HOST, Cert, RelayLoop, make_cert, record_sends, wait_for

from meshwright.site.sidecar import Sidecar, SidecarConfigError, main
from meshwright.site.sidecar.config import parse_config
from meshwright.wire.frames import KEEPALIVE, FrameDecoder, encode, fingerprint
from meshwright.wire.stream import UDP_BUFFER, WRITE_CHUNK, tune, widen_buffers

# --- certificates -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    directory = tmp_path_factory.mktemp("certs")
    # One shape for the relay's and the sites': both usages, and no keyUsage (optional).
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    names = ("relay", "blk", "stranger", "impostor")
    return {n: make_cert(directory, n, usages=usages, key_usage=False) for n in names}


# --- the relay side ---------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def udp_socket(timeout: float = DEADLINE) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(timeout)
    return sock


@dataclass
class Setup:
    relay: RelayLoop
    sidecar: Sidecar
    config: Path
    wireguard: socket.socket  # stands in for the site's WireGuard
    other: socket.socket  # stands in for the other site, behind the relay
    ports: list[int]
    certs: dict[str, Cert]

    def write_config(self, peers: list[int], **overrides: Any) -> None:
        write_config(
            self.config, self.relay.address, self.certs, self.wireguard, peers, **overrides
        )

    def counters(self) -> Counter[str]:
        # The loop thread may add a key while this copies: then copy again.
        while True:
            with contextlib.suppress(RuntimeError):
                return Counter(dict(self.sidecar.counters))

    def probe(self, port: int, timeout: float = DEADLINE) -> bytes:
        """Send through the sidecar until one datagram reaches the other side (the first ones
        are dropped while the sidecar connects); then drain stragglers."""
        deadline = time.monotonic() + timeout
        self.other.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                self.wireguard.sendto(b"probe", (HOST, port))
                with contextlib.suppress(TimeoutError):
                    data, _ = self.other.recvfrom(65535)
                    with contextlib.suppress(TimeoutError):
                        while True:
                            self.other.recvfrom(65535)
                    return data
            raise AssertionError(f"nothing got through port {port}")
        finally:
            self.other.settimeout(DEADLINE)


def write_config(
    path: Path,
    relay: tuple[str, int],
    certs: dict[str, Cert],
    wireguard: socket.socket,
    peers: list[int],
    *,
    site: str = "blk",
    pin: str | None = None,
    standby: str | None = None,
) -> None:
    config = {
        "relays": {
            "relay1": {
                "address": relay[0],
                "port": relay[1],
                "fingerprint": pin or certs["relay"].pin,
                **({"standby_fingerprint": standby} if standby else {}),
            }
        },
        "peers": [{"name": f"peer{port}", "relay": "relay1", "port": port} for port in peers],
        "certificate": str(certs[site].certificate),
        "key": str(certs[site].key),
        "wireguard_port": wireguard.getsockname()[1],
    }
    path.write_text(json.dumps(config))


@pytest.fixture
def setup(certs: dict[str, Cert], tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    started: list[tuple[Setup, threading.Thread]] = []

    def start(peers: int = 1, relay_address: tuple[str, int] | None = None, **config: Any) -> Setup:
        ports = [free_udp_port() for _ in range(peers)]
        relay = RelayLoop(certs["relay"], {"blk": certs["blk"]}, {"blk": set(ports)})
        other, wireguard = udp_socket(), udp_socket()
        relay.forward_to = other.getsockname()
        path = tmp_path / "sidecar.json"
        write_config(path, relay_address or relay.address, certs, wireguard, ports[:1], **config)
        logs: list[str] = []
        sidecar = Sidecar(path, log=logs.append)
        sidecar.logs = logs  # type: ignore[attr-defined]
        thread = threading.Thread(target=sidecar.serve_forever, daemon=True)
        thread.start()
        result = Setup(relay, sidecar, path, wireguard, other, ports, certs)
        started.append((result, thread))
        return result

    yield start
    for result, thread in started:
        result.sidecar.stop()
        thread.join(DEADLINE)
        assert not thread.is_alive()
        result.relay.stop()
        result.wireguard.close()
        result.other.close()


# --- configuration ----------------------------------------------------------------------------

GOOD = {
    "relays": {
        "relay1": {"address": "198.51.100.10", "port": 443, "fingerprint": "sha256:" + "ab" * 32}
    },
    "peers": [{"name": "hard1", "relay": "relay1", "port": 40003}],
    "certificate": "/etc/meshwright/sidecar.crt",
    "key": "/etc/meshwright/sidecar.key",
    "wireguard_port": 51820,
}


def test_the_documented_configuration_parses():
    config = parse_config(GOOD)
    assert config.relays["relay1"].fingerprint == "sha256:" + "ab" * 32
    assert config.peers["hard1"].port == 40003
    assert config.wireguard_port == 51820
    openssl_style = json.loads(json.dumps(GOOD))
    openssl_style["relays"]["relay1"]["fingerprint"] = "SHA256 Fingerprint=" + ":".join(["AB"] * 32)
    assert parse_config(openssl_style).relays == config.relays


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["peers"][0].update(relay="relay2"), "not in relays"),
        (lambda c: c["peers"].append(dict(c["peers"][0], name="hard2")), "also hard1's"),
        (lambda c: c["peers"][0].update(port=51820), "also wireguard_port's"),
        (lambda c: c["peers"][0].update(port=0), "not a port"),
        (lambda c: c["relays"]["relay1"].update(fingerprint="sha1:00"), "fingerprint"),
        (lambda c: c.pop("certificate"), "certificate"),
        (lambda c: c.update(peers="hard1"), "not a list"),
        (lambda c: c["peers"].append(dict(c["peers"][0], port=40004)), "appears twice"),
    ],
)
def test_bad_configurations_are_refused_with_a_reason(change, message):
    config = json.loads(json.dumps(GOOD))
    change(config)
    with pytest.raises(SidecarConfigError, match=message):
        parse_config(config)


# --- over the relay ---------------------------------------------------------------------------


def test_1000_numbered_datagrams_each_way_arrive_in_order(setup):
    s = setup()
    port = s.ports[0]
    s.probe(port)
    before = len(s.relay.datagrams)
    to_other: list[bytes] = []
    to_wireguard: list[bytes] = []
    # A window of 50 in flight keeps the loopback's UDP buffers from dropping any.
    for base in range(0, 1000, 50):
        for number in range(base, base + 50):
            s.wireguard.sendto(number.to_bytes(4, "big") + b"w" * 120, (HOST, port))
        for _ in range(50):
            data, _ = s.other.recvfrom(65535)
            to_other.append(data)
            s.other.sendto(b"re:" + data, s.relay.udp[port].getsockname())
        for _ in range(50):
            data, source = s.wireguard.recvfrom(65535)
            assert source == (HOST, port)  # from the peer's endpoint, as WireGuard expects
            to_wireguard.append(data)
    expected = [number.to_bytes(4, "big") + b"w" * 120 for number in range(1000)]
    assert to_other == expected
    assert to_wireguard == [b"re:" + data for data in expected]
    assert s.relay.datagrams[before:] == [("blk", port, data) for data in expected]
    # The loop counts right after it sends: wait for the count to catch up with the socket.
    wait_for(lambda: s.counters()["datagrams_to_wireguard"] == 1000)
    counters = s.counters()
    assert counters["datagrams_to_relay"] >= 1000
    assert counters["connects"] == 1


def test_datagrams_not_from_wireguard_or_too_big_are_dropped(setup):
    s = setup()
    port = s.ports[0]
    s.probe(port)
    with udp_socket() as stranger:
        stranger.sendto(b"not wireguard", (HOST, port))
    s.wireguard.sendto(b"x" * 3000, (HOST, port))
    wait_for(lambda: s.counters()["dropped_foreign_source"] == 1)
    wait_for(lambda: s.counters()["dropped_bad_size"] == 1)
    assert s.probe(port) == b"probe"
    assert all(payload == b"probe" for _, _, payload in s.relay.datagrams)


@contextlib.contextmanager
def loop_paused(sidecar: Sidecar) -> Iterator[None]:
    """Hold the sidecar's loop before its next select(): what arrives meanwhile is read in
    one wake-up when the block ends."""
    release, paused = threading.Event(), threading.Event()
    timers = sidecar._timers

    def held(now: float) -> float:
        if not release.is_set():
            paused.set()
            release.wait(DEADLINE)
        return timers(now)

    sidecar._timers = held  # type: ignore[method-assign]
    try:
        assert paused.wait(DEADLINE)
        yield
    finally:
        release.set()


@pytest.mark.parametrize("count", [40, 150])
def test_the_datagrams_of_one_wake_up_go_to_the_relay_together_in_order(setup, count):
    """Full-size datagrams read in one wake-up: few writes, none larger than WRITE_CHUNK (four
    TLS records), all of them in order (150 fit in MAX_BUFFER: none may be dropped)."""
    s = setup()
    port = s.ports[0]
    s.probe(port)
    before = len(s.relay.datagrams)
    payloads = [number.to_bytes(4, "big") + os.urandom(1448) for number in range(count)]
    with loop_paused(s.sidecar):
        sizes = record_sends(s.sidecar._links["relay1"].sock)
        for payload in payloads:
            s.wireguard.sendto(payload, (HOST, port))
    wait_for(lambda: len(s.relay.datagrams) - before == count)
    assert [payload for _, _, payload in s.relay.datagrams[before:]] == payloads
    assert s.counters()["dropped_buffer_full"] == 0
    assert sizes and max(sizes) <= WRITE_CHUNK
    # Repeated attempts (the socket was full) may add a few; one write per frame would be 40+.
    assert len(sizes) <= count * (4 + 1452) // WRITE_CHUNK + 4


def test_peer_sockets_get_wide_buffers_and_tcp_keeps_autotuning(setup):
    s = setup()
    s.probe(s.ports[0])
    # Without privileges (no SO_*BUFFORCE) the system's maximum caps them; the kernel reports
    # twice what it was given.
    limits = {
        name: int(Path(f"/proc/sys/net/core/{name}").read_text())
        for name in ("rmem_max", "wmem_max")
    }
    [peer] = s.sidecar._peers.values()
    for option, limit in ((socket.SO_RCVBUF, "rmem_max"), (socket.SO_SNDBUF, "wmem_max")):
        assert peer.sock.getsockopt(socket.SOL_SOCKET, option) >= min(UDP_BUFFER, limits[limit])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        widen_buffers(sock, 1 << 20)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= min(
            1 << 20, limits["rmem_max"]
        )
    with socket.socket() as tcp:
        default = tcp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        tune(tcp, keepalive_idle=30)
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == default


def test_the_sidecar_refuses_a_relay_that_does_not_match_its_pin(setup, certs):
    s = setup(pin=certs["impostor"].pin)
    wait_for(lambda: s.counters()["disconnects_fingerprint_mismatch"] >= 1)
    for _ in range(20):
        s.wireguard.sendto(b"secret handshake", (HOST, s.ports[0]))
    wait_for(lambda: s.counters()["dropped_disconnected"] >= 20)
    assert s.relay.datagrams == []
    assert s.counters()["connects"] == 0
    assert any("fingerprint_mismatch" in line for line in s.sidecar.logs)  # type: ignore[attr-defined]


def test_a_relay_serving_its_standby_certificate_is_accepted_and_kept_across_new_pins(setup, certs):
    """A certificate rotation: the relay already serves the certificate the site pinned as the
    standby; when the site's pins move on (that one first, a new standby), it stays connected."""
    s = setup(pin=certs["impostor"].pin, standby=certs["relay"].pin)
    port = s.ports[0]
    assert s.probe(port) == b"probe"
    s.write_config([port], pin=certs["relay"].pin, standby=certs["blk"].pin)
    s.sidecar.request_reload()
    wait_for(lambda: s.sidecar.config.relays["relay1"].standby_fingerprint == certs["blk"].pin)
    assert s.probe(port) == b"probe"
    assert s.counters()["connects"] == 1
    # Pins that no longer cover the relay's certificate drop the connection, as they must.
    s.write_config([port], pin=certs["impostor"].pin, standby=certs["blk"].pin)
    s.sidecar.request_reload()
    wait_for(lambda: s.counters()["disconnects_fingerprint_mismatch"] >= 1)
    assert s.counters()["connects"] == 1


def test_the_relay_refuses_a_sidecar_whose_certificate_it_does_not_know(setup):
    s = setup(site="stranger")
    wait_for(lambda: s.relay.counters()["closed_certificate_rejected"] >= 1)
    for _ in range(20):
        s.wireguard.sendto(b"let me in", (HOST, s.ports[0]))
    wait_for(lambda: s.relay.counters()["closed_certificate_rejected"] >= 2)
    assert s.relay.datagrams == []
    assert s.counters()["keepalives_answered"] == 0


def test_a_lost_connection_is_reconnected_and_traffic_resumes(setup):
    s = setup()
    port = s.ports[0]
    s.probe(port)
    wait_for(lambda: s.counters()["keepalives_answered"] == 1)  # backoff reset: accepted
    assert s.relay.call(lambda: s.relay.clients.disconnect("blk"))
    started = time.monotonic()
    s.probe(port)
    # The first retry comes after 0.25..0.5 s: backoff, but a short one.
    assert 0.2 < time.monotonic() - started < 3.0
    counters = s.counters()
    assert counters["connects"] == 2
    assert counters["disconnects_relay_closed"] + counters["disconnects_read_error"] == 1
    assert s.relay.counters()["handshakes"] == 2


def test_reconnects_back_off_while_the_relay_is_down(setup):
    closed = socket.socket()
    closed.bind((HOST, 0))
    address = closed.getsockname()
    closed.close()  # nothing listens there: every connect is refused at once
    s = setup(relay_address=address)
    wait_for(lambda: s.counters()["connect_attempts"] >= 1)
    time.sleep(1.7)
    # Attempts at 0, 0.25-0.5, 0.75-1.5, 1.75-3.5 s: without backoff it would be hundreds.
    assert 3 <= s.counters()["connect_attempts"] <= 4
    assert s.counters()["disconnects_connect_failed"] >= 3


def test_garbage_from_the_relay_closes_the_connection_not_the_sidecar(setup, certs):
    # A relay that answers with a frame for a port nobody uses, then junk.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs["relay"].certificate, certs["relay"].key)
    listener = socket.create_server((HOST, 0))
    listener.settimeout(DEADLINE)

    def serve() -> None:
        for _ in range(2):
            with (
                contextlib.suppress(OSError),
                server_context.wrap_socket(listener.accept()[0], server_side=True) as tls,
            ):
                tls.sendall(encode(9, b"nobody's") + b"\x00\x09\x00\x00" + b"junk" * 100)
                with contextlib.suppress(OSError):
                    while tls.recv(4096):
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        s = setup(relay_address=listener.getsockname())
        wait_for(lambda: s.counters()["disconnects_frame_error"] >= 1)
        assert s.counters()["dropped_unknown_port"] == 1
        # It is retried, and the sidecar's loop is alive and well.
        wait_for(lambda: s.counters()["connects"] >= 2)
        s.wireguard.sendto(b"x" * 3000, (HOST, s.ports[0]))
        wait_for(lambda: s.counters()["dropped_bad_size"] == 1)
    finally:
        listener.close()
        thread.join(DEADLINE)


def test_reload_adds_and_removes_peers_without_dropping_the_connection(setup):
    s = setup(peers=2)
    first, second = s.ports
    s.probe(first)
    s.write_config([first, second])
    s.sidecar.request_reload()
    assert s.probe(second) == b"probe"
    assert s.relay.datagrams[-1] == ("blk", second, b"probe")
    s.write_config([second])
    s.sidecar.request_reload()

    def first_is_free() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((HOST, first))
            except OSError:
                return False
            return True

    wait_for(first_is_free)
    s.config.write_text("{not json")
    s.sidecar.request_reload()
    wait_for(lambda: s.counters()["config_errors"] == 1)
    assert s.probe(second) == b"probe"  # the last good configuration still runs
    assert s.counters()["connects"] == 1


def test_main_reloads_on_sighup_and_stops_on_sigterm(certs, tmp_path):
    path = tmp_path / "sidecar.json"
    with udp_socket() as wireguard:
        write_config(path, (HOST, 9), certs, wireguard, [free_udp_port()])
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from meshwright.node import main; sys.exit(main(sys.argv[1:]))",
                "sidecar",
                "--config",
                str(path),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stderr is not None
            assert "1 peers" in process.stderr.readline()
            process.send_signal(signal.SIGHUP)
            assert "1 peers" in process.stderr.readline()
            process.send_signal(signal.SIGTERM)
            _, rest = process.communicate(timeout=DEADLINE)
            assert process.returncode == 0, rest
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_main_refuses_a_bad_configuration(tmp_path, capsys):
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps({"peers": [{"name": "x", "relay": "nowhere", "port": 40000}]}))
    assert main(["--config", str(path)]) == 2
    assert "not in relays" in capsys.readouterr().err


def test_a_keepalive_is_the_first_frame_and_gets_the_relay_to_answer(certs):
    # What the relay's answer means to the sidecar: its certificate was accepted.
    relay = RelayLoop(certs["relay"], {"blk": certs["blk"]}, {"blk": {40000}})
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(certs["blk"].certificate, certs["blk"].key)
        with context.wrap_socket(socket.create_connection(relay.address, DEADLINE)) as tls:
            assert fingerprint(tls.getpeercert(binary_form=True) or b"") == certs["relay"].pin
            tls.sendall(KEEPALIVE)
            assert FrameDecoder().feed(tls.recv(64)) == [(0, b"\x00")]
    finally:
        relay.stop()


def test_keepalives_go_out_and_a_silent_relay_is_left(certs, tmp_path):
    # A relay that takes the connection but never answers; the sidecar's clock runs fast.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs["relay"].certificate, certs["relay"].key)
    listener = socket.create_server((HOST, 0))
    listener.settimeout(DEADLINE)
    frames: list[tuple[int, bytes]] = []

    def serve() -> None:
        with (
            contextlib.suppress(OSError),
            server_context.wrap_socket(listener.accept()[0], server_side=True) as tls,
        ):
            decoder = FrameDecoder()
            while data := tls.recv(4096):
                frames.extend(decoder.feed(data))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    offset = [0.0]
    path = tmp_path / "sidecar.json"
    with udp_socket() as wireguard:
        write_config(path, listener.getsockname(), certs, wireguard, [free_udp_port()])
        sidecar = Sidecar(path, log=lambda _: None, clock=lambda: time.monotonic() + offset[0])
        loop = threading.Thread(target=sidecar.serve_forever, daemon=True)
        loop.start()
        try:
            wait_for(lambda: frames == [(0, b"\x00")])  # the first one, right after the pin
            offset[0] += 31.0
            wait_for(lambda: len(frames) == 2)
            assert sidecar.counters["disconnects_relay_silent"] == 0
            offset[0] += 60.0  # 91 s without a word from the relay
            wait_for(lambda: sidecar.counters["disconnects_relay_silent"] == 1)
        finally:
            sidecar.stop()
            loop.join(DEADLINE)
            listener.close()
            thread.join(DEADLINE)
