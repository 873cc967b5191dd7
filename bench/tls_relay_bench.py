"""Benchmark of the TLS relay path on loopback: a real relay and a real sidecar, no lab.

    nice -n 19 .venv/bin/python bench/tls_relay_bench.py
    nice -n 19 .venv/bin/python bench/tls_relay_bench.py --before /tmp/mw-before/src
    .venv/bin/python bench/tls_relay_bench.py --rounds 3 --seconds 3 --window 256 --no-profile

Run from anywhere. Two child processes run the real entry points, ``meshwright relay``
(:func:`meshwright.relay.server.main`) and ``meshwright sidecar``
(:func:`meshwright.site.sidecar.main`), serving a UDP-blocked site ``blk`` (over TLS, through
the sidecar) and a site ``other`` (plain UDP), each with its relay port. The relay's state file
(the format in :mod:`meshwright.relay.server`) already holds both sites' confirmed addresses and
one session each way, so WireGuard transport datagrams (type 4, the receiver index of that
direction's session, random bytes after it) are forwarded at once, with no handshake. This
process plays both sites' WireGuard:

- to relay: "WireGuard" (127.0.0.1) -> sidecar -> TLS -> relay -> UDP -> "other" (::1);
- from relay: "other" -> relay -> TLS -> sidecar -> "WireGuard";
- plain UDP: two sockets on 127.0.0.1, straight to each other: the ceiling of this process's
  own sending and receiving, measured in the same run because the machine is noisy.

Each run keeps at most ``--window`` datagrams in flight (like a TCP window; a window lost to a
full buffer is opened again after 0.2 s and counted) for ``--seconds`` or ``--count``
datagrams, full-size (1452 bytes: WireGuard's packet for a 1420 MTU) and small (96 bytes: a
TCP ACK's). The relay's and the sidecar's CPU time per datagram (/proc/<pid>/stat) is the
figure that noise moves least; "core-bound" is what the busier of the two would carry with a
core of its own (here the two children and this process share the machine's cores).

With ``--before DIR`` the same runs also go through the code in ``DIR``, another ``src``
directory (for example an older commit's: ``mkdir -p /tmp/mw-before && git archive 718acaa src
| tar -x -C /tmp/mw-before``, then ``--before /tmp/mw-before/src``), interleaved round by round;
the table shows medians. Each tree gets the configuration and state files it reads: a tree with
``meshwright/relay/sites.py`` the per-site ones (``sites`` with one port each, the sidecar's
``site_port`` and ``local_port``, the state's ``sites`` and ``sessions``), an older one the
per-pair ones (one ``allocations`` entry, the sidecar's ``peers``, the state's
``allocations`` with ``confirmed``). Then, unless ``--no-profile``, one more run per direction
with both children under cProfile (CPU time) says where their time goes: the share of ssl reads
and writes, UDP and select() calls, and our own Python (cProfile's own overhead inflates the
Python share), and the top functions by cumulative time.

Every address is loopback (127.0.0.1 and ::1; the relay's site ports use ::1 because the older
sidecar binds the same port numbers on 127.0.0.1). Not a test: the figures depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import json
import os
import pstats
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from report import table  # bench/report.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests" / "unit"  # tls_harness: the tests' certificates, shaped for sites

HOST, HOST6 = "127.0.0.1", "::1"
FULL, SMALL = 1452, 96
TICK = os.sysconf("SC_CLK_TCK")
STARTUP = 10.0
LIMITS = {"packets_per_second": 1e9, "bytes_per_second": 1e12}
# The receiver index of each direction's transport datagrams: a session the per-site relay's
# state file holds (the older relay forwards by port, whatever the index).
INDEX = {"to relay": 0x1234_5678, "from relay": 0x0BAD_CAFE}

# pstats names of the C calls that are not our Python.
_CATEGORIES = {
    "ssl write": ("<method 'write' of '_ssl._SSLSocket' objects>",),
    "ssl read": ("<method 'read' of '_ssl._SSLSocket' objects>",),
    "udp receive": (
        "<method 'recvfrom' of '_socket.socket' objects>",
        "<method 'recvfrom_into' of '_socket.socket' objects>",
    ),
    "udp send": ("<method 'sendto' of '_socket.socket' objects>",),
    "select": ("<method 'poll' of 'select.epoll' objects>",),
}
_OURS = "our Python and the rest"


# --- the child processes ----------------------------------------------------------------------


def serve(role: str, config: Path, state: Path, profile: Path | None) -> int:
    """Run the relay or the sidecar until SIGTERM, under cProfile when ``profile`` is given."""
    import meshwright

    print(f"meshwright from {Path(meshwright.__file__).parent}", file=sys.stderr, flush=True)
    main: Callable[[list[str]], int]
    if role == "relay":
        from meshwright.relay.server import main as relay_main

        main, argv = relay_main, ["--config", str(config), "--state", str(state)]
    else:
        from meshwright.site.sidecar import main as sidecar_main

        main, argv = sidecar_main, ["--config", str(config)]
    if profile is None:
        return main(argv)
    # CPU time, not wall time: a loop that waits in select() costs nothing.
    profiler = cProfile.Profile(time.process_time)
    try:
        return int(profiler.runcall(main, argv))
    finally:
        profiler.dump_stats(profile)


# --- the pipeline -----------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct UDP ports free on both 127.0.0.1 (the sidecar's) and ::1 (the
    relay's)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as four:
            four.bind((HOST, 0))
            port: int = four.getsockname()[1]
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as six:
                try:
                    six.bind((HOST6, port))
                except OSError:
                    continue
        if port not in ports:
            ports.append(port)
    return ports


def udp(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def transport(size: int, index: int) -> bytes:
    """A WireGuard transport datagram's shape: type 4, receiver ``index``, counter (random, as
    the ciphertext: the relay reads neither)."""
    return b"\x04\x00\x00\x00" + index.to_bytes(4, "little") + os.urandom(size - 8)


@dataclass
class Pipeline:
    """A relay and a sidecar running ``tree``'s code, and this process's two sites."""

    tree: Path
    work: Path
    wireguard: socket.socket  # the UDP-blocked site's WireGuard, 127.0.0.1
    other: socket.socket  # the other site, ::1
    to_sidecar: tuple[str, int]  # where WireGuard sends: the sidecar's peer socket
    to_relay: tuple[str, int]  # where the other site sends: its allocation port
    processes: dict[str, subprocess.Popen[bytes]]

    def cpu(self) -> dict[str, float]:
        """Each child's CPU seconds so far."""
        seconds = {}
        for role, process in self.processes.items():
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds[role] = (int(fields[11]) + int(fields[12])) / TICK
        return seconds


