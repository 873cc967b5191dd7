"""Tests for meshwright.wire.frames (framing, no I/O) and meshwright.relay.tls (the relay's TLS
service), the latter with real TLS over sockets on 127.0.0.1 only.

The relay side runs as a small selectors loop in a thread, like RelayServer's would; the sites
are plain blocking TLS clients here (the sidecar has its own tests).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import queue
import random
import signal
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from tls_harness import (
    DEADLINE,
    Cert,
    RelayLoop,
    make_cert,
    record_sends,
    save_cert,
    trickle_until_closed,
    wait_for,
)
from wg_messages import initiation, public_key, response, transport

from meshwright.relay.admission import SourceSlots
from meshwright.relay.server import RelayServer
from meshwright.relay.tls import site_fingerprints
from meshwright.wire.frames import (
    KEEPALIVE,
    KEEPALIVE_PORT,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameError,
    could_be_tls,
    encode,
    fingerprint,
    looks_like_stun,
    looks_like_tls,
    normalize_fingerprint,
)
from meshwright.wire.stream import WRITE_CHUNK

# --- framing ----------------------------------------------------------------------------------


def test_encode_lays_out_port_length_payload():
    assert encode(40003, b"abc") == b"\x9c\x43\x00\x03abc"
    assert encode(0, b"\x00") == KEEPALIVE
    assert len(encode(65535, b"x" * MAX_PAYLOAD)) == 4 + MAX_PAYLOAD


@pytest.mark.parametrize(
    ("port", "payload"),
    [(40000, b""), (40000, b"x" * (MAX_PAYLOAD + 1)), (-1, b"x"), (65536, b"x")],
)
def test_encode_refuses_what_no_decoder_would_take(port, payload):
    with pytest.raises(ValueError):
        encode(port, payload)


def test_a_frame_split_at_every_byte_boundary_decodes_once():
    frames = [(40003, b"hello"), (40004, bytes(range(256)) * 5), (1, b"z")]
    stream = b"".join(encode(p, d) for p, d in frames)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == frames, cut
        assert decoder.buffered == 0


def test_byte_by_byte_and_many_frames_in_one_chunk():
    frames = [(40000 + i % 7, bytes([i % 256]) * (1 + i % 300)) for i in range(2000)]
    stream = b"".join(encode(p, d) for p, d in frames)
    assert FrameDecoder().feed(stream) == frames
    decoder = FrameDecoder()
    got: list[tuple[int, bytes]] = []
    for i in range(0, 20_000):
        got += decoder.feed(stream[i : i + 1])
    got += decoder.feed(stream[20_000:])
    assert got == frames


def test_payloads_are_independent_bytes():
    decoder = FrameDecoder()
    chunk = bytearray(encode(7, b"abcd"))
    [(port, payload)] = decoder.feed(chunk)
    chunk[4:8] = b"XXXX"
    assert (port, payload) == (7, b"abcd")
    assert type(payload) is bytes


@given(
    frames=st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.binary(min_size=1, max_size=MAX_PAYLOAD)),
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 70_000), max_size=12),
)
@settings(max_examples=150, deadline=None)
def test_any_chunking_decodes_the_same_frames(frames, cuts):
    stream = b"".join(encode(p, d) for p, d in frames)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = FrameDecoder()
    got: list[tuple[int, bytes]] = []
    for start, end in itertools.pairwise(bounds):
        got += decoder.feed(stream[start:end])
    assert got == frames
    assert decoder.buffered == 0


@pytest.mark.parametrize("length", [0, MAX_PAYLOAD + 1, 0xFFFF])
def test_a_bad_length_raises_frame_error_and_stays_failed(length):
    decoder = FrameDecoder()
    good = encode(40003, b"first")
    with pytest.raises(FrameError) as raised:
        decoder.feed(good + struct.pack(">HH", 40003, length) + b"rest")
    # The frames before the bad one are still there for the caller to deliver.
    assert raised.value.frames == [(40003, b"first")]
    with pytest.raises(FrameError):
        decoder.feed(encode(40003, b"later"))


def test_a_bad_header_split_across_chunks_still_raises():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x9c\x43\x00") == []
    with pytest.raises(FrameError):
        decoder.feed(b"\x00")


@given(st.binary(min_size=0, max_size=3000))
@settings(max_examples=200, deadline=None)
def test_random_bytes_give_frames_or_frame_error_nothing_else(data):
    decoder = FrameDecoder()
    try:
        frames = decoder.feed(data)
    except FrameError:
        return
    for _, payload in frames:
        assert 0 < len(payload) <= MAX_PAYLOAD


def test_reads_go_into_the_decoder_and_always_find_room_behind_a_partial_frame():
    decoder = FrameDecoder(room=100)
    # The worst partial frame: all but the last byte of the largest one.
    stream = encode(7, b"a" * 60) + encode(8, b"b" * MAX_PAYLOAD) + encode(9, b"c")
    got: list[tuple[int, bytes]] = []
    position = 0
    while position < len(stream):
        space = decoder.space()
        assert len(space) >= 100
        size = min(100, len(stream) - position)
        space[:size] = stream[position : position + size]
        position += size
        got += decoder.commit(size)
        assert decoder.buffered < 4 + MAX_PAYLOAD
    assert got == [(7, b"a" * 60), (8, b"b" * MAX_PAYLOAD), (9, b"c")]
    assert decoder.buffered == 0


def test_feeding_many_small_frames_is_linear():
    # 1.5 MB in 64 KiB chunks that cut frames anywhere: quadratic copying would take seconds.
    stream = b"".join(encode(40000, os.urandom(60)) for _ in range(25_000))
    decoder = FrameDecoder()
    started = time.perf_counter()
    count = 0
    for i in range(0, len(stream), 65_531):
        count += len(decoder.feed(stream[i : i + 65_531]))
    assert count == 25_000
    assert time.perf_counter() - started < 1.0


def test_looks_like_tls_and_stun():
    assert looks_like_tls(b"\x16\x03\x01\x02\x00")
    assert looks_like_tls(b"\x16\x03\x04")
    assert not looks_like_tls(b"\x16\x03\x05")
    assert not looks_like_tls(b"\x16\x03\x00")
    assert not looks_like_tls(b"\x16\x03")
    assert not looks_like_tls(b"GET / HTTP/1.1")
    assert could_be_tls(b"\x16") and could_be_tls(b"\x16\x03") and could_be_tls(b"")
    assert not could_be_tls(b"\x00") and not could_be_tls(b"\x16\x02")
    binding = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    assert looks_like_stun(binding)
    assert not looks_like_stun(b"\x40" + binding[1:])  # first two bits must be zero
    assert not looks_like_stun(binding[:7])
    assert not looks_like_stun(b"\x00\x01\x00\x00\x21\x12\xa4\x43")
    assert not looks_like_tls(binding)
    assert not looks_like_stun(b"\x16\x03\x01\x00\x21\x12\xa4\x42"[:5])


def test_fingerprint_and_its_normal_form():
    der = b"not really a certificate"
    digest = hashlib.sha256(der).hexdigest()
    assert fingerprint(der) == "sha256:" + digest
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(f"SHA256 Fingerprint={colons}") == fingerprint(der)
    assert normalize_fingerprint(f"sha256 Fingerprint={colons}\n") == fingerprint(der)
    assert normalize_fingerprint("SHA256:" + digest.upper()) == fingerprint(der)
    assert normalize_fingerprint(digest) == fingerprint(der)
    for bad in ("sha256:abc", "sha1:" + digest, digest + "00", "x" * 64):
        with pytest.raises(ValueError):
            normalize_fingerprint(bad)


# --- certificates -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    directory = tmp_path_factory.mktemp("certs")
    names = ("relay", "alpha", "beta", "stranger")
    client, server = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
    return {n: make_cert(directory, n, usages=[server if n == "relay" else client]) for n in names}


def test_site_fingerprints_maps_every_certificate_and_refuses_shared_ones(certs):
    both = certs["alpha"].pem + "\n" + certs["stranger"].pem  # a rotation: old and new
    assert site_fingerprints({"alpha": both, "beta": certs["beta"].pem.encode()}) == {
        certs["alpha"].pin: "alpha",
        certs["stranger"].pin: "alpha",
        certs["beta"].pin: "beta",
    }
    with pytest.raises(ValueError, match="same certificate"):
        site_fingerprints({"alpha": certs["alpha"].pem, "beta": certs["alpha"].pem})
    with pytest.raises(ValueError, match="no PEM"):
        site_fingerprints({"alpha": "garbage"})


# --- the relay's TLS service on loopback --------------------------------------------------------


@pytest.fixture
def relay_loop(certs: dict[str, Cert]) -> Iterator[Callable[..., RelayLoop]]:
    loops: list[RelayLoop] = []

    def start(**kwargs: Any) -> RelayLoop:
        kwargs.setdefault("sites", {"alpha": certs["alpha"], "beta": certs["beta"]})
        kwargs.setdefault("ports", {"alpha": {40000, 40002}, "beta": {40001}})
        loop = RelayLoop(certs["relay"], **kwargs)
        loops.append(loop)
        return loop

    yield start
    for loop in loops:
        loop.stop()


def tls_client(address: tuple[str, int], cert: Cert | None) -> ssl.SSLSocket:
    """A site's connection as the sidecar makes it (blocking, for the test thread)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(cert.certificate, cert.key)
    sock = socket.create_connection(address, timeout=DEADLINE)
    return context.wrap_socket(sock)


