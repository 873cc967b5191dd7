"""What the verify tests share: the lab's inventory and plan, and lab hosts over podman.

testinfra opens every lab host as podman://<container> (its Ansible mapping does not know
the project's podman_exec connection and would fall back to running each command through
Ansible).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import testinfra
import yaml

PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
INVENTORY = yaml.safe_load((EPHEMERAL / "inventory/lab.yml").read_text())["all"]["children"]
PLAN = json.loads((EPHEMERAL / "inventory/.meshwright/plan.json").read_text())
SITES = sorted(INVENTORY["mesh_sites"]["hosts"])
CONNECTED = SITES  # every site, the UDP-blocked one through the TLS relay


def host(name: str):
    for group in INVENTORY.values():
        if name in group["hosts"]:
            return testinfra.get_host(f"podman://{group['hosts'][name]['ansible_host']}")
    raise KeyError(name)


def lan_address(site: str) -> str:
    prefix = INVENTORY["mesh_sites"]["hosts"][site]["mesh_lan_prefixes"][0]
    return re.sub(r"\.0/\d+$", ".10", prefix)


def overlay(site: str) -> str:
    return PLAN["sites"][site]["overlay_address"]


def public_addresses(relay: str) -> list[str]:
    return INVENTORY["mesh_relays"]["hosts"][relay]["relay_public_addresses"]


def pair(a: str, b: str) -> dict:
    return next(p for p in PLAN["pairs"] if {p["a"], p["b"]} == {a, b})


def endpoint_of(me: str, other: str) -> str | None:
    """The WireGuard endpoint `me` holds for `other` right now (None: none)."""
    key = next(p["public_key"] for p in PLAN["sites"][me]["peers"] if p["name"] == other)
    for line in host(me).check_output("wg show mesh0 endpoints").splitlines():
        if line.startswith(key):
            value = line.split()[1]
            return None if value == "(none)" else value
    return None


def ping_loss(src_lan_host: str, address: str, count: int = 5) -> int:
    """Packet loss in percent of `count` pings (0.3 s apart) from a lab host."""
    out = host(src_lan_host).run(f"ping -c {count} -i 0.3 -W 2 -q {address}").stdout
    match = re.search(r"(\d+(?:\.\d+)?)% packet loss", out)
    assert match, out
    return round(float(match.group(1)))


def relay_counters(relay: str | None = None) -> dict[str, dict[str, int]]:
    """Pair (a--b) -> what the relay forwarded between the two sites so far ("forwarded",
    "forwarded_bytes", "kernel_forwarded"), from `relay`'s state file (written once a second),
    or added up over every relay (a pair may have used its standby relay too)."""
    counters: dict[str, dict[str, int]] = {}
    for name in [relay] if relay else INVENTORY["mesh_relays"]["hosts"]:
        state = json.loads(host(name).check_output("cat /var/lib/meshwright-relay/state.json"))
        for key, pair in state.get("pairs", {}).items():
            total = counters.setdefault(key, {})
            for counter, value in pair.items():
                total[counter] = total.get(counter, 0) + value
    return counters


def site_run(limit: str) -> dict[str, str]:
    """playbooks/site.yml run again, ``--limit``-ed, as a user would: host -> its recap line
    (``ok=.. changed=.. failed=..``); the run must succeed."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(PROJECT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_STDOUT_CALLBACK": "default",
    }
    run = subprocess.run(
        [
            "ansible-playbook",
            "meshwright.mesh.site",
            "-i",
            str(EPHEMERAL / "inventory"),
            "--limit",
            limit,
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    out = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout)
    return dict(re.findall(r"^(\S+)\s+:\s+(ok=.*)$", out, re.M))
