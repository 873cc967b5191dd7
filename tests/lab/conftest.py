"""The lab fixture: the default topology, brought up once for the session under its own name.

A missing prerequisite (podman, root, the image's build tools) fails the tests loudly; it
never skips them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshwright.lab import podman, runner
from meshwright.lab.topology import Lab, Topology

ROOT = Path(__file__).resolve().parents[2]
LAB_NAME = "mwtest"
LABTOOL = runner.LABTOOL_IN_CONTAINER
BIN = Path(sys.executable).parent


@dataclass
class RunningLab:
    lab: Lab
    topology: Topology
    inventory: Path

    def container(self, host: str) -> str:
        return self.lab.host(host).container

    def sh(self, host: str, script: str, check: bool = True) -> str:
        return podman.exec_sh(self.container(host), script, check=check)

    def labtool(self, host: str, *args: str) -> dict:
        out = podman.run(["exec", self.container(host), "python3", LABTOOL, *args])
        return json.loads(out)


def ansible(lab: RunningLab, *args: str, tool: str = "ansible-playbook"):
    """Run an Ansible command against the lab's inventory from the repository root."""
    return subprocess.run(
        [str(BIN / tool), "-i", str(lab.inventory), *args],
        cwd=ROOT,
        env={**podman.env(), "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"},
        capture_output=True,
        text=True,
        check=False,
    )


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters per host."""
    rows = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", stdout, re.M):
        rows[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return rows


def require_prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("lab tests run as root (podman networks, NET_ADMIN)")
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (`make setup` installs it)")
    if problems:
        pytest.fail("lab prerequisites missing: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    require_prerequisites()
    topology = runner.read_topology(ROOT / "inventory/lab/topology.yml", LAB_NAME)
    inventory = tmp_path_factory.mktemp("lab") / "hosts.yml"
    built = runner.up(topology, inventory)
    try:
        yield RunningLab(built, topology, inventory)
    finally:
        runner.down(LAB_NAME, inventory)