def read_frames(sock: ssl.SSLSocket, decoder: FrameDecoder, count: int) -> list[tuple[int, bytes]]:
    frames: list[tuple[int, bytes]] = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        frames += decoder.feed(data)
    return frames


def accepted(sock: ssl.SSLSocket) -> None:
    """Under TLS 1.3 the client finishes first: a keepalive's answer shows the relay agreed."""
    sock.sendall(KEEPALIVE)
    assert read_frames(sock, FrameDecoder(), 1) == [(KEEPALIVE_PORT, b"\x00")]


def try_send(sock: ssl.SSLSocket, data: bytes) -> None:
    """Send unless the relay already closed the connection (it may, before we write)."""
    with contextlib.suppress(ssl.SSLError, OSError):
        sock.sendall(data)


def closed_by_relay(sock: ssl.SSLSocket) -> bool:
    try:
        return sock.recv(1024) == b""
    except (ssl.SSLError, OSError):
        return True


def test_a_known_site_reaches_its_ports_and_gets_answers(relay_loop, certs):
    relay = relay_loop()
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)
        assert relay.call(lambda: relay.clients.connected).keys() == {"alpha"}
        alpha.sendall(encode(40000, b"one") + encode(40002, b"two"))
        wait_for(lambda: len(relay.datagrams) == 2)
        assert relay.datagrams == [("alpha", 40000, b"one"), ("alpha", 40002, b"two")]
        assert relay.call(lambda: relay.clients.send("alpha", 40002, b"back"))
        assert read_frames(alpha, FrameDecoder(), 1) == [(40002, b"back")]
    counters = relay.counters()
    assert counters["handshakes"] == 1
    assert counters["frames_in"] == 2


