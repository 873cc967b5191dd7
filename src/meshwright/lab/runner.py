"""Bring a lab up, take it down, and report on it: the podman side of `meshwright lab`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from meshwright.lab import podman
from meshwright.lab.image import ensure_image
from meshwright.lab.topology import (
    ROLE_LAN_HOST,
    ROLE_RELAY,
    ROLE_ROUTER,
    ROLE_SITE,
    Lab,
    LabHost,
    Topology,
    build_lab,
    load_topology,
)

LABEL = "meshwright.lab"
LABTOOL = Path(__file__).with_name("labtool.py")
LABTOOL_IN_CONTAINER = "/usr/local/lib/meshwright/labtool.py"
INVENTORY_HEADER = (
    "# Written by `meshwright lab up` for lab {name!r}; do not edit, it is re-made.\n"
)
Log = Callable[[str], None]


def read_topology(path: Path, name: str | None = None) -> Topology:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"topology file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"{path}: not valid YAML: {exc}") from None
    if name is not None and isinstance(data, dict):
        data = {**data, "name": name}
    return load_topology(data)


def _containers(lab_name: str) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = podman.run_json(
        ["ps", "-a", "--filter", f"label={LABEL}={lab_name}", "--format", "json"]
    )
    return containers


def _networks(lab_name: str) -> list[str]:
    out = podman.run(
        ["network", "ls", "--filter", f"label={LABEL}={lab_name}", "--format", "{{.Name}}"]
    )
    return [line for line in out.splitlines() if line.strip()]


def is_up(lab: Lab) -> bool:
    running = {c["Names"][0] for c in _containers(lab.name) if c.get("State") == "running"}
    return running == {h.container for h in lab.hosts} and set(_networks(lab.name)) == {
        n.name for n in lab.networks
    }


def up(topology: Topology, inventory: Path | None, log: Log = print) -> Lab:
    """Build the lab; a lab already fully up is left as it is, a partial one is rebuilt."""
    lab = build_lab(topology)
    if is_up(lab):
        log(f"lab {lab.name!r} is already up ({len(lab.hosts)} hosts)")
        if inventory is not None:
            write_inventory(lab, topology, inventory)
        return lab
    if _containers(lab.name) or _networks(lab.name):
        log(f"lab {lab.name!r} is partly there (an interrupted run?): removing it first")
        down(lab.name, None, log=lambda _msg: None)
    image = ensure_image(log)
    ensure_inotify_instances(len(lab.hosts), log)
    started = time.monotonic()
    for net in lab.networks:
        # No IPAM: the host bridge gets no address, so no lab host can route through the
        # host; addresses are set inside the containers, from the topology, by us.
        podman.run(
            [
                "network",
                "create",
                "--internal",
                "--ipam-driver",
                "none",
                "--disable-dns",
                "--label",
                f"{LABEL}={lab.name}",
                "--label",
                f"meshwright.purpose={net.purpose}",
                net.name,
            ]
        )
    for host in lab.hosts:
        podman.run(_run_args(lab, host, image))
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(_prepare, lab.hosts))
    if inventory is not None:
        write_inventory(lab, topology, inventory)
    log(
        f"lab {lab.name!r} up: {len(lab.hosts)} hosts, {len(lab.networks)} networks "
        f"in {time.monotonic() - started:.1f} s"
    )
    return lab


INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
# systemd takes about five inotify instances per container, all counted against root: the
# kernel's default of 128 stops booting at about 25 containers (systemd stays "initializing").
INOTIFY_PER_CONTAINER = 16
INOTIFY_FLOOR = 1024


def ensure_inotify_instances(hosts: int, log: Log) -> None:
    """Raise the host's inotify instance limit (a runtime sysctl) when it is too low."""
    running = len(podman.run(["ps", "-q"]).split())
    needed = max(INOTIFY_FLOOR, (running + hosts) * INOTIFY_PER_CONTAINER)
    current = int(INOTIFY_INSTANCES.read_text())
    if current >= needed:
        return
    try:
        INOTIFY_INSTANCES.write_text(str(needed))
    except OSError as exc:
        raise podman.PodmanError(
            f"fs.inotify.max_user_instances is {current}; {running + hosts} systemd containers "
            f"need about {needed}: run `sysctl -w fs.inotify.max_user_instances={needed}` ({exc})"
        ) from None
    log(
        f"raised fs.inotify.max_user_instances from {current} to {needed} "
        "(systemd in every container needs its own)"
    )


def _run_args(lab: Lab, host: LabHost, image: str) -> list[str]:
    args = [
        "run",
        "-d",
        "--name",
        host.container,
        "--hostname",
        host.name,
        # No resolver (the image's resolv.conf is empty) and the host's own name in /etc/hosts,
        # so sudo and friends never wait on a DNS lookup.
        "--dns",
        "none",
        "--add-host",
        f"{host.name}:127.0.1.1",
        "--label",
        f"{LABEL}={lab.name}",
        "--label",
        f"meshwright.host={host.name}",
        "--label",
        f"meshwright.role={host.role}",
        "--label",
        f"meshwright.site={host.site or ''}",
        "--label",
        f"meshwright.nat={host.nat or ''}",
        "--label",
        "meshwright.ifaces=" + ",".join(f"{i.ifname}:{i.network}" for i in host.interfaces),
        "--systemd=always",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "NET_RAW",
        "--device",
        "/dev/net/tun",
        "--sysctl",
        "net.ipv6.conf.all.disable_ipv6=1",
        "--sysctl",
        "net.ipv6.conf.default.disable_ipv6=1",
        "--sysctl",
        f"net.ipv4.ip_forward={1 if host.forwarding else 0}",
    ]
    if host.role == ROLE_RELAY:
        args += ["--sysctl", "net.ipv4.conf.all.send_redirects=0"]  # as the relay role sets it
    for iface in host.interfaces:
        args += ["--network", f"{iface.network}:interface_name={iface.ifname}"]
    return [*args, image]


