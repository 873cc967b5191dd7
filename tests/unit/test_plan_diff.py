"""meshwright.plan.diff and `meshwright plan`: what a change to the inventory does to the plan.

Each case plans a small mesh twice, as ``meshwright.mesh.site`` would (the same
``plan_inventory``), and compares the words a reviewer reads, exactly. Then the command on a
temporary inventory directory (plan and state committed beside it): exit status 0, 2 and 1, and
the ``--check --diff`` summary of the mesh_plan action plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshwright.plan import PlanError
from meshwright.plan.diff import PlanDiff, diff_plans, render
from meshwright.plan.inventory import Inventory, InventoryPlan, State, plan_inventory
from meshwright.plan.relays import local_ports
from meshwright.plan.synthetic import public_key

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAY = "10.99.0.0/24"
RELAYS = {
    "relay1": {
        "relay_public_addresses": ["203.0.113.10"],
        "mesh_wg_public_key": public_key("relay1"),
        "mesh_overlay_address": "10.99.0.250",
    }
}


def nat(nat_class: str, address: str) -> dict[str, Any]:
    """A mesh_nat fact as nat_probe sets it (the part the planner reads)."""
    return {
        "nat_class": nat_class,
        "public_addresses": [address],
        "behind_nat": nat_class != "open",
        "port_preservation": False,
        "rtt_ms": {"relay1": 5.0},
    }


def host(number: int, nat_class: str, lans: list[str], facts: bool = True) -> dict[str, Any]:
    """A site's variables and, unless ``facts`` is false, this run's facts."""
    found: dict[str, Any] = {
        "mesh_overlay_network": OVERLAY,
        "mesh_overlay_address": f"10.99.0.{number}",
        "mesh_lan_prefixes": lans,
    }
    if facts:
        found["mesh_wg_public_key"] = public_key(f"site{number}")
        found["mesh_nat"] = nat(nat_class, f"198.51.100.{20 + number}")
    return found


def mesh(*without: str) -> dict[str, dict[str, Any]]:
    """hq is open (direct links with everyone), branch and shop are easy NATs."""
    sites = {
        "hq": host(1, "open", ["10.1.0.0/16"]),
        "branch": host(2, "easy", ["192.168.20.0/24"]),
        "shop": host(3, "easy", ["192.168.30.0/24"]),
    }
    return {name: site for name, site in sites.items() if name not in without}


def plans(
    old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], relays: Any = None
) -> tuple[InventoryPlan, InventoryPlan]:
    """The committed plan, then the next one (its state and allocations carried over)."""
    before = plan_inventory(Inventory(sites=old, relays=relays or {}), State())
    after = plan_inventory(
        Inventory(sites=new, relays=relays or {}), before.state, before.plan_json, pending=True
    )
    return before, after


def changes(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], **kw: Any) -> PlanDiff:
    before, after = plans(old, new, **kw)
    return diff_plans(
        json.loads(before.plan_json),
        json.loads(after.plan_json),
        to_probe=after.pending,
        old_state=before.state,
        new_state=after.state,
    )


# --- the diff, in words -----------------------------------------------------------------------


def test_a_lan_prefix_added_to_one_site_disturbs_nothing():
    new = mesh()
    new["hq"]["mesh_lan_prefixes"] = ["10.1.0.0/16", "10.2.0.0/16"]
    found = changes(mesh(), new)
    assert render(found) == (
        "Plan: 3 sites changed; live tunnels disturbed: none\n"
        "\n"
        "Sites:\n"
        "  branch, shop\n"
        "    peer hq: allowed IPs added 10.2.0.0/16\n"
        "    routes added: 10.2.0.0/16 via hq\n"
        "  hq\n"
        "    LAN prefixes added: 10.2.0.0/16\n"
    )
    assert render(found, "markdown") == (
        "### meshwright plan\n"
        "\n"
        "**Plan: 3 sites changed; live tunnels disturbed: none**\n"
        "\n"
        "**Sites**\n"
        "\n"
        "- branch, shop\n"
        "  - peer hq: allowed IPs added 10.2.0.0/16\n"
        "  - routes added: 10.2.0.0/16 via hq\n"
        "- hq\n"
        "  - LAN prefixes added: 10.2.0.0/16\n"
    )
    data = json.loads(render(found, "json"))
    assert data["changed"] is True
    assert data["counts"]["tunnels_disturbed"] == 0
    assert data["sites"][1]["lan_prefixes_added"] == ["10.2.0.0/16"]


def test_a_new_site_without_facts_is_to_be_probed_not_an_error():
    new = mesh()
    new["shop"] = host(3, "easy", ["192.168.30.0/24"], facts=False)
    assert render(changes(mesh("shop"), new)) == (
        "Plan: 1 site to be probed; live tunnels disturbed: none\n"
        "\n"
        "Sites to be probed (no key or NAT facts yet; their links are planned after the probe):\n"
        "  shop\n"
    )


def test_a_site_to_be_probed_is_still_checked_and_may_be_named_as_a_hub():
    new = mesh()
    new["shop"] = host(3, "easy", ["192.168.30.0/24"], facts=False)
    new["branch"]["mesh_policy"] = {"hubs": ["hq", "shop"]}
    _, after = plans(mesh("shop"), new)
    assert after.pending == ("shop",)
    new["shop"]["mesh_lan_prefixes"] = ["192.168.20.0/25"]
    with pytest.raises(PlanError) as found:
        plans(mesh("shop"), new)
    assert found.value.problems == (
        "sites branch and shop: LAN prefixes 192.168.20.0/24 (branch) and 192.168.20.0/25"
        " (shop) overlap",
    )


def test_a_new_site_with_facts_shows_its_pairs():
    assert render(changes(mesh("shop"), mesh())) == (
        "Plan: 1 site added, 2 sites changed; live tunnels disturbed: none\n"
        "\n"
        "Sites added:\n"
        "  shop: direct with hq; via hq to branch\n"
        "\n"
        "Sites:\n"
        "  branch\n"
        "    peer hq: allowed IPs added 10.99.0.3/32, 192.168.30.0/24\n"
        "    routes added: 10.99.0.3/32, 192.168.30.0/24 via hq\n"
        "  hq\n"
        "    peer added: shop (direct; allowed IPs 10.99.0.3/32, 192.168.30.0/24)\n"
        "    routes added: 10.99.0.3/32, 192.168.30.0/24 via shop\n"
    )


def test_a_site_removed_ends_its_tunnels():
    assert render(changes(mesh(), mesh("shop"))) == (
        "Plan: 1 site removed, 2 sites changed; live tunnels disturbed: 1\n"
        "\n"
        "Sites removed:\n"
        "  shop\n"
        "\n"
        "Sites:\n"
        "  branch\n"
        "    peer hq: allowed IPs removed 10.99.0.3/32, 192.168.30.0/24\n"
        "    routes removed: 10.99.0.3/32, 192.168.30.0/24\n"
        "  hq\n"
        "    peer removed: shop\n"
        "    routes removed: 10.99.0.3/32, 192.168.30.0/24\n"
        "\n"
        "Live tunnels disturbed:\n"
        "  hq -- shop: tunnel removed\n"
    )


def test_a_nat_class_changed_turns_a_punched_pair_into_a_relayed_one():
    new = mesh()
    new["branch"]["mesh_nat"] = nat("hard", "198.51.100.22")
    # The allocation is kept; wg_sync sets the relay endpoint back, which the sidecar held.
    assert render(changes(mesh(), new, relays=RELAYS)) == (
        "Plan: 1 site fact changed, 1 pair changed, 2 sites changed;"
        " live tunnels disturbed: 1\n"
        "\n"
        "Site facts:\n"
        "  branch: NAT class easy -> hard\n"
        "\n"
        "Pairs:\n"
        "  branch -- shop: punch -> relay\n"
        "\n"
        "Sites:\n"
        "  branch\n"
        "    peer shop: mode punch -> relay\n"
        "  shop\n"
        "    peer branch: mode punch -> relay\n"
        "\n"
        "Live tunnels disturbed:\n"
        "  branch -- shop: at branch: endpoint set to 203.0.113.10:40000 (disturbs it if the"
        " sidecar made it direct); at shop: endpoint set to 203.0.113.10:40002 (disturbs it if"
        " the sidecar made it direct)\n"
    )


def test_an_open_site_becoming_udp_blocked_moves_its_direct_pairs_to_relay_tcp():
    new = mesh()
    new["hq"]["mesh_nat"] = nat("blocked", "198.51.100.21")
    found = changes(mesh(), new, relays=RELAYS)
    # Its direct pairs already had their allocations (their fallback): they stay on relay1, and
    # hq reaches it through its sidecar's one loopback socket for relay1.
    local = local_ports(["relay1"], avoid=(51820,))["relay1"]
    assert render(found) == (
        "Plan: 2 site facts changed, 2 pairs changed, 3 sites changed;"
        " live tunnels disturbed: 3\n"
        "\n"
        "Site facts:\n"
        "  hq: NAT class open -> blocked\n"
        "  hq: endpoint 198.51.100.21:51820 -> (none)\n"
        "\n"
        "Pairs:\n"
        "  branch -- hq: direct -> relay-tcp\n"
        "  hq -- shop: direct -> relay-tcp\n"
        "\n"
        "Sites:\n"
        "  branch\n"
        "    peer hq: mode direct -> relay-tcp; endpoint 198.51.100.21:51820 ->"
        " 203.0.113.10:40000\n"
        "  hq\n"
        "    peer removed: relay1\n"
        f"    peer branch: mode direct -> relay-tcp; endpoint (none) -> 127.0.0.1:{local};"
        " keepalive off -> 25\n"
        f"    peer shop: mode direct -> relay-tcp; endpoint (none) -> 127.0.0.1:{local};"
        " keepalive off -> 25\n"
        "  shop\n"
        "    peer hq: mode direct -> relay-tcp; endpoint 198.51.100.21:51820 ->"
        " 203.0.113.10:40002\n"
        "\n"
        "Live tunnels disturbed:\n"
        "  branch -- hq: at branch: endpoint 198.51.100.21:51820 -> 203.0.113.10:40000;"
        f" at hq: endpoint (none) -> 127.0.0.1:{local}\n"
        "  hq -- relay1: tunnel removed\n"
        f"  hq -- shop: at hq: endpoint (none) -> 127.0.0.1:{local}; at shop: endpoint"
        " 198.51.100.21:51820 -> 203.0.113.10:40002\n"
    )


def test_a_narrowed_relay_port_range_moves_a_sites_port_and_nothing_else():
    narrowed = {"relay1": {**RELAYS["relay1"], "relay_first_port": 40001}}
    before = plan_inventory(Inventory(sites=mesh(), relays=RELAYS), State())
    after = plan_inventory(Inventory(sites=mesh(), relays=narrowed), before.state, before.plan_json)
    found = diff_plans(json.loads(before.plan_json), json.loads(after.plan_json))
    assert not found.allocations
    text = render(found)
    assert text.startswith(
        "Plan: 1 site changed, 1 relay port changed; live tunnels disturbed: 1\n"
        "\n"
        "Sites:\n"
        "  branch\n"
        "    peer shop: endpoint 203.0.113.10:40000 -> 203.0.113.10:40003\n"
        "\n"
        "Relay ports (a site's port on every relay):\n"
        "  branch: 40000 -> 40003\n"
    ), text
    assert json.loads(render(found, "json"))["site_ports"] == [
        {"site": "branch", "old": 40000, "new": 40003}
    ]


def test_a_policy_of_hubs_sends_a_pair_through_the_hub():
    new = mesh()
    new["shop"]["mesh_policy"] = {"hubs": ["hq"]}
    assert render(changes(mesh(), new, relays=RELAYS)) == (
        "Plan: 1 pair changed, 2 sites changed, 1 relay allocation changed;"
        " live tunnels disturbed: 1\n"
        "\n"
        "Pairs:\n"
        "  branch -- shop: punch -> via hq (path branch > shop -> branch > hq > shop)\n"
        "\n"
        "Sites:\n"
        "  branch\n"
        "    peer removed: shop\n"
        "    peer hq: allowed IPs added 10.99.0.3/32, 192.168.30.0/24\n"
        "  shop\n"
        "    peer removed: branch\n"
        "    peer hq: allowed IPs added 10.99.0.2/32, 192.168.20.0/24\n"
        "\n"
        "Relay allocations:\n"
        "  removed: branch -- shop from relay1 (203.0.113.10)\n"
        "\n"
        "Live tunnels disturbed:\n"
        "  branch -- shop: tunnel removed\n"
    )


def test_the_link_kinds_changed_are_a_mesh_setting():
    new = mesh()
    for site in new.values():
        site["mesh_link_kinds"] = ["direct", "relay", "relay-tcp"]
    text = render(changes(mesh(), new, relays=RELAYS))
    assert text.startswith(
        "Plan: 1 mesh setting changed, 1 pair changed, 2 sites changed;"
        " live tunnels disturbed: 1\n"
        "\n"
        "Mesh settings:\n"
        "  link_kinds: direct, punch, relay, relay-tcp -> direct, relay, relay-tcp\n"
        "\n"
        "Pairs:\n"
        "  branch -- shop: punch -> relay\n"
    ), text


def test_a_prefix_moving_to_another_peer_disturbs_the_tunnel_it_leaves():
    old = {
        "sites": {
            "a": {
                "overlay_address": "10.99.0.1",
                "listen_port": 51820,
                "mesh_prefixes": ["10.99.0.0/24"],
                "routes": [],
                "peers": [
                    {
                        "name": "b",
                        "public_key": "kb",
                        "endpoint": None,
                        "keepalive": 25,
                        "mode": "direct",
                        "allowed_ips": ["10.2.0.0/16", "10.99.0.2/32"],
                    },
                    {
                        "name": "c",
                        "public_key": "kc",
                        "endpoint": None,
                        "keepalive": 25,
                        "mode": "direct",
                        "allowed_ips": ["10.99.0.3/32"],
                    },
                ],
            }
        }
    }
    new = json.loads(json.dumps(old))
    peers = new["sites"]["a"]["peers"]
    peers[0]["allowed_ips"] = ["10.99.0.2/32"]
    peers[1]["allowed_ips"] = ["10.2.0.0/24", "10.99.0.3/32"]  # part of it, elsewhere
    peers[1]["public_key"] = "kc2"
    found = diff_plans(old, new)
    assert [(d.a, d.b, d.reasons) for d in found.disturbed] == [
        ("a", "b", ("at a: 10.2.0.0/16 moves to c",)),
        ("a", "c", ("c's public key changes (a new handshake)",)),
    ]


def test_the_same_plan_is_no_change():
    before, after = plans(mesh(), mesh())
    found = diff_plans(json.loads(before.plan_json), json.loads(after.plan_json))
    assert not found.changed
    assert render(found) == "No changes.\n"
    assert json.loads(render(found, "json"))["changed"] is False


# --- `meshwright plan` on an inventory directory ----------------------------------------------


def write_inventory(directory: Path, sites: dict[str, dict[str, Any]]) -> None:
    """hosts.yml without facts (the inventory a repository holds), mesh settings in
    group_vars/all.yml (read as ansible-playbook reads them)."""
    hosts = {
        name: {k: v for k, v in site.items() if k.startswith("mesh_") and k not in FACTS}
        for name, site in sites.items()
    }
    for site in hosts.values():
        site.pop("mesh_overlay_network", None)
    (directory / "group_vars").mkdir(parents=True, exist_ok=True)
    (directory / "group_vars/all.yml").write_text(yaml.safe_dump({"mesh_overlay_network": OVERLAY}))
    data = {"all": {"children": {"mesh_sites": {"hosts": hosts}}}}
    (directory / "hosts.yml").write_text(yaml.safe_dump(data, sort_keys=False))


FACTS = ("mesh_wg_public_key", "mesh_nat")


def commit_plan(directory: Path, sites: dict[str, dict[str, Any]]) -> None:
    """What a converged run leaves beside the inventory: .meshwright/{plan,state}.json."""
    planned = plan_inventory(Inventory(sites=sites), State())
    (directory / ".meshwright").mkdir(parents=True, exist_ok=True)
    (directory / ".meshwright/plan.json").write_text(planned.plan_json)
    (directory / ".meshwright/state.json").write_text(planned.state_json)


def meshwright_plan(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    start = time.monotonic()
    run = subprocess.run(
        [str(BIN / "meshwright"), "plan", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**env, "ANSIBLE_NOCOLOR": "1"},
        cwd=cwd,
        timeout=60,
    )
    return run, time.monotonic() - start


def test_the_command_exits_0_unchanged_2_changed_1_invalid(tmp_path):
    inventory = tmp_path / "inventory"
    write_inventory(inventory, mesh())
    commit_plan(inventory, mesh())

    same, seconds = meshwright_plan(tmp_path, "-i", str(inventory))
    assert (same.returncode, same.stdout) == (0, "No changes.\n"), same.stderr
    assert seconds < 5, f"{seconds:.1f} s"

    changed = mesh()
    changed["hq"]["mesh_lan_prefixes"] = ["10.1.0.0/16", "10.2.0.0/16"]
    changed["shop2"] = host(4, "easy", ["192.168.40.0/24"], facts=False)
    write_inventory(inventory, changed)
    # ./inventory is the default without ansible.cfg; --diff as the command line has it
    diff, _ = meshwright_plan(tmp_path, "--diff", "--format", "markdown")
    assert diff.returncode == 2, diff.stderr
    assert diff.stdout == (
        "### meshwright plan\n"
        "\n"
        "**Plan: 1 site to be probed, 3 sites changed; live tunnels disturbed: none**\n"
        "\n"
        "**Sites to be probed (no key or NAT facts yet; their links are planned after the"
        " probe)**\n"
        "\n"
        "- shop2\n"
        "\n"
        "**Sites**\n"
        "\n"
        "- branch, shop\n"
        "  - peer hq: allowed IPs added 10.2.0.0/16\n"
        "  - routes added: 10.2.0.0/16 via hq\n"
        "- hq\n"
        "  - LAN prefixes added: 10.2.0.0/16\n"
    )

    invalid = mesh()
    invalid["branch"]["mesh_lan_prefixes"] = ["10.1.20.0/24"]
    write_inventory(inventory, invalid)
    # the inventory of ansible.cfg, as ansible-playbook finds it
    (tmp_path / "ansible.cfg").write_text("[defaults]\ninventory = inventory/hosts.yml\n")
    failed, _ = meshwright_plan(tmp_path)
    assert (failed.returncode, failed.stdout) == (1, ""), failed.stderr
    assert failed.stderr.endswith(
        "the inventory is not valid: sites hq and branch: LAN prefixes 10.1.0.0/16 (hq) and"
        " 10.1.20.0/24 (branch) overlap\n"
    ), failed.stderr
    as_json, _ = meshwright_plan(tmp_path, "--format", "json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["problems"] == [
        "sites hq and branch: LAN prefixes 10.1.0.0/16 (hq) and 10.1.20.0/24 (branch) overlap"
    ]


def test_a_missing_inventory_is_an_error_naming_it(tmp_path):
    failed, _ = meshwright_plan(tmp_path, "-i", "nowhere.yml")
    assert failed.returncode == 1
    assert failed.stderr == f"inventory {tmp_path / 'nowhere.yml'}: no such file or directory\n"


# --- ansible-playbook --check --diff: the same summary first ----------------------------------

PLAYBOOK = """
- name: Facts, as the keys and probe steps would set them
  hosts: mesh_sites
  gather_facts: false
  tasks:
    - name: Set this site's facts
      ansible.builtin.set_fact:
        mesh_wg_public_key: "{{ test_facts[inventory_hostname].mesh_wg_public_key }}"
        mesh_nat: "{{ test_facts[inventory_hostname].mesh_nat }}"