def test_a_site_cannot_use_another_sites_port(relay_loop, certs):
    relay = relay_loop()
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)
        alpha.sendall(encode(40001, b"beta's") + encode(40003, b"nobody's") + encode(40000, b"ok"))
        wait_for(lambda: relay.datagrams)
        accepted(alpha)  # still open: dropping is not closing
    assert relay.datagrams == [("alpha", 40000, b"ok")]
    assert relay.counters()["dropped_port_not_allowed"] == 2


def test_the_relay_refuses_a_certificate_it_does_not_know(relay_loop, certs):
    relay = relay_loop()
    with tls_client(relay.address, certs["stranger"]) as stranger:
        try_send(stranger, encode(40000, b"let me in"))
        assert closed_by_relay(stranger)
    wait_for(lambda: relay.counters()["closed_certificate_rejected"] == 1)
    assert relay.datagrams == []
    with tls_client(relay.address, None) as anonymous:
        assert closed_by_relay(anonymous)
    wait_for(lambda: relay.counters()["closed_no_certificate"] == 1)
    assert relay.call(lambda: relay.clients.connected) == {}


def test_a_certificate_signed_by_a_site_key_is_not_that_site(relay_loop, certs, tmp_path):
    # alpha's certificate is CA:TRUE, so OpenSSL accepts one it signed; the pin must not.
    alpha_key = serialization.load_pem_private_key(certs["alpha"].key.read_bytes(), None)
    alpha_cert = x509.load_pem_x509_certificate(certs["alpha"].pem.encode())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    child = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "child")]))
        .issuer_name(alpha_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(alpha_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert = save_cert(tmp_path, "child", child, key)
    relay = relay_loop()
    with tls_client(relay.address, cert) as impostor:
        try_send(impostor, encode(40000, b"as alpha"))
        assert closed_by_relay(impostor)
    wait_for(lambda: relay.counters()["closed_unknown_certificate"] == 1)
    assert relay.datagrams == []


def test_garbage_closes_that_connection_and_the_others_carry_on(relay_loop, certs):
    relay = relay_loop()
    with (
        tls_client(relay.address, certs["alpha"]) as alpha,
        tls_client(relay.address, certs["beta"]) as beta,
    ):
        accepted(alpha)
        accepted(beta)
        # A frame, then a header no frame can have, then random bytes.
        alpha.sendall(encode(40000, b"fine") + b"\x9c\x40\xff\xff" + os.urandom(3000))
        assert closed_by_relay(alpha)
        beta.sendall(encode(40001, b"still here"))
        wait_for(lambda: ("beta", 40001, b"still here") in relay.datagrams)
        assert relay.call(lambda: relay.clients.send("beta", 40001, b"and back"))
        assert read_frames(beta, FrameDecoder(), 1) == [(40001, b"and back")]
    assert ("alpha", 40000, b"fine") in relay.datagrams
    assert relay.counters()["closed_frame_error"] == 1


def test_random_bytes_that_look_like_tls_fail_the_handshake_only(relay_loop, certs):
    relay = relay_loop()
    rng = random.Random(7)
    for _ in range(5):
        with socket.create_connection(relay.address, timeout=DEADLINE) as raw:
            # One whole record of junk; then EOF, so OpenSSL never waits for a "rest".
            body = rng.randbytes(rng.randrange(1, 600))
            raw.sendall(b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body)
            raw.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                raw.recv(4096)  # the relay's alert, or nothing
    wait_for(lambda: relay.counters()["closed_handshake_failed"] == 5)
    with tls_client(relay.address, certs["beta"]) as beta:
        accepted(beta)


def test_a_stream_that_is_not_tls_goes_to_on_other(relay_loop, certs):
    handed: queue.SimpleQueue[tuple[socket.socket, bytes]] = queue.SimpleQueue()
    relay = relay_loop(on_other=lambda sock, first: handed.put((sock, first)))
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.create_connection(relay.address, timeout=DEADLINE) as raw:
        raw.sendall(request)
        sock, first = handed.get(timeout=DEADLINE)
        assert looks_like_stun(first)
        assert first == request  # consumed from the socket: the callee has the stream's start
        with sock:
            sock.setblocking(True)
            sock.sendall(b"answer")  # the callee owns a working socket
            assert raw.recv(16) == b"answer"
    counters = relay.counters()
    assert counters["handed_over"] == 1
    # The relay stays usable, and never registered the handed-over socket again.
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)


def test_without_on_other_a_non_tls_stream_is_closed(relay_loop):
    relay = relay_loop()
    with socket.create_connection(relay.address, timeout=DEADLINE) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert raw.recv(16) == b""
    assert relay.counters()["closed_not_tls"] == 1


def test_an_on_other_that_raises_costs_only_that_connection(relay_loop, certs):
    def broken(sock: socket.socket, first: bytes) -> None:
        raise RuntimeError("bug")

    relay = relay_loop(on_other=broken)
    with socket.create_connection(relay.address, timeout=DEADLINE) as raw:
        raw.sendall(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12))
        assert raw.recv(16) == b""
    assert relay.counters()["callback_errors"] == 1
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)


