"""Benchmark of the UDP relay against a direct link, on a lab of its own (`mwbench`).

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
host to LAN host, over a direct pair (easy1-lan1 -> public-lan1) and a UDP-relayed pair
(hard1-lan1 -> hard2-lan1), both checked in the plan and in the live WireGuard endpoints:

- iperf3 TCP throughput (`end.sum_received`), and the same with the sender's MSS clamped
  (--mss; 0 skips those rows), which keeps every WireGuard datagram below full MTU size;
- ping RTT (`ping -c 20 -i 0.2 -q`, the average);
- CPU of the relay process (`meshwright relay`, /proc/<pid>/stat utime+stime) and the relay's own
  counters for the pair (its state file) during the relayed runs.

Runs are interleaved (direct, relay, direct, relay, ...) for --rounds rounds; the table shows
medians. A TCP-relayed pair does not exist yet: its row says so. Exit status: 0 if relayed/direct
throughput is at least the target, 1 if not, 2 if a prerequisite or a lab step failed (no
numbers are printed then). Not a test: the numbers depend on the machine and its load.
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
IPERF_PORT = 5299  # not iperf3's default, so a stray server elsewhere cannot answer
IPERF_PIDFILE = "/run/mwbench-iperf3.pid"
RELAY_UNIT = "meshwright-relay.service"
RELAY_STATE = "/var/lib/meshwright-relay/state.json"
WG_INTERFACE = "mesh0"
PING_COUNT, PING_INTERVAL = 20, 0.2
TARGET_RATIO = 0.8
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
    # e.g. `blocked: mesh_required: false`: the plan needs it to accept the lab's topology.
    if SOURCE_HOST_VARS.is_dir():
        shutil.copytree(SOURCE_HOST_VARS, WORK / "host_vars", dirs_exist_ok=True)


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
    return json.loads(run(lab_command("status", "--json"), timeout=120).stdout)


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


def check_no_delayer(rows: list[dict[str, Any]]) -> int:
    """Fail if any internet-facing host queues packets to the delayer; returns hosts checked."""
    facing = [
        row["name"]
        for row in rows
        if any(network.endswith("-internet") for network in row["addresses"])
    ]
    if not facing:
        raise BenchError("`lab status` lists no internet-facing host")
    for host in facing:
        rules = podman_exec(host, "iptables", "-t", "mangle", "-S", "POSTROUTING")
        if "NFQUEUE" in rules:
            raise BenchError(f"{host} still delays its WAN traffic (NFQUEUE): latency is not 0")
    return len(facing)


# --- the plan and the live mesh --------------------------------------------------------------


def plan_pair(plan: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    for pair in plan.get("pairs", []):
        if {pair.get("a"), pair.get("b")} == {a, b}:
            return pair
    raise BenchError(f"{PLAN}: no pair {a} <-> {b}")


def relay_allocation(plan: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    for allocation in plan.get("allocations", []):
        if {allocation.get("a"), allocation.get("b")} == {a, b}:
            return allocation
    raise BenchError(f"{PLAN}: the relayed pair {a} <-> {b} has no allocation")


def live_endpoint(plan: dict[str, Any], site: str, peer: str) -> str:
    """The endpoint `site`'s WireGuard uses for `peer` now (host:port)."""
    peers = plan["sites"][site]["peers"]
    entry = next((p for p in peers if p["name"] == peer), None)
    if entry is None:
        raise BenchError(f"{PLAN}: {site} has no peer {peer}")
    for line in podman_exec(site, "wg", "show", WG_INTERFACE, "endpoints").splitlines():
        key, _, endpoint = line.partition("\t")
        if key == entry["public_key"]:
            return endpoint.strip()
    raise BenchError(f"{site}: WireGuard has no peer {peer} ({entry['public_key']})")


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


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Series:
    """The runs of one path."""

    bits: list[float] = field(default_factory=list)
    retransmits: list[int] = field(default_factory=list)
    rtt_ms: list[float] = field(default_factory=list)
    cpu_pct: list[float] = field(default_factory=list)
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


def relay_pid(relay: str) -> int:
    pid = podman_exec(relay, "systemctl", "show", "-p", "MainPID", "--value", RELAY_UNIT).strip()
    if not pid.isdigit() or pid == "0":
        raise BenchError(f"{relay}: {RELAY_UNIT} is not running (MainPID {pid!r})")
    return int(pid)


