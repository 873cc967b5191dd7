"""Standard STUN clients against the relays' STUN service (issue 12, "Standard clients").

The STUN service is a public service, so these are third-party clients people actually run:
from Debian, coturn's ``turnutils_stunclient`` and ``turnutils_natdiscovery`` and stund's
``stun`` (package stun-client); from PyPI, ``pystun3`` and ``aiostun`` (the one that speaks
STUN over TCP). Each runs against a :class:`StunServer` on loopback only: 127.0.0.1, plus
127.0.0.2 as the second address RFC 5780 needs. None of the Debian clients speaks TCP, so TCP
is aiostun's. A missing client fails its test, naming what installs it (``make deb`` for
Debian's, ``make venv`` for PyPI's); every client run is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshwright.relay.stun_server import StunServer

Address = tuple[str, int]
PRIMARY, SECONDARY = "127.0.0.1", "127.0.0.2"
# Some clients wait forever for an answer that does not come (turnutils_stunclient in
# Debian 12, pystun3 retrying an error): that must fail the test, not hang it.
CLIENT_TIMEOUT = 30.0
IPV4 = r"(\d+\.\d+\.\d+\.\d+):(\d+)"


@dataclass
class Service:
    """A running StunServer and every source address it saw a request from."""

    server: StunServer
    tcp_port: int
    sources: list[Address] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.responder.port

    @property
    def alt(self) -> int:
        return self.server.responder.alt_port

    @property
    def two_addresses(self) -> bool:
        return len(self.server.responder.addresses) == 2


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((PRIMARY, 0))
        return int(probe.getsockname()[1])


def _start(addresses: Sequence[str]) -> Service:
    # Ports free on 127.0.0.1 may be taken on 127.0.0.2 (or by a racing test): retry.
    last_error: OSError | None = None
    for _ in range(20):
        port, alt = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_DGRAM)
        tcp_port = _free_port(socket.SOCK_STREAM)
        if port == alt:
            continue
        try:
            # A generous rate limit: pystun3 retries an error answer as fast as it comes.
            server = StunServer(
                list(addresses),
                port,
                alt,
                rate=1000.0,
                burst=1000,
                log_interval=0,
                tcp_port=tcp_port,
            )
        except OSError as error:
            last_error = error
        else:
            return Service(server, tcp_port)
    raise AssertionError(f"no free loopback ports: {last_error}")


@contextmanager
def _serving(addresses: Sequence[str]) -> Iterator[Service]:
    running = _start(addresses)
    server = running.server
    handle = server.responder.handle

    def recording(
        data: bytes, source: Address, local: Address, *, stream: Address | None = None
    ) -> Any:
        # Where each request really came from, to check the mapped address a client prints.
        running.sources.append(source)
        return handle(data, source, local, stream=stream)

    server.responder.handle = recording  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, name="stun-server", daemon=True)
    thread.start()
    try:
        yield running
    finally:
        server.stop()
        thread.join(timeout=5)
        alive = thread.is_alive()
        server.close()
        assert not alive, "server thread did not stop"
    assert server.stats["internal_errors"] == 0


@pytest.fixture(params=[(PRIMARY,), (PRIMARY, SECONDARY)], ids=["one-address", "two-addresses"])
def service(request: pytest.FixtureRequest) -> Iterator[Service]:
    with _serving(request.param) as running:
        yield running


@pytest.fixture
def two_addresses() -> Iterator[Service]:
    with _serving((PRIMARY, SECONDARY)) as running:
        yield running


def _command(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with Debian's {package} (make deb)")
    return path


def _pypi_command(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} is not installed: it is pinned in requirements.lock (make venv)")
    return str(path)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(
            f"{' '.join(argv)} did not finish in {CLIENT_TIMEOUT:.0f} s; "
            f"stdout: {expired.stdout!r}; stderr: {expired.stderr!r}"
        )


def _addresses(pattern: str, text: str) -> list[Address]:
    return [(ip, int(port)) for ip, port in re.findall(pattern + IPV4, text)]


def _report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# --- coturn ---------------------------------------------------------------------------------


def test_turnutils_stunclient(service: Service) -> None:
    """turnutils_stunclient sends a plain request; when the answer has OTHER-ADDRESS (or with
    -f) then one with RESPONSE-PORT (its port + 1, the only socket it then reads) and
    change-IP-and-port, then one with PADDING. Against one address it used to wait forever for
    the 420 that went to the port it had closed."""
    command = _command("turnutils_stunclient", "coturn")
    two = service.two_addresses
    # -f: RFC 5780 tests even without OTHER-ADDRESS, which is how it met the 420 before.
    forced = [] if two else ["-f"]
    result = _run([command, *forced, "-L", PRIMARY, "-p", str(service.port), PRIMARY])
    report = _report(result)
    assert result.returncode == 0, report

    reflexive = set(_addresses(r"UDP reflexive addr: ", result.stdout))
    assert len(reflexive) == 1, report
    (mapped,) = reflexive
    assert mapped[0] == PRIMARY and mapped in service.sources, report
    origins = _addresses(r"Response origin: : ", result.stdout)
    if two:
        assert set(_addresses(r"Other addr: : ", result.stdout)) == {(SECONDARY, service.alt)}
        # The second answer came from the alternate address and port, to its RESPONSE-PORT.
        assert origins[0] == (PRIMARY, service.port), report
        assert origins[-1] == (SECONDARY, service.alt), report
        # The third request's PADDING is not implemented (RFC 5780 makes it optional).
        assert result.stdout.count("The response is an error 420 (Unknown Attribute)") == 1
    else:
        assert "Other addr" not in result.stdout and not origins, report
        # Both RFC 5780 requests ask for a change one address cannot make: 420, and the first
        # one reached the client at its RESPONSE-PORT.
        assert result.stdout.count("The response is an error 420 (Unknown Attribute)") == 2


@pytest.mark.parametrize(
    ("arguments", "verdict"),
    [
        (["-m"], "NAT with Endpoint Independent Mapping!"),
        (["-f"], "NAT with Endpoint Independent Filtering!"),
        (["-H"], "Received a request (maybe a successful hairpinning)"),
        # Binding lifetime (RFC 5780 4.6): a second socket asks, with RESPONSE-PORT, for the
        # answer at the first one, which alone is read.
        (["-t", "-T", "1"], "RFC 5780 response 2"),
    ],
    ids=["mapping", "filtering", "hairpinning", "lifetime"],
)
def test_turnutils_natdiscovery(service: Service, arguments: list[str], verdict: str) -> None:
    command = _command("turnutils_natdiscovery", "coturn")
    two = service.two_addresses
    argv = [command, *arguments, "-L", PRIMARY, "-p", str(service.port), PRIMARY]
    result = _run(argv)
    report = _report(result)
    assert result.returncode == 0, report

    reflexive = _addresses(r"UDP reflexive addr: ", result.stdout)
    local = _addresses(r"Local addr: : ", result.stdout)
    # Loopback has no NAT: every mapped address is the socket it was sent from (it prints
    # some of them twice).
    assert reflexive and set(reflexive) == set(local), report
    assert {address[0] for address in reflexive} == {PRIMARY}, report
    assert set(reflexive) <= set(service.sources), report
    if arguments[0] == "-t":
        # Two sockets, two mappings; the answer to the second reached the first.
        assert len(set(reflexive)) == 2, report
    if two:
        assert verdict in result.stdout, report
    else:
        # Without OTHER-ADDRESS it gives no verdict; the lifetime test needs only RESPONSE-PORT
        # and so runs on one address too (its two mappings above).
        assert "Other addr" not in result.stdout and "NAT with" not in result.stdout, report


# --- stund's client (stun-client) -----------------------------------------------------------


def test_stund_client(service: Service) -> None:
    """stund's stun is an RFC 3489 client: no magic cookie, and CHANGE-REQUEST (no flag set
    for its test I) in every request. It used to get nothing back and report "Blocked"."""
    command = _command("stun", "stun-client")
    result = _run([command, f"{PRIMARY}:{service.port}", "-v", "-i", PRIMARY])
    report = _report(result)
    value = re.search(r"Return value is (0x[0-9a-f]+)", result.stdout)
    assert value is not None, report
    # Its exit status is the NAT type it found (0xff for an error).
    assert result.returncode == int(value.group(1), 16), report

    opened = [int(port) for port in re.findall(r"Opened port (\d+) with fd", result.stderr)]
    answers: dict[int, list[str]] = {}
    for block in result.stderr.split("Received stun message:")[1:]:
        test = re.search(r"Received message of type \d+\s+id=(\d+)", block)
        if test is not None:
            answers.setdefault(int(test.group(1)), []).append(block)
    # Test I is sent from its first socket, and the answer names that socket.
    (first, *_) = answers[1]
    assert _addresses(r"MappedAddress = ", first) == [(PRIMARY, opened[0])], report
    assert (PRIMARY, opened[0]) in service.sources
    assert _addresses(r"SourceAddress = ", first) == [(PRIMARY, service.port)], report
    assert service.server.stats["classic"] > 0
    if service.two_addresses:
        assert _addresses(r"ChangedAddress = ", first) == [(SECONDARY, service.alt)], report
        # Loopback: open, port preserved (0x01), hairpin works (0x10 clear).
        assert "Primary: Open" in result.stdout and result.returncode == 0x01, report
    else:
        assert "ChangedAddress" not in first, report
        # Its change tests get 420. It takes any answer for a pass, so its verdict against one
        # address means nothing (docs/relays.md); the mapped address above is right.
        assert "ErrorCode = 4 20 Unknown Attribute" in result.stderr, report


# --- pystun3 --------------------------------------------------------------------------------


def test_pystun3_command(two_addresses: Service) -> None:
    """pystun3's command runs RFC 3489 tests I and II. Against one address it cannot finish,
    whatever the server does: it retries an error answer forever, and without an answer it
    sends test I to CHANGED-ADDRESS, which it then lacks (test_pystun3_test_i covers one)."""
    service = two_addresses
    command = _pypi_command("pystun3")
    source = _free_port(socket.SOCK_DGRAM)
    argv = [command, "-H", PRIMARY, "-P", str(service.port), "-i", PRIMARY, "-p", str(source)]
    result = _run(argv)
    report = _report(result)
    assert result.returncode == 0, report
    # Its test II (change IP and port) came back, so it reports no NAT and no firewall.
    assert "NAT Type: Open Internet" in result.stdout, report
    assert f"External IP: {PRIMARY}\n" in result.stdout, report
    assert f"External Port: {source}\n" in result.stdout, report


PYSTUN3_TEST_I = """
import json, socket, sys
import stun
stun._initialize()
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(2)
    sock.bind((sys.argv[1], 0))
    source = sock.getsockname()
    answer = stun.stun_test(sock, sys.argv[1], int(sys.argv[2]), *source)