def _prepare(host: LabHost) -> None:
    """Wait for systemd, install labtool, then run the host's setup."""
    deadline = time.monotonic() + 90
    while True:
        state = podman.run(
            ["exec", host.container, "systemctl", "is-system-running"], check=False
        ).strip()
        if state in ("running", "degraded"):
            break
        if time.monotonic() > deadline:
            raise podman.PodmanError(f"{host.container}: systemd did not come up ({state!r})")
        time.sleep(0.3)
    podman.exec_sh(host.container, f"mkdir -p {Path(LABTOOL_IN_CONTAINER).parent}")
    podman.run(["cp", str(LABTOOL), f"{host.container}:{LABTOOL_IN_CONTAINER}"])
    if host.setup:
        podman.exec_sh(host.container, "\n".join(host.setup))


def down(lab_name: str, inventory: Path | None, log: Log = print) -> None:
    """Remove every container and network labelled with this lab, and its inventory."""
    containers = [c["Names"][0] for c in _containers(lab_name)]
    if containers:
        podman.run(["rm", "-f", "-t", "0", *containers])
    networks = _networks(lab_name)
    if networks:
        podman.run(["network", "rm", *networks])
    if inventory is not None and inventory.exists():
        head = inventory.read_text().splitlines()[:1]
        if head and head[0] == INVENTORY_HEADER.format(name=lab_name).rstrip("\n"):
            inventory.unlink()
    log(f"lab {lab_name!r} down: removed {len(containers)} containers, {len(networks)} networks")


def status(lab_name: str) -> list[dict[str, Any]]:
    """Every host of the lab with its role, site, NAT and addresses per network."""
    rows = []
    for c in sorted(_containers(lab_name), key=lambda c: c["Labels"].get("meshwright.host", "")):
        labels = c.get("Labels") or {}
        iface_networks = dict(
            pair.split(":", 1) for pair in labels.get("meshwright.ifaces", "").split(",") if pair
        )
        addresses: dict[str, list[str]] = {}
        if c.get("State") == "running":
            out = podman.run(["exec", c["Names"][0], "ip", "-j", "-4", "addr"], check=False)
            for link in json.loads(out or "[]"):
                network = iface_networks.get(link["ifname"])
                if network:
                    addresses[network] = [
                        f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                    ]
        rows.append(
            {
                "name": labels.get("meshwright.host"),
                "container": c["Names"][0],
                "role": labels.get("meshwright.role"),
                "site": labels.get("meshwright.site") or None,
                "nat": labels.get("meshwright.nat") or None,
                "state": c.get("State"),
                "addresses": addresses,
            }
        )
    return rows


def render_inventory(lab: Lab, topology: Topology) -> str:
    """The lab as an Ansible inventory, with the groups the playbooks use."""
    groups: dict[str, dict[str, Any]] = {
        "mesh_relays": {},
        "mesh_sites": {},
        "lan_hosts": {},
        "lab_routers": {},
    }
    group_of = {
        ROLE_RELAY: "mesh_relays",
        ROLE_SITE: "mesh_sites",
        ROLE_LAN_HOST: "lan_hosts",
        ROLE_ROUTER: "lab_routers",
    }
    for host in lab.hosts:
        hostvars: dict[str, Any] = {"ansible_host": host.container, "lab_role": host.role}
        if host.site:
            hostvars["lab_site"] = host.site
            hostvars["lab_nat"] = host.nat
        if host.public_address:
            hostvars["lab_public_address"] = host.public_address
        if host.role == ROLE_RELAY:
            relay = next(r for r in topology.relays if r.name == host.name)
            hostvars["relay_public_addresses"] = [str(a) for a in relay.addresses]
            hostvars["mesh_overlay_address"] = topology.relay_overlay_address(host.name)
            # The lab's echo service (port 7), which its NAT tests use, stays reachable.
            hostvars["relay_firewall_extra_ports"] = ["udp/7", "tcp/7"]
        if host.role == ROLE_SITE:
            hostvars["mesh_lan_prefixes"] = [str(topology.site(host.name).lan)]
            hostvars["mesh_overlay_address"] = topology.overlay_address(host.name)
            site = topology.site(host.name)
            if site.behind is not None:
                # Behind one NAT, two sites on one port would share its mappings (each
                # destination maps to whichever was first): a port of its own, as a user
                # would give it. 51821 is the sidecars' control port.
                behind = [s.name for s in topology.sites if s.behind == site.behind]
                hostvars["mesh_listen_port"] = 51830 + behind.index(site.name)
        groups[group_of[host.role]][host.name] = hostvars
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "meshwright.mesh.podman_exec",
                "ansible_python_interpreter": "/usr/bin/python3",
                "lab_name": lab.name,
                "mesh_overlay_network": str(topology.overlay),
            },
            "children": {name: {"hosts": hosts} for name, hosts in groups.items()},
        }
    }
    body = yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False)
    return INVENTORY_HEADER.format(name=lab.name) + body


def write_inventory(lab: Lab, topology: Topology, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_inventory(lab, topology))
