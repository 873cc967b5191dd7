#!/usr/bin/python
"""Ansible module mesh_routes: keep the mesh interface's routes exactly as the plan says."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mesh_routes
short_description: Keep the routes through the mesh interface exactly as planned
description:
  - Makes the routes through a WireGuard interface exactly O(prefixes) - adds missing ones
    and removes the stale ones that this module added earlier - live, without touching the
    interface or any other route. WireGuard's allowed IPs pick the peer; these routes only
    steer remote prefixes into the interface.
  - Routes it manages carry the route protocol O(protocol), so routes added by anyone else
    are never removed.
  - Check mode reports the routes that would be added and removed; diff mode shows the owned
    routes before and after.
version_added: "0.1.0"
author: meshwright
options:
  interface:
    description: The mesh interface.
    type: str
    default: mesh0
  prefixes:
    description: Every remote prefix (IPv4 or IPv6) that must be routed into the interface.
    type: list
    elements: str
    required: true
  protocol:
    description: Route protocol number that marks the routes this module owns.
    type: int
    default: 77
notes:
  - Needs C(ip) from iproute2 on the target.
attributes:
  check_mode:
    support: full
    description: Reports the routes that would be added and removed, changes nothing.
  diff_mode:
    support: full
    description: Shows the routes this module owns on the interface before and after.
  platform:
    support: full
    platforms: posix
    description: Linux with iproute2.
"""

EXAMPLES = r"""
- name: Route the remote sites' prefixes into mesh0
  mesh_routes:
    interface: mesh0
    prefixes: [10.10.3.0/24, 10.10.4.0/24]
"""

RETURN = r"""
added:
  description: Prefixes routed by this run.
  returned: success
  type: list
  elements: str
removed:
  description: Stale prefixes this run stopped routing.
  returned: success
  type: list
  elements: str
routes:
  description: The prefixes routed into the interface after this run.
  returned: success
  type: list
  elements: str
"""

import ipaddress
import json

from ansible.module_utils.basic import AnsibleModule


def _current(module: AnsibleModule, interface: str, protocol: int) -> set[str]:
    owned: set[str] = set()
    for family in ("-4", "-6"):
        rc, out, err = module.run_command(
            ["ip", "-j", family, "route", "show", "dev", interface, "proto", str(protocol)]
        )
        if rc != 0:
            module.fail_json(msg=f"cannot list routes of {interface}: {err.strip()}")
        for route in json.loads(out or "[]"):
            dst = route.get("dst", "")
            if dst == "default":
                dst = "0.0.0.0/0" if family == "-4" else "::/0"
            owned.add(str(ipaddress.ip_network(dst if "/" in dst else _host(dst))))
    return owned


def _host(address: str) -> str:
    return f"{address}/{ipaddress.ip_address(address).max_prefixlen}"


def _order(prefix: str) -> tuple[int, int, int]:
    # IPv4 before IPv6: ip_network objects of two versions do not compare.
    network = ipaddress.ip_network(prefix)
    return network.version, int(network.network_address), network.prefixlen


def _table(prefixes: set[str], interface: str) -> str:
    return "".join(f"{p} dev {interface}\n" for p in sorted(prefixes, key=_order))


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "interface": {"type": "str", "default": "mesh0"},
            "prefixes": {"type": "list", "elements": "str", "required": True},
            "protocol": {"type": "int", "default": 77},
        },
        supports_check_mode=True,
    )
    interface = module.params["interface"]
    protocol = module.params["protocol"]
    wanted: set[str] = set()
    for prefix in module.params["prefixes"]:
        try:
            wanted.add(str(ipaddress.ip_network(prefix, strict=True)))
        except ValueError as exc:
            module.fail_json(msg=f"prefixes: {prefix!r} is not a network prefix ({exc})")
    rc, _, err = module.run_command(["ip", "link", "show", "dev", interface])
    if rc != 0:
        module.fail_json(msg=f"interface {interface} does not exist: {err.strip()}")
    current = _current(module, interface, protocol)
    added = sorted(wanted - current, key=_order)
    removed = sorted(current - wanted, key=_order)
    if not module.check_mode:
        for prefix in added:
            cmd = ["ip", "route", "replace", prefix, "dev", interface, "proto", str(protocol)]
            rc, _, err = module.run_command(cmd)
            if rc != 0:
                module.fail_json(msg=f"cannot route {prefix} into {interface}: {err.strip()}")
        for prefix in removed:
            cmd = ["ip", "route", "del", prefix, "dev", interface, "proto", str(protocol)]
            rc, _, err = module.run_command(cmd)
            if rc != 0:
                module.fail_json(msg=f"cannot remove route {prefix}: {err.strip()}")
    result = {
        "changed": bool(added or removed),
        "added": added,
        "removed": removed,
        "routes": sorted(wanted, key=_order),
    }
    if module._diff and (added or removed):
        result["diff"] = {
            "before_header": f"routes of {interface}, protocol {protocol}",
            "after_header": f"routes of {interface}, protocol {protocol}",
            "before": _table(current, interface),
            "after": _table(wanted, interface),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
