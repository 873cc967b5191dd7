"""Action plugins declare their arguments: a mistyped option is an error, and the declared
arguments are the documented ones (plugins/modules/*.py, as ansible-doc renders them)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COLLECTIONS = ROOT / ".cache/collections"
KEYS = ("type", "elements", "default", "required")


def spec_of(plugin: str) -> dict[str, Any]:
    # The checkout is linked as the collection (make collections): import it as Ansible does.
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    module = importlib.import_module(f"ansible_collections.meshwright.mesh.plugins.action.{plugin}")
    return dict(module.ARGUMENT_SPEC)


def documented(module: str) -> dict[str, Any]:
    run = subprocess.run(
        [str(BIN / "ansible-doc"), "--json", "-M", str(ROOT / "plugins/modules"), module],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
        cwd=ROOT,
    )
    return dict(json.loads(run.stdout)[module]["doc"]["options"])


def shape(options: dict[str, Any], keys: tuple[str, ...] = KEYS) -> dict[str, Any]:
    """Options reduced to what both forms say: type, elements, default, required, suboptions."""
    out = {}
    for name, option in options.items():
        entry = {k: option[k] for k in keys if option.get(k) not in (None, False)}
        inner = option.get("options") or option.get("suboptions")
        if inner:
            entry["options"] = shape(inner, keys)
        out[name] = entry
    return out


@pytest.mark.parametrize("plugin", ["mesh_plan", "mesh_validate"])
def test_controller_plugins_declare_exactly_their_documented_options(plugin):
    assert shape(spec_of(plugin)) == shape(documented(plugin))


def test_nat_probe_declares_the_modules_options_and_leaves_defaults_to_it():
    # relays is required by the module, and filled by the action plugin when not given.
    keys = ("type", "elements")
    assert shape(spec_of("nat_probe"), keys) == shape(documented("nat_probe"), keys)
    assert not any("default" in option for option in spec_of("nat_probe").values())


def test_a_mistyped_option_is_an_error(tmp_path: Path):
    playbook = tmp_path / "typos.yml"
    playbook.write_text(
        """
- name: Typos
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: mesh_plan
      meshwright.mesh.mesh_plan:
        plan_fle: /tmp/x
      ignore_errors: true
    - name: mesh_validate
      meshwright.mesh.mesh_validate:
        site_group: branches
      ignore_errors: true
    - name: nat_probe
      meshwright.mesh.nat_probe:
        relay: []
      ignore_errors: true
"""
    )
    (tmp_path / "hosts.yml").write_text("all: {}\n")
    run = subprocess.run(
        [str(BIN / "ansible-playbook"), str(playbook), "-i", str(tmp_path / "hosts.yml")],
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
    )
    out = run.stdout + run.stderr
    for plugin, typo, supported in (
        ("mesh_plan", "plan_fle", "link_kinds, overlay_network, plan_file, relays_group,"),
        (
            "mesh_validate",
            "site_group",
            "link_kinds, overlay_network, relays_group, rotate_keys, rotate_tls, sites_group.",
        ),
        ("nat_probe", "relay", "bind_address, hairpin, local_port, node_artifact, relays,"),
    ):
        expected = (
            f"Unsupported parameters for (ansible_collections.meshwright.mesh.plugins.action."
            f"{plugin}) module: {typo}. Supported parameters include: {supported}"
        )
        assert expected in out, out[-3000:]
