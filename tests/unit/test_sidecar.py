"""Tests for meshwright.site.sidecar: a UDP-blocked site's WireGuard over TLS to its relays.

Everything runs on 127.0.0.1 with real sockets and real TLS: the relay side is TlsClients in a
small selectors loop of its own (standing in for RelayServer, with a UDP socket per site port
for "the other sites"), "WireGuard" is a UDP socket the test owns. The sidecar has one local
socket per relay: WireGuard's endpoint for every peer relayed through it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
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
from sidecar_fakes import FakeProbes
from tls_harness import DEADLINE, HOST, Cert, RelayLoop, make_cert, record_sends, wait_for

from meshwright.site.sidecar import Sidecar, SidecarConfigError, main
from meshwright.site.sidecar.carrier import CONNECT_TIMEOUT, RETIRE_GRACE
from meshwright.site.sidecar.config import parse_config, parse_traversal
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
    other: socket.socket  # stands in for the other sites, behind the relay
    site_ports: list[int]  # the ones the relay lets this site use; the first in the file
    local_port: int  # the relay's socket here: WireGuard's endpoint for its peers
    certs: dict[str, Cert]

    @property
    def site_port(self) -> int:
        return self.site_ports[0]

    def write_config(self, **overrides: Any) -> None:
        overrides.setdefault("site_port", self.site_port)
        overrides.setdefault("local_port", self.local_port)
        write_config(self.config, self.relay.address, self.certs, self.wireguard, **overrides)

    def counters(self) -> Counter[str]:
        # The loop thread may add a key while this copies: then copy again.
        while True:
            with contextlib.suppress(RuntimeError):
                return Counter(dict(self.sidecar.counters))

    def probe(self, port: int | None = None, timeout: float = DEADLINE) -> bytes:
        """Send through the sidecar (its local socket ``port``) until one datagram reaches
        the other side (the first ones are dropped while the sidecar connects); then drain
        stragglers."""
        port = self.local_port if port is None else port
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
    *,
    site_port: int,
    local_port: int,
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
                "site_port": site_port,
                "local_port": local_port,
            }
        },
        "certificate": str(certs[site].certificate),
        "key": str(certs[site].key),
        "wireguard_port": wireguard.getsockname()[1],
    }
    path.write_text(json.dumps(config))


@pytest.fixture
def setup(certs: dict[str, Cert], tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    started: list[tuple[Setup, threading.Thread]] = []

    def start(
        site_ports: int = 1,
        relay_address: tuple[str, int] | None = None,
        *,
        relay_cert: Cert | None = None,
        relay_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        **config: Any,
    ) -> Setup:
        # Labels for the relay harness (its UDP sockets are ephemeral): any distinct numbers.
        ports = [free_udp_port() for _ in range(site_ports)]
        local = free_udp_port()
        relay = RelayLoop(
            relay_cert or certs["relay"],
            {"blk": certs["blk"]},
            {"blk": set(ports)},
            **(relay_options or {}),
        )
        other, wireguard = udp_socket(), udp_socket()
        relay.forward_to = other.getsockname()
        path = tmp_path / "sidecar.json"
        write_config(
            path,
            relay_address or relay.address,
            certs,
            wireguard,
            site_port=ports[0],
            local_port=local,
            **config,
        )
        logs: list[str] = []
        sidecar = Sidecar(path, log=logs.append, clock=clock)
        sidecar.logs = logs  # type: ignore[attr-defined]
        thread = threading.Thread(target=sidecar.serve_forever, daemon=True)
        thread.start()
        result = Setup(relay, sidecar, path, wireguard, other, ports, local, certs)
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
        "relay1": {
            "address": "198.51.100.10",
            "port": 443,
            "fingerprint": "sha256:" + "ab" * 32,
            "site_port": 40003,
            "local_port": 41000,
        },
        "relay2": {
            "address": "203.0.113.30",
            "port": 443,
            "fingerprint": "sha256:" + "cd" * 32,
            "standby_fingerprint": "sha256:" + "ef" * 32,
            "site_port": 40003,
            "local_port": 41001,
        },
    },
    "certificate": "/etc/meshwright/sidecar.crt",
    "key": "/etc/meshwright/sidecar.key",
    "wireguard_port": 51820,
}


def test_the_documented_configuration_parses():
    config = parse_config(GOOD)
    relay1, relay2 = config.relays["relay1"], config.relays["relay2"]
    assert relay1.fingerprint == "sha256:" + "ab" * 32
    assert (relay1.site_port, relay1.local_port) == (40003, 41000)
    assert (relay2.site_port, relay2.local_port) == (40003, 41001)
    assert relay2.pins == ("sha256:" + "cd" * 32, "sha256:" + "ef" * 32)
    assert config.wireguard_port == 51820
    openssl_style = json.loads(json.dumps(GOOD))
    openssl_style["relays"]["relay1"]["fingerprint"] = "SHA256 Fingerprint=" + ":".join(["AB"] * 32)
    assert parse_config(openssl_style).relays == config.relays


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["relays"]["relay2"].update(local_port=41000), "also relay1's"),
        (lambda c: c["relays"]["relay1"].update(local_port=51820), "also wireguard_port's"),
        (lambda c: c["relays"]["relay1"].update(local_port=0), "local_port: 0 is not a port"),
        (lambda c: c["relays"]["relay1"].pop("site_port"), "site_port: None is not a port"),
        (lambda c: c["relays"]["relay1"].pop("local_port"), "local_port: None is not a port"),
        (lambda c: c["relays"]["relay1"].update(fingerprint="sha1:00"), "fingerprint"),
        (lambda c: c.pop("certificate"), "certificate"),
        (lambda c: c.update(relays=["relay1"]), "relays: not an object"),
        # The carrier of a relay port pair per peer (before one port per site):
        (
            lambda c: c.update(peers=[{"name": "hard1", "relay": "relay1", "port": 40003}]),
            "peers: no longer used",
        ),
    ],
)
def test_bad_configurations_are_refused_with_a_reason(change, message):
    config = json.loads(json.dumps(GOOD))
    change(config)
    with pytest.raises(SidecarConfigError, match=message):
        parse_config(config)


def _traversal(*peers: dict[str, Any]) -> dict[str, Any]:
    base = {
        "name": "easy2",
        "public_key": "B" * 43 + "=",
        "overlay_address": "10.200.0.2",
        "relay_endpoint": "198.51.100.10:40001",
    }
    return {
        "site": "easy1",
        "public_key": "A" * 43 + "=",
        "overlay_address": "10.200.0.1",
        "peers": [{**base, **peer} for peer in peers],
    }


@pytest.mark.parametrize(
    ("fields", "mode", "upgrade", "direct"),
    [
        ({}, "punch", True, None),  # written before modes: upgrade's default
        ({"upgrade": True}, "punch", True, None),
        ({"upgrade": False}, "relay", False, None),
        ({"mode": "relay", "upgrade": False}, "relay", False, None),
        ({"mode": "punch", "direct_endpoint": None}, "punch", True, None),
        ({"mode": "direct", "direct_endpoint": None, "upgrade": True}, "direct", True, None),
        (
            {"mode": "direct", "direct_endpoint": "[2001:db8::7]:51820"},
            "direct",
            True,
            ("2001:db8::7", 51820),
        ),
    ],
)
def test_traversal_peers_have_a_mode_or_say_upgrade(fields, mode, upgrade, direct):
    (peer,) = parse_traversal(_traversal(fields)).peers
    assert (peer.mode, peer.upgrade, peer.direct_endpoint) == (mode, upgrade, direct)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "hole-punch"}, "mode: 'hole-punch' is not one of punch, relay, direct"),
        ({"mode": "relay", "upgrade": True}, "upgrade: True contradicts mode relay"),
        ({"mode": "direct", "upgrade": False}, "upgrade: False contradicts mode direct"),
        ({"upgrade": "yes"}, "upgrade: not true or false"),
        ({"mode": "direct", "direct_endpoint": "203.0.113.5"}, "direct_endpoint"),
    ],
)
def test_bad_traversal_peers_are_refused_with_a_reason(fields, message):
    with pytest.raises(SidecarConfigError, match=re.escape(message)):
        parse_traversal(_traversal(fields))


# --- over the relay ---------------------------------------------------------------------------


def test_1000_numbered_datagrams_each_way_arrive_in_order(setup):
    s = setup()
    port, site_port = s.local_port, s.site_port
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
            s.other.sendto(b"re:" + data, s.relay.udp[site_port].getsockname())
        for _ in range(50):
            data, source = s.wireguard.recvfrom(65535)
            assert source == (HOST, port)  # from the peer's endpoint, as WireGuard expects
            to_wireguard.append(data)
    expected = [number.to_bytes(4, "big") + b"w" * 120 for number in range(1000)]
    assert to_other == expected
    assert to_wireguard == [b"re:" + data for data in expected]
    assert s.relay.datagrams[before:] == [("blk", site_port, data) for data in expected]
    # The loop counts right after it sends: wait for the count to catch up with the socket.
    wait_for(lambda: s.counters()["datagrams_to_wireguard"] == 1000)
    counters = s.counters()
    assert counters["datagrams_to_relay"] >= 1000
    assert counters["connects"] == 1


def test_datagrams_not_from_wireguard_or_too_big_are_dropped(setup):
    s = setup()
    port = s.local_port
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
    port = s.local_port
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
    s.probe(s.local_port)
    # Without privileges (no SO_*BUFFORCE) the system's maximum caps them; the kernel reports
    # twice what it was given.
    limits = {
        name: int(Path(f"/proc/sys/net/core/{name}").read_text())
        for name in ("rmem_max", "wmem_max")
    }
    [local] = s.sidecar._locals.values()
    for option, limit in ((socket.SO_RCVBUF, "rmem_max"), (socket.SO_SNDBUF, "wmem_max")):
        assert local.sock.getsockopt(socket.SOL_SOCKET, option) >= min(UDP_BUFFER, limits[limit])
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
        s.wireguard.sendto(b"secret handshake", (HOST, s.local_port))
    wait_for(lambda: s.counters()["dropped_disconnected"] >= 20)
    assert s.relay.datagrams == []
    assert s.counters()["connects"] == 0
    assert any("fingerprint_mismatch" in line for line in s.sidecar.logs)  # type: ignore[attr-defined]


def test_a_relay_serving_its_standby_certificate_is_accepted_and_kept_across_new_pins(setup, certs):
    """A certificate rotation: the relay already serves the certificate the site pinned as the
    standby; when the site's pins move on (that one first, a new standby), it stays connected."""
    s = setup(pin=certs["impostor"].pin, standby=certs["relay"].pin)
    port = s.local_port
    assert s.probe(port) == b"probe"
    s.write_config(pin=certs["relay"].pin, standby=certs["blk"].pin)
    s.sidecar.request_reload()
    wait_for(lambda: s.sidecar.config.relays["relay1"].standby_fingerprint == certs["blk"].pin)
    assert s.probe(port) == b"probe"
    assert s.counters()["connects"] == 1
    # Pins that no longer cover the relay's certificate drop the connection, as they must: it
    # carries on only while its replacement is tried, which fails here.
    s.write_config(pin=certs["impostor"].pin, standby=certs["blk"].pin)
    s.sidecar.request_reload()
    wait_for(lambda: s.counters()["disconnects_fingerprint_mismatch"] >= 1)
    counters = s.counters()
    assert counters["connects"] == 1
    assert counters["retired_replacement_failed"] == 1
    assert "relay1 (retiring)" not in s.sidecar.status()
    wait_for(lambda: not s.relay.call(lambda: s.relay.clients.connected))


