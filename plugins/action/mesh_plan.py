"""Action plugin mesh_plan: one deterministic plan for the whole mesh, on the controller.

Gathers the variables of every host of the sites and relays groups (not just the play's hosts),
makes one call to ``meshwright.plan.inventory.plan_inventory``, which decides everything (a
site outside ``--limit`` keeps its peers: its key and NAT facts come from the state file), and
writes what it returns: the plan and the state file beside the inventory in its hidden
``.meshwright/`` directory (an inventory directory never parses them as inventory), where a
GitOps repository commits them and a pull request shows what will change. The plan is set as
the fact ``mesh_plan`` (run_once results reach every host of the play). In diff mode, the
summary ``meshwright plan`` prints (``meshwright.plan.diff``) comes first, then the file's diff.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible_collections.meshwright.mesh.plugins.plugin_utils.mesh import (
    INVENTORY_OPTIONS,
    gather,
    mesh_diff,
    mesh_inventory,
)

ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "plan_file": {"type": "path"},
    "state_file": {"type": "path"},
    **INVENTORY_OPTIONS,
}


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: an interrupted run leaves the old file whole


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
        # A hidden directory: an inventory that is a directory never reads these as inventory.
        here = Path(task_vars.get("inventory_dir") or ".") / mesh_inventory.STATE_DIR
        plan_path = Path(args["plan_file"] or here / mesh_inventory.PLAN_FILE)
        state_path = Path(args["state_file"] or here / mesh_inventory.STATE_FILE)
        old_plan, old_state = _read(plan_path), _read(state_path)
        try:
            state = mesh_inventory.read_state(old_state)
        except mesh_inventory.StateError as exc:
            raise AnsibleActionFail(f"{state_path}: {exc}") from None
        try:
            planned = mesh_inventory.plan_inventory(inventory, state, old_plan)
        except mesh_inventory.PlanError as exc:
            raise AnsibleActionFail(f"the mesh cannot be planned: {exc}") from None

        plan_changed = old_plan != planned.plan_json
        changed = plan_changed or old_state != planned.state_json
        if changed and not self._task.check_mode:
            _write(plan_path, planned.plan_json)
            _write(state_path, planned.state_json)
        facts = planned.facts()
        result.update(
            changed=changed,
            plan_file=str(plan_path),
            state_file=str(state_path),
            table=planned.table,
            unreachable_sites=facts["mesh_plan"]["unreachable"],
            ansible_facts=facts,
        )
        if self._task.diff:
            # What a reviewer reads first: the changes in words (as `meshwright plan` says
            # them), then the file's lines.
            changes = mesh_diff.diff_plans(
                mesh_diff.load_plan(old_plan),
                facts["mesh_plan"],
                old_state=state,
                new_state=planned.state,
            )
            summary = mesh_diff.render(changes)
            result["summary"] = summary
            if plan_changed or changes.changed:  # a NAT class may change and no pair with it
                lines = difflib.unified_diff(
                    (old_plan or "").splitlines(True),
                    planned.plan_json.splitlines(True),
                    str(plan_path),
                    str(plan_path),
                )
                result["diff"] = {
                    "before_header": str(plan_path),
                    "after_header": str(plan_path),
                    "prepared": summary + "\n" + "".join(lines),
                }
        return result