def cpu_ticks(relay: str, pid: int) -> int:
    """utime + stime of `pid` on `relay`, in clock ticks."""
    stat = podman_exec(relay, "cat", f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 is fields[0]
    return int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime


def relay_counters(relay: str, key: str) -> dict[str, int]:
    """The relay's counters for allocation `key` ("a--b") from its state file."""
    text = podman_exec(relay, "cat", RELAY_STATE, check=False)
    try:
        return dict(json.loads(text)["allocations"][key]["counters"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return {}


# --- output ----------------------------------------------------------------------------------


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if k else c.ljust(w)
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mbit(bits: list[float]) -> str:
    return f"{statistics.median(bits) / 1e6:.1f}" if bits else "-"


def runs_text(bits: list[float]) -> str:
    return " ".join(f"{b / 1e6:.1f}" for b in bits)


# --- the benchmark ---------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> int:
    rows = lab_status()
    plan = json.loads(PLAN.read_text())
    direct_pair = plan_pair(plan, *DIRECT)
    relayed_pair = plan_pair(plan, *RELAYED)
    if direct_pair["mode"] != "direct":
        raise BenchError(f"{PLAN}: {DIRECT[0]} <-> {DIRECT[1]} is {direct_pair['mode']!r}")
    if relayed_pair["mode"] != "relay":
        raise BenchError(f"{PLAN}: {RELAYED[0]} <-> {RELAYED[1]} is {relayed_pair['mode']!r}")
    allocation = relay_allocation(plan, *RELAYED)
    relay, relay_address = allocation["relay"], allocation["address"]
    allocation_key = f"{allocation['a']}--{allocation['b']}"
    relay_addresses = {a["address"] for a in plan.get("allocations", [])}

    relayed_endpoint = live_endpoint(plan, RELAYED[0], RELAYED[1])
    if relayed_endpoint.rsplit(":", 1)[0] != relay_address:
        raise BenchError(
            f"{RELAYED[0]} reaches {RELAYED[1]} at {relayed_endpoint}, not through "
            f"{relay} ({relay_address})"
        )
    direct_endpoint = live_endpoint(plan, DIRECT[0], DIRECT[1])
    if direct_endpoint.rsplit(":", 1)[0] in relay_addresses:
        raise BenchError(f"{DIRECT[0]} reaches {DIRECT[1]} through a relay ({direct_endpoint})")
    checked = check_no_delayer(rows)
    kinds = {site: wireguard_kind(site) for site in (*DIRECT, *RELAYED)}
    pid = relay_pid(relay)

    paths = {
        "direct": (f"{DIRECT[0]}-lan1", f"{DIRECT[1]}-lan1"),
        "relay": (f"{RELAYED[0]}-lan1", f"{RELAYED[1]}-lan1"),
    }
    addresses = {name: lan_address(rows, receiver) for name, (_, receiver) in paths.items()}
    kind_text = "; ".join(sorted({kind for kind, _ in kinds.values()}))
    mtu = kinds[RELAYED[0]][1]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(
        f"machine: nproc {len(os.sched_getaffinity(0))}, load average {load}, {os.uname().release}"
    )
    print(f"WireGuard on {', '.join(kinds)}: {kind_text}; {WG_INTERFACE} MTU {mtu}")
    print(
        f"WAN latency: 0 ms, jitter 0, loss 0 ({TOPOLOGY}; no NFQUEUE delayer on any of the "
        f"{checked} internet-facing hosts)"
    )
    print(
        f"direct: {paths['direct'][0]} -> {paths['direct'][1]} ({addresses['direct']}), plan "
        f"mode {direct_pair['mode']}, endpoint {direct_endpoint}"
    )
    print(
        f"relay:  {paths['relay'][0]} -> {paths['relay'][1]} ({addresses['relay']}), plan mode "
        f"{relayed_pair['mode']}, via {relay} {relayed_endpoint} (`meshwright relay`, pid {pid})"
    )
    print(
        f"{args.rounds} rounds, interleaved; iperf3 TCP {args.seconds} s per run; "
        f"ping -c {PING_COUNT} -i {PING_INTERVAL}"
    )
    print()

    variants: list[tuple[str, str, int | None]] = [
        ("direct", "direct", None),
        ("relay", "relay", None),
    ]
    if args.mss:
        variants += [("direct-mss", "direct", args.mss), ("relay-mss", "relay", args.mss)]
    series = {name: Series() for name, _, _ in variants}
    for round_number in range(1, args.rounds + 1):
        for name, path, mss in variants:
            sender, receiver = paths[path]
            counted = relay_counters(relay, allocation_key) if path == "relay" else {}
            before, start = cpu_ticks(relay, pid) if path == "relay" else 0, time.monotonic()
            bits, retransmits = iperf(sender, receiver, addresses[path], args.seconds, mss)
            series[name].bits.append(bits)
            series[name].retransmits.append(retransmits)
            if path == "relay":
                ticks = cpu_ticks(relay, pid) - before
                busy = ticks / CLOCK_TICKS / (time.monotonic() - start) * 100
                series[name].cpu_pct.append(busy)
                time.sleep(1.5)  # the relay writes its state file once a second
                after = relay_counters(relay, allocation_key)
                if counted and after:
                    series[name].relay_counters.update(
                        {k: v - counted.get(k, 0) for k, v in after.items()}
                    )
            log(
                f"round {round_number}: {name:<10} {bits / 1e6:8.1f} Mbit/s, "
                f"{retransmits} retransmits"
            )
        for path in ("direct", "relay"):
            sender, _ = paths[path]
            rtt = ping(sender, addresses[path])
            series[path].rtt_ms.append(rtt)
            log(f"round {round_number}: {path:<10} ping avg {rtt:.3f} ms")

    direct, relayed = series["direct"], series["relay"]
    rows_out: list[tuple[str, ...]] = [
        ("path", "Mbit/s", "runs", "retrans", "RTT ms", "relay CPU %")
    ]
    labels = {
        "direct": "direct (UDP, no relay)",
        "relay": "udp relay",
        "direct-mss": f"direct, MSS {args.mss}",
        "relay-mss": f"udp relay, MSS {args.mss}",
    }
    for name, _, _ in variants:
        s = series[name]
        rows_out.append(
            (
                labels[name],
                mbit(s.bits),
                runs_text(s.bits),
                str(int(statistics.median(s.retransmits))),
                f"{statistics.median(s.rtt_ms):.3f}" if s.rtt_ms else "-",
                f"{statistics.median(s.cpu_pct):.0f}" if s.cpu_pct else "-",
            )
        )
    rows_out.append(("tcp relay: not built yet", "-", "-", "-", "-", "-"))
    print()
    print(table(rows_out))
    print()
    print("Mbit/s, retrans, RTT and CPU are medians; relay CPU is % of one core over the run.")

    ratio = statistics.median(relayed.bits) / statistics.median(direct.bits)
    rtt_direct, rtt_relay = statistics.median(direct.rtt_ms), statistics.median(relayed.rtt_ms)
    print(f"relayed/direct throughput: {ratio:.2f}")
    if args.mss:
        mss_ratio = statistics.median(series["relay-mss"].bits) / statistics.median(
            series["direct-mss"].bits
        )
        print(f"relayed/direct throughput at MSS {args.mss}: {mss_ratio:.2f}")
    print(
        f"relayed/direct RTT: {rtt_relay / rtt_direct:.2f} "
        f"(the relay adds {rtt_relay - rtt_direct:+.3f} ms)"
    )
    for name in ("relay", "relay-mss"):
        if name not in series:
            continue
        counted = series[name].relay_counters
        shown = ", ".join(f"{k} +{v}" for k, v in sorted(counted.items()) if v) or "none"
        print(f"relay counters for {allocation_key} over the {labels[name]} runs: {shown}")
    if series["relay"].relay_counters["dropped_malformed"] and mtu:
        full = 16 + mtu + 16
        print(
            f"  note: the relay drops datagrams as malformed. WireGuard pads to a multiple "
            f"of 16 only up to the MTU, so a full-size one here is 16+{mtu}+16 = {full} "
            f"bytes ({full % 16} over a multiple of 16), which a transport-size check "
            "requiring a multiple of 16 rejects; the MSS-clamped rows avoid such datagrams."
        )
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"target: relayed/direct throughput >= {TARGET_RATIO}: {verdict} ({ratio:.2f})")
    return 0 if verdict == "PASS" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the mwbench lab up")
    parser.add_argument(
        "--no-converge", action="store_true", help="reuse a lab already up and converged"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=6, help="per iperf3 run (default 6)")
    parser.add_argument(
        "--mss", type=int, default=1300, help="clamped-MSS rows' MSS (default 1300; 0: none)"
    )
    args = parser.parse_args()
    if args.rounds < 1 or not 1 <= args.seconds <= 60 or args.mss < 0:
        parser.error("--rounds must be >= 1, --seconds 1..60, --mss >= 0")

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
