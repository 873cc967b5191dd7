#!/usr/bin/python
# meshwright: documentation of the mesh_validate action plugin (plugins/action/mesh_validate.py),
# which does all the work on the controller; this file only lets ansible-doc and ansible-lint
# see it.
"""Ansible module mesh_validate: documentation only; the action plugin runs on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mesh_validate
short_description: Check the whole mesh inventory on the controller, before any host is touched
description:
  - Runs the planner's own validation (C(meshwright.plan)) over every host of the sites group
    and the relays group, from inventory variables alone, and fails naming every problem, each
    with the host and the value - in seconds, and without contacting any host.
  - Checks site and relay names (unique, no host in both groups); C(mesh_overlay_network);
    every C(mesh_overlay_address) (an address, inside the overlay network, not its network or
    broadcast address, unique across sites and relays); every C(mesh_lan_prefixes) entry (a
    valid prefix without host bits, no overlap between sites or within one, none overlapping
    the overlay network); C(mesh_policy) (known keys, C(hubs) naming known sites);
    C(mesh_endpoint) overrides (valid, unique); listen ports; C(mesh_link_kinds) and
    C(mesh_keepalive); relay addresses and allocation ports (C(relay_first_port),
    C(relay_last_port)); and that C(mesh_overlay_network), C(mesh_link_kinds) and
    C(mesh_keepalive) are the same for every site; and that O(rotate_keys) and O(rotate_tls)
    name hosts of their groups.
  - What needs facts - WireGuard keys, NAT classes, and so whether a path reaches every
    required site - is checked by M(meshwright.mesh.mesh_plan), where the facts are first
    known.
  - Runs entirely on the controller (use it in a play on C(localhost)); C(ansible-playbook
    meshwright.mesh.validate) runs only this, for CI pipelines.
  - An unknown or mistyped option is an error.
version_added: "0.2.0"
author: meshwright
options:
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
  rotate_keys:
    description:
      - Hosts whose WireGuard key this run rotates (C(mesh_rotate_keys) of
        C(meshwright.mesh.site)); each must be a site or a relay. A list, or one string of
        names separated by commas.
    type: raw
  rotate_tls:
    description:
      - Relays whose TLS certificate this run rotates (C(mesh_rotate_tls)); each must be a
        relay. A list, or one string of names separated by commas.
    type: raw
attributes:
  check_mode:
    support: full
    description: Checks and reports; it never changes anything.
  diff_mode:
    support: none
    description: Nothing to show a difference of.
"""

EXAMPLES = r"""
- name: Check the inventory before any host is touched
  hosts: localhost
  connection: local
  gather_facts: false
  any_errors_fatal: true
  tasks:
    - name: Check every site and relay (addresses, prefixes, policies, relays)
      meshwright.mesh.mesh_validate:
      run_once: true
"""

RETURN = r"""
sites:
  description: How many sites were checked.
  returned: success
  type: int
  sample: 8
relays:
  description: How many relays were checked.
  returned: success
  type: int
  sample: 2
msg:
  description: One line saying what was checked.
  returned: success
  type: str
  sample: "8 sites and 2 relays: valid"
"""

if __name__ == "__main__":
    raise SystemExit("mesh_validate runs as an action plugin on the controller")
