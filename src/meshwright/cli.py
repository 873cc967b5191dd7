"""The `meshwright` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshwright import node

DEFAULT_TOPOLOGY = Path("inventory/lab/topology.yml")
DEFAULT_INVENTORY = Path("inventory/lab/hosts.yml")


def _lab(args: argparse.Namespace) -> int:
    from meshwright.lab import image, podman, runner
    from meshwright.lab.topology import TopologyError

    try:
        if args.action == "image":
            print(image.ensure_image())
            return 0
        topology = runner.read_topology(args.topology, args.name)
        inventory = None if args.no_inventory else args.inventory
        if args.action == "up":
            runner.up(topology, inventory)
            if not args.quiet:
                _print_status(runner.status(topology.name))
        elif args.action == "down":
            runner.down(topology.name, inventory)
        elif args.action == "status":
            rows = runner.status(topology.name)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_status(rows)
    except TopologyError as exc:
        print(f"{args.topology}: {exc}", file=sys.stderr)
        return 2
    except podman.PodmanError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_status(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no lab hosts")
        return
    print(f"{'host':<14} {'role':<9} {'site':<9} {'nat':<12} {'state':<8} addresses")
    for row in rows:
        addrs = "  ".join(
            f"{net.split('-', 1)[-1]}={','.join(a)}" for net, a in row["addresses"].items()
        )
        print(
            f"{row['name']:<14} {row['role']:<9} {row['site'] or '-':<9} "
            f"{row['nat'] or '-':<12} {row['state']:<8} {addrs}"
        )


def _artifact(args: argparse.Namespace) -> int:
    from meshwright import artifact

    try:
        path = artifact.build(args.output)
    except artifact.ArtifactError as exc:
        print(f"artifact: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from meshwright import plan_cli

    return plan_cli.run(args.inventory, args.format, sys.stdout, sys.stderr)


def _status(args: argparse.Namespace) -> int:
    from meshwright import status_cli

    return status_cli.run(args.inventory, args.json, args.output, sys.stdout, sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The node's services (relay, sidecar, STUN) take their own arguments.
    if argv[:1] and argv[0] in node.COMMANDS:
        return node.main(argv)
    if argv[:1] == ["graph"]:  # parses its own arguments, like the node's commands
        from meshwright import graph_cli

        return graph_cli.main(argv[1:])
    from meshwright.plan.diff import FORMATS

    parser = argparse.ArgumentParser(prog="meshwright", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="the multi-site NAT lab on podman")
    lab.add_argument("action", choices=["up", "down", "status", "image"])
    lab.add_argument(
        "--topology",
        type=Path,
        default=DEFAULT_TOPOLOGY,
        help=f"topology file (default: {DEFAULT_TOPOLOGY})",
    )
    lab.add_argument("--name", help="lab name, overriding the topology's (prefixes every object)")
    lab.add_argument(
        "--inventory",
        type=Path,
        default=DEFAULT_INVENTORY,
        help=f"Ansible inventory written by `up` (default: {DEFAULT_INVENTORY})",
    )
    lab.add_argument("--no-inventory", action="store_true", help="write no inventory")
    lab.add_argument("--json", action="store_true", help="status as JSON")
    lab.add_argument("--quiet", action="store_true", help="`up` prints no status table")
    lab.set_defaults(func=_lab)
    build = sub.add_parser("artifact", help="build the node artifact (what relays and sites run)")
    build.add_argument("--output", type=Path, default=Path("."), help="directory (default: .)")
    build.set_defaults(func=_artifact)
    plan = sub.add_parser(
        "plan",
        help="what the inventory changes in the committed plan, for review (contacts no host);"
        " exit 0: no change, 2: changes, 1: error",
    )
    plan.add_argument(
        "-i",
        "--inventory",
        action="append",
        help="inventory file, directory or host list, as ansible-playbook -i (default: the"
        " inventory of ansible.cfg, else ./inventory)",
    )
    plan.add_argument(
        "--diff", action="store_true", help="accepted for compatibility: the output is the diff"
    )
    plan.add_argument("--format", choices=FORMATS, default="text")
    plan.set_defaults(func=_plan)
    status = sub.add_parser(
        "status",
        help="every pair of the mesh as planned and as it is now (runs meshwright.mesh.status);"
        " exit 0: every site answered, 1: some did not",
    )
    status.add_argument(
        "-i",
        "--inventory",
        action="append",
        help="inventory file, directory or host list, passed to ansible-playbook -i",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "-o",
        "--output",
        type=Path,
        help="also write the status as JSON to this file (meshwright graph --live reads it)",
    )
    status.set_defaults(func=_status)
    # Listed for --help; meshwright.graph_cli takes its arguments (see the dispatch above).
    sub.add_parser("graph", help="draw the mesh (its plan, optionally live) with Graphviz")
    # Listed for --help; their own parser takes their arguments (see the dispatch above).
    for name, text in node.COMMANDS.items():
        sub.add_parser(name, help=text)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