# --- replacing a connection, make-before-break -------------------------------------------------


def serving(directory: Path, cert: Cert) -> Cert:
    """``cert`` in files of its own, which the relay serves and a test may rotate."""
    served = Cert(cert.pem, directory / "served.crt", directory / "served.key", cert.pin)
    served.certificate.write_bytes(cert.certificate.read_bytes())
    served.key.write_bytes(cert.key.read_bytes())
    return served


def rotate_relay_certificate(s: Setup, served: Cert, new: Cert) -> None:
    """The relay serves ``new`` from now on, as a live rotation has it: the files replaced,
    then the relay's reload (its open connections keep their sessions)."""
    served.certificate.write_bytes(new.certificate.read_bytes())
    served.key.write_bytes(new.key.read_bytes())
    ports = {"blk": set(s.site_ports)}
    s.relay.call(lambda: s.relay.clients.update({"blk": s.certs["blk"].pem}, ports))


def start_relay_rotation(
    setup: Callable[..., Setup], certs: dict[str, Cert], tmp_path: Path, **options: Any
) -> Setup:
    """A sidecar connected to a relay that then serves its standby certificate, "impostor"
    here; the sidecar still pins both and keeps its connection until it reloads."""
    served = serving(tmp_path, certs["relay"])
    s = setup(relay_cert=served, standby=certs["impostor"].pin, **options)
    s.probe()
    rotate_relay_certificate(s, served, certs["impostor"])
    return s