def test_a_reconnecting_site_gets_sent_to_on_its_newest_connection(relay_loop, certs):
    """Make-before-break: what the relay sends goes to the newest connection from the moment it
    is proven, while the older one still delivers what the site sent on it (in flight when the
    site switched) until the grace is over."""
    relay = relay_loop(supersede_grace=0.5)
    with tls_client(relay.address, certs["alpha"]) as old:
        accepted(old)
        with tls_client(relay.address, certs["alpha"]) as new:
            accepted(new)
            assert relay.call(lambda: relay.clients.connected) == {"alpha": new.getsockname()}
            assert relay.call(lambda: relay.clients.send("alpha", 40000, b"to the new one"))
            assert read_frames(new, FrameDecoder(), 1) == [(40000, b"to the new one")]
            old.sendall(encode(40000, b"late, on the old one"))
            wait_for(lambda: ("alpha", 40000, b"late, on the old one") in relay.datagrams)
            assert closed_by_relay(old)
            accepted(new)
    assert relay.counters()["closed_superseded"] == 1


def test_what_was_queued_on_a_superseded_connection_is_still_written(relay_loop, certs):
    relay = relay_loop(supersede_grace=0.5)
    payloads: list[bytes] = []

    def fill() -> int:
        """Queue frames to the site until its connection holds 128 KiB it could not write
        (the site does not read): what superseding must not throw away."""
        connection = relay.clients._by_site["alpha"]
        while len(connection.out) < 128 * 1024 and len(payloads) < 50_000:
            payloads.append(len(payloads).to_bytes(4, "big") + bytes(1400))
            assert relay.clients.send("alpha", 40000, payloads[-1])
        return len(connection.out)

    with tls_client(relay.address, certs["alpha"]) as old:
        accepted(old)
        assert relay.call(fill) >= 128 * 1024
        with tls_client(relay.address, certs["alpha"]) as new:
            accepted(new)
            assert read_frames(old, FrameDecoder(), len(payloads)) == [
                (40000, payload) for payload in payloads
            ]
            assert closed_by_relay(old)
    counters = relay.counters()
    assert counters["closed_superseded"] == 1
    assert counters["dropped_buffer_full"] == 0


