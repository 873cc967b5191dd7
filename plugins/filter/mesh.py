"""Filters for presenting the mesh's facts."""

from __future__ import annotations

from typing import Any

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


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"nat_table": nat_table}
