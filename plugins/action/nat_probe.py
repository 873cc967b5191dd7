"""Action plugin for nat_probe: fills `relays` from the mesh_relays inventory group.

Its options are checked here, on the controller, so a mistyped one fails before a probe runs;
their defaults stay in the module (one place), which gets the task's arguments as given.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

RELAY_GROUP = "mesh_relays"

# The module's options (plugins/modules/nat_probe.py), without their defaults; `relays` is
# optional here because this plugin fills it.
ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "relays": {
        "type": "list",
        "elements": "dict",
        "options": {
            "name": {"type": "str", "required": True},
            "addresses": {"type": "list", "elements": "str", "required": True},
            "port": {"type": "int"},
            "alt_port": {"type": "int"},
        },
    },
    "local_port": {"type": "int"},
    "bind_address": {"type": "str"},
    "tcp_port": {"type": "int"},
    "rto_ms": {"type": "int"},
    "tries": {"type": "int"},
    "hairpin": {"type": "bool"},
    "node_artifact": {"type": "path"},
}


def relays_from_inventory(task_vars: dict[str, Any]) -> list[dict[str, Any]]:
    """Every relay of the mesh_relays group, as nat_probe's `relays` option wants it."""
    hostvars = task_vars["hostvars"]
    relays = []
    for name in task_vars.get("groups", {}).get(RELAY_GROUP, []):
        host = hostvars[name]
        addresses = host.get("relay_stun_addresses") or host.get("relay_public_addresses")
        if not addresses:
            raise AnsibleActionFail(
                f"relay {name}: set relay_public_addresses (or relay_stun_addresses) in "
                "inventory: nat_probe needs the addresses of its STUN service"
            )
        if isinstance(addresses, str):
            addresses = [addresses]
        relays.append(
            {
                "name": name,
                "addresses": list(addresses),
                "port": int(host.get("relay_stun_port", 3478)),
                "alt_port": int(host.get("relay_stun_alt_port", 3479)),
            }
        )
    return relays


class ActionModule(ActionBase):
    _supports_check_mode = True
    _supports_async = False

    def run(
        self, tmp: str | None = None, task_vars: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        task_vars = task_vars or {}
        result: dict[str, Any] = super().run(tmp, task_vars)
        self.validate_argument_spec(ARGUMENT_SPEC)
        args = dict(self._task.args)
        if not args.get("relays"):
            args["relays"] = relays_from_inventory(task_vars)
            if not args["relays"]:
                raise AnsibleActionFail(
                    f"no relays given and the {RELAY_GROUP} inventory group is empty: "
                    "nat_probe measures the NAT against the relays' STUN service"
                )
        result.update(
            self._execute_module(
                module_name="meshwright.mesh.nat_probe", module_args=args, task_vars=task_vars
            )
        )
        return result