def test_a_site_holds_at_most_one_superseded_connection(relay_loop, certs):
    relay = relay_loop(supersede_grace=60.0)
    with tls_client(relay.address, certs["alpha"]) as first:
        accepted(first)
        with tls_client(relay.address, certs["alpha"]) as second:
            accepted(second)
            with tls_client(relay.address, certs["alpha"]) as third:
                accepted(third)
                assert closed_by_relay(first)  # at once, not after the grace
                second.sendall(encode(40000, b"from the second"))
                wait_for(lambda: ("alpha", 40000, b"from the second") in relay.datagrams)
                assert relay.call(lambda: len(relay.clients._connections)) == 2
                assert relay.call(lambda: relay.clients.connected) == {"alpha": third.getsockname()}
    assert relay.counters()["closed_superseded"] == 1


def test_idle_and_silent_connections_are_closed(relay_loop, certs):
    relay = relay_loop(idle_timeout=0.3, handshake_timeout=0.3)
    with (
        socket.create_connection(relay.address, timeout=DEADLINE) as silent,
        tls_client(relay.address, certs["alpha"]) as idle,
    ):
        accepted(idle)
        assert silent.recv(16) == b""  # never sent a byte
        assert closed_by_relay(idle)
    counters = relay.counters()
    assert counters["closed_handshake_timeout"] == 1
    assert counters["closed_idle"] == 1


