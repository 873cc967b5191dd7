"""Benchmark of the traversal sidecar on a converged lab (the default topology, with its WAN
latency: the lab's delayer makes packets of a hole punch cross in flight).

    .venv/bin/python bench/sidecar_bench.py                        # the lab of inventory/lab
    .venv/bin/python bench/sidecar_bench.py --inventory FILE --rounds 7

The lab must be up and converged (`make demo`, or `meshwright lab up` and
`ansible-playbook meshwright.mesh.site`). Measures, for the pair easy1-easy2 (two
endpoint-independent NATs, the pair the sidecar upgrades):

- time from the sidecars' start to direct: both sidecars restarted (each puts the pair back
  on its relay at start), then the sidecar's own log line "direct via ..." against systemd's
  "Started" line, median of --rounds; target under 2 s;
- packets lost during those upgrades: a 20-per-second ping across the pair's LANs spans every
  round; target 0;
- fallback: the direct path cut on easy2's NAT router (drop easy1's public address) while the
  ping flows; the outage is the pings lost / 20, and the sidecar's "relay (direct path
  silent)" line against the moment of the cut; target under 3 s;
- the lab matrix: how many of the lab's pairs are on a direct path (WireGuard endpoints that
  are not a relay's address or the sidecar's loopback), before and with the sidecar;
- the sidecar's memory (VmRSS) and idle CPU (utime + stime over 60 s with every peer settled
  and no traffic), and the probe and keepalive packets per idle peer per minute (tcpdump on
  easy1 towards easy2's public address).

Prints a table. Not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from report import table  # bench/report.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "src" / "meshwright" / "lab" / "containers.conf"
NODE = "/opt/meshwright/lib/meshwright-node.pyz"
A, B = "easy1", "easy2"


class Lab:
    def __init__(self, inventory: Path) -> None:
        data = yaml.safe_load(inventory.read_text())["all"]["children"]
        self.hosts = {n: h for group in data.values() for n, h in group["hosts"].items()}
        self.sites = sorted(data["mesh_sites"]["hosts"])
        self.relays = sorted(data["mesh_relays"]["hosts"])
        plan = inventory.parent / ".meshwright" / "plan.json"
        self.plan = json.loads(plan.read_text())

    def sh(self, host: str, script: str, check: bool = True, timeout: float = 120) -> str:
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        container = self.hosts[host]["ansible_host"]
        done = subprocess.run(
            ["podman", "exec", container, "sh", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{host}: {script}: {done.stderr.strip()}")
        return done.stdout

    def lan(self, site: str) -> str:
        prefix = self.hosts[site]["mesh_lan_prefixes"][0]
        return re.sub(r"\.0/\d+$", ".10", prefix)

    def public(self, site: str) -> str:
        return str(self.hosts[site]["lab_public_address"])

    def status(self, site: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.sh(site, f"python3 {NODE} sidecar status --json"))
        return status

    def path(self, site: str, peer: str) -> str:
        try:
            return str(self.status(site)["peers"][peer]["path"])
        except (RuntimeError, ValueError, KeyError):  # restarting: no state file yet
            return "unknown"

    def wait_direct(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not (self.path(A, B) == "direct" and self.path(B, A) == "direct"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{A}-{B} not direct in {timeout} s")
            time.sleep(0.5)

    def journal(self, site: str, since: float) -> list[tuple[float, str]]:
        out = self.sh(
            site,
            f"journalctl -u meshwright-sidecar -o short-unix --no-pager --since @{since:.3f}",
        )
        lines = []
        for line in out.splitlines():
            stamp, _, text = line.partition(" ")
            try:
                lines.append((float(stamp), text))
            except ValueError:
                continue
        return lines


def start_ping(lab: Lab, count: int, name: str) -> str:
    log = f"/tmp/{name}.txt"
    lab.sh(f"{A}-lan1", f"rm -f {log}; systemctl stop {name} 2>/dev/null; true", check=False)
    lab.sh(
        f"{A}-lan1",
        f"systemd-run --quiet --unit={name} sh -c "
        f"'ping -i 0.05 -c {count} -W 1 {lab.lan(B)} > {log} 2>&1'",
    )
    return log


def ping_lost(lab: Lab, log: str, count: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        out = lab.sh(f"{A}-lan1", f"cat {log}", check=False)
        match = re.search(r"(\d+) received", out)
        if match:
            return count - int(match.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"ping did not finish: {out[-300:]}")
        time.sleep(0.5)


def upgrade_times(lab: Lab, rounds: int) -> tuple[list[float], int, int]:
    count = int((rounds * 8 + 4) * 20)
    log = start_ping(lab, count, "mw-bench-upgrade")
    times = []
    for _ in range(rounds):
        lab.wait_direct()
        since = time.time() - 1
        for site in (A, B):
            lab.sh(site, "systemctl restart meshwright-sidecar")
        lab.wait_direct(30)
        for site, peer in ((A, B), (B, A)):
            lines = lab.journal(site, since)
            started = max(t for t, text in lines if "Started meshwright-sidecar" in text)
            direct = min(t for t, text in lines if t >= started and f"{peer}: direct via" in text)
            times.append(direct - started)
        time.sleep(2)
    return times, ping_lost(lab, log, count), count


def fallback(lab: Lab) -> tuple[float, float]:
    lab.wait_direct()
    count = 400
    log = start_ping(lab, count, "mw-bench-fallback")
    time.sleep(3)
    rule = f"FORWARD -s {lab.public(A)} -j DROP"
    router = f"{B}-nat"
    cut = time.time()
    lab.sh(router, f"iptables -I {rule}")
    try:
        deadline = time.monotonic() + 30
        while lab.path(A, B) != "relay" or lab.path(B, A) != "relay":
            if time.monotonic() > deadline:
                raise RuntimeError("no fallback in 30 s")
            time.sleep(0.2)
        lost = ping_lost(lab, log, count)
    finally:
        lab.sh(router, f"iptables -D {rule}", check=False)
    moved = [
        t - cut
        for site in (A, B)
        for t, text in lab.journal(site, cut)
        if "relay (direct path silent)" in text or "relay (peer fell back)" in text
    ]
    return lost / 20, min(moved) if moved else float("nan")


def direct_pairs(lab: Lab) -> tuple[int, int, int]:
    """(pairs on a direct path now, pairs the plan makes direct, all pairs)."""
    relays = {a for r in lab.relays for a in lab.hosts[r]["relay_public_addresses"]}
    keys = {s: lab.plan["sites"][s] for s in lab.sites}
    endpoints: dict[str, dict[str, str]] = {}
    for site in lab.sites:
        out = lab.sh(site, "wg show mesh0 endpoints")
        endpoints[site] = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
    direct = 0
    for a, b in itertools.combinations(lab.sites, 2):
        peers = {p["name"]: p["public_key"] for p in keys[a]["peers"]}
        ends = [endpoints[a].get(peers.get(b, ""), "(none)")]
        peers_b = {p["name"]: p["public_key"] for p in keys[b]["peers"]}
        ends.append(endpoints[b].get(peers_b.get(a, ""), "(none)"))
        known = [e for e in ends if e != "(none)"]
        hosts = {e.rsplit(":", 1)[0] for e in known}
        if known and not hosts & relays and "127.0.0.1" not in hosts:
            direct += 1
    planned = sum(1 for p in lab.plan["pairs"] if p["mode"] == "direct")
    return direct, planned, len(lab.plan["pairs"])


def idle(lab: Lab, seconds: float = 60) -> tuple[float, float, float, float]:
    """(VmRSS MiB, CPU % of a core, probes per minute, keepalives per minute) on easy1."""
    lab.wait_direct()
    pid = lab.sh(A, "systemctl show -p MainPID --value meshwright-sidecar").strip()
    vmrss = re.search(r"VmRSS:\s+(\d+)", lab.sh(A, f"cat /proc/{pid}/status"))
    assert vmrss is not None, f"no VmRSS in /proc/{pid}/status"
    rss = int(vmrss.group(1))
    hz = int(lab.sh(A, "getconf CLK_TCK").strip())

    def ticks() -> int:
        fields = lab.sh(A, f"cat /proc/{pid}/stat").rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    endpoint = lab.public(B)
    lab.sh(
        A,
        "rm -f /tmp/mw-idle.pcap; systemd-run --quiet --unit=mw-bench-idle "
        f"tcpdump -i any -U -w /tmp/mw-idle.pcap 'udp and host {endpoint}'",
    )
    time.sleep(1)
    before, started = ticks(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = ticks(), time.monotonic() - started
    lab.sh(A, "systemctl stop mw-bench-idle", check=False)
    time.sleep(0.5)
    out = lab.sh(A, "tcpdump -n -r /tmp/mw-idle.pcap 2>/dev/null", check=False)
    sent = [line for line in out.splitlines() if " Out " in line or f"> {endpoint}" in line]
    probes = sum(1 for line in sent if "length 34" in line or "length 40" in line)
    keepalives = sum(1 for line in sent if "length 32" in line)
    per_minute = 60 / elapsed
    cpu = (after - before) / hz / elapsed * 100
    return rss / 1024, cpu, probes * per_minute, keepalives * per_minute


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inventory", type=Path, default=ROOT / "inventory/lab/hosts.yml")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lab = Lab(args.inventory)
    direct, planned, total = direct_pairs(lab)
    times, lost, sent = upgrade_times(lab, args.rounds)
    outage, moved = fallback(lab)
    rss, cpu, probes, keepalives = idle(lab)
    median = statistics.median(times)
    rows = [
        (
            "start to direct, median (min-max)",
            f"{median:.2f} s ({min(times):.2f}-{max(times):.2f})",
            "< 2 s",
            "PASS" if median < 2 else "FAIL",
        ),
        ("packets lost during upgrades", f"{lost} of {sent}", "0", "PASS" if lost == 0 else "FAIL"),
        (
            "fallback: outage (pings lost / 20)",
            f"{outage:.2f} s",
            "< 3 s",
            "PASS" if outage < 3 else "FAIL",
        ),
        (
            "fallback: cut to relay endpoint",
            f"{moved:.2f} s",
            "< 3 s",
            "PASS" if moved < 3 else "FAIL",
        ),
        ("direct pairs of the lab", f"{direct} of {total} (plan: {planned})", "", ""),
        ("sidecar memory (VmRSS)", f"{rss:.1f} MiB", "< 30 MiB", "PASS" if rss < 30 else "FAIL"),
        ("sidecar idle CPU", f"{cpu:.2f} % of a core", "< 0.5 %", "PASS" if cpu < 0.5 else "FAIL"),
        ("probes per idle peer per minute", f"{probes:.1f}", "", ""),
        ("WireGuard keepalives per idle peer per minute", f"{keepalives:.1f}", "", ""),
    ]
    print(table([("measure", "value", "target", ""), *rows]))
    print(f"upgrade times (s): {' '.join(f'{t:.2f}' for t in times)}")
    return 0 if all(r[3] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
