"""What the mesh's controller-side action plugins share: the options that name the inventory,
the one check that the meshwright package is installed, and the call that gathers the host
variables the planner reads (``meshwright.plan.inventory`` decides everything, the gathering
included)."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail

try:
    from meshwright.plan import diff as mesh_diff
    from meshwright.plan import inventory as mesh_inventory
except ImportError:  # one clear sentence instead of a traceback deep in a run
    mesh_diff = None  # type: ignore[assignment]
    mesh_inventory = None  # type: ignore[assignment]

MISSING_PACKAGE = (
    "meshwright.mesh needs the Python package meshwright on the controller, in the Python that"
    " runs ansible-playbook: pip install meshwright (from the meshwright repository)"
)

# The options of mesh_plan and mesh_validate that say where the mesh is in the inventory.
INVENTORY_OPTIONS: dict[str, dict[str, Any]] = {
    "sites_group": {"type": "str", "default": "mesh_sites"},
    "relays_group": {"type": "str", "default": "mesh_relays"},
    "overlay_network": {"type": "str"},
    "link_kinds": {"type": "list", "elements": "str"},
}


def gather(task_vars: dict[str, Any], args: dict[str, Any]) -> Any:
    """The ``Inventory`` of the sites and relays groups (``meshwright.plan.inventory.gather``,
    which ``meshwright plan`` calls too)."""
    if mesh_inventory is None:
        raise AnsibleActionFail(MISSING_PACKAGE)
    return mesh_inventory.gather(
        task_vars["hostvars"],
        task_vars.get("groups", {}),
        sites_group=args["sites_group"],
        relays_group=args["relays_group"],
        overlay_network=args.get("overlay_network"),
        link_kinds=args.get("link_kinds"),
    )
