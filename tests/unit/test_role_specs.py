"""Every role's meta/argument_specs.yml mirrors its defaults/main.yml, option by option, and
ansible-doc renders it: a stranger reads the role there, and bad values stop the play."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = {
    "wireguard": ROOT / "roles/wireguard",
    "routing": ROOT / "roles/routing",
    "sidecar": ROOT / "roles/sidecar",
    "node": ROOT / "roles/node",
    "relay": ROOT / "relay-role",
}
# Mappings keyed by name (a relay, a site): their entries cannot be declared as suboptions.
KEYED_BY_NAME = {"sidecar_relays", "relay_tls_sites", "relay_tls.sites"}


def bare(option: dict[str, Any]) -> dict[str, Any]:
    """An option without its descriptions (which may differ between entry points)."""
    out = {k: v for k, v in option.items() if k not in ("description", "options")}
    if option.get("options"):
        out["options"] = {n: bare(o) for n, o in option["options"].items()}
    return out


def spec(role: str) -> dict[str, dict[str, Any]]:
    """Every option of every entry point (an option in two entry points must agree)."""
    data = yaml.safe_load((ROLES[role] / "meta/argument_specs.yml").read_text())
    options: dict[str, dict[str, Any]] = {}
    for entry in data["argument_specs"].values():
        for name, option in (entry.get("options") or {}).items():
            seen = options.setdefault(name, option)
            assert bare(seen) == bare(option), f"{name} differs between entry points"
    return options


def defaults(role: str) -> dict[str, Any]:
    return yaml.safe_load((ROLES[role] / "defaults/main.yml").read_text()) or {}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_default_is_an_option_and_every_option_has_a_default_or_is_required(role):
    options, values = spec(role), defaults(role)
    assert sorted(set(values) - set(options)) == [], "defaults without an option"
    assert sorted(n for n, o in options.items() if n not in values and not o.get("required")) == []


@pytest.mark.parametrize("role", sorted(ROLES))
def test_no_option_with_a_default_is_required(role):
    # A default in defaults/main.yml means the requirement could never fire.
    values = defaults(role)
    assert sorted(n for n, o in spec(role).items() if o.get("required") and n in values) == []


@pytest.mark.parametrize("role", sorted(ROLES))
def test_documented_defaults_are_the_defaults(role):
    values = defaults(role)
    for name, option in spec(role).items():
        value = values.get(name)
        if "default" in option and not (isinstance(value, str) and "{{" in value):
            assert option["default"] == value, name


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_dict_option_declares_its_keys(role):
    def missing(options: dict[str, Any], where: str) -> list[str]:
        found = []
        for name, option in options.items():
            is_dict = option.get("type") == "dict" or option.get("elements") == "dict"
            if is_dict and not option.get("options") and f"{where}{name}" not in KEYED_BY_NAME:
                found.append(f"{where}{name}")
            found += missing(option.get("options") or {}, f"{where}{name}.")
        return found

    assert missing(spec(role), "") == []


@pytest.mark.parametrize("role", sorted(ROLES))
def test_ansible_doc_renders_the_role(role):
    ansible_doc = str(Path(sys.executable).parent / "ansible-doc")
    run = subprocess.run(
        [ansible_doc, "--json", "-t", "role", f"meshwright.mesh.{role}"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    entries = json.loads(run.stdout)[f"meshwright.mesh.{role}"]["entry_points"]
    assert all(entry["short_description"] for entry in entries.values())