def per_site(tree: Path) -> bool:
    """Whether ``tree`` has the per-site relay (one port per site, sessions by index) or the
    older one (a port pair per allocation): each gets the configuration and state it reads."""
    return (tree / "meshwright" / "relay" / "sites.py").exists()


@dataclass(frozen=True)
class Ends:
    """What the two children are configured with, in either format."""

    tls_port: int
    relay_pin: str
    relay_certificate: tuple[Path, Path]  # certificate, key
    site_certificate: tuple[Path, Path]
    site_pem: str
    keys: tuple[str, str]  # blk's and other's public keys
    wireguard: tuple[str, int]  # the UDP-blocked site's WireGuard, 127.0.0.1
    other: tuple[str, int]  # the other site, ::1


def tls_section(ends: Ends) -> dict[str, object]:
    """The relay's ``tls``, the same in either format: blk's pinned certificate."""
    return {
        "port": ends.tls_port,
        "listen": [HOST],
        "sites": {"blk": ends.site_pem},
        "certificate": str(ends.relay_certificate[0]),
        "key": str(ends.relay_certificate[1]),
    }


def per_site_files(ends: Ends, ports: list[int]) -> tuple[dict[str, object], tuple[int, int]]:
    """The per-site relay's and sidecar's files (``ports``: blk's and other's site ports, the
    sidecar's local port): each site has one relay port, and the state file already holds both
    sites' confirmed addresses and the two sessions whose indices the bench's datagrams carry.
    Returns the files and (the sidecar's local port, other's relay port)."""
    blk_port, other_port, local_port = ports
    sites = [
        {"name": "blk", "port": blk_port, "public_key": ends.keys[0]},
        {"name": "other", "port": other_port, "public_key": ends.keys[1]},
    ]
    confirmed = {"blk": ["tls:blk", blk_port], "other": list(ends.other)}
    files: dict[str, object] = {
        "relay.json": {
            "address": HOST6,
            "sites": sites,
            "limits": LIMITS,
            "tls": tls_section(ends),
        },
        # As the relay writes it (server.py, "State file"); a session is (owner, peer, the
        # index the peer sends to the owner).
        "state.json": {
            "address": HOST6,
            "sites": {
                site["name"]: {
                    "port": site["port"],
                    "public_key": site["public_key"],
                    "confirmed": confirmed[str(site["name"])],
                }
                for site in sites
            },
            "sessions": [
                ["other", "blk", INDEX["to relay"]],
                ["blk", "other", INDEX["from relay"]],
            ],
        },
        "sidecar.json": {
            "relays": {
                "relay1": {
                    "address": HOST,
                    "port": ends.tls_port,
                    "fingerprint": ends.relay_pin,
                    "site_port": blk_port,
                    "local_port": local_port,
                }
            },
            "certificate": str(ends.site_certificate[0]),
            "key": str(ends.site_certificate[1]),
            "wireguard_port": ends.wireguard[1],
        },
    }
    return files, (local_port, other_port)


