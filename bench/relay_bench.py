"""Benchmark of the UDP and TCP relays against a direct link, on a lab of its own (`mwbench`).

    .venv/bin/python bench/relay_bench.py                  # up, converge, measure, down
    .venv/bin/python bench/relay_bench.py --keep           # leave the lab up afterwards
    .venv/bin/python bench/relay_bench.py --no-converge    # reuse a kept, converged lab
                                                           # (taken down after, without --keep)
    .venv/bin/python bench/relay_bench.py --rounds 3 --seconds 6 --mss 1300

Run from anywhere; it works from the repository root. It copies the default topology
(inventory/lab/topology.yml) to /tmp/mwbench/topology.yml with every WAN latency, jitter and loss
set to 0 (the lab's latency is an NFQUEUE delayer in userspace, which would bound throughput;
that no host has one is checked), brings the lab `mwbench` up with its inventory in /tmp/mwbench,
converges playbooks/site.yml on it (the plan: /tmp/mwbench/.meshwright/plan.json), then, LAN
host to LAN host, over three pairs, each checked in the plan and in the live WireGuard endpoints:

- direct: easy1-lan1 -> public-lan1 (plan mode `direct`, no relay address as endpoint);
- udp relay: hard1-lan1 -> hard2-lan1 (mode `relay`: both sides' endpoints are the relay's
  address and their own site port);
- tcp relay: blocked-lan1 -> public-lan1 (mode `relay-tcp`: blocked's endpoint is its
  sidecar's socket for the relay on 127.0.0.1, which holds a TLS connection to the relay's TCP
  443; public's is the relay's address and its site port),

- with --same-pair, same-direct and same-relay: easy1-lan1 -> easy2-lan1 (mode `punch`), first
  on the direct path the sidecars found, then through its relay (the direct path cut at easy2's
  NAT, so that the sidecars fall back by themselves; healed afterwards): the same sites and
  NATs, only the relay differs, which is what the 0.95 target compares (after a fresh
  converge the pair may take minutes to go direct: a conntrack clash, docs/sidecar.md). For
  these runs the NAT routers hold probe-sized datagrams 10 ms on arrival, the default lab's
  latency, and nothing else (without any latency the side whose first probe leaves a
  millisecond later clashes on its own NAT, every time); the pair's sidecars are restarted
  for a fresh attempt;

and measures:

- iperf3 TCP throughput (`end.sum_received`); with --mss (default 0: none) also the same with
  the sender's MSS clamped, for every pair;
- ping RTT (`ping -c 20 -i 0.2 -q`, the average);
- forwarding capacity (after the rounds, --capacity-seconds per run, --rounds interleaved
  rounds): small WireGuard-shaped transport datagrams (72 bytes, a size WireGuard never sends,
  with the index of the pair's live session from the relay's state file), written by one Python
  process in hard1 from its WireGuard port (so they leave through WireGuard's NAT mapping and
  arrive from its confirmed address), through hard1's relay with the kernel path and with the
  code path only, and the same datagrams sent straight to hard2's address, routed by the lab
  with no relay (the ceiling); counted, and dropped, on arrival at hard2's NAT router (an
  iptables rule for that size), so WireGuard never spends CPU on them; the relay's per-site
  limits raised meanwhile, and restored;
- CPU (/proc/<pid>/stat utime+stime) during each relayed run of the relay process carrying the
  pair (`meshwright relay`) and, for the tcp relay, of the sidecar on blocked
  (`meshwright-sidecar.service`); the machine's CPU (/proc/stat) during every run; the relay's
  own counters for the pair (its state file).

Runs are interleaved (direct, udp relay, tcp relay, direct, ...) for --rounds rounds; the table
shows medians. Exit status: 0 if udp-relayed/direct throughput is at least the target, 1 if not,
2 if a prerequisite or a lab step failed (no numbers are printed then). Not a test: the numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from report import table  # bench/report.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
CONTAINERS_CONF = ROOT / "src" / "meshwright" / "lab" / "containers.conf"
COLLECTIONS = ROOT / ".cache" / "collections"
SOURCE_TOPOLOGY = ROOT / "inventory" / "lab" / "topology.yml"
SOURCE_HOST_VARS = ROOT / "inventory" / "lab" / "host_vars"
PLAYBOOK = ROOT / "playbooks" / "site.yml"

LAB = "mwbench"
WORK = Path("/tmp/mwbench")
INVENTORY = WORK / "hosts.yml"
TOPOLOGY = WORK / "topology.yml"
PLAN = WORK / ".meshwright" / "plan.json"
STATE = WORK / ".meshwright" / "state.json"

DIRECT = ("easy1", "public")  # sender site, receiver site
RELAYED = ("hard1", "hard2")
TCP_RELAYED = ("blocked", "public")  # the sender is the UDP-blocked site
# One pair both ways: direct (the sidecars upgraded it) and through its relay (sidecars
# stopped, endpoints set to the allocation): the same sites and NATs, only the relay differs.
SAME = ("easy1", "easy2")
IPERF_PORT = 5299  # not iperf3's default, so a stray server elsewhere cannot answer
IPERF_PIDFILE = "/run/mwbench-iperf3.pid"
RELAY_UNIT = "meshwright-relay.service"
SIDECAR_UNIT = "meshwright-sidecar.service"
RELAY_TLS_PORT = 443
RELAY_STATE = "/var/lib/meshwright-relay/state.json"
WG_INTERFACE = "mesh0"
PING_COUNT, PING_INTERVAL = 20, 0.2
TARGET_RATIO = 0.95  # udp-relayed / direct, with the kernel path (issue #13)
# --same-pair: the traversal's probes (IP length of a ping 62, a pong 69, one with an IPv6
# address 81) get the default lab's WAN latency; nothing else does (delay_probes).
PROBE_LENGTHS, PROBE_LATENCY_MS = "60:90", 10
TCP_TARGET_RATIO = 0.8
RELAY_CONFIG = "/etc/meshwright/relay.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A prerequisite or a lab step failed: the message says which; no numbers are printed."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(COLLECTIONS)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(
    command: list[str], *, timeout: float, check: bool = True, logfile: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root; with `logfile`, its output goes there."""
    try:
        if logfile is not None:
            with logfile.open("w") as out:
                result = subprocess.run(
                    command,
                    cwd=ROOT,
                    env=environment(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
        else:
            result = subprocess.run(
                command,
                cwd=ROOT,
                env=environment(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(command)}") from None
    if check and result.returncode != 0:
        if logfile is not None:
            tail = "\n".join(logfile.read_text().splitlines()[-30:])
            detail = f"last lines of {logfile}:\n{tail}"
        else:
            detail = (result.stderr or result.stdout).strip()
        raise BenchError(f"exit {result.returncode}: {' '.join(command)}\n{detail}")
    return result


def podman_exec(host: str, *command: str, timeout: float = 60, check: bool = True) -> str:
    """stdout of `command` in lab host `host` (its container is mwbench-<host>)."""
    return run(["podman", "exec", f"{LAB}-{host}", *command], timeout=timeout, check=check).stdout


# --- the lab ---------------------------------------------------------------------------------


def check_prerequisites() -> None:
    missing = [
        str(path)
        for path in (
            BIN / "meshwright",
            BIN / "ansible-playbook",
            CONTAINERS_CONF,
            COLLECTIONS,
            SOURCE_TOPOLOGY,
            PLAYBOOK,
        )
        if not path.exists()
    ]
    if shutil.which("podman") is None:
        missing.append("podman (not on PATH)")
    if missing:
        raise BenchError("missing: " + ", ".join(missing) + " (see `make setup`)")


def write_topology() -> None:
    """The default topology with every WAN shaping value 0, and the lab's host_vars beside it."""
    text = SOURCE_TOPOLOGY.read_text()
    zeroed, count = re.subn(
        r"\b(latency_ms|jitter_ms|loss_pct)(\s*:\s*)[0-9.]+", r"\g<1>\g<2>0", text
    )
    if not re.search(r"\blatency_ms\s*:\s*0\b", zeroed):
        raise BenchError(f"{SOURCE_TOPOLOGY}: no latency_ms field found to set to 0")
    WORK.mkdir(parents=True, exist_ok=True)
    TOPOLOGY.write_text(
        f"# {SOURCE_TOPOLOGY.relative_to(ROOT)} with WAN shaping 0 ({count} values), "
        "written by bench/relay_bench.py\n" + zeroed
    )
    # The lab's host_vars as they are now: a file removed there must not linger here.
    shutil.rmtree(WORK / "host_vars", ignore_errors=True)
    if SOURCE_HOST_VARS.is_dir():
        shutil.copytree(SOURCE_HOST_VARS, WORK / "host_vars")


def lab_command(action: str, *extra: str) -> list[str]:
    return [
        str(BIN / "meshwright"),
        "lab",
        action,
        "--name",
        LAB,
        "--topology",
        str(TOPOLOGY),
        "--inventory",
        str(INVENTORY),
        *extra,
    ]


def lab_status() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        run(lab_command("status", "--json"), timeout=120).stdout
    )
    return rows


def lab_up() -> None:
    run(lab_command("up", "--quiet"), timeout=900, logfile=WORK / "lab-up.log")


def lab_down() -> None:
    run(lab_command("down"), timeout=600, logfile=WORK / "lab-down.log")


def converge() -> None:
    command = [str(BIN / "ansible-playbook"), "-i", str(INVENTORY), str(PLAYBOOK)]
    run(command, timeout=1800, logfile=WORK / "converge.log")


def lan_address(rows: list[dict[str, Any]], host: str) -> str:
    for row in rows:
        if row["name"] == host:
            if row["state"] != "running":
                raise BenchError(f"lab host {host} is {row['state']}, not running")
            for network, addresses in row["addresses"].items():
                if network.endswith("-lan") and addresses:
                    return str(addresses[0]).split("/")[0]
    raise BenchError(f"lab host {host} has no LAN address in `lab status`")


def internet_facing(rows: list[dict[str, Any]]) -> list[str]:
    facing = [
        row["name"]
        for row in rows
        if any(network.endswith("-internet") for network in row["addresses"])
    ]
    if not facing:
        raise BenchError("`lab status` lists no internet-facing host")
    return facing


def check_no_delayer(rows: list[dict[str, Any]]) -> int:
    """Fail if any internet-facing host queues other packets than probes to the delayer;
    returns hosts checked."""
    facing = internet_facing(rows)
    for host in facing:
        rules = podman_exec(host, "iptables", "-t", "raw", "-S", "PREROUTING")
        for rule in rules.splitlines():
            if "NFQUEUE" in rule and PROBE_LENGTHS not in rule:
                raise BenchError(f"{host} delays its WAN traffic (NFQUEUE): latency is not 0")
    return len(facing)


def delay_probes(rows: list[dict[str, Any]]) -> int:
    """Give the traversal's probes the internet's latency, and nothing else: every NAT router
    holds datagrams of a probe's size (PROBE_LENGTHS, IP length) PROBE_LATENCY_MS on arrival
    from its WAN, before conntrack, as the lab's own shaping does to every packet. With no
    latency at all, the side of a punch whose first probe leaves even a millisecond later
    finds the other's already on its NAT (a conntrack clash, docs/sidecar.md), which the
    internet never shows; bulk data (larger) goes undelayed. Returns the routers."""
    routers = [h for h in internet_facing(rows) if h.endswith(("-nat", "-cgnat"))]
    for host in routers:
        rules = podman_exec(host, "iptables", "-t", "raw", "-S", "PREROUTING")
        if PROBE_LENGTHS in rules:
            continue
        podman_exec(
            host, "iptables", "-t", "raw", "-I", "PREROUTING", "-i", "wan", "-p", "udp",
            "-m", "length", "--length", PROBE_LENGTHS,
            "-j", "NFQUEUE", "--queue-num", "1", "--queue-bypass",
        )  # fmt: skip
        podman_exec(
            host, "systemd-run", "--quiet", "--unit=mw-probedelay", "-p", "Restart=always",
            "python3", "/usr/local/lib/meshwright/labtool.py", "delay", "--queue", "1",
            "--latency-ms", str(PROBE_LATENCY_MS),
        )  # fmt: skip
    return len(routers)


# --- the plan and the live mesh --------------------------------------------------------------


def plan_pair(plan: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    pairs: list[dict[str, Any]] = plan.get("pairs", [])
    for pair in pairs:
        if {pair.get("a"), pair.get("b")} == {a, b}:
            return pair
    raise BenchError(f"{PLAN}: no pair {a} <-> {b}")


def relay_allocation(plan: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    allocations: list[dict[str, Any]] = plan.get("allocations", [])
    for allocation in allocations:
        if {allocation.get("a"), allocation.get("b")} == {a, b}:
            return allocation
    raise BenchError(f"{PLAN}: the relayed pair {a} <-> {b} has no allocation")


def plan_peer(plan: dict[str, Any], site: str, peer: str) -> dict[str, Any]:
    entry = next((p for p in plan["sites"][site]["peers"] if p["name"] == peer), None)
    if entry is None:
        raise BenchError(f"{PLAN}: {site} has no peer {peer}")
    return dict(entry)


def live_endpoint(plan: dict[str, Any], site: str, peer: str) -> str:
    """The endpoint `site`'s WireGuard uses for `peer` now (host:port)."""
    key = plan_peer(plan, site, peer)["public_key"]
    for line in podman_exec(site, "wg", "show", WG_INTERFACE, "endpoints").splitlines():
        public_key, _, endpoint = line.partition("\t")
        if public_key == key:
            return endpoint.strip()
    raise BenchError(f"{site}: WireGuard has no peer {peer} ({key})")


def wireguard_kind(site: str) -> tuple[str, int]:
    """What runs `mesh0` on `site` (from `ip -d link show`), and its MTU."""
    details = podman_exec(site, "ip", "-d", "link", "show", WG_INTERFACE)
    mtu_match = re.search(r"\bmtu (\d+)", details)
    mtu = int(mtu_match.group(1)) if mtu_match else 0
    if re.search(r"\swireguard\s", details):
        return "kernel WireGuard (link kind wireguard)", mtu
    if re.search(r"\stun\s", details):
        running = podman_exec(site, "pgrep", "-x", "wireguard-go", check=False).strip()
        if not running:
            raise BenchError(f"{site}: {WG_INTERFACE} is a tun device but no wireguard-go runs")
        version = podman_exec(site, "wireguard-go", "--version", check=False).split("\n")[0]
        return f"{version.strip() or 'wireguard-go'} (userspace, link kind tun)", mtu
    raise BenchError(f"{site}: {WG_INTERFACE} is neither wireguard nor tun:\n{details}")


def unit_pid(host: str, unit: str) -> int:
    pid = podman_exec(host, "systemctl", "show", "-p", "MainPID", "--value", unit).strip()
    if not pid.isdigit() or pid == "0":
        raise BenchError(f"{host}: {unit} is not running (MainPID {pid!r})")
    return int(pid)


@dataclass
class Route:
    """One measured pair, as the plan and the live mesh have it (filled in by `check_route`)."""

    name: str  # "direct", "relay", "relay-code", "tcp", "same-direct", "same-relay"
    label: str
    sites: tuple[str, str]  # sender, receiver
    mode: str  # the plan's mode for the pair
    address: str = ""  # the receiver's LAN address
    endpoints: dict[str, str] = field(default_factory=dict)  # site -> its live endpoint
    relay: str = ""
    allocation_key: str = ""
    processes: list[tuple[str, str, int]] = field(default_factory=list)  # (what, host, pid)

    @property
    def hosts(self) -> tuple[str, str]:
        return f"{self.sites[0]}-lan1", f"{self.sites[1]}-lan1"


def check_route(plan: dict[str, Any], rows: list[dict[str, Any]], route: Route) -> None:
    """Check `route` in the plan and the live mesh, and fill in what the runs need."""
    a, b = route.sites
    pair = plan_pair(plan, a, b)
    if pair["mode"] != route.mode:
        raise BenchError(f"{PLAN}: {a} <-> {b} is {pair['mode']!r}, not {route.mode!r}")
    route.address = lan_address(rows, route.hosts[1])
    route.endpoints = {a: live_endpoint(plan, a, b), b: live_endpoint(plan, b, a)}
    if route.mode == "punch":
        allocation = relay_allocation(plan, a, b)
        route.relay = allocation["relay"]
        route.allocation_key = f"{allocation['a']}--{allocation['b']}"
        ports = dict(zip((allocation["a"], allocation["b"]), allocation["ports"], strict=True))
        route.endpoints = {site: f"{allocation['address']}:{ports[site]}" for site in (a, b)}
        route.processes = [("relay", route.relay, unit_pid(route.relay, RELAY_UNIT))]
        return
    if route.mode == "direct":
        relays = {x["address"] for x in plan.get("allocations", [])} | {"127.0.0.1"}
        for site, endpoint in route.endpoints.items():
            if endpoint.rsplit(":", 1)[0] in relays:
                raise BenchError(f"{site} reaches its peer of {a} <-> {b} at {endpoint}: relayed")
        return
    allocation = relay_allocation(plan, a, b)
    if allocation.get("kind") != route.mode:
        raise BenchError(f"{PLAN}: {a} <-> {b} has an allocation of kind {allocation.get('kind')}")
    route.relay = allocation["relay"]
    route.allocation_key = f"{allocation['a']}--{allocation['b']}"
    ports = dict(zip((allocation["a"], allocation["b"]), allocation["ports"], strict=True))
    for site, peer in ((a, b), (b, a)):
        planned = plan_peer(plan, site, peer).get("endpoint")
        # The UDP-blocked sender reaches the relay through its sidecar's socket on loopback.
        tls = route.mode == "relay-tcp" and site == a
        expected = planned if tls else f"{allocation['address']}:{ports[site]}"
        if planned != expected or not str(planned).startswith("127.0.0.1:" if tls else ""):
            raise BenchError(f"{PLAN}: {site}'s endpoint for {peer} is {planned}, not {expected}")
        if route.endpoints[site] != expected:
            raise BenchError(
                f"{site} reaches {peer} at {route.endpoints[site]}, not {expected} "
                f"({route.relay}, {route.mode})"
            )
    route.processes = [("relay", route.relay, unit_pid(route.relay, RELAY_UNIT))]
    if route.mode == "relay-tcp":
        connections = podman_exec(
            a,
            "ss",
            "-Htn",
            "state",
            "established",
            "dst",
            f"{allocation['address']}:{RELAY_TLS_PORT}",
        )
        if not connections.strip():
            raise BenchError(
                f"{a}: no TCP connection to {allocation['address']}:{RELAY_TLS_PORT} "
                f"({route.relay}'s TLS service)"
            )
        route.processes.append(("sidecar", a, unit_pid(a, SIDECAR_UNIT)))


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Series:
    """The runs of one variant (a route, with or without a clamped MSS)."""

    bits: list[float] = field(default_factory=list)
    retransmits: list[int] = field(default_factory=list)
    rtt_ms: list[float] = field(default_factory=list)
    cpu_pct: dict[str, list[float]] = field(default_factory=dict)  # "relay", "sidecar", "host"
    relay_counters: Counter[str] = field(default_factory=Counter)


def iperf(
    sender: str, receiver: str, address: str, seconds: int, mss: int | None
) -> tuple[float, int]:
    """TCP bits per second received, and the sender's retransmits, sender -> receiver."""
    podman_exec(
        receiver,
        "sh",
        "-c",
        f"if [ -f {IPERF_PIDFILE} ]; then kill $(cat {IPERF_PIDFILE}) 2>/dev/null; "
        f"rm -f {IPERF_PIDFILE}; fi; iperf3 -s -1 -D -p {IPERF_PORT} -I {IPERF_PIDFILE}",
    )
    deadline = time.monotonic() + 5
    while not podman_exec(receiver, "ss", "-Hltn", f"sport = :{IPERF_PORT}").strip():
        if time.monotonic() > deadline:
            raise BenchError(f"{receiver}: the iperf3 server does not listen on {IPERF_PORT}")
        time.sleep(0.1)
    command = ["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if mss:
        command += ["-M", str(mss)]
    limit = seconds + 25
    output = podman_exec(
        sender, "timeout", "-k", "5", str(limit), *command, timeout=limit + 15, check=False
    )
    try:
        result = json.loads(output)
    except json.JSONDecodeError:
        raise BenchError(f"{sender}: iperf3 gave no JSON:\n{output[-2000:]}") from None
    if "error" in result:
        raise BenchError(f"{sender} -> {receiver}: iperf3: {result['error']}")
    end = result["end"]
    return float(end["sum_received"]["bits_per_second"]), int(end["sum_sent"].get("retransmits", 0))


def ping(sender: str, address: str) -> float:
    """Average RTT in ms of `ping -c 20 -i 0.2 -q`."""
    output = podman_exec(
        sender,
        "ping",
        "-c",
        str(PING_COUNT),
        "-i",
        str(PING_INTERVAL),
        "-q",
        address,
        timeout=PING_COUNT * PING_INTERVAL + 30,
        check=False,
    )
    match = re.search(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms", output)
    if match is None:
        raise BenchError(f"{sender}: ping {address} got no answer:\n{output.strip()}")
    return float(match.group(1))


def cpu_ticks(host: str, pid: int) -> int:
    """utime + stime of `pid` on lab host `host`, in clock ticks."""
    stat = podman_exec(host, "cat", f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 is fields[0]
    return int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime


def machine_ticks() -> tuple[int, int]:
    """This machine's busy and total CPU ticks so far, over all CPUs (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def relay_counters(relay: str, key: str) -> dict[str, int]:
    """What the relay forwarded between the pair `key` ("a--b"), from its state file."""
    text = podman_exec(relay, "cat", RELAY_STATE, check=False)
    try:
        return dict(json.loads(text)["pairs"][key])
    except (json.JSONDecodeError, KeyError, TypeError):
        return {}


def on_relay(plan: dict[str, Any], route: Route) -> tuple[bool, bool]:
    """Whether each side of `route`'s pair holds its relay allocation as WireGuard's endpoint."""
    a, b = route.sites
    return (
        live_endpoint(plan, a, b) == route.endpoints[a],
        live_endpoint(plan, b, a) == route.endpoints[b],
    )


def wait_for_path(plan: dict[str, Any], route: Route, relayed: bool, seconds: float) -> None:
    """Until both sides hold the relay allocation, or (not ``relayed``) the other site's
    public address: a direct path between the two NATs, as the packets go, not merely no
    relay (an endpoint inside the tunnel would be neither)."""
    a, b = route.sites
    public = {a: site_public_address(b), b: site_public_address(a)}
    deadline = time.monotonic() + seconds
    while True:
        if relayed and on_relay(plan, route) == (True, True):
            return
        endpoints = {s: live_endpoint(plan, s, o) for s, o in ((a, b), (b, a))}
        if not relayed and all(e.rsplit(":", 1)[0] == public[s] for s, e in endpoints.items()):
            return
        if time.monotonic() > deadline:
            where = "its relay" if relayed else "a direct path"
            raise BenchError(
                f"{a} <-> {b} not on {where} within {seconds:.0f} s (endpoints {endpoints})"
            )
        time.sleep(0.5)


def pin_to_relay(plan: dict[str, Any], route: Route, pinned: bool) -> None:
    """Pinned: the direct path cut at the receiver's NAT (all from the sender's public address
    dropped), so that the sidecars fall back to the pair's relay by themselves (within 3 s).
    Not pinned: the cut healed, and the pair direct again (waited for)."""
    a, b = route.sites
    rule = ["FORWARD", "-s", site_public_address(a), "-j", "DROP"]
    podman_exec(f"{b}-nat", "iptables", "-I" if pinned else "-D", *rule)
    if not pinned:
        wait_for_path(plan, route, False, 300)
        return
    # A path is found dead by data sent and not answered: pings while the sidecars decide.
    sender = route.hosts[0]
    pings = subprocess.Popen(
        [
            "podman",
            "exec",
            f"{LAB}-{sender}",
            "ping",
            "-q",
            "-c",
            "100",
            "-i",
            "0.2",
            route.address,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
    )
    try:
        wait_for_path(plan, route, True, 15)
    except BenchError:
        podman_exec(f"{b}-nat", "iptables", "-D", *rule)  # the lab as it was
        raise
    finally:
        pings.terminate()
        pings.wait(10)


def site_public_address(site: str) -> str:
    inventory = yaml.safe_load(INVENTORY.read_text())["all"]["children"]
    return str(inventory["mesh_sites"]["hosts"][site]["lab_public_address"])


def set_relay_setting(relay: str, key: str, value: Any) -> Any:
    """One setting of the relay service's configuration (None: removed), then a reload;
    returns what it was before (None: not there)."""
    config = json.loads(podman_exec(relay, "cat", RELAY_CONFIG))
    before = config.get(key)
    if value is None:
        config.pop(key, None)
    else:
        config[key] = value
    text = json.dumps(config, indent=1, sort_keys=True)
    podman_exec(relay, "python3", "-c", "import sys;open(sys.argv[1],'w').write(sys.argv[2])",
                RELAY_CONFIG, text)  # fmt: skip
    podman_exec(relay, "systemctl", "reload", RELAY_UNIT)
    return before


def set_kernel_path(relay: str, on: bool) -> None:
    """Turn the relay service's kernel forwarding on or off (its config, then a reload), and
    wait until its nftables table is there with routes, or gone."""
    set_relay_setting(relay, "kernel", on)
    deadline = time.monotonic() + 30
    while True:
        routes = podman_exec(
            relay, "nft", "list", "map", "ip", "meshwright_forward", "arrive", check=False
        )
        if ("jump" in routes) == on:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{relay}: the kernel path did not turn {'on' if on else 'off'}")
        time.sleep(0.5)


# --- forwarding capacity on the lab ------------------------------------------------------------

# Run in the sending site: WireGuard-shaped transport datagrams (type 4, the given receiver
# index, a counter, filler) written from WireGuard's own port with a raw socket (so they leave
# through the NAT mapping WireGuard's traffic uses), as fast as one Python process can.
CAPACITY_SENDER = """
import os, socket, struct, sys, time
destination = sys.argv[1]
port, source_port, index = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
seconds, size = float(sys.argv[5]), int(sys.argv[6])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
datagram = bytearray(struct.pack(">HHHH", source_port, port, 8 + size, 0) + bytes(size))
struct.pack_into("<BxxxI", datagram, 8, 4, index)
datagram[24:] = os.urandom(size - 16)
sent = counter = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(512):
        counter += 1
        struct.pack_into("<Q", datagram, 16, counter)
        try:
            sock.sendto(datagram, (destination, 0))
            sent += 1
        except OSError:
            pass
print(sent)
"""
# Never a WireGuard message's size (32 + a multiple of 16): the receiver's NAT router counts and
# drops exactly these on arrival, so WireGuard behind it never spends CPU on them.
CAPACITY_PAYLOAD = 72
CAPACITY_LIMITS = {"packets_per_second": 10_000_000, "bytes_per_second": 10_000_000_000}


def relay_session(relay: str, owner: str, peer: str) -> tuple[int, tuple[str, int]]:
    """A proven index that ``peer`` sends to ``owner`` through ``relay``, and owner's
    confirmed address (the relay's state file)."""
    state = json.loads(podman_exec(relay, "cat", RELAY_STATE))
    indices = [i for o, p, i in state.get("sessions", []) if (o, p) == (owner, peer)]
    confirmed = state["sites"][owner]["confirmed"]
    if not indices or not confirmed:
        raise BenchError(f"{relay}: no proven session of {peer} -> {owner} in {RELAY_STATE}")
    return int(indices[-1]), (str(confirmed[0]), int(confirmed[1]))


def counted_at(host: str) -> int:
    """Capacity datagrams the receiver's NAT router has counted (and dropped) on arrival."""
    out = podman_exec(host, "iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n")
    for line in out.splitlines():
        if f"length {20 + 8 + CAPACITY_PAYLOAD}" in line and "DROP" in line:
            return int(line.split()[0])
    raise BenchError(f"{host}: the capacity counting rule is gone")


def capacity(
    plan: dict[str, Any], route: Route, seconds: float, rounds: int
) -> list[tuple[str, ...]]:
    """Small datagrams a second through the pair's relay, kernel path and code path only, and
    the same datagrams routed by the lab straight to the receiver (no relay: the ceiling),
    interleaved for ``rounds``; counted where they arrive, at the receiver's NAT router."""
    a, b = route.sites
    assert route.relay is not None
    rule = ["PREROUTING", "-i", "wan", "-p", "udp", "-m", "length", "--length"]
    rule += [str(20 + 8 + CAPACITY_PAYLOAD), "-j", "DROP"]
    podman_exec(f"{b}-nat", "iptables", "-t", "raw", "-I", *rule)
    limits = json.loads(podman_exec(route.relay, "cat", RELAY_CONFIG)).get("limits")
    set_relay_setting(route.relay, "limits", {**(limits or {}), **CAPACITY_LIMITS})
    relay_address, a_port = route.endpoints[a].rsplit(":", 1)
    listen_port = int(plan["sites"][a]["listen_port"])
    results: dict[str, list[tuple[float, float, float]]] = {}
    try:
        for round_number in range(1, rounds + 1):
            for name in ("kernel path", "code path", "no relay"):
                if name != "no relay":
                    set_kernel_path(route.relay, name == "kernel path")
                # The session's index moves with WireGuard's rekeying: a fresh one, in use.
                ping(route.hosts[0], route.address)
                index, b_address = relay_session(route.relay, b, a)
                target = (relay_address, int(a_port)) if name != "no relay" else b_address
                pid = unit_pid(route.relay, RELAY_UNIT)
                before, ticks = counted_at(f"{b}-nat"), cpu_ticks(route.relay, pid)
                start = time.monotonic()
                sent = int(
                    podman_exec(
                        a, "python3", "-c", CAPACITY_SENDER, target[0], str(target[1]),
                        str(listen_port), str(index), str(seconds), str(CAPACITY_PAYLOAD),
                        timeout=seconds + 60,
                    ).strip()
                )  # fmt: skip
                elapsed = time.monotonic() - start
                time.sleep(0.5)  # the last datagrams in flight
                received = counted_at(f"{b}-nat") - before
                cpu = (cpu_ticks(route.relay, pid) - ticks) / CLOCK_TICKS / elapsed * 100
                results.setdefault(name, []).append((sent / seconds, received / seconds, cpu))
                log(
                    f"capacity round {round_number}: {name:<11} sent {sent / seconds:9,.0f}/s "
                    f"received {received / seconds:9,.0f}/s; relay CPU {cpu:.0f}%"
                )
    finally:
        set_relay_setting(route.relay, "limits", limits)
        set_kernel_path(route.relay, True)
        podman_exec(f"{b}-nat", "iptables", "-t", "raw", "-D", *rule)
    ceiling = statistics.median(r for _, r, _ in results["no relay"])
    rows: list[tuple[str, ...]] = [("path", "sent/s", "received/s", "of no relay", "relay CPU %")]
    for name, runs in results.items():
        rate = statistics.median(r for _, r, _ in runs)
        rows.append(
            (
                name if name != "no relay" else "no relay: routed by the lab (the ceiling)",
                f"{statistics.median(x for x, _, _ in runs):,.0f}",
                f"{rate:,.0f}",
                f"{rate / ceiling:.2f}",
                "-" if name == "no relay" else f"{statistics.median(c for _, _, c in runs):.0f}",
            )
        )
    return rows


def sidecar_log(host: str) -> str:
    """The sidecar's last counters line in its journal (it logs them every 60 s), or ""."""
    text = podman_exec(
        host, "journalctl", "-u", SIDECAR_UNIT, "-o", "cat", "--no-pager", "-n", "200", check=False
    )
    lines = [line for line in text.splitlines() if "counters" in line]
    return lines[-1].strip() if lines else ""


# --- output ----------------------------------------------------------------------------------


def mbit(bits: list[float]) -> str:
    return f"{statistics.median(bits) / 1e6:.1f}" if bits else "-"


def runs_text(bits: list[float]) -> str:
    return " ".join(f"{b / 1e6:.1f}" for b in bits)


def median_text(values: list[float] | None, digits: int) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "-"


# --- the benchmark ---------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> int:
    rows = lab_status()
    plan = json.loads(PLAN.read_text())
    routes = {
        route.name: route
        for route in (
            Route("direct", "direct (UDP, no relay)", DIRECT, "direct"),
            Route("relay", "udp relay (kernel path)", RELAYED, "relay"),
            Route("relay-code", "udp relay (code path only)", RELAYED, "relay"),
            Route("tcp", "tcp relay (TLS, sidecar)", TCP_RELAYED, "relay-tcp"),
        )
    }
    if args.same_pair:
        routes["same-direct"] = Route(
            "same-direct", "easy1->easy2 direct (upgraded)", SAME, "punch"
        )
        routes["same-relay"] = Route(
            "same-relay", "easy1->easy2 via its relay (kernel path)", SAME, "punch"
        )
    for route in routes.values():
        check_route(plan, rows, route)
    delayed = 0
    if args.same_pair:
        delayed = delay_probes(rows)
        # Fresh attempts at once, with the probes' latency (a failed one waits 35 s or more).
        for site in SAME:
            podman_exec(site, "systemctl", "restart", SIDECAR_UNIT)
    checked = check_no_delayer(rows)
    sites = sorted({site for route in routes.values() for site in route.sites})
    kinds = {site: wireguard_kind(site) for site in sites}

    kind_text = "; ".join(sorted({kind for kind, _ in kinds.values()}))
    by_mtu: dict[int, list[str]] = {}
    for site, (_, mtu) in kinds.items():
        by_mtu.setdefault(mtu, []).append(site)
    mtu_text = (
        str(next(iter(by_mtu)))
        if len(by_mtu) == 1
        else "; ".join(f"{mtu} on {', '.join(names)}" for mtu, names in sorted(by_mtu.items()))
    )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(
        f"machine: nproc {len(os.sched_getaffinity(0))}, load average {load}, {os.uname().release}"
    )
    print(f"WireGuard on {', '.join(sites)}: {kind_text}; {WG_INTERFACE} MTU {mtu_text}")
    print(
        f"WAN latency: 0 ms, jitter 0, loss 0 ({TOPOLOGY}; no NFQUEUE delayer on any of the "
        f"{checked} internet-facing hosts"
        + (
            f", but for probe-sized datagrams (IP length {PROBE_LENGTHS}): "
            f"{PROBE_LATENCY_MS} ms on arrival at {delayed} NAT routers)"
            if delayed
            else ")"
        )
    )
    for route in routes.values():
        sender, receiver = route.hosts
        a, b = route.sites
        text = (
            f"{route.name + ':':<7} {sender} -> {receiver} ({route.address}), plan mode "
            f"{route.mode}, endpoints {a} {route.endpoints[a]}, {b} {route.endpoints[b]}"
        )
        if route.processes:
            text += ", via " + ", ".join(
                f"{host} {what} pid {pid}" for what, host, pid in route.processes
            )
        print(text)
    print(
        f"{args.rounds} rounds, interleaved; iperf3 TCP {args.seconds} s per run; "
        f"ping -c {PING_COUNT} -i {PING_INTERVAL}"
    )
    print()

    variants: list[tuple[str, Route, int | None]] = [
        (name, route, None) for name, route in routes.items()
    ]
    if args.mss:
        variants += [(f"{name}-mss", route, args.mss) for name, route in routes.items()]
    series = {name: Series() for name, _, _ in variants}
    for round_number in range(1, args.rounds + 1):
        for name, route, mss in variants:
            sender, receiver = route.hosts
            if route.relay:
                set_kernel_path(route.relay, name != "relay-code")
            if name == "same-relay":
                pin_to_relay(plan, route, True)
            elif name == "same-direct":
                wait_for_path(plan, route, False, 300)
            counted = relay_counters(route.relay, route.allocation_key) if route.relay else {}
            before = {what: cpu_ticks(host, pid) for what, host, pid in route.processes}
            busy_before, total_before = machine_ticks()
            start = time.monotonic()
            try:
                bits, retransmits = iperf(sender, receiver, route.address, args.seconds, mss)
                # CPU over the run alone, not the wait for the direct path after it.
                elapsed = time.monotonic() - start
                busy_after, total_after = machine_ticks()
                spent = {w: cpu_ticks(h, pid) - before[w] for w, h, pid in route.processes}
            finally:
                if name == "same-relay":
                    pin_to_relay(plan, route, False)
            s = series[name]
            s.bits.append(bits)
            s.retransmits.append(retransmits)
            for what, ticks in spent.items():
                s.cpu_pct.setdefault(what, []).append(ticks / CLOCK_TICKS / elapsed * 100)
            s.cpu_pct.setdefault("host", []).append(
                (busy_after - busy_before) / max(total_after - total_before, 1) * 100
            )
            if route.relay:
                time.sleep(1.5)  # the relay writes its state file once a second
                after = relay_counters(route.relay, route.allocation_key)
                if counted and after:
                    s.relay_counters.update({k: v - counted.get(k, 0) for k, v in after.items()})
            cpu = ", ".join(f"{what} {v[-1]:.0f}%" for what, v in s.cpu_pct.items())
            log(
                f"round {round_number}: {name:<10} {bits / 1e6:8.1f} Mbit/s, "
                f"{retransmits} retransmits; CPU {cpu}"
            )
        for name, route in routes.items():
            rtt = ping(route.hosts[0], route.address)
            series[name].rtt_ms.append(rtt)
            log(f"round {round_number}: {name:<10} ping avg {rtt:.3f} ms")

    capacity_rows = (
        capacity(plan, routes["relay"], args.capacity_seconds, args.rounds)
        if args.capacity_seconds
        else []
    )

    rows_out: list[tuple[str, ...]] = [
        (
            "path",
            "Mbit/s",
            "runs",
            "retrans",
            "RTT ms",
            "relay CPU %",
            "sidecar CPU %",
            "host CPU %",
        )
    ]
    labels = {name: route.label for name, route in routes.items()}
    labels.update(
        {f"{name}-mss": f"{route.label}, MSS {args.mss}" for name, route in routes.items()}
    )
    for name, _, _ in variants:
        s = series[name]
        rows_out.append(
            (
                labels[name],
                mbit(s.bits),
                runs_text(s.bits),
                str(int(statistics.median(s.retransmits))),
                median_text(s.rtt_ms, 3),
                median_text(s.cpu_pct.get("relay"), 0),
                median_text(s.cpu_pct.get("sidecar"), 0),
                median_text(s.cpu_pct.get("host"), 0),
            )
        )
    print()
    print(table(rows_out))
    print()
    print(
        "Mbit/s, retrans, RTT and CPU are medians; relay and sidecar CPU are % of one core over "
        f"the run, host CPU % of all {os.cpu_count()} of this machine's (everything on it)."
    )

    if capacity_rows:
        a, b = routes["relay"].sites
        print(
            f"Forwarding capacity, {CAPACITY_PAYLOAD}-byte transport datagrams {a} -> {b} (one "
            f"Python sender in {a}, {args.capacity_seconds:g} s per run, medians), counted on "
            f"arrival at {b}'s NAT router; no relay: the same datagrams routed by the lab "
            f"straight to {b}'s address:"
        )
        print(table(capacity_rows))
        print()

    direct = series["direct"]
    bits_direct, rtt_direct = statistics.median(direct.bits), statistics.median(direct.rtt_ms)
    ratios: dict[str, float] = {}
    prefixes = (
        ("relay", "udp-relayed (kernel path)"),
        ("relay-code", "udp-relayed (code path)"),
        ("tcp", "tcp-relayed"),
    )
    for name, prefix in prefixes:
        ratios[name] = statistics.median(series[name].bits) / bits_direct
        print(f"{prefix}/direct throughput: {ratios[name]:.2f}")
        if args.mss:
            mss_ratio = statistics.median(series[f"{name}-mss"].bits) / statistics.median(
                series["direct-mss"].bits
            )
            print(f"{prefix}/direct throughput at MSS {args.mss}: {mss_ratio:.2f}")
    if args.same_pair:
        ratios["same"] = statistics.median(series["same-relay"].bits) / statistics.median(
            series["same-direct"].bits
        )
        print(f"easy1->easy2 relayed (kernel path)/direct, same pair: {ratios['same']:.2f}")
    for name, prefix in prefixes:
        rtt = statistics.median(series[name].rtt_ms)
        print(
            f"{prefix}/direct RTT: {rtt / rtt_direct:.2f} "
            f"(the relay adds {rtt - rtt_direct:+.3f} ms)"
        )
    for name, _, _ in variants:
        route = routes[name.removesuffix("-mss")]
        if not route.relay or name == "same-direct":
            continue
        counted = series[name].relay_counters
        shown = ", ".join(f"{k} +{v}" for k, v in sorted(counted.items()) if v) or "none"
        print(
            f"{route.relay} counters for {route.allocation_key} over the {labels[name]} runs: "
            f"{shown}"
        )
    for _, host, _ in routes["tcp"].processes[1:]:
        line = sidecar_log(host)
        print(f"{host} sidecar, last logged (cumulative, every 60 s): {line or 'nothing yet'}")
    verdicts = []
    udp = (
        ("same", "udp-relayed (kernel path, same pair)")
        if args.same_pair
        else ("relay", "udp-relayed (kernel path)")
    )
    for name, what, target in ((*udp, TARGET_RATIO), ("tcp", "tcp-relayed", TCP_TARGET_RATIO)):
        verdict = "PASS" if ratios[name] >= target else "FAIL"
        verdicts.append(verdict)
        print(f"target: {what}/direct throughput >= {target}: {verdict} ({ratios[name]:.2f})")
    return 0 if set(verdicts) == {"PASS"} else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the mwbench lab up")
    parser.add_argument(
        "--no-converge", action="store_true", help="reuse a lab already up and converged"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=6, help="per iperf3 run (default 6)")
    parser.add_argument(
        "--mss", type=int, default=0, help="also run with the sender's MSS clamped to this (0: no)"
    )
    parser.add_argument(
        "--capacity-seconds",
        type=float,
        default=3,
        help="per forwarding-capacity run (default 3; 0: no capacity runs)",
    )
    parser.add_argument(
        "--same-pair",
        action="store_true",
        help="also easy1->easy2 direct and through its relay (waits for the pair to go direct)",
    )
    args = parser.parse_args()
    if args.rounds < 1 or not 1 <= args.seconds <= 60 or args.mss < 0:
        parser.error("--rounds must be >= 1, --seconds 1..60, --mss >= 0")
    if not 0 <= args.capacity_seconds <= 30:
        parser.error("--capacity-seconds must be 0..30")

    started = time.monotonic()
    status = 2
    brought_up = False
    try:
        check_prerequisites()
        write_topology()
        hosts = lab_status()
        was_up = bool(hosts) and all(h["state"] == "running" for h in hosts)
        if args.no_converge:
            if not was_up or not PLAN.exists() or not INVENTORY.exists():
                raise BenchError(f"--no-converge needs lab {LAB} up and converged ({PLAN})")
            brought_up = True  # taken down at the end like a lab of this run, unless --keep
        else:
            if not was_up:
                # A fresh lab has fresh keys: the previous lab's plan and state would be stale.
                for stale in (PLAN, STATE):
                    stale.unlink(missing_ok=True)
            log(f"lab {LAB} up ({'already up' if was_up else 'building'}; log {WORK}/lab-up.log)")
            brought_up = True
            lab_up()
            log(f"converging playbooks/site.yml (log {WORK}/converge.log)")
            converge_start = time.monotonic()
            converge()
            log(f"converged in {time.monotonic() - converge_start:.0f} s")
        if not PLAN.exists():
            raise BenchError(f"the converge wrote no plan at {PLAN}")
        status = bench(args)
    except BenchError as exc:
        print(f"relay_bench: error: {exc}", file=sys.stderr)
        status = 2
    finally:
        if args.keep:
            log(
                f"lab {LAB} left up (--keep): meshwright lab down --name {LAB} "
                f"--inventory {INVENTORY}"
            )
        elif brought_up:
            log(f"lab {LAB} down")
            try:
                lab_down()
            except BenchError as exc:
                print(f"relay_bench: error: lab down: {exc}", file=sys.stderr)
                status = 2
        log(f"total {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
