"""`ansible-playbook meshwright.mesh.validate`: the whole inventory checked on the controller.

Real ansible-playbook runs (the checkout is linked as the collection by `make collections`)
against small inventories written here and against docs/examples/gitops-repo: no host is
contacted, so a bad inventory stops in seconds, naming the host and the value.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GITOPS = ROOT / "docs/examples/gitops-repo"
BUDGET_S = 5.0


def validate(inventory: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    run = subprocess.run(
        [str(BIN / "ansible-playbook"), "meshwright.mesh.validate", "-i", str(inventory)],
        capture_output=True,
        text=True,
        check=False,
        env={
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "default",
        },
        cwd=ROOT,
        timeout=60,
    )
    return run, time.monotonic() - start


def inventory(tmp_path: Path, branch_lan: str) -> Path:
    """Two relays and three sites, reached over SSH at addresses nobody answers on: the
    check must not try."""
    data = {
        "all": {
            "vars": {"mesh_overlay_network": "10.99.0.0/24", "ansible_host": "198.51.100.1"},
            "children": {
                "mesh_relays": {
                    "hosts": {
                        "relay1": {
                            "relay_public_addresses": ["203.0.113.10"],
                            "mesh_overlay_address": "10.99.0.250",
                        }
                    }
                },
                "mesh_sites": {
                    "hosts": {
                        "hq": {
                            "mesh_overlay_address": "10.99.0.1",
                            "mesh_lan_prefixes": ["10.1.0.0/16"],
                        },
                        "branch": {
                            "mesh_overlay_address": "10.99.0.2",
                            "mesh_lan_prefixes": [branch_lan],
                        },
                        "shop": {
                            "mesh_overlay_address": "10.99.0.3",
                            "mesh_lan_prefixes": ["192.168.30.0/24"],
                        },
                    }
                },
            },
        }
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_overlapping_lan_prefix_stops_the_run_in_seconds_naming_hosts_and_values(tmp_path):
    run, seconds = validate(inventory(tmp_path, "10.1.20.0/24"))
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert (
        "sites hq and branch: LAN prefixes 10.1.0.0/16 (hq) and 10.1.20.0/24 (branch) overlap"
        in out
    ), out[-3000:]
    assert re.search(r"^localhost\s+:.*failed=1", out, re.M), out[-3000:]
    assert "relay1" not in out.split("PLAY RECAP")[-1]  # no other host was part of the run
    assert seconds < BUDGET_S, f"{seconds:.1f} s"


def test_a_valid_inventory_passes_in_seconds(tmp_path):
    run, seconds = validate(inventory(tmp_path, "192.168.20.0/24"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "ok: [localhost]" in run.stdout
    assert seconds < BUDGET_S, f"{seconds:.1f} s"


def test_the_gitops_example_inventory_is_valid():
    run, seconds = validate(GITOPS / "inventory/hosts.yml")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert seconds < BUDGET_S, f"{seconds:.1f} s"


def test_the_gitops_example_uses_only_documentation_and_private_addresses():
    text = "".join(p.read_text() for p in sorted(GITOPS.rglob("*")) if p.is_file())
    addresses = set(re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", text))
    # Public addresses from 198.51.100.0/24 and 203.0.113.0/24 only (never 192.0.2.0/24).
    allowed = ("198.51.100.", "203.0.113.", "10.", "192.168.", "172.16.")
    assert addresses and sorted(a for a in addresses if not a.startswith(allowed)) == []
