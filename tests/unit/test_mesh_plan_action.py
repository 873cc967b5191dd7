"""The mesh_plan action plugin end to end, in a real ansible-playbook run on the controller:
facts in, plan and state files written once (idempotent), check mode writes nothing, and the
facts the playbooks use. Sites are inventory entries with a local connection whose facts the
playbook sets: no host is contacted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from meshwright.plan.synthetic import public_key

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

PLAYBOOK = """
- name: Facts, as the keys and probe steps would set them
  hosts: mesh_sites
  gather_facts: false
  tasks:
    - name: Set this site's facts
      ansible.builtin.set_fact:
        mesh_wg_public_key: "{{ test_keys[inventory_hostname] }}"
        mesh_nat: "{{ test_nat[inventory_hostname] }}"

- name: Plan
  hosts: mesh_sites
  gather_facts: false
  any_errors_fatal: true
  tasks:
    - name: Plan the mesh
      meshwright.mesh.mesh_plan:
      run_once: true
      register: planned

    - name: Check the facts the playbooks use
      ansible.builtin.assert:
        that:
          - mesh_plan.sites.hq.mesh_prefixes == ['10.99.0.0/24', '10.1.0.0/16', '192.168.20.0/24']
          - mesh_plan.sites.hq.peers | map(attribute='name') | list == ['branch']
          - planned.table[0].startswith('pair')
        quiet: true
      run_once: true
"""


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            str(tmp_path / "plan.yml"),
            "-i",
            str(tmp_path / "inventory/hosts.yml"),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_STDOUT_CALLBACK": "default",
        },
        cwd=ROOT,
        timeout=120,
    )


def setup(tmp_path: Path) -> None:
    (tmp_path / "inventory").mkdir()
    (tmp_path / "plan.yml").write_text(PLAYBOOK)
    hosts = {
        "hq": {"mesh_overlay_address": "10.99.0.1", "mesh_lan_prefixes": ["10.1.0.0/16"]},
        "branch": {"mesh_overlay_address": "10.99.0.2", "mesh_lan_prefixes": ["192.168.20.0/24"]},
    }
    nat = {
        "hq": {"nat_class": "open", "public_addresses": ["198.51.100.20"], "behind_nat": False},
        "branch": {"nat_class": "easy", "public_addresses": ["203.0.113.40"], "behind_nat": True},
    }
    data = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "mesh_overlay_network": "10.99.0.0/24",
                "test_keys": {name: public_key(name) for name in hosts},
                "test_nat": nat,
            },
            "children": {"mesh_sites": {"hosts": hosts}},
        }
    }
    (tmp_path / "inventory/hosts.yml").write_text(yaml.safe_dump(data, sort_keys=False))


def recap(out: str, host: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith(f"{host} ")]
    return line


def test_plan_and_state_written_beside_the_inventory_once(tmp_path):
    setup(tmp_path)
    checked = run(tmp_path, "--check")
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-2000:]
    assert not (tmp_path / "inventory/.meshwright").exists()  # check mode writes nothing

    first = run(tmp_path, "--diff")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert "changed=1" in recap(first.stdout, "hq")
    assert '+  "hq": {' in first.stdout  # the plan's diff
    plan = json.loads((tmp_path / "inventory/.meshwright/plan.json").read_text())
    state = json.loads((tmp_path / "inventory/.meshwright/state.json").read_text())
    assert plan["sites"]["branch"]["peers"][0]["endpoint"] == "198.51.100.20:51820"
    assert state == {
        "version": 1,
        "relays": {},
        "sites": {
            "branch": {"endpoint": None, "nat_class": "easy", "public_key": public_key("branch")},
            "hq": {
                "endpoint": "198.51.100.20:51820",
                "nat_class": "open",
                "public_key": public_key("hq"),
            },
        },
    }

    again = run(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "changed=0" in recap(again.stdout, "hq")


def test_a_broken_state_file_stops_the_run_naming_the_file(tmp_path):
    setup(tmp_path)
    state = tmp_path / "inventory/.meshwright/state.json"
    state.parent.mkdir()
    state.write_text('{"version": 7}')
    failed = run(tmp_path)
    assert failed.returncode != 0
    assert (
        f"{state}: version 7 is not 1, the one this meshwright reads (a newer meshwright wrote"
        " it, or it was edited)" in failed.stdout
    ), failed.stdout[-3000:]