def test_a_full_write_buffer_drops_frames_without_blocking_or_reordering(relay_loop, certs):
    relay = relay_loop(max_buffer=64 * 1024)
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)

        def flood() -> int:
            sent = 0
            for number in range(8000):  # 16 MB: more than loopback's socket buffers hold
                payload = number.to_bytes(4, "big") + bytes(MAX_PAYLOAD - 4)
                sent += relay.clients.send("alpha", 40000, payload)
            return sent

        started = time.monotonic()
        sent = relay.call(flood)
        assert time.monotonic() - started < 3.0  # never waited for the reader
        assert 0 < sent < 8000
        assert relay.counters()["dropped_buffer_full"] == 8000 - sent
        frames = read_frames(alpha, FrameDecoder(), sent)
        numbers = [int.from_bytes(payload[:4], "big") for _, payload in frames]
        assert numbers == sorted(numbers) and len(set(numbers)) == sent
        assert numbers[0] == 0


@pytest.mark.parametrize("count", [40, 300])
def test_the_datagrams_of_one_wake_up_go_out_together_in_order(relay_loop, certs, count):
    """What RelayServer hands over in one wake-up goes out in few writes, none larger than
    WRITE_CHUNK (four TLS records), all of it and in order (300 full-size frames fit in the
    default buffer, so none may be dropped)."""
    relay = relay_loop()
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)
        sizes = relay.call(lambda: record_sends(relay.clients._by_site["alpha"].sock))
        payloads = [number.to_bytes(4, "big") + os.urandom(1448) for number in range(count)]
        assert relay.call(lambda: [relay.clients.send("alpha", 40000, p) for p in payloads])
        frames = read_frames(alpha, FrameDecoder(), count)
    assert frames == [(40000, payload) for payload in payloads]
    assert relay.counters()["dropped_buffer_full"] == 0
    assert sizes and max(sizes) <= WRITE_CHUNK
    total = count * (4 + 1452)
    # Repeated attempts (the socket was full) may add a few; one write per frame would be 40+.
    assert len(sizes) <= total // WRITE_CHUNK + 4 if count == 40 else len(sizes) < count // 4


def test_send_to_a_site_without_a_connection_is_dropped_and_counted(relay_loop):
    relay = relay_loop()
    assert not relay.call(lambda: relay.clients.send("beta", 40001, b"x"))
    assert not relay.call(lambda: relay.clients.send("nobody", 40001, b"x"))
    assert relay.counters()["dropped_no_connection"] == 2


def test_update_closes_removed_sites_and_applies_new_ports(relay_loop, certs):
    relay = relay_loop()
    with (
        tls_client(relay.address, certs["alpha"]) as alpha,
        tls_client(relay.address, certs["beta"]) as beta,
    ):
        accepted(alpha)
        accepted(beta)
        relay.call(lambda: relay.clients.update({"alpha": certs["alpha"].pem}, {"alpha": {40001}}))
        assert closed_by_relay(beta)
        alpha.sendall(encode(40000, b"old port") + encode(40001, b"new port"))
        wait_for(lambda: relay.datagrams)
        accepted(alpha)
    assert relay.datagrams == [("alpha", 40001, b"new port")]
    assert relay.counters()["closed_site_removed"] == 1
    with pytest.raises(ValueError):
        relay.call(lambda: relay.clients.update({"alpha": "no pem"}, {}))
    with pytest.raises(ValueError):
        relay.call(lambda: relay.clients.update({}, {"alpha": {0}}))
    # A refused update changed nothing: beta is still unknown, alpha still known.
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)


def test_an_on_datagram_that_raises_is_counted_not_fatal(relay_loop, certs):
    relay = relay_loop()

    def broken(site: str, port: int, payload: bytes) -> None:
        raise RuntimeError("bug")

    relay.call(lambda: setattr(relay.clients, "on_datagram", broken))
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)
        alpha.sendall(encode(40000, b"x") * 3)
        accepted(alpha)
    assert relay.counters()["callback_errors"] == 3


