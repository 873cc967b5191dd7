"""Benchmark of meshwright.relay.sites, the per-site relay core: memory and CPU at 10,000 sites.

    PYTHONPATH=src .venv/bin/python bench/relay_sites_bench.py             # 10,000 sites, 50,000
    PYTHONPATH=src .venv/bin/python bench/relay_sites_bench.py --sites 1000 --sessions 5000

Pure core only (no sockets): every session is made by real WireGuard-shaped handshakes (real
X25519 public keys, valid mac1) fed to Relay.receive(), then transport data is pushed through it.
Each site initiates sessions/sites sessions to peers spread over the mesh.

Loading starts from a restored state (confirmed addresses and the peers' relationships, as a
relay restarted with its state file has), so each initiation finds its receiver among the
sender's recent peers; a relay without that state scans every site for each first initiation,
and the "full scan" rows say what that costs. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc
from pathlib import Path

from report import table  # bench/report.py: the script's own directory is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))
from wg_messages import flip_bit, initiation, public_key, response, transport

from meshwright.relay.sites import SESSION_TTL, Address, Relay


def rss_mib() -> float:
    """This process's resident set now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def address(site: int) -> Address:
    return (f"198.51.100.{site % 250 + 1}", 1024 + site)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=50_000)
    parser.add_argument("--data", type=int, default=200_000, help="transport datagrams to push")
    args = parser.parse_args()
    n, per_site = args.sites, max(1, args.sessions // args.sites)
    names = [f"site{k:05d}" for k in range(n)]
    keys = {name: public_key() for name in names}
    # Site k initiates to k+1, k+1+stride, ...: every site has 2 * per_site peers.
    stride = max(1, n // (per_site + 1))
    pairs = [(k, (k + 1 + j * stride) % n) for k in range(n) for j in range(per_site)]
    pairs = [(i, r) for i, r in pairs if i != r]

    gc.collect()
    rss_before = rss_mib()
    tracemalloc.start()
    relay = Relay(
        keys,
        confirmed={names[k]: address(k) for k in range(n)},
        # The peers' relationships, as a restarted relay restores them (placeholder indices,
        # expired before the measurement): they fill each site's recent peers.
        sessions=[(names[i], names[r], 0xFFFF0000 + j) for j, (i, r) in enumerate(pairs)],
        mac1_checks_per_second=1e12,
        scans_per_second=1e12,
    )
    relay.receive(names[0], address(0), b"\xffMWP", 0.0)  # the relay's clock starts
    now = SESSION_TTL + 1.0  # the placeholders are gone by the next sweep
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    flows: list[tuple[str, Address, int]] = []
    for j, (i, r) in enumerate(pairs):
        si, sr = names[i], names[r]
        mine, theirs = 2 * j + 1, 2 * j + 2  # unique per session: nothing collides
        assert relay.receive(si, address(i), initiation(keys[sr], mine), now) is not None
        assert relay.receive(sr, address(r), response(keys[si], theirs, mine), now) is not None
        assert relay.receive(si, address(i), transport(theirs), now) is not None
        flows += [(si, address(i), theirs), (sr, address(r), mine)]
    load_cpu = time.process_time() - start_cpu
    load_wall = time.perf_counter() - start_wall
    del flows[args.data :]
    flows_size = sum(sys.getsizeof(f) + sys.getsizeof(f[1]) for f in flows)
    held, peak = tracemalloc.get_traced_memory()
    held -= flows_size  # the benchmark's own list, not the relay's
    tracemalloc.stop()
    gc.collect()
    rss_loaded = rss_mib()  # before the benchmark's own datagrams below
    data = [(site, source, transport(index, 1, 1404)) for site, source, index in flows]
    stats = relay.stats()
    assert stats["sessions"] == 2 * len(pairs), stats

    # Transport data through receive(): the per-packet path.
    rounds = max(1, args.data // max(1, len(data)))
    start = time.process_time()
    forwarded = 0
    for _ in range(rounds):
        for site, source, datagram in data:
            forwarded += relay.receive(site, source, datagram, now) is not None
    data_cpu = time.process_time() - start
    assert forwarded == rounds * len(data)

    # Initiations: receiver among the sender's recent peers (a rekey), and a full scan.
    rekeys = [
        (names[i], address(i), initiation(keys[names[r]], 0x7000_0000 + j))
        for j, (i, r) in enumerate(pairs[:5000])
    ]
    start = time.process_time()
    for site, source, datagram in rekeys:  # no answer: they stay tentative
        relay.receive(site, source, datagram, now + 1)
    hit_cpu = (time.process_time() - start) / len(rekeys)
    # Junk with a valid shape and a wrong mac1: the worst case, every site checked.
    junk = [flip_bit(initiation(keys[names[1]], 0x7F00_0000 + k), 8 * 120) for k in range(50)]
    start = time.process_time()
    for datagram in junk:
        relay.receive(names[0], address(0), datagram, now + 2)
    scan_cpu = (time.process_time() - start) / len(junk)
    assert relay.counters["dropped_bad_mac1"] == len(junk)

    print(f"{n:,} sites, {len(pairs):,} sessions ({2 * len(pairs):,} index entries), pure core")
    rows = [("measure", "value")]
    rows += [
        ("load, under tracemalloc (CPU s)", f"{load_cpu:.2f} ({load_wall:.2f} wall)"),
        ("memory held, tracemalloc (MiB)", f"{held / 2**20:.1f}"),
        ("memory peak, tracemalloc (MiB)", f"{peak / 2**20:.1f}"),
        ("per site and its 2 * sessions/sites entries (KiB)", f"{held / n / 1024:.2f}"),
        ("RSS before -> loaded (MiB)", f"{rss_before:.1f} -> {rss_loaded:.1f}"),
        ("transport data (datagrams/s, one core)", f"{forwarded / data_cpu:,.0f}"),
        ("transport data (µs CPU each)", f"{data_cpu / forwarded * 1e6:.2f}"),
        ("initiation, receiver cached (µs CPU)", f"{hit_cpu * 1e6:.1f}"),
        (f"initiation, full scan of {n:,} sites (ms CPU)", f"{scan_cpu * 1e3:.2f}"),
        ("full scan, per site (µs CPU)", f"{scan_cpu / n * 1e6:.3f}"),
        ("full scans/s at the default budget", f"{min(100.0, 200_000 / n):,.0f}"),
    ]
    print(table(rows))
    print("state once loaded:", ", ".join(f"{k} {v:,}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