@pytest.mark.parametrize("rotated", ["relay certificate", "site certificate"])
def test_a_rotation_replaces_the_connection_without_losing_a_datagram(
    setup, certs, tmp_path, rotated
):
    """The new connection is made before the old one is let go: what WireGuard sends while the
    new one's handshake waits, and what the other side sends meanwhile, all arrive."""
    if rotated == "relay certificate":
        s = start_relay_rotation(setup, certs, tmp_path, relay_options={"supersede_grace": 0.2})
        new_config = {"pin": certs["impostor"].pin}  # the retired certificate is unpinned
    else:
        s = setup(relay_options={"supersede_grace": 0.2})
        s.probe()
        both = certs["blk"].pem + certs["stranger"].pem  # the relay knows the new one already
        s.relay.call(lambda: s.relay.clients.update({"blk": both}, {"blk": set(s.site_ports)}))
        new_config = {"site": "stranger"}
    sent_out = [f"out {n}".encode() for n in range(20)]
    sent_in = [f"in {n}".encode() for n in range(20)]
    before = s.counters()
    queued = before["datagrams_to_relay"]
    with s.relay.paused():  # the new connection's handshake waits for the relay
        s.write_config(**new_config)
        s.sidecar.request_reload()
        wait_for(lambda: s.sidecar.status() == {"relay1": "handshake", "relay1 (retiring)": "open"})
        for payload in sent_out:
            s.wireguard.sendto(payload, (HOST, s.local_port))
        wait_for(lambda: s.counters()["datagrams_to_relay"] == queued + len(sent_out))
        for payload in sent_in:
            s.other.sendto(payload, s.relay.udp[s.site_port].getsockname())
    assert [s.other.recvfrom(65535)[0] for _ in sent_out] == sent_out
    assert sorted(s.wireguard.recvfrom(65535)[0] for _ in sent_in) == sorted(sent_in)
    # The relay closes the old connection after its grace; the new one carries on.
    wait_for(lambda: s.counters()["retired_relay_closed"] == 1)
    assert s.sidecar.status() == {"relay1": "open"}
    assert s.probe() == b"probe"
    counters = s.counters()
    assert (counters["connects"], counters["connections_retired"]) == (2, 1)
    assert counters["dropped_disconnected"] == before["dropped_disconnected"]
    assert s.relay.counters()["closed_superseded"] == 1


