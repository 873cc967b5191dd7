"""Filters for presenting the mesh's facts."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

MISSING_PACKAGE = (
    "meshwright.mesh needs the Python package meshwright on the controller, in the Python that"
    " runs ansible-playbook: pip install meshwright (from the meshwright repository)"
)

COLUMNS = ("site", "class", "mapping", "filtering", "public address", "best relay", "rtt ms")


def _row(site: str, nat: dict[str, Any] | None) -> tuple[str, ...]:
    if not nat:
        return (site, "?", "not probed", "", "", "", "")
    best = nat.get("best_relay")
    rtt = nat.get("rtt_ms", {}).get(best) if best else None
    return (
        site,
        nat.get("nat_class", "?"),
        nat.get("mapping", ""),
        nat.get("filtering", ""),
        ", ".join(nat.get("public_addresses") or []) or "-",
        best or "-",
        f"{rtt:.1f}" if isinstance(rtt, int | float) else "-",
    )


def nat_table(sites: list[str], hostvars: Any) -> list[str]:
    """One line per site: class, mapping, filtering, public address, best relay and RTT."""
    rows = [COLUMNS, *(_row(s, hostvars[s].get("mesh_nat")) for s in sorted(sites))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _status_module() -> Any:
    try:
        from meshwright import status
    except ImportError:  # one clear sentence instead of a traceback deep in a run
        raise AnsibleFilterError(MISSING_PACKAGE) from None
    return status


def mesh_status(
    sites: list[str], hostvars: Any, plan: Any, result: str = "mesh_status_site"
) -> dict[str, Any]:
    """The mesh's status (``meshwright.status.build_status``): the plan combined with what
    each site's mesh_status task registered as ``result`` (a site without it was not asked)."""
    status = _status_module()
    if not plan:
        raise AnsibleFilterError("no plan to compare with: run the meshwright.mesh.site playbook")
    results = {site: hostvars[site].get(result) for site in sites}
    try:
        built: dict[str, Any] = status.build_status(plan, results)
    except status.StatusError as exc:
        raise AnsibleFilterError(f"mesh status: {exc}") from None
    return built


def mesh_status_table(status: dict[str, Any]) -> list[str]:
    """The status as the table `meshwright status` prints, one line per list item."""
    table: str = _status_module().render_table(status)
    return table.splitlines()


def mesh_status_json(status: dict[str, Any]) -> str:
    """The status file's text (sorted keys, indent 2), as `meshwright status --json` prints."""
    text: str = _status_module().to_json(status)
    return text


def mesh_names(value: Any) -> list[str]:
    """The host names of a rotation option (``mesh_rotate_keys``, ``mesh_rotate_tls``): a list,
    or one string of names separated by commas, as ``-e`` gives it."""
    try:
        from meshwright.plan.inventory import rotation_names
    except ImportError:
        raise AnsibleFilterError(MISSING_PACKAGE) from None
    try:
        return rotation_names(value)
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "nat_table": nat_table,
            "mesh_names": mesh_names,
            "mesh_status": mesh_status,
            "mesh_status_table": mesh_status_table,
            "mesh_status_json": mesh_status_json,
        }