def per_pair_files(ends: Ends, ports: list[int]) -> tuple[dict[str, object], tuple[int, int]]:
    """The older relay's and sidecar's files: one allocation (a port pair) between blk and
    other, both ends confirmed in the state file; the sidecar's socket for its peer takes
    blk's allocation port on 127.0.0.1. Returns the files and (that port, other's port)."""
    spec = [HOST6, ports[:2], list(ends.keys)]
    files: dict[str, object] = {
        "relay.json": {
            "allocations": [
                {
                    "a": "blk",
                    "b": "other",
                    "address": HOST6,
                    "ports": ports[:2],
                    "public_keys": list(ends.keys),
                }
            ],
            "limits": LIMITS,
            "tls": tls_section(ends),
        },
        "state.json": {
            "allocations": {
                "blk--other": {
                    "spec": spec,
                    "confirmed": [["tls:blk", ports[0]], list(ends.other)],
                }
            }
        },
        "sidecar.json": {
            "relays": {
                "relay1": {"address": HOST, "port": ends.tls_port, "fingerprint": ends.relay_pin}
            },
            "peers": [{"name": "other", "relay": "relay1", "port": ports[0]}],
            "certificate": str(ends.site_certificate[0]),
            "key": str(ends.site_certificate[1]),
            "wireguard_port": ends.wireguard[1],
        },
    }
    return files, (ports[0], ports[1])


@contextlib.contextmanager
def pipeline(tree: Path, work: Path, profile: bool = False) -> Iterator[Pipeline]:
    # Imported here, not by the children (they import only the tree they run).
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from tls_harness import make_cert

    usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    relay_cert = make_cert(work, "relay", usages=usages, key_usage=False)
    site_cert = make_cert(work, "blk", usages=usages, key_usage=False)
    wireguard = udp(socket.AF_INET, HOST)
    other = udp(socket.AF_INET6, HOST6)
    ports = free_ports(3)
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        tls_port = probe.getsockname()[1]
    ends = Ends(
        tls_port,
        relay_cert.pin,
        (relay_cert.certificate, relay_cert.key),
        (site_cert.certificate, site_cert.key),
        site_cert.pem,
        (base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(32)).decode()),
        wireguard.getsockname()[:2],
        other.getsockname()[:2],
    )
    files, (sidecar_port, relay_port) = (per_site_files if per_site(tree) else per_pair_files)(
        ends, ports
    )
    for name, content in files.items():
        (work / name).write_text(json.dumps(content))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for role, config in (("relay", "relay.json"), ("sidecar", "sidecar.json")):
            command = [sys.executable, __file__, "--serve", role, "--config", str(work / config)]
            command += ["--state", str(work / "state.json")]
            if profile:
                command += ["--profile-to", str(work / f"{role}.prof")]
            with (work / f"{role}.log").open("wb") as log:
                processes[role] = subprocess.Popen(command, env=env, stderr=log)
        running = Pipeline(
            tree, work, wireguard, other, (HOST, sidecar_port), (HOST6, relay_port), processes
        )
        wait_until_carried(running)
        yield running
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        wireguard.close()
        other.close()


