"""The node program: what runs on relays and sites, from the node artifact (``python3 FILE.pyz``).

The artifact (:mod:`meshwright.artifact`) holds :mod:`meshwright.wire`, :mod:`meshwright.relay`,
:mod:`meshwright.site` and their pinned pure-Python dependencies, and runs this module's
:func:`main`; the controller's ``meshwright`` command passes the same subcommands here.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "relay": "a relay's forwarding service (WireGuard ciphertext, unread)",
    "sidecar": "a site's sidecar: relay failover, direct paths; TLS for UDP-blocked sites",
    "stun-server": "the relays' STUN service (RFC 8489 and RFC 5780)",
    "wg-stun": "a relay's answer to sites: where it sees their WireGuard socket",
    "version": "the artifact's content hash",
}


def version() -> str:
    """The content hash the artifact was built with, or ``source`` when run from a checkout."""
    try:
        from meshwright import _artifact  # type: ignore[attr-defined]  # written by the build
    except ImportError:
        return "source"
    return str(_artifact.DIGEST)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "relay":
        from meshwright.relay import server

        return server.main(rest)
    if command == "stun-server":
        from meshwright.relay import stun_server

        return stun_server.main(rest)
    if command == "sidecar":
        from meshwright.site import sidecar

        return sidecar.main(rest)
    if command == "wg-stun":
        from meshwright.relay import wgstun

        return wgstun.main(rest)
    if command == "version":
        print(version())
        return 0
    usage = "\n".join(f"  {name:<12} {text}" for name, text in COMMANDS.items())
    print(f"usage: meshwright-node COMMAND [ARGS]\n{usage}", file=sys.stderr)
    return 2
