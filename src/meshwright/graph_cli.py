"""`meshwright graph`: the plan (optionally with a live status) as a picture, through Graphviz.

The adapter around :mod:`meshwright.graph`: reads the plan file, the state file beside it (the
sites' NAT classes: the plan does not hold them) and an optional live status file, and writes
DOT text or runs Graphviz's ``dot`` for SVG or PNG. See docs/graph.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from meshwright.graph import GraphError, live_from_dict, to_dot
from meshwright.plan.inventory import StateError, read_state

__all__ = ["DEFAULT_PLAN", "FORMATS", "GraphCommandError", "main", "render"]

DEFAULT_PLAN = Path("inventory/.meshwright/plan.json")
FORMATS = ("svg", "png", "dot")
# Graphviz: Debian package graphviz (`make deb`).
DOT_PROGRAM = "dot"
INSTALL_HINT = "install graphviz (make deb)"


class GraphCommandError(Exception):
    """One sentence for stderr, and the exit status: 1 the environment, 2 the input."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _read_json(path: Path, what: str, hint: str = "") -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphCommandError(f"graph: {what} {path} does not exist{hint}", 1) from None
    except OSError as exc:
        raise GraphCommandError(f"graph: {what} {path}: {exc.strerror}", 1) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise GraphCommandError(f"graph: {what} {path}: not valid JSON ({exc})", 2) from None


def _nat_classes(path: Path) -> dict[str, str | None]:
    """Site -> NAT class from the state file; none when there is no state file yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise GraphCommandError(f"graph: state file {path}: {exc.strerror}", 1) from None
    try:
        state = read_state(text)
    except StateError as exc:
        raise GraphCommandError(f"graph: state file {path}: {exc}", 2) from None
    return {name: site.nat_class for name, site in state.sites.items()}


def render(dot_text: str, fmt: str) -> bytes:
    """DOT text as ``fmt`` (svg, png) by Graphviz's ``dot``; GraphCommandError when it cannot."""
    program = shutil.which(DOT_PROGRAM)
    if program is None:
        raise GraphCommandError(
            f"graph: Graphviz's `{DOT_PROGRAM}` program is not on PATH: {INSTALL_HINT}"
            f" (or use --format dot)",
            1,
        )
    result = subprocess.run(
        [program, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, check=False
    )
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
        raise GraphCommandError(f"graph: `{DOT_PROGRAM} -T{fmt}` failed: {detail}", 1)
    return result.stdout


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshwright graph",
        description="Draw the mesh (sites, relays, every pair's link) with Graphviz.",
    )
    parser.add_argument(
        "-p",
        "--plan",
        type=Path,
        default=DEFAULT_PLAN,
        help=f"plan file (default: {DEFAULT_PLAN})",
    )
    parser.add_argument(
        "--state",
        type=Path,
        help="state file with the sites' NAT classes (default: state.json beside the plan)",
    )
    parser.add_argument(
        "--live",
        type=Path,
        metavar="STATUS_JSON",
        help='live status: {"pairs": [{"a": ..., "b": ..., "path": "direct|relay|relay-tcp|via"}]}',
    )
    parser.add_argument("-o", "--output", type=Path, help="output file (default: standard output)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (default: the output's suffix, else svg)",
    )
    return parser


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    suffix = args.output.suffix.lower().lstrip(".") if args.output else ""
    return {"gv": "dot"}.get(suffix, suffix) if suffix in (*FORMATS, "gv") else "svg"


def _run(args: argparse.Namespace) -> None:
    fmt = _format(args)
    plan = _read_json(args.plan, "plan file", " (the site playbook writes it; -p names another)")
    classes = _nat_classes(args.state or args.plan.with_name("state.json"))
    try:
        live = live_from_dict(_read_json(args.live, "live status")) if args.live else None
        text = to_dot(plan, classes, live)
    except GraphError as exc:
        raise GraphCommandError(f"graph: {exc}", 2) from None
    data = text.encode() if fmt == "dot" else render(text, fmt)
    if args.output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        args.output.write_bytes(data)
    except OSError as exc:
        raise GraphCommandError(f"graph: cannot write {args.output}: {exc.strerror}", 1) from None


def main(argv: list[str] | None = None) -> int:
    """``meshwright graph`` with these arguments; 0, 1 (environment) or 2 (bad input)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _run(args)
    except GraphCommandError as exc:
        print(exc, file=sys.stderr)
        return exc.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