def test_the_old_connection_is_read_until_the_grace_is_over(setup, certs, tmp_path):
    """Once the new connection is open, WireGuard's datagrams go there, and what the relay
    still sends on the old one (queued before it switched) arrives until the sidecar's grace
    is over; then the sidecar closes it (the relay here would keep it for a minute)."""
    offset = [0.0]
    s = start_relay_rotation(
        setup,
        certs,
        tmp_path,
        relay_options={"supersede_grace": 60.0},
        clock=lambda: time.monotonic() + offset[0],
    )
    s.write_config(pin=certs["impostor"].pin)
    s.sidecar.request_reload()
    wait_for(lambda: s.sidecar.status() == {"relay1": "open", "relay1 (retiring)": "open"})
    wait_for(lambda: s.relay.call(lambda: "blk" in s.relay.clients._superseded))
    late = [f"late {n}".encode() for n in range(10)]

    def queue_on_the_old_connection() -> None:
        old, _ = s.relay.clients._superseded["blk"]
        for payload in late:
            assert s.relay.clients._queue(old, s.site_port, payload)

    s.relay.call(queue_on_the_old_connection)
    assert [s.wireguard.recvfrom(65535)[0] for _ in late] == late
    assert s.probe() == b"probe"  # through the new connection
    offset[0] += RETIRE_GRACE
    s.wireguard.sendto(b"wake up", (HOST, s.local_port))
    wait_for(lambda: s.counters()["retired_grace_over"] == 1)
    assert s.sidecar.status() == {"relay1": "open"}
    wait_for(lambda: not s.relay.call(lambda: s.relay.clients._superseded))
    assert s.relay.counters()["closed_superseded"] == 0  # the sidecar closed it


