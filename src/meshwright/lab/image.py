"""The lab's container image: Debian bookworm with systemd, built offline and cached.

No container registry is reachable, so the image is made with debootstrap from the Debian
mirror the host's apt already uses, and imported into podman. Its tag is a hash of what goes
into it, so a change to the package list builds a new image and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from meshwright.lab import podman

SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-apt",
    "iproute2",
    "iptables",
    "nftables",
    "wireguard-tools",
    "wireguard-go",
    "iputils-ping",
    "conntrack",
    "tcpdump",
    "iperf3",
    "procps",
    "traceroute",
    "netcat-openbsd",
    "ca-certificates",
    "kmod",
    "sudo",
)
RECIPE_VERSION = "2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def image_name() -> str:
    recipe = "\n".join([RECIPE_VERSION, SUITE, *PACKAGES]).encode()
    return f"localhost/meshwright-lab:{hashlib.sha256(recipe).hexdigest()[:12]}"


def host_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt is configured with (the one that is reachable)."""
    candidates = sorted((sources_dir / "sources.list.d").glob("*.sources"))
    for path in candidates:
        for line in path.read_text().splitlines():
            match = re.match(r"URIs:\s*(\S+)", line)
            if match and "security" not in match.group(1):
                return match.group(1)
    for path in [
        sources_dir / "sources.list",
        *sorted((sources_dir / "sources.list.d").glob("*.list")),
    ]:
        if path.exists():
            for line in path.read_text().splitlines():
                match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", line + " ")
                if match:
                    return match.group(1)
    return DEFAULT_MIRROR


def ensure_image(log: Callable[[str], None] = print) -> str:
    """Build the image unless it exists; returns its name."""
    name = image_name()
    if podman.image_exists(name):
        return name
    for tool in ("debootstrap", "tar"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run `make setup` (it installs it)")
    mirror = host_mirror()
    log(f"building lab image {name} from {mirror} (debootstrap, about a minute) ...")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshwright-image-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # Smaller and faster to boot: no package caches, no getty on a console nobody reads.
        for cache in (root / "var/cache/apt/archives").glob("*.deb"):
            cache.unlink()
        (root / "etc/hostname").write_text("lab\n")
        # The lab has no DNS: debootstrap copied the host's resolver, which lab hosts must not
        # use (each lookup would wait for a timeout, and it is not a lab address).
        (root / "etc/resolv.conf").write_text("# the meshwright lab has no DNS\n")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        podman.run(["import", "--change", 'CMD ["/sbin/init"]', "-", name], stdin=tar.stdout)
        if tar.wait() != 0:
            raise RuntimeError("tar of the image root failed")
    log(f"built {name} in {time.monotonic() - started:.0f} s")
    return name
