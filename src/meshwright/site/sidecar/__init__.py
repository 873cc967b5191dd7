"""The site sidecar (`meshwright sidecar`): one service per site, beside WireGuard.

Two parts, each configured by its part of ``/etc/meshwright/sidecar.json``:

* traversal (:mod:`.traversal`, the decisions; :mod:`.daemon`, the I/O): keeps every peer with
  a relay allocation on its best working path, relayed or direct (punch peers upgraded, direct
  peers watched, relayed ones failed over), by setting WireGuard's endpoint; it never carries
  site traffic itself (docs/sidecar.md);
* the TLS carrier (:mod:`.carrier`, configured by :mod:`.config`): carries a UDP-blocked site's
  WireGuard datagrams to its relays over TLS, one local socket per relay.

``meshwright sidecar status [--json]`` prints the traversal state file as a table or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from .carrier import Sidecar
from .config import (
    Config,
    SidecarConfigError,
    TlsRelay,
    TraversalConfig,
    load_config,
    load_sidecar_file,
)

__all__ = [
    "Config",
    "Sidecar",
    "SidecarConfigError",
    "TlsRelay",
    "TraversalConfig",
    "format_status",
    "load_config",
    "main",
]

DEFAULT_CONFIG = Path("/etc/meshwright/sidecar.json")
DEFAULT_STATE = Path("/run/meshwright-sidecar/state.json")
_COLUMNS = (
    "peer",
    "path",
    "endpoint",
    "rtt ms",
    "last proof",
    "attempts",
    "up",
    "down",
    "next try",
)


def _cell(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def format_status(state: dict[str, Any]) -> str:
    """The state file as a table: one line per peer."""
    rows = [_COLUMNS]
    for name, peer in sorted(state.get("peers", {}).items()):
        path = peer["path"] if peer.get("phase") == "idle" else f"{peer['path']} ({peer['phase']})"
        rows.append(
            (
                name,
                path + (" suspect" if peer.get("suspect") else ""),
                _cell(peer.get("endpoint")),
                _cell(peer.get("rtt_ms")),
                _cell(peer.get("last_proof_age_s"), " s ago"),
                str(peer.get("attempts", 0)),
                str(peer.get("upgrades", 0)),
                str(peer.get("fallbacks", 0)),
                _cell(peer.get("next_attempt_in_s"), " s"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    mapped = ", ".join(f"{r} sees {m}" for r, m in state.get("mapped", {}).items())
    header = f"site {state.get('site', '?')}: WireGuard's socket: {mapped or 'not yet known'}"
    return "\n".join([header, *lines])


def _status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshwright sidecar status")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--json", action="store_true", help="the state file as it is")
    args = parser.parse_args(argv)
    try:
        state = json.loads(args.state.read_text())
    except (OSError, ValueError) as exc:
        print(f"sidecar status: {args.state}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2, sort_keys=True) if args.json else format_status(state))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return _status(argv[1:])
    parser = argparse.ArgumentParser(
        prog="meshwright sidecar",
        description="keep peers on their best path; carry a UDP-blocked site over TLS",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        carrier, traversal = load_sidecar_file(args.config)
    except (OSError, SidecarConfigError) as exc:
        log(f"sidecar: {args.config}: {exc}")
        return 2
    if traversal is None:
        sidecar = Sidecar(args.config, log=log)
        sidecar.install_signals()
        sidecar.serve_forever()
        return 0
    from .daemon import TraversalDaemon, install_signals
    from .wireguard import LiveWireGuard

    thread = None
    if carrier is not None:
        sidecar = Sidecar(args.config, log=log)
        thread = threading.Thread(target=sidecar.serve_forever, name="carrier", daemon=True)
        thread.start()
    daemon = TraversalDaemon(
        traversal, LiveWireGuard(traversal.interface), log=log, config_path=args.config
    )
    install_signals(daemon)
    try:
        daemon.serve_forever()
    finally:
        daemon.close()
    return 0
