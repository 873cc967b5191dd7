"""`lab up` is idempotent and `lab down` removes what the lab made, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshwright.lab import podman, runner
from meshwright.lab.topology import load_topology

from .conftest import require_prerequisites

TINY = {
    "name": "mwdown",
    "relays": {"r1": {"addresses": ["198.51.100.10"]}},
    "sites": {
        "a": {"nat": "edm", "public_address": "198.51.100.21", "lan": "10.1.0.0/24"},
        "b": {"behind": "a", "lan": "10.2.0.0/24", "lan_hosts": 0},
    },
}


def _leftovers(name: str) -> tuple[list[str], list[str]]:
    containers = podman.run(["ps", "-a", "--format", "{{.Names}}"]).split()
    networks = podman.run(["network", "ls", "--format", "{{.Name}}"]).split()
    return (
        [c for c in containers if c.startswith(name + "-")],
        [n for n in networks if n.startswith(name + "-")],
    )


@pytest.mark.lab
def test_up_is_idempotent_and_down_leaves_nothing(tmp_path: Path):
    require_prerequisites()
    topology = load_topology(TINY)
    inventory = tmp_path / "hosts.yml"
    # Something that looks like ours but is not: `down` must leave it alone.
    podman.run(["network", "create", "--internal", "mwdown-sentinel"])
    try:
        lab = runner.up(topology, inventory)
        assert runner.is_up(lab) and inventory.exists()
        messages: list[str] = []
        runner.up(topology, inventory, log=messages.append)
        assert messages == ["lab 'mwdown' is already up (5 hosts)"]
        # The second site shares the first one's NAT: both are seen from one public address.
        for site in ("a", "b"):
            assert lab.host(site).public_address == "198.51.100.21"

        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshwright.cli",
                "lab",
                "status",
                "--json",
                "--name",
                "mwdown",
                "--topology",
                str(tmp_path / "topology.json"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert cli.returncode != 0 and "does not exist" in cli.stderr

        runner.down("mwdown", inventory)
        assert _leftovers("mwdown") == ([], ["mwdown-sentinel"])
        assert not inventory.exists()
        assert runner.status("mwdown") == []
    finally:
        runner.down("mwdown", None, log=lambda _m: None)
        podman.run(["network", "rm", "mwdown-sentinel"], check=False)


@pytest.mark.lab
def test_status_json_from_the_command_line(lab, tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "meshwright.cli", "lab", "status", "--json", "--name", "mwtest"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    rows = json.loads(out.stdout)
    assert {r["role"] for r in rows} == {"relay", "site", "lan-host", "router"}
    for row in rows:
        assert set(row) >= {"name", "role", "site", "nat", "addresses"}