def test_a_replacement_that_never_opens_ends_the_old_connection_at_its_deadline(
    setup, certs, tmp_path
):
    offset = [0.0]
    s = start_relay_rotation(setup, certs, tmp_path, clock=lambda: time.monotonic() + offset[0])
    with s.relay.paused():  # the new connection's handshake never gets an answer
        s.write_config(pin=certs["impostor"].pin)
        s.sidecar.request_reload()
        wait_for(lambda: s.sidecar.status() == {"relay1": "handshake", "relay1 (retiring)": "open"})
        offset[0] += CONNECT_TIMEOUT
        s.wireguard.sendto(b"wake up", (HOST, s.local_port))
        wait_for(lambda: s.counters()["retired_replacement_timeout"] == 1)
        assert "relay1 (retiring)" not in s.sidecar.status()


def test_the_relay_refuses_a_sidecar_whose_certificate_it_does_not_know(setup):
    s = setup(site="stranger")
    wait_for(lambda: s.relay.counters()["closed_certificate_rejected"] >= 1)
    for _ in range(20):
        s.wireguard.sendto(b"let me in", (HOST, s.local_port))
    wait_for(lambda: s.relay.counters()["closed_certificate_rejected"] >= 2)
    assert s.relay.datagrams == []
    assert s.counters()["keepalives_answered"] == 0


def test_a_lost_connection_is_reconnected_and_traffic_resumes(setup):
    s = setup()
    port = s.local_port
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
        s.wireguard.sendto(b"x" * 3000, (HOST, s.local_port))
        wait_for(lambda: s.counters()["dropped_bad_size"] == 1)
    finally:
        listener.close()
        thread.join(DEADLINE)


