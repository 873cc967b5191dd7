"""How many small datagrams a second the relay forwards: with its kernel path, with its code
path only, and plain kernel routing between the same two namespaces (the ceiling).

    sudo .venv/bin/python bench/relay_capacity_bench.py [--seconds 3] [--rounds 3] [--size 64]

On one machine, in network namespaces (meshwright.lab.netns: a -- r -- b, nothing leaves
them). The relay service (`meshwright relay`) runs in r with two sites, a and b (a port each),
whose confirmed addresses and one session (b's receiver index, used by a) it restores from its
state file (so no WireGuard is needed), and limits far above what is measured. A sender in a
writes WireGuard-shaped transport datagrams (type 4, `--size` bytes, that index) from a's port
51820 as fast as one Python process can, for `--seconds`; a receiver in b counts what arrives on
b's port 51820. Routing: the same sender aimed at b itself, through r. Rounds are interleaved;
the table shows medians. Not a test: the figures depend on the machine (the sender, the relay
and the receiver share its cores).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import table  # bench/report.py: the script's own directory is on sys.path

from meshwright.lab.netns import RELAY, SITE_A, SITE_B, RelayLine

PORTS = (40000, 40001)
WG = 51820
INDEX = 0x12345678  # b's receiver index in the sender's datagrams
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SENDER = """
import socket, struct, sys, time
target, port, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 51820))
datagram = struct.pack("<BxxxIQ", 4, 0x12345678, 0) + bytes(size - 16)  # INDEX
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.sendto(datagram, (target, port))
            sent += 1
        except OSError:
            pass
print(sent)
"""

RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", 51820))
s.settimeout(0.5)
print("ready", flush=True)
count, end = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        s.recv(2048)
        count += 1
    except TimeoutError:
        pass
print(count)
"""


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Relay:
    """The relay service in r, sites a and b and a's session with b restored from its state."""

    def __init__(self, line: RelayLine, work: Path, kernel: bool) -> None:
        keys = [base64.b64encode(bytes([n]) * 32).decode() for n in (1, 2)]
        sites = [
            {"name": name, "port": port, "public_key": key}
            for name, port, key in zip("ab", PORTS, keys, strict=True)
        ]
        config = work / "relay.json"
        config.write_text(
            json.dumps(
                {
                    "address": RELAY,
                    "sites": sites,
                    "limits": {"packets_per_second": 100_000_000, "bytes_per_second": 1e10},
                    "kernel": kernel,
                }
            )
        )
        state = work / "state.json"
        confirmed = {"a": [SITE_A, WG], "b": [SITE_B, WG]}
        state.write_text(
            json.dumps(
                {
                    "address": RELAY,
                    "sites": {
                        name: s | {"confirmed": confirmed[name]}
                        for name, s in zip("ab", sites, strict=True)
                    },
                    "sessions": [["b", "a", INDEX]],  # b owns INDEX, a sends to it
                }
            )
        )
        self.line, self.work = line, work
        self.process = line.popen(
            "r",
            [
                *(sys.executable, "-m", "meshwright.cli", "relay"),
                *("--config", str(config), "--state", str(state)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(work / "relay.log").open("a"),
        )
        self.kernel = kernel

    def warm(self) -> None:
        """A few datagrams through the code, then wait for the kernel's routes (if on)."""
        run_pair(self.line, RELAY, PORTS[0], 64, 0.3)
        deadline = time.monotonic() + 10
        while self.kernel:
            shown = self.line.run(
                "r", "nft", "list", "map", "ip", "meshwright_forward", "arrive", check=False
            )
            if f"{PORTS[0]} : jump" in shown:
                return
            if time.monotonic() > deadline:
                log = (self.work / "relay.log").read_text()[-2000:]
                raise SystemExit(f"the relay installed no kernel route in 10 s:\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def run_pair(line: RelayLine, target: str, port: int, size: int, seconds: float) -> tuple[int, int]:
    """(sent, received) of one sender run at `target`:`port` from a, counted in b."""
    receiver = line.popen(
        "b", [sys.executable, "-c", RECEIVER, str(seconds + 1.5)], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None
    receiver.stdout.readline()  # "ready"
    sent = line.run("a", sys.executable, "-c", SENDER, target, str(port), str(size), str(seconds))
    received = receiver.communicate(timeout=seconds + 10)[0]
    return int(sent.strip()), int(received.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="datagram bytes (>= 32)")
    args = parser.parse_args()
    if os.geteuid() != 0 or args.size < 32 or args.rounds < 1:
        parser.error("run as root, with --size >= 32 and --rounds >= 1")
    line = RelayLine(f"mwc{os.getpid() % 100000}")
    results: dict[str, list[tuple[float, float, float]]] = {}
    line.up()
    try:
        line.forwarding(True)
        with tempfile.TemporaryDirectory() as temporary:
            work = Path(temporary)
            for round_number in range(1, args.rounds + 1):
                for mode in ("kernel path", "code path", "plain routing"):
                    relay = None
                    if mode != "plain routing":
                        relay = Relay(line, work, kernel=mode == "kernel path")
                        relay.warm()
                    target, port = (SITE_B, WG) if relay is None else (RELAY, PORTS[0])
                    before = cpu_ticks(relay.process.pid) if relay else 0
                    start = time.monotonic()
                    sent, received = run_pair(line, target, port, args.size, args.seconds)
                    elapsed = time.monotonic() - start
                    cpu = (
                        (cpu_ticks(relay.process.pid) - before) / CLOCK_TICKS / elapsed * 100
                        if relay
                        else 0.0
                    )
                    if relay is not None:
                        relay.stop()
                    rate = (sent / args.seconds, received / args.seconds, cpu)
                    results.setdefault(mode, []).append(rate)
                    print(
                        f"round {round_number}: {mode:<13} sent {rate[0]:>9,.0f}/s"
                        f" received {rate[1]:>9,.0f}/s relay CPU {cpu:.0f}%",
                        flush=True,
                    )
    finally:
        line.down()
    rows = [("path", "sent/s", "received/s", "of routing", "relay CPU %")]
    ceiling = statistics.median(r[1] for r in results["plain routing"])
    for mode, runs in results.items():
        median_received = statistics.median(r[1] for r in runs)
        rows.append(
            (
                mode,
                f"{statistics.median(r[0] for r in runs):,.0f}",
                f"{median_received:,.0f}",
                f"{median_received / ceiling:.2f}",
                f"{statistics.median(r[2] for r in runs):.0f}" if mode != "plain routing" else "-",
            )
        )
    print()
    print(
        f"{args.size}-byte datagrams, {args.seconds:g} s per run, {args.rounds} rounds (medians);"
        f" nproc {os.cpu_count()}, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
