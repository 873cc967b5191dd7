"""A relay between sites on one machine, in network namespaces: for the relay's tests and
benchmarks that need real packets but not the whole lab.

    a (203.0.113.5) ---- r (203.0.113.1 | 198.51.100.1 | 192.0.2.1) ---- b (198.51.100.7)
                                                 |
                                                 c (192.0.2.9), only when asked for

``r`` routes between the links (``ip_forward`` is the caller's choice); each site's default
route goes through it. The namespaces are joined only to each other: nothing sent in them can
leave them. Needs root and iproute2.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = ["RELAY", "SITE_A", "SITE_B", "SITE_C", "RelayLine"]

SITE_A, SITE_B, SITE_C = "203.0.113.5", "198.51.100.7", "192.0.2.9"
RELAY = "198.51.100.1"  # the relay's address on b's link, which a and c reach through r
_LINKS = {"a": ("203.0.113", SITE_A), "b": ("198.51.100", SITE_B), "c": ("192.0.2", SITE_C)}


class RelayLine:
    """The namespaces, named ``<prefix>a``, ``<prefix>r``, ``<prefix>b`` (and ``<prefix>c``
    with ``sites="abc"``)."""

    def __init__(self, prefix: str | None = None, sites: str = "ab") -> None:
        if sites not in ("ab", "abc"):
            raise ValueError(f"sites must be 'ab' or 'abc', not {sites!r}")
        self.prefix = prefix or f"mwl{os.getpid() % 100000}"
        self.sites = sites
        self.names = {side: f"{self.prefix}{side}" for side in ("r", *sites)}

    def up(self) -> None:
        for name in self.names.values():
            _run("ip", "netns", "add", name)
        for side in self.sites:
            net, address = _LINKS[side]
            outer, inner = f"{self.prefix}{side}0", f"{self.prefix}{side}1"
            _run(
                "ip", "link", "add", outer, "netns", self.names[side], "type", "veth", "peer", inner
            )
            _run("ip", "link", "set", inner, "netns", self.names["r"])
            self.run(side, "ip", "addr", "add", f"{address}/24", "dev", outer)
            self.run(side, "ip", "link", "set", outer, "up")
            self.run(side, "ip", "link", "set", "lo", "up")
            self.run(side, "ip", "route", "add", "default", "via", f"{net}.1")
            self.run("r", "ip", "addr", "add", f"{net}.1/24", "dev", inner)
            self.run("r", "ip", "link", "set", inner, "up")
        self.run("r", "ip", "link", "set", "lo", "up")
        self.run("r", "sysctl", "-q", "-w", "net.ipv4.conf.all.send_redirects=0")

    def down(self) -> None:
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def forwarding(self, on: bool) -> None:
        self.run("r", "sysctl", "-q", "-w", f"net.ipv4.ip_forward={int(on)}")

    def command(self, side: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[side], *argv]

    def run(self, side: str, *argv: str, check: bool = True) -> str:
        """Run a command in namespace ``side``; its output (AssertionError, naming it, when it
        fails and ``check``)."""
        return _run(*self.command(side, argv), check=check)

    def popen(self, side: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(side, argv), **kwargs)


def _run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout
