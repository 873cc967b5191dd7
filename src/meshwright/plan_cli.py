"""`meshwright plan`: what applying the inventory would change, for a pull request's review.

The adapter around :mod:`meshwright.plan.diff`, on the controller alone (no host is contacted):

1. loads the Ansible inventory with ansible-core's own API (inventory plugins, group_vars and
   host_vars, each variable templated when read, as a play's ``hostvars``) and gathers the mesh
   with :func:`meshwright.plan.inventory.gather`, as the action plugins do;
2. checks it as ``meshwright.mesh.site`` does: ``validate_inventory`` first, then the planner's
   own checks, with the same messages;
3. plans it with ``plan_inventory``, as ``mesh_plan`` does, with facts from the committed
   ``.meshwright/state.json`` only; a site with none yet is "to be probed";
4. compares the result with the committed ``.meshwright/plan.json``.

Exit status as ``terraform plan -detailed-exitcode``: 0 no change, 2 changes, 1 an error.
ansible-core is imported only here, when the command runs (about half a second).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from meshwright.plan.diff import PlanDiff, diff_plans, load_plan, render, render_errors
from meshwright.plan.inventory import (
    PLAN_FILE,
    STATE_DIR,
    STATE_FILE,
    PlanError,
    StateError,
    gather,
    plan_inventory,
    read_state,
    validate_inventory,
)

__all__ = ["EXIT_CHANGED", "EXIT_ERROR", "EXIT_SAME", "inventory_sources", "plan", "run"]

EXIT_SAME, EXIT_ERROR, EXIT_CHANGED = 0, 1, 2
DEFAULT_INVENTORY = "inventory"


class PlanFailure(Exception):
    """No plan: a sentence, and the problems under it (worded as the playbooks word them)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = tuple(problems)


def inventory_sources(given: Sequence[str] | None) -> list[str]:
    """The inventory sources, as ansible-playbook takes them: ``-i`` (a file, a directory or a
    ``host,`` list; paths made absolute), else Ansible's configured inventory (ansible.cfg,
    ``ANSIBLE_INVENTORY``), else ``./inventory`` (not Ansible's /etc/ansible/hosts)."""
    from ansible import constants  # type: ignore[import-untyped]
    from ansible.utils.path import unfrackpath  # type: ignore[import-untyped]

    if given:
        return [s if "," in s else unfrackpath(s, follow=False) for s in given]
    value, origin = constants.config.get_config_value_and_origin("DEFAULT_HOST_LIST")
    if origin == "default":
        return [unfrackpath(DEFAULT_INVENTORY, follow=False)]
    return [str(s) for s in value]


def _load(sources: Sequence[str]) -> tuple[Mapping[str, Mapping[str, Any]], dict[str, Any]]:
    """Ansible's ``hostvars`` and ``groups`` for these sources, as a play sees them."""
    from ansible.inventory.manager import InventoryManager  # type: ignore[import-untyped]
    from ansible.parsing.dataloader import DataLoader  # type: ignore[import-untyped]
    from ansible.vars.hostvars import HostVars  # type: ignore[import-untyped]
    from ansible.vars.manager import VariableManager  # type: ignore[import-untyped]

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=list(sources))
    variables = VariableManager(loader=loader, inventory=inventory)
    hostvars: Mapping[str, Mapping[str, Any]] = HostVars(inventory, variables, loader)
    groups: dict[str, Any] = inventory.get_groups_dict()
    return hostvars, groups


def plan(sources: Sequence[str]) -> PlanDiff:
    """The diff of the committed plan and the inventory's; :class:`PlanFailure` when there is
    none to make."""
    from ansible.errors import AnsibleError  # type: ignore[import-untyped]

    for source in sources:
        if "," not in source and not os.path.exists(source):
            raise PlanFailure(f"inventory {source}: no such file or directory")
    try:
        hostvars, groups = _load(sources)
        inventory = gather(hostvars, groups, facts=False)
        # mesh_plan's directory: the inventory_dir of the host it runs once on, the first site
        sites = groups.get(inventory.sites_group) or [None]
        here = hostvars[sites[0]].get("inventory_dir") if sites[0] else None
    except AnsibleError as exc:
        raise PlanFailure(f"the inventory cannot be read: {exc}") from None
    problems = validate_inventory(inventory)
    if problems:
        raise PlanFailure("the inventory is not valid", problems)
    files = Path(here or ".") / STATE_DIR
    old_plan = _read(files / PLAN_FILE)
    try:
        state = read_state(_read(files / STATE_FILE))
    except StateError as exc:
        raise PlanFailure(f"{files / STATE_FILE}: {exc}") from None
    try:
        planned = plan_inventory(inventory, state, old_plan, pending=True)
    except PlanError as exc:
        raise PlanFailure("the mesh cannot be planned", exc.problems) from None
    return diff_plans(
        load_plan(old_plan),
        json.loads(planned.plan_json),
        to_probe=planned.pending,
        old_state=state,
        new_state=planned.state,
    )


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def run(given: Sequence[str] | None, fmt: str, out: TextIO, err: TextIO) -> int:
    """Print the diff (or why there is none) in ``fmt``; the exit status."""
    try:
        found = plan(inventory_sources(given))
    except PlanFailure as exc:
        if fmt != "text":  # a pull request's comment says why, too
            out.write(render_errors(exc.message, exc.problems, fmt))
        err.write(render_errors(exc.message, exc.problems))
        return EXIT_ERROR
    out.write(render(found, fmt))
    return EXIT_CHANGED if found.changed else EXIT_SAME
