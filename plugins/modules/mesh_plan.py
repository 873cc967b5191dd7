#!/usr/bin/python
# meshwright: documentation of the mesh_plan action plugin (plugins/action/mesh_plan.py), which
# does all the work on the controller; this file only lets ansible-doc and ansible-lint see it.
"""Ansible module mesh_plan: documentation only; the action plugin runs on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mesh_plan
short_description: Plan the whole mesh once, on the controller
description:
  - Runs the pure planner C(meshwright.plan) once over every host of the sites group (not only
    the play's hosts) and the relays group, for every site's WireGuard peers, allowed IPs and
    routes, every pair's link mode and path, relay allocations and the relays' WireGuard peers,
    and every site's mesh prefixes (the overlay network and the LAN prefixes its firewall
    passes). Use it with C(run_once) set to true; the plan reaches every host of the play as
    the fact C(mesh_plan).
  - Reads, per site, C(mesh_overlay_address), C(mesh_lan_prefixes), C(mesh_listen_port),
    C(mesh_policy), C(mesh_required) and C(mesh_endpoint) (an override of the endpoint the NAT
    facts give; null for none), with the facts C(mesh_wg_public_key), C(mesh_nat) and
    C(sidecar_certificate); per relay, C(relay_public_addresses), C(relay_first_port) and
    C(relay_last_port) (its allocation ports, 40000 to 59999 unless set), C(relay_tls_port),
    C(mesh_overlay_address), C(mesh_listen_port) and the facts C(mesh_wg_public_key) and
    C(relay_tls_fingerprint). C(mesh_overlay_network), C(mesh_link_kinds) and
    C(mesh_keepalive) must be the same for every site.
  - A site outside C(--limit) keeps its peers; its public key, NAT class and certificate come
    from the state file when this run did not gather them.
  - Writes the plan and the state file (public data only) atomically into the hidden
    C(.meshwright/) directory beside the inventory, where a GitOps repository commits them;
    an allocation the previous plan made is kept while it is still valid.
  - Invalid inventory (overlapping prefixes, duplicate addresses, missing keys or NAT facts,
    unknown hubs, unreachable required sites) fails before any WireGuard or route changes,
    naming the sites and values. M(meshwright.mesh.mesh_validate) checks what needs no facts
    earlier still, before any host is contacted.
  - An unknown or mistyped option is an error.
version_added: "0.1.0"
author: meshwright
options:
  plan_file:
    description:
      - Where the plan is written (and the previous plan, whose relay allocations are kept,
        read). Defaults to C(<inventory_dir>/.meshwright/plan.json).
    type: path
  state_file:
    description:
      - Where the state (keys, NAT classes, endpoints, certificates) is written and read.
        Defaults to C(<inventory_dir>/.meshwright/state.json).
    type: path
  sites_group:
    description: The inventory group of the mesh's sites.
    type: str
    default: mesh_sites
  relays_group:
    description: The inventory group of the relays.
    type: str
    default: mesh_relays
  overlay_network:
    description: The overlay prefix; defaults to the variable C(mesh_overlay_network).
    type: str
  link_kinds:
    description:
      - The link kinds the planner may use; defaults to the variable C(mesh_link_kinds), or
        C(direct), C(relay) and C(relay-tcp) when there are relays (C(direct) without).
    type: list
    elements: str
attributes:
  check_mode:
    support: full
    description: Plans and reports, writes no file.
  diff_mode:
    support: full
    description: Shows the change to the plan file as a unified diff.
  platform:
    support: full
    platforms: all
    description: Runs on the controller only (an action plugin); the targets do not matter.
"""

EXAMPLES = r"""
- name: Plan every site's peers, link modes and routes
  meshwright.mesh.mesh_plan:
  run_once: true
  register: mesh_plan_result

- name: Show the plan
  ansible.builtin.debug:
    msg: "{{ mesh_plan_result.table }}"
  run_once: true
"""

RETURN = r"""
table:
  description: One line per pair (pair, mode, cost, path), then the unreachable sites.
  returned: always
  type: list
  elements: str
unreachable_sites:
  description: Optional sites no path reaches, with the reason.
  returned: always
  type: dict
plan_file:
  description: Where the plan was written.
  returned: always
  type: str
state_file:
  description: Where the state was written.
  returned: always
  type: str
ansible_facts:
  description:
    - C(mesh_plan), the plan (C(mesh_plan.sites[site]) has C(overlay_address),
      C(listen_port), C(peers), C(routes) and C(mesh_prefixes)); C(mesh_tls_sites), the
      certificates of UDP-blocked sites by site; C(mesh_sidecars), every UDP-blocked site's
      sidecar peers and relays.
  returned: always
  type: dict
"""

if __name__ == "__main__":
    raise SystemExit("mesh_plan runs as an action plugin on the controller")