- name: Plan
  hosts: mesh_sites
  gather_facts: false
  tasks:
    - name: Plan the mesh
      meshwright.mesh.mesh_plan:
      run_once: true
      register: planned

    - name: Hand the summary to the test
      ansible.builtin.copy:
        content: "{{ planned.summary }}"
        dest: "{{ summary_file }}"
      delegate_to: localhost
      run_once: true
      check_mode: false
"""


def test_check_diff_shows_the_summary_before_the_files_diff(tmp_path):
    inventory = tmp_path / "inventory"
    write_inventory(inventory, mesh())
    commit_plan(inventory, mesh())
    new = mesh()
    new["hq"]["mesh_lan_prefixes"] = ["10.1.0.0/16", "10.2.0.0/16"]
    write_inventory(inventory, new)
    (tmp_path / "plan.yml").write_text(PLAYBOOK)
    facts = {name: {k: site[k] for k in FACTS} for name, site in new.items()}
    (tmp_path / "facts.json").write_text(json.dumps({"test_facts": facts}))
    summary_file = tmp_path / "summary.txt"
    run = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            str(tmp_path / "plan.yml"),
            "-i",
            str(inventory),
            "-e",
            f"@{tmp_path / 'facts.json'}",
            "-e",
            f"summary_file={summary_file}",
            "-e",
            "ansible_connection=local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "--check",
            "--diff",
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
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    expected = render(changes(mesh(), new))
    assert summary_file.read_text() == expected
    shown = run.stdout.index(expected)
    assert shown < run.stdout.index(f"--- {inventory}/.meshwright/plan.json")