print(json.dumps({"source": source, "answer": answer}))
"""


def test_pystun3_test_i(service: Service) -> None:
    """pystun3's stun_test(): the RFC 3489 test I, run in a child so a hang is bounded."""
    _pypi_command("pystun3")
    result = _run([sys.executable, "-c", PYSTUN3_TEST_I, PRIMARY, str(service.port)])
    report = _report(result)
    assert result.returncode == 0, report
    printed = json.loads(result.stdout)
    source, answer = tuple(printed["source"]), printed["answer"]
    assert answer["Resp"] is True, report
    assert (answer["ExternalIP"], answer["ExternalPort"]) == source, report
    assert source in service.sources
    assert (answer["SourceIP"], answer["SourcePort"]) == (PRIMARY, service.port), report
    changed = (answer["ChangedIP"], answer["ChangedPort"])
    assert changed == ((SECONDARY, service.alt) if service.two_addresses else (None, None))


# --- aiostun: STUN over TCP, and classic STUN over UDP ----------------------------------------


def _aiostun() -> Any:
    try:
        import aiostun  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail("aiostun is not installed: it is pinned in requirements.lock (make venv)")
    return aiostun


async def _aiostun_exchanges(aiostun: Any, service: Service) -> list[tuple[Any, Any]]:
    """(local address, response) for: over TCP a plain request, CHANGE-REQUEST with no flag
    and with change-port; over UDP an RFC 3489 request."""
    from aiostun.attribute import AttrChangeRequest  # type: ignore[import-untyped]

    results = []
    for attributes in ([], [AttrChangeRequest()], [AttrChangeRequest(changePort=True)]):
        async with aiostun.Client(PRIMARY, service.tcp_port, proto=aiostun.TCP) as client:
            local = client.get_local_addr()
            results.append((local, await client.bind_request(attrs=attributes)))
    async with aiostun.Client(PRIMARY, service.port, proto=aiostun.UDP) as client:
        local = client.get_local_addr()
        results.append((local, await client.bind_request(use_classicstun=True)))
    return results


