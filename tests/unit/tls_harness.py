"""What the TLS relay's tests share: site and relay certificates, and the relay side in a loop.

Imported by ``test_relay_tcp.py`` (the relay's TLS service) and ``test_the sidecar`` as a plain
module: ``tests/unit`` has no ``__init__.py``, so pytest puts it on ``sys.path``.

:class:`RelayLoop` runs :class:`meshwright.relay.tls.TlsClients` in a ``selectors`` loop of its
own thread, standing in for RelayServer, on 127.0.0.1 only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshwright.relay.tls import TlsClients
from meshwright.wire.frames import fingerprint

HOST = "127.0.0.1"
DEADLINE = 5.0


def wait_for(condition: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def record_sends(sock: socket.socket) -> list[int]:
    """From now on, note the size of every write on ``sock`` (an ``ssl.SSLSocket``, which has
    an instance dict), attempts that must be repeated included."""
    sizes: list[int] = []
    send = sock.send

    def recorded(data: Any, flags: int = 0) -> int:
        sizes.append(len(data))
        return send(data, flags)

    sock.send = recorded  # type: ignore[method-assign]
    return sizes


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    pem: str
    certificate: Path
    key: Path
    pin: str


def trickle_until_closed(
    sock: socket.socket, byte: bytes, interval: float, give_up: float
) -> float | None:
    """Send ``byte`` every ``interval`` seconds until the server closes ``sock``: how many
    seconds that took, or None when it was still open after ``give_up`` seconds."""
    started = time.monotonic()
    sock.settimeout(interval)
    while time.monotonic() - started < give_up:
        try:
            sock.sendall(byte)
            if sock.recv(16) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def save_cert(
    directory: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Cert:
    """Write ``<name>.crt`` and ``<name>.key`` (PEM) to ``directory``."""
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    return Cert(pem.decode(), cert_path, key_path, fingerprint(der))


def make_cert(
    directory: Path,
    name: str,
    *,
    usages: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    key_usage: bool = True,
) -> Cert:
    """A self-signed EC P-256 certificate, CA:TRUE, shaped as the relay's TLS service documents
    for sites: ``usages`` as its extendedKeyUsage and, with ``key_usage``, a keyUsage of
    digitalSignature and keyCertSign."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshwright {name}")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    certificate = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False).sign(
        key, hashes.SHA256()
    )
    return save_cert(directory, name, certificate, key)


# --- the relay side ---------------------------------------------------------------------------


class RelayLoop:
    """TlsClients in a selectors loop of its own thread, standing in for RelayServer.

    Each allocation port also has a UDP socket for "the other side": frames from a site are
    sent from it to ``forward_to``, and datagrams that arrive on it go back to the port's site
    over TLS, the way RelayServer forwards between an allocation's two ports.
    """

    def __init__(
        self,
        relay: Cert,
        sites: dict[str, Cert],
        ports: dict[str, set[int]],
        on_other: Callable[[socket.socket, bytes], None] | None = None,
        **options: Any,
    ) -> None:
        self.selector = selectors.DefaultSelector()
        self.datagrams: list[tuple[str, int, bytes]] = []
        self.log: list[str] = []
        self.forward_to: tuple[str, int] | None = None
        self.owner = {port: site for site, site_ports in ports.items() for port in site_ports}
        self.clients = TlsClients(
            relay.certificate,
            relay.key,
            {name: cert.pem for name, cert in sites.items()},
            ports,
            self._on_datagram,
            on_other,
            log=self.log.append,
            **options,
        )
        self.clients.register(self.selector)
        self.listener = self.clients.listen(HOST, 0)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.udp: dict[int, socket.socket] = {}
        for port in self.owner:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((HOST, 0))
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, ("udp", port))
            self.udp[port] = sock
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self.selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_datagram(self, site: str, port: int, payload: bytes) -> None:
        self.datagrams.append((site, port, payload))
        if self.forward_to is not None:
            self.udp[port].sendto(payload, self.forward_to)

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self.selector.select(0.05):
                if self.clients.owns(key):
                    self.clients.handle(key, mask)
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_read.recv(4096)
                    while not self._calls.empty():
                        function, future = self._calls.get()
                        try:
                            future.set_result(function())
                        except Exception as exc:
                            future.set_exception(exc)
                else:
                    port = key.data[1]
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            data, _ = self.udp[port].recvfrom(65535)
                            self.clients.send(self.owner[port], port, data)
            self.clients.close_idle()
        self.clients.close()

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` in the loop's thread (TlsClients is not thread-safe)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((function, future))
        self._wake_write.send(b"\0")
        return future.result(DEADLINE)

    def counters(self) -> Counter[str]:
        return self.call(lambda: Counter(self.clients.counters))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the loop (in a call of its own) until the block ends: what arrives meanwhile
        waits in the sockets. Do not :meth:`call` in the block."""
        release, holding = threading.Event(), threading.Event()

        def hold() -> None:
            holding.set()
            release.wait(DEADLINE)

        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((hold, future))
        self._wake_write.send(b"\0")
        assert holding.wait(DEADLINE)
        try:
            yield
        finally:
            release.set()
            future.result(DEADLINE)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        for sock in (*self.udp.values(), self._wake_read, self._wake_write):
            sock.close()
        self.selector.close()
