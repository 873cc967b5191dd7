"""Benchmark of meshwright.plan: plan time and peak memory on synthetic meshes.

    .venv/bin/python bench/plan_bench.py            # the sizes below, a few runs each
    .venv/bin/python bench/plan_bench.py --quick    # one run each, smaller scenarios table

The meshes are seeded: 15% open, 45% easy, 30% hard, 10% blocked sites, one LAN each,
link kinds {"direct"} (blocked sites are optional and end up unreachable). "plan" is
build_plan (validation, links, every pair's path, and with relays every linked pair's relay and
standby relay and every site's relay port); "all sites" then derives every site's peers,
allowed IPs and routes (about n*n routes). Peak memory is tracemalloc's, for build_plan.
"probed RTTs": every UDP site has its own round trip to each relay (2-150 ms), as real probes
give; without them every relay is as near as the others. The last table plans 10,000 sites
with relays (about 50 million linked pairs, each with an allocation) in a process of its own,
whose peak RSS it reports.
Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

from report import table  # bench/report.py: the script's own directory is on sys.path

from meshwright.plan import Mesh, Plan, PlanError, build_plan
from meshwright.plan.synthetic import REALISTIC_MIX, synthetic_mesh

SIZES = (100, 1000, 3000)
TARGET_SIZE, TARGET_SECONDS = 1000, 2.0
ALL_KINDS = ("direct", "punch", "relay", "relay-tcp")
LARGE_SIZE = 10_000
LARGE: dict[str, dict[str, Any]] = {
    "all kinds, 2 relays, probed RTTs": {"link_kinds": ALL_KINDS, "relays": 2, "relay_rtts": True},
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "direct only (the default)": {},
    "direct + punch": {"link_kinds": ("direct", "punch")},
    "all kinds, 2 relays": {"link_kinds": ALL_KINDS, "relays": 2},
    "all kinds, 2 relays, probed RTTs": {"link_kinds": ALL_KINDS, "relays": 2, "relay_rtts": True},
    "all kinds, 3 relays, probed RTTs": {"link_kinds": ALL_KINDS, "relays": 3, "relay_rtts": True},
    "relays only": {"link_kinds": ("relay", "relay-tcp"), "relays": 2},
    "30% spokes of 3 hubs": {"spokes": 0.3},
    "50% spokes, policies, all": {
        "spokes": 0.5,
        "no_direct": 0.05,
        "no_relay": 0.05,
        "link_kinds": ALL_KINDS,
        "relays": 1,
    },
}


def timed(function: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median wall time of ``runs`` calls, and the last result."""
    times, result = [], None
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_memory(mesh: Mesh) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        plan = build_plan(mesh)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del plan
    return peak


def all_sites(plan: Plan) -> int:
    return sum(len(site.routes) for site in plan.sites.values())


def large(name: str, seed: int) -> None:
    """Plan one LARGE scenario and print its time, peak RSS and allocation counts."""
    mesh = synthetic_mesh(LARGE_SIZE, seed=seed, **LARGE[name])
    gc.collect()
    start = time.perf_counter()
    plan = build_plan(mesh)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    counts = len(plan.allocations), len(plan.standby_allocations)
    print(f"{seconds:.1f} {peak:.0f} {counts[0]:,} {counts[1]:,}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--large", metavar="SCENARIO", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.large:
        large(args.large, args.seed)
        return 0

    print(
        "mix open/easy/hard/blocked =",
        "/".join(f"{x:.0%}" for x in REALISTIC_MIX),
        f"seed {args.seed}",
    )
    rows: list[tuple[str, ...]] = [
        ("sites", "plan s", "peak MiB", "all sites s", "routes", "groups", "2-link", "searched")
    ]
    target = None
    for size in SIZES:
        mesh = synthetic_mesh(size, seed=args.seed)
        runs = 1 if args.quick else (5 if size <= 1000 else 3)
        seconds, plan = timed(partial(build_plan, mesh), runs)
        peak = peak_memory(mesh)
        if size <= 1000:
            derive, routes = timed(partial(all_sites, plan), 1)
            derive_text, routes_text = f"{derive:.3f}", f"{routes:,}"
        else:
            derive_text = routes_text = "-"
        stats = plan.stats
        rows.append(
            (
                f"{size:,}",
                f"{seconds:.3f}",
                f"{peak / 2**20:.1f}",
                derive_text,
                routes_text,
                str(stats["groups"]),
                f"{stats['two_hop_pairs']:,}",
                f"{stats['pending_pairs']:,}",
            )
        )
        if size == TARGET_SIZE:
            target = seconds
    print(table(rows))
    print()
    print("ordered pairs solved by 2-link: the nearest-midpoint transit; by searched: the")
    print("per-destination Dijkstra (3+ links). Every other pair is linked: no search at all.")
    print()

    rows = [("1,000 sites, scenario", "plan s", "2-link", "searched", "relayed", "unreachable")]
    for name, options in SCENARIOS.items():
        mesh = synthetic_mesh(TARGET_SIZE, seed=args.seed, **options)
        try:
            seconds, plan = timed(partial(build_plan, mesh), 1 if args.quick else 3)
        except PlanError as exc:
            rows.append((name, "refused", "-", "-", "-", str(exc)[:60]))
            continue
        stats = plan.stats
        rows.append(
            (
                name,
                f"{seconds:.3f}",
                f"{stats['two_hop_pairs']:,}",
                f"{stats['pending_pairs']:,}",
                f"{len(plan.allocations):,}",
                str(len(plan.unreachable)),
            )
        )
    print(table(rows))
    print("relayed: allocations (every linked pair has one when the mesh has relays)")
    print()

    rows = [(f"{LARGE_SIZE:,} sites, scenario", "plan s", "RSS MiB", "allocations", "standby")]
    for name in LARGE:
        # A process of its own: its peak RSS is the plan's (tracemalloc would trace every
        # object of 50 million pair choices, and take minutes).
        found = subprocess.run(
            [sys.executable, __file__, "--large", name, "--seed", str(args.seed)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        rows.append((name, *found))
    print(table(rows))
    print("RSS: the peak resident memory of a process that only builds the mesh and plans it")
    print()
    assert target is not None
    verdict = "PASS" if target < TARGET_SECONDS else "FAIL"
    print(
        f"target: {TARGET_SIZE:,} sites planned in under {TARGET_SECONDS:.0f} s:"
        f" {verdict} ({target:.3f} s median)"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
