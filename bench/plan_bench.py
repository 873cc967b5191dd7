"""Benchmark of meshwright.plan: plan time and peak memory on synthetic meshes.

    .venv/bin/python bench/plan_bench.py            # the sizes below, a few runs each
    .venv/bin/python bench/plan_bench.py --quick    # one run each, smaller scenarios table

The meshes are seeded: 15% open, 45% easy, 30% hard, 10% blocked sites, one LAN each,
link kinds {"direct"} (blocked sites are optional and end up unreachable). "plan" is
build_plan (validation, links, every pair's path); "all sites" then derives every site's peers,
allowed IPs and routes (about n*n routes). Peak memory is tracemalloc's, for build_plan.
Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from report import table  # bench/report.py: the script's own directory is on sys.path

from meshwright.plan import Mesh, Plan, PlanError, build_plan
from meshwright.plan.synthetic import REALISTIC_MIX, synthetic_mesh

SIZES = (100, 1000, 3000)
TARGET_SIZE, TARGET_SECONDS = 1000, 2.0
ALL_KINDS = ("direct", "punch", "relay", "relay-tcp")
SCENARIOS: dict[str, dict[str, Any]] = {
    "direct only (the default)": {},
    "direct + punch": {"link_kinds": ("direct", "punch")},
    "all kinds, 2 relays": {"link_kinds": ALL_KINDS, "relays": 2},
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per size")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    print(
        "mix open/easy/hard/blocked =",
        "/".join(f"{x:.0%}" for x in REALISTIC_MIX),
        f"seed {args.seed}",
    )
    rows = [
        ("sites", "plan s", "peak MiB", "all sites s", "routes", "groups", "2-link", "searched")
    ]
    target = None
    for size in SIZES:
        mesh = synthetic_mesh(size, seed=args.seed)
        runs = 1 if args.quick else (5 if size <= 1000 else 3)
        seconds, plan = timed(lambda mesh=mesh: build_plan(mesh), runs)
        peak = peak_memory(mesh)
        if size <= 1000:
            derive, routes = timed(lambda plan=plan: all_sites(plan), 1)
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

    rows = [("1,000 sites, scenario", "plan s", "2-link", "searched", "unreachable")]
    for name, options in SCENARIOS.items():
        mesh = synthetic_mesh(TARGET_SIZE, seed=args.seed, **options)
        try:
            seconds, plan = timed(lambda mesh=mesh: build_plan(mesh), 1 if args.quick else 3)
        except PlanError as exc:
            # Honest about a limit: every relayed pair needs its own port pair on a relay.
            rows.append((name, "refused", "-", "-", str(exc)[:60]))
            continue
        stats = plan.stats
        rows.append(
            (
                name,
                f"{seconds:.3f}",
                f"{stats['two_hop_pairs']:,}",
                f"{stats['pending_pairs']:,}",
                str(len(plan.unreachable)),
            )
        )
    print(table(rows))
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