def test_aiostun(service: Service) -> None:
    aiostun = _aiostun()
    from aiostun import constants
    from aiostun.attribute import AttrErrorCode, AttrMappedAddr, AttrXorMappedAddr

    exchanges = asyncio.run(asyncio.wait_for(_aiostun_exchanges(aiostun, service), CLIENT_TIMEOUT))
    (plain, no_change, change, classic) = exchanges
    for local, response in (plain, no_change):
        # Over TCP too, a CHANGE-REQUEST asking for no change is served.
        assert response is not None and response.msgclass == constants.CLASS_SUCCESS
        mapped = response.get_attribute(AttrXorMappedAddr).params
        assert (mapped["ip"], mapped["port"]) == local
        assert local in service.sources
    local, response = change
    # A connection has one source: a change cannot be made, with one address or two.
    assert response is not None and response.msgclass == constants.CLASS_ERROR
    assert response.get_attribute(AttrErrorCode).params["code"] == 420
    local, response = classic
    assert response is not None and response.msgclass == constants.CLASS_SUCCESS
    assert response.get_attribute(AttrXorMappedAddr) is None
    mapped = response.get_attribute(AttrMappedAddr).params
    assert (mapped["ip"], mapped["port"]) == local
    assert service.server.stats["classic"] == 1