def test_many_connections_at_once(relay_loop, certs):
    relay = relay_loop(supersede_grace=0.1)
    clients = [tls_client(relay.address, certs["alpha" if i % 2 else "beta"]) for i in range(20)]
    try:
        for client in clients:
            client.sendall(KEEPALIVE)
        # Each site's last connection survives; the rest were superseded in turn.
        wait_for(lambda: relay.counters()["closed_superseded"] == 18)
        assert relay.call(lambda: sorted(relay.clients.connected)) == ["alpha", "beta"]
    finally:
        for client in clients:
            client.close()


# --- one source cannot starve the others ------------------------------------------------------


def connect_from(address: tuple[str, int], source: str) -> socket.socket:
    """A plain TCP connection from another loopback address (all of 127/8 is this host)."""
    return socket.create_connection(address, timeout=DEADLINE, source_address=(source, 0))


def test_one_source_holds_only_a_few_unproven_connections(relay_loop, certs):
    relay = relay_loop(max_unproven_per_source=4, max_connections=8)
    held = [connect_from(relay.address, "127.0.0.2") for _ in range(4)]
    refused = [connect_from(relay.address, "127.0.0.2") for _ in range(20)]
    try:
        for sock in refused:
            assert sock.recv(16) == b""  # closed at once, not queued behind the others
        # The held ones are still open, yet a site from another address gets in, twice over
        # (the connection table has room for 8, and the flooder may take only 4 of it).
        for _ in range(2):
            with tls_client(relay.address, certs["alpha"]) as alpha:
                accepted(alpha)
        counters = relay.counters()
        assert counters["rejected_source_limit"] == 20
        assert counters["handshakes"] == 2
        assert relay.call(lambda: len(relay.clients._unproven)) == 4
    finally:
        for sock in held + refused:
            sock.close()
    # Closing them gives their slots back.
    wait_for(lambda: relay.call(lambda: len(relay.clients._unproven)) == 0)


def test_a_proven_site_no_longer_counts_against_its_source(relay_loop, certs):
    relay = relay_loop(max_unproven_per_source=1)
    # Both sites behind one NAT (one source): each proves itself in turn.
    with tls_client(relay.address, certs["alpha"]) as alpha:
        accepted(alpha)
        with tls_client(relay.address, certs["beta"]) as beta:
            accepted(beta)
    assert relay.counters()["rejected_source_limit"] == 0


def test_a_trickle_of_bytes_does_not_extend_the_handshake_deadline(relay_loop, certs):
    relay = relay_loop(handshake_timeout=0.5)
    record_header = b"\x16\x03\x01\x02\x00"  # a ClientHello record of 512 bytes, never sent
    with connect_from(relay.address, "127.0.0.2") as slow:
        slow.sendall(record_header)
        # One byte every 50 ms: far more often than any idle timeout.
        closed_after = trickle_until_closed(slow, b"\x01", 0.05, give_up=2.0)
    assert closed_after is not None, "the trickling connection was never closed"
    assert closed_after < 0.5 + 1.5  # the deadline plus close_idle's one-second scan
    assert relay.counters()["closed_handshake_timeout"] == 1


def test_source_slots_count_per_source_and_in_all():
    slots = SourceSlots(per_source=2, total=3)
    assert slots.take("192.0.2.1") is None
    assert slots.take("192.0.2.1") is None
    assert slots.take("192.0.2.1") == "source"
    # One host's IPv6 /64 is one source, however many addresses it uses.
    assert slots.take("2001:db8::1") is None
    assert slots.take("2001:db8::2") == "total"
    slots.give("192.0.2.1")
    assert slots.take("2001:db8::ffff") is None
    assert slots.take("2001:db8::3") == "total"  # checked before the source's own limit
    assert slots.held("2001:db8::7") == 2 and len(slots) == 3
    for _ in range(5):  # more gives than takes cannot drive a count negative
        slots.give("2001:db8::9")
    assert slots.held("2001:db8::1") == 0 and len(slots) == 1
    assert slots.take("198.51.100.7") is None