def wait_until_carried(running: Pipeline) -> None:
    """Until a datagram goes both ways (the sidecar drops them until it is connected), and
    each child runs the tree asked for."""
    deadline = time.monotonic() + STARTUP
    for sender, destination, receiver, index in (
        (running.wireguard, running.to_sidecar, running.other, INDEX["to relay"]),
        (running.other, running.to_relay, running.wireguard, INDEX["from relay"]),
    ):
        datagram = transport(64, index)
        while True:
            if time.monotonic() > deadline:
                logs = {
                    r: (running.work / f"{r}.log").read_text()[-800:] for r in running.processes
                }
                raise RuntimeError(f"the TLS path does not carry datagrams: {logs}")
            sender.sendto(datagram, destination)
            if select.select([receiver], [], [], 0.05)[0]:
                receiver.recv(65535)
                break
    time.sleep(0.1)
    drain(running.wireguard)
    drain(running.other)
    for role in running.processes:
        log = (running.work / f"{role}.log").read_text()
        if f"meshwright from {running.tree / 'meshwright'}" not in log:
            raise RuntimeError(f"the {role} does not run {running.tree}: {log[:300]}")


def drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.recv(65535)


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Result:
    datagrams: int
    seconds: float
    lost: int
    size: int
    cpu: dict[str, float]  # child -> CPU seconds during the run

    @property
    def rate(self) -> float:
        return self.datagrams / self.seconds

    @property
    def mbits(self) -> float:
        return self.rate * self.size * 8 / 1e6

    def cpu_per_datagram(self, role: str) -> float:
        """Microseconds of ``role``'s CPU per datagram carried."""
        return self.cpu[role] / max(self.datagrams, 1) * 1e6


def pump(
    sender: socket.socket,
    destination: tuple[str, int],
    receiver: socket.socket,
    datagram: bytes,
    seconds: float,
    count: int,
    window: int,
) -> tuple[int, float, int]:
    """Send ``datagram`` with at most ``window`` in flight for ``seconds`` or ``count``
    datagrams: (received, elapsed seconds, lost)."""
    buffer = bytearray(65536)
    poller = select.poll()
    poller.register(receiver, select.POLLIN)
    sent = received = lost = 0
    started = time.monotonic()
    deadline = started + seconds
    progress = started
    now = started
    while now < deadline and received < count:
        while sent - received < window and sent < count:
            try:
                sender.sendto(datagram, destination)
            except BlockingIOError:
                break
            sent += 1
        if poller.poll(50):
            with contextlib.suppress(BlockingIOError):
                while True:
                    receiver.recv_into(buffer)
                    received += 1
            progress = time.monotonic()
        now = time.monotonic()
        if now - progress > 0.2:  # the rest of the window is lost: open it again
            lost += sent - received
            sent = received
            progress = now
    elapsed = now - started
    time.sleep(0.1)
    straggling = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            receiver.recv_into(buffer)
            straggling += 1
    return received, elapsed, lost + max(0, sent - received - straggling)


def measure(
    running: Pipeline, direction: str, size: int, seconds: float, count: int, window: int
) -> Result:
    if direction == "to relay":
        ends = (running.wireguard, running.to_sidecar, running.other)
    else:
        ends = (running.other, running.to_relay, running.wireguard)
    before = running.cpu()
    datagram = transport(size, INDEX[direction])
    received, elapsed, lost = pump(*ends, datagram, seconds, count, window)
    after = running.cpu()
    cpu = {role: after[role] - before[role] for role in after}
    return Result(received, elapsed, lost, size, cpu)


def plain_udp(size: int, seconds: float, count: int, window: int) -> Result:
    sender, receiver = udp(socket.AF_INET, HOST), udp(socket.AF_INET, HOST)
    try:
        received, elapsed, lost = pump(
            sender, receiver.getsockname(), receiver, transport(size, 0), seconds, count, window
        )
    finally:
        sender.close()
        receiver.close()
    return Result(received, elapsed, lost, size, {})


# --- where the time goes ----------------------------------------------------------------------


