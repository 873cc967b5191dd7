"""meshwright.plan: the pure, deterministic planner of the site-to-site WireGuard mesh.

``build_plan(mesh)`` decides for every pair of sites how they connect (a link of some kind, or a
path through other sites) and derives every site's WireGuard peers, allowed IPs and routing
table; ``mesh_from_dict`` reads the plain dict that :mod:`meshwright.plan.inventory` builds
from an Ansible inventory (for the ``mesh_plan`` and ``mesh_validate`` action plugins). No I/O,
standard library only. See docs/plan.md.
"""

from __future__ import annotations

from .build import build_plan
from .links import wanted_kind
from .model import (
    DEFAULT_KEEPALIVE,
    DEFAULT_LINK_KINDS,
    DEFAULT_LISTEN_PORT,
    DEFAULT_RELAY_FIRST_PORT,
    DEFAULT_RELAY_LAST_PORT,
    LINK_COST,
    LINK_KINDS,
    NAT_CLASSES,
    Mesh,
    PlanError,
    Policy,
    Relay,
    Site,
)
from .output import Pair, Peer, Plan, Route, SitePlan, format_table
from .parse import mesh_from_dict

__all__ = [
    "DEFAULT_KEEPALIVE",
    "DEFAULT_LINK_KINDS",
    "DEFAULT_LISTEN_PORT",
    "DEFAULT_RELAY_FIRST_PORT",
    "DEFAULT_RELAY_LAST_PORT",
    "LINK_COST",
    "LINK_KINDS",
    "NAT_CLASSES",
    "Mesh",
    "Pair",
    "Peer",
    "Plan",
    "PlanError",
    "Policy",
    "Relay",
    "Route",
    "Site",
    "SitePlan",
    "build_plan",
    "format_table",
    "mesh_from_dict",
    "wanted_kind",
]