def test_one_local_socket_per_relay_carries_every_peer_through_it_both_ways(setup):
    """WireGuard's endpoint for both peers relayed through relay1 is the one local socket:
    their datagrams all go to the relay as frames for this site's port (the relay tells them
    apart by WireGuard's indices), and both peers' answers come back out of that socket."""
    s = setup()
    s.probe()
    before = len(s.relay.datagrams)
    sent = [f"to {peer} #{n}".encode() for n in range(20) for peer in ("hard1", "hard2")]
    for payload in sent:
        s.wireguard.sendto(payload, (HOST, s.local_port))
    arrived = [s.other.recvfrom(65535)[0] for _ in sent]
    assert arrived == sent
    assert s.relay.datagrams[before:] == [("blk", s.site_port, p) for p in sent]
    relay_side = s.relay.udp[s.site_port].getsockname()
    with udp_socket() as hard1, udp_socket() as hard2:
        for n in range(20):
            hard1.sendto(f"from hard1 #{n}".encode(), relay_side)
            hard2.sendto(f"from hard2 #{n}".encode(), relay_side)
            for _ in range(2):
                _, source = s.wireguard.recvfrom(65535)
                assert source == (HOST, s.local_port)
    assert len(s.sidecar._locals) == 1
    wait_for(lambda: s.counters()["datagrams_to_wireguard"] == 40)
    assert s.counters()["dropped_unknown_port"] == 0


def test_reload_moves_the_local_socket_and_the_site_port_without_dropping_the_connection(setup):
    s = setup(site_ports=2)
    first, second = s.site_ports
    old_local = s.local_port
    s.probe()
    # A new site port (the plan moved this site's port): the connection stays.
    s.write_config(site_port=second)
    s.sidecar.request_reload()
    wait_for(lambda: s.sidecar.config.relays["relay1"].site_port == second)
    assert s.probe() == b"probe"
    assert s.relay.datagrams[-1] == ("blk", second, b"probe")
    # Frames for the old port are nobody's now.
    with udp_socket() as stranger:
        stranger.sendto(b"stale", s.relay.udp[first].getsockname())
    wait_for(lambda: s.counters()["dropped_unknown_port"] == 1)
    # A new local port: the old one is given up, WireGuard's endpoint is the new one.
    s.local_port = free_udp_port()
    s.write_config()
    s.sidecar.request_reload()

    def old_is_free() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((HOST, old_local))
            except OSError:
                return False
            return True

    wait_for(old_is_free)
    assert s.probe() == b"probe"
    s.config.write_text("{not json")
    s.sidecar.request_reload()
    wait_for(lambda: s.counters()["config_errors"] == 1)
    assert s.probe() == b"probe"  # the last good configuration still runs
    assert s.counters()["connects"] == 1


def test_main_reloads_on_sighup_and_stops_on_sigterm(certs, tmp_path):
    path = tmp_path / "sidecar.json"
    with udp_socket() as wireguard:
        write_config(path, (HOST, 9), certs, wireguard, site_port=40000, local_port=free_udp_port())
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
            assert "1 relays" in process.stderr.readline()
            process.send_signal(signal.SIGHUP)
            assert "1 relays" in process.stderr.readline()
            process.send_signal(signal.SIGTERM)
            _, rest = process.communicate(timeout=DEADLINE)
            assert process.returncode == 0, rest
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_main_refuses_a_bad_configuration(tmp_path, capsys):
    path = tmp_path / "sidecar.json"
    relay = {"address": "198.51.100.10", "fingerprint": "sha256:" + "ab" * 32, "local_port": 1}
    path.write_text(json.dumps({"relays": {"relay1": relay}}))
    assert main(["--config", str(path)]) == 2
    assert "relays.relay1.site_port: None is not a port" in capsys.readouterr().err


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
        write_config(
            path,
            listener.getsockname(),
            certs,
            wireguard,
            site_port=40000,
            local_port=free_udp_port(),
        )
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


# --- the traversal daemon: sampling in the grace ----------------------------------------------