# --- the relay service: a UDP-blocked site and a UDP site, one port each ------------------------


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def core_counters(server: RelayServer) -> Counter[str]:
    # Read from the test's thread while the loop runs: a copy, good enough to wait on.
    return server.core.counters if server.core is not None else Counter()


def test_the_relay_service_carries_a_tls_site_to_a_udp_site_and_back(
    certs: dict[str, Cert], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alpha (TLS, port P_alpha) and beta (UDP, port P_beta) bootstrap through RelayServer:
    alpha's frames carry its own port; what is sent to alpha comes back as frames on that port;
    a frame for beta's port is dropped."""
    key_alpha, key_beta = public_key(), public_key()
    tls_port = free_port(socket.SOCK_STREAM)
    port_alpha, port_beta = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    config = tmp_path / "relay.json"
    config.write_text(
        json.dumps(
            {
                "address": "127.0.0.1",
                "sites": [
                    {"name": "alpha", "port": port_alpha, "public_key": b64(key_alpha)},
                    {"name": "beta", "port": port_beta, "public_key": b64(key_beta)},
                ],
                "tls": {
                    "port": tls_port,
                    "listen": ["127.0.0.1"],
                    "sites": {"alpha": certs["alpha"].pem},
                    "certificate": str(certs["relay"].certificate),
                    "key": str(certs["relay"].key),
                },
            }
        )
    )
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # only the main thread may
    server = RelayServer(config, tmp_path / "state.json", log=lambda _message: None)
    thread = threading.Thread(target=server.serve_forever, name="relay", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.tls is not None and server.core is not None)
        with (
            tls_client(("127.0.0.1", tls_port), certs["alpha"]) as alpha,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as beta,
        ):
            beta.bind(("127.0.0.1", 0))
            beta.settimeout(DEADLINE)
            beta_address = beta.getsockname()
            accepted(alpha)
            decoder = FrameDecoder()
            # alpha's initiation reaches nobody yet (beta is unknown): remembered as its claim.
            alpha.sendall(encode(port_alpha, initiation(key_beta, 0xA0)))
            wait_for(lambda: core_counters(server)["dropped_no_destination"])
            # beta's initiation goes to alpha's claim: a frame on alpha's port.
            first = initiation(key_alpha, 0xB0)
            beta.sendto(first, ("127.0.0.1", port_beta))
            assert read_frames(alpha, decoder, 1) == [(port_alpha, first)]
            # alpha answers (beta proven): out of beta's port to beta.
            answer = response(key_beta, 0xA1, 0xB0)
            alpha.sendall(encode(port_alpha, answer))
            assert beta.recvfrom(2048) == (answer, ("127.0.0.1", port_beta))
            # beta's first data proves alpha; then data both ways.
            data = transport(0xA1, 0, 1404)  # a full-size packet: 1420 bytes
            beta.sendto(data, ("127.0.0.1", port_beta))
            assert read_frames(alpha, decoder, 1) == [(port_alpha, data)]
            back = transport(0xB0, 1)
            alpha.sendall(encode(port_alpha, back))
            assert beta.recvfrom(2048) == (back, ("127.0.0.1", port_beta))
            # alpha may not speak for beta's port.
            alpha.sendall(encode(port_beta, transport(0xB0, 2)))
            accepted(alpha)
            wait_for(lambda: server.tls and server.tls.counters["dropped_port_not_allowed"])
    finally:
        server._stop = True
        thread.join(timeout=5)
        assert not thread.is_alive()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["sites"]["alpha"]["confirmed"] == ["tls:alpha", port_alpha]
    assert state["sites"]["beta"]["confirmed"] == list(beta_address)
    counters = state["sites"]["alpha"]["counters"]
    assert (counters["forwarded"], counters["delivered"]) == (2, 2)
    assert counters["dropped_no_destination"] == 1
