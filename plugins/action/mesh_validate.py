"""Action plugin mesh_validate: the whole inventory checked on the controller, no host touched.

Gathers the variables of every host of the sites and relays groups and makes one call to
``meshwright.plan.inventory.validate_inventory``: the planner's own validation, without what
needs facts (keys, NAT classes), so that a bad prefix or address stops the run in seconds,
before any relay or site is contacted, naming the host and the value.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible_collections.meshwright.mesh.plugins.plugin_utils.mesh import (
    INVENTORY_OPTIONS,
    gather,
    mesh_inventory,
)

ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    **INVENTORY_OPTIONS,
    "rotate_keys": {"type": "raw"},
    "rotate_tls": {"type": "raw"},
}


class ActionModule(ActionBase):
    _supports_check_mode = True
    _supports_async = False

    def run(
        self, tmp: str | None = None, task_vars: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        task_vars = task_vars or {}
        result: dict[str, Any] = super().run(tmp, task_vars)
        _, args = self.validate_argument_spec(ARGUMENT_SPEC)
        inventory = gather(task_vars, args)
        problems = [
            *mesh_inventory.validate_inventory(inventory),
            *mesh_inventory.check_rotations(
                inventory, args.get("rotate_keys"), args.get("rotate_tls")
            ),
        ]
        if problems:
            raise AnsibleActionFail(
                f"the inventory is not valid: {mesh_inventory.PlanError(problems)}"
            )
        result.update(
            changed=False,
            sites=len(inventory.sites),
            relays=len(inventory.relays),
            msg=f"{len(inventory.sites)} sites and {len(inventory.relays)} relays: valid",
        )
        return result