class _SampledWireGuard:
    """WireGuard as the daemon sees it, noting when it was read."""

    def __init__(self, peers: dict[str, Any]) -> None:
        self.peers = peers
        self.read_at: list[float] = []

    def sample(self) -> dict[str, Any]:
        self.read_at.append(time.monotonic())
        return self.peers

    def set_endpoint(self, public_key: str, endpoint: tuple[str, int]) -> None:
        pass

    def reset_session(self, public_key: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_daemon_reads_wireguard_every_100_ms_in_a_grace_and_seldom_otherwise(tmp_path):
    from meshwright.site.sidecar.daemon import SAMPLE_GRACE, TraversalDaemon

    key = "B" * 43 + "="
    config = _traversal({"mode": "direct", "direct_endpoint": "203.0.113.20:51820"})
    config.update(overlay_address="127.0.0.1", control_port=free_udp_port())
    config["state_file"] = str(tmp_path / "state.json")
    wireguard = _SampledWireGuard({key: (("203.0.113.20", 51820), 100, 100, None)})
    daemon = TraversalDaemon(
        parse_traversal(config),
        wireguard,
        probes=FakeProbes(),  # type: ignore[arg-type]
        log=lambda _message: None,
        addresses=list,
    )
    started = time.monotonic()
    grace = (started + 0.6, started + 1.2)
    daemon.core.reasserting = lambda now: grace[0] <= now < grace[1]  # type: ignore[method-assign]
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        time.sleep(1.8)
    finally:
        daemon.stop()
        thread.join(DEADLINE)
        daemon.close()
    in_grace = [t for t in wireguard.read_at if grace[0] <= t < grace[1]]
    assert len(in_grace) >= 0.6 / SAMPLE_GRACE - 1, in_grace
    assert max(b - a for a, b in itertools.pairwise(in_grace)) < 2 * SAMPLE_GRACE
    # Counters that do not move: once a second outside it.
    assert len([t for t in wireguard.read_at if grace[1] + 0.05 <= t]) <= 1


@pytest.mark.parametrize(("interface", "tunnelled"), [("lo", True), ("mesh0", False)])
def test_probes_that_came_through_wireguard_are_dropped_and_counted(tmp_path, interface, tunnelled):
    """A probe names the interface it arrived on: one through WireGuard's (a peer's ping to
    one of this site's LAN addresses, routed into the tunnel) proves nothing about a direct
    path, so the daemon drops it before the core sees it. Real raw sockets, on loopback (here
    standing in for WireGuard's interface)."""
    from meshwright.site.sidecar.daemon import TraversalDaemon
    from meshwright.site.sidecar.messages import MAGIC
    from meshwright.site.sidecar.rawudp import ProbeSocket

    port = free_udp_port()
    config = _traversal({})
    config.update(
        overlay_address="127.0.0.1",
        control_port=free_udp_port(),
        listen_port=port,
        interface=interface,
        state_file=str(tmp_path / "state.json"),
    )
    probes = ProbeSocket(port)
    daemon = TraversalDaemon(
        parse_traversal(config),
        _SampledWireGuard({}),
        probes=probes,
        log=lambda _message: None,
        addresses=list,
    )
    try:
        probes.send(("127.0.0.1", port), MAGIC + b"\x01" + bytes(40))
        deadline = time.monotonic() + DEADLINE
        while not (daemon.counters or daemon.core.counters):
            assert time.monotonic() < deadline, "the probe never arrived"
            daemon._drain_probes()
            time.sleep(0.01)
    finally:
        daemon.close()
    assert daemon.counters["dropped_probe_tunnel"] == (1 if tunnelled else 0)
    assert daemon.core.counters["dropped_probe_unknown"] == (0 if tunnelled else 1)


def test_the_probe_socket_says_which_interface_a_probe_arrived_on():
    from meshwright.site.sidecar.messages import MAGIC
    from meshwright.site.sidecar.rawudp import ProbeSocket

    port = free_udp_port()
    probes = ProbeSocket(port)
    try:
        probes.send(("127.0.0.1", port), MAGIC + b"probe")
        deadline = time.monotonic() + DEADLINE
        while (received := probes.receive()) is None:
            assert time.monotonic() < deadline, "the probe never arrived"
            time.sleep(0.01)
    finally:
        probes.close()
    assert received.source == ("127.0.0.1", port)
    assert received.payload == MAGIC + b"probe"
    assert received.interface == socket.if_nametoindex("lo")