def breakdown(path: Path) -> tuple[dict[str, float], float, list[tuple[str, float, float]]]:
    """From a cProfile dump: share of the total per category, the total profiled seconds, and
    the top functions by cumulative time (name, cumulative %, own %)."""
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values()) or 1.0
    shares = dict.fromkeys(_CATEGORIES, 0.0)
    for (_file, _line, name), entry in raw.items():
        for category, names in _CATEGORIES.items():
            if name in names:
                shares[category] += entry[2] / total
    shares[_OURS] = 1.0 - sum(shares.values())
    top = []
    for (file, line, name), entry in raw.items():
        cumulative = entry[3] / total
        if cumulative >= 0.97 or name.startswith("<built-in method builtins.exec"):
            continue  # the loop and its callers: everything is under them
        where = f"{Path(file).name}:{line}({name})" if file != "~" else name
        top.append((where, cumulative, entry[2] / total))
    top.sort(key=lambda item: -item[1])
    return shares, total, top[:8]


# --- the run ----------------------------------------------------------------------------------


def percent(value: float) -> str:
    return f"{value * 100:.0f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per run")
    parser.add_argument("--count", type=int, default=2_000_000, help="datagrams per run, at most")
    parser.add_argument("--window", type=int, default=256, help="datagrams in flight, at most")
    parser.add_argument("--before", type=Path, help="also run the code of this src directory")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--serve", choices=("relay", "sidecar"), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.config, args.state, args.profile_to)

    trees = {"this": ROOT / "src"}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    cases = [(d, s) for s in (FULL, SMALL) for d in ("to relay", "from relay")]
    results: dict[tuple[str, str, int], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="mw-tls-bench-") as temp:
        for number in range(args.rounds):
            for size in (FULL, SMALL):
                result = plain_udp(size, args.seconds, args.count, args.window)
                results.setdefault(("plain UDP", "", size), []).append(result)
            for name, tree in trees.items():
                work = Path(temp) / f"{name}-{number}"
                work.mkdir()
                with pipeline(tree, work) as running:
                    for direction, size in cases:
                        result = measure(
                            running, direction, size, args.seconds, args.count, args.window
                        )
                        results.setdefault((name, direction, size), []).append(result)
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr, flush=True)

        rows: list[tuple[str, ...]] = [
            ("path", "size", "datagrams/s", "Mbit/s", "of UDP", "lost", "relay µs/dg")
        ]
        rows[0] += ("sidecar µs/dg", "core-bound Mbit/s")
        for (name, direction, size), runs in results.items():
            rate = statistics.median(r.rate for r in runs)
            udp_rate = statistics.median(r.rate for r in results[("plain UDP", "", size)])
            cpu = {
                role: statistics.median(r.cpu_per_datagram(role) for r in runs)
                for role in ("relay", "sidecar")
                if runs[0].cpu
            }
            # What the busier child would carry with a core of its own.
            bound = f"{size * 8 / max(cpu.values()):,.0f}" if cpu and max(cpu.values()) else "-"
            rows.append(
                (
                    f"{name} {direction}".strip(),
                    str(size),
                    f"{rate:,.0f}",
                    f"{rate * size * 8 / 1e6:,.0f}",
                    percent(rate / udp_rate),
                    str(sum(r.lost for r in runs)),
                    *(f"{cpu[role]:.1f}" if role in cpu else "-" for role in ("relay", "sidecar")),
                    bound,
                )
            )
        print(
            f"TLS relay on loopback: medians of {args.rounds} rounds of {args.seconds:g} s, "
            f"window {args.window}"
        )
        print(table(rows))

        if args.no_profile:
            return 0
        for name, tree in trees.items():
            profiles = []
            for direction in ("to relay", "from relay"):
                work = Path(temp) / f"{name}-profile-{direction.replace(' ', '-')}"
                work.mkdir()
                with pipeline(tree, work, profile=True) as running:
                    measure(running, direction, FULL, args.seconds, args.count, args.window)
                # The sending end first.
                roles = ("sidecar", "relay") if direction == "to relay" else ("relay", "sidecar")
                for role in roles:
                    profiles.append((f"{direction}: {role}", breakdown(work / f"{role}.prof")))
            print(f"\nwhere the time goes ({name}, {FULL}-byte datagrams, under cProfile)")
            shares_rows = [("", *(label for label, _ in profiles))]
            for category in (*_CATEGORIES, _OURS):
                shares_rows.append((category, *(percent(b[0][category]) for _, b in profiles)))
            print(table(shares_rows))
            for label, (_, total, top) in profiles:
                print(f"\n{name}, {label}: top functions by cumulative time ({total:.2f} s)")
                top_rows = [("function", "cumulative", "own")]
                top_rows += [(where, percent(c), percent(o)) for where, c, o in top]
                print(table(top_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
