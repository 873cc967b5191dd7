"""Action plugin mesh_plan: one deterministic plan for the whole mesh, on the controller.

Runs `meshwright.plan` once (use `run_once: true`) over every host of the `mesh_sites` group,
not just the play's hosts: a site outside `--limit` keeps its peers, because its public key
and NAT facts come from the state file when this run did not gather them. The plan is set
as the fact `mesh_plan` (run_once results reach every host of the play) and written, with
the state file, beside the inventory in its `.meshwright/` directory (hidden, so that an
inventory directory never parses them as inventory), where a GitOps repository commits them
and a pull request shows what will change.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

try:
    from meshwright import plan as planner
except ImportError:  # one clear sentence instead of a traceback deep in a run
    planner = None  # type: ignore[assignment]

MISSING_PACKAGE = (
    "meshwright.mesh needs the Python package meshwright on the controller, in the Python that"
    " runs ansible-playbook: pip install meshwright (from the meshwright repository)"
)

STATE_VERSION = 1


def _endpoint(nat: dict[str, Any], listen_port: int) -> str | None:
    """Where peers reach this site's WireGuard port unsolicited, if anywhere."""
    if nat.get("nat_class") != "open" or not nat.get("public_addresses"):
        return None
    # Behind a NAT the WireGuard port is reachable on the same public port only when the NAT
    # keeps ports (a full cone that preserves ports); otherwise the sidecar must learn it.
    if nat.get("behind_nat") and not nat.get("port_preservation"):
        return None
    return f"{nat['public_addresses'][0]}:{listen_port}"


def site_facts(name: str, hostvars: Any, state: dict[str, Any]) -> dict[str, Any]:
    """What the planner needs of one site: fresh facts when this run has them, else state."""
    host = hostvars[name]
    saved = state.get("sites", {}).get(name, {})
    listen_port = int(host.get("mesh_listen_port", planner.DEFAULT_LISTEN_PORT))
    nat = host.get("mesh_nat")
    if nat:
        nat_class = nat.get("nat_class")
        endpoint = _endpoint(nat, listen_port)
    else:
        nat_class = saved.get("nat_class")
        endpoint = saved.get("endpoint")
    endpoint = host.get("mesh_endpoint", endpoint)  # an operator's override wins
    overlay = str(host.get("mesh_overlay_address", "")).split("/")[0]
    return {
        "name": name,
        "public_key": host.get("mesh_wg_public_key") or saved.get("public_key"),
        "overlay_address": overlay,
        "lan_prefixes": list(host.get("mesh_lan_prefixes", [])),
        "nat_class": nat_class,
        "endpoint": endpoint,
        "listen_port": listen_port,
        "policy": dict(host.get("mesh_policy", {})),
        "required": bool(host.get("mesh_required", True)),
        # Only this run's measurements: they choose the relay of a new relayed pair, and an
        # existing pair keeps its relay (the previous plan's allocations), so RTTs that vary
        # from run to run never move a pair or rewrite the state file.
        "relay_rtt_ms": dict((nat or {}).get("rtt_ms") or {}),
    }


def relay_facts(name: str, hostvars: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A relay: its addresses, and its WireGuard key and overlay address when it has them."""
    host = hostvars[name]
    saved = state.get("relays", {}).get(name, {})
    relay: dict[str, Any] = {
        "name": name,
        "addresses": list(host.get("relay_public_addresses", [])),
        "public_key": host.get("mesh_wg_public_key") or saved.get("public_key"),
        "listen_port": int(host.get("mesh_listen_port", planner.DEFAULT_LISTEN_PORT)),
    }
    if host.get("mesh_overlay_address"):
        relay["overlay_address"] = str(host["mesh_overlay_address"])
    return relay


_FACT_OF = {
    "certificate": "sidecar_certificate",
    "tls_fingerprint": "relay_tls_fingerprint",
}


def _fresh_or_saved(hostvars: Any, state: dict[str, Any], kind: str, name: str, key: str) -> Any:
    return hostvars[name].get(_FACT_OF[key]) or state.get(kind, {}).get(name, {}).get(key)


def sidecar_configs(
    plan: dict[str, Any], sites: list[dict[str, Any]], hostvars: Any, fingerprints: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """For every UDP-blocked site: its relay-tcp peers (its side's port) and their relays."""
    blocked = {s["name"] for s in sites if s["nat_class"] == "blocked"}
    configs: dict[str, dict[str, Any]] = {}
    for allocation in plan.get("allocations", []):
        for side, site in enumerate((allocation["a"], allocation["b"])):
            if site not in blocked:
                continue
            other = allocation["b"] if side == 0 else allocation["a"]
            relay = allocation["relay"]
            config = configs.setdefault(site, {"peers": [], "relays": {}})
            config["peers"].append(
                {"name": other, "relay": relay, "port": allocation["ports"][side]}
            )
            config["relays"][relay] = {
                "address": allocation["address"],
                "port": int(hostvars[relay].get("relay_tls_port", 443)),
                "fingerprint": fingerprints.get(relay, ""),
            }
    return configs


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: an interrupted run leaves the old file whole


class ActionModule(ActionBase):
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None):
        if planner is None:
            raise AnsibleActionFail(MISSING_PACKAGE)
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = self._task.args
        inventory_dir = Path(task_vars.get("inventory_dir") or ".")
        # A hidden directory: an inventory that is a directory never reads these as inventory.
        plan_path = Path(args.get("plan_file") or inventory_dir / ".meshwright/plan.json")
        state_path = Path(args.get("state_file") or inventory_dir / ".meshwright/state.json")
        sites_group = args.get("sites_group", "mesh_sites")
        relays_group = args.get("relays_group", "mesh_relays")
        hostvars = task_vars["hostvars"]
        groups = task_vars.get("groups", {})

        previous_allocations: list[Any] = []
        if plan_path.exists():
            try:
                previous_allocations = json.loads(plan_path.read_text()).get("allocations", [])
            except (ValueError, AttributeError):
                previous_allocations = []  # a broken plan file is rewritten, not trusted
        state: dict[str, Any] = {}
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text())
            except ValueError as exc:
                raise AnsibleActionFail(f"{state_path}: not valid JSON ({exc})") from None

        sites = [site_facts(name, hostvars, state) for name in groups.get(sites_group, [])]
        if not sites:
            raise AnsibleActionFail(f"the {sites_group} inventory group is empty: nothing to plan")
        relays = [relay_facts(name, hostvars, state) for name in groups.get(relays_group, [])]
        mesh_input = {
            "overlay_network": args.get("overlay_network") or task_vars.get("mesh_overlay_network"),
            # With relays, relayed pairs get a relay (UDP, or TLS for a UDP-blocked site).
            "link_kinds": list(
                args.get("link_kinds")
                or task_vars.get(
                    "mesh_link_kinds", ["direct", "relay", "relay-tcp"] if relays else ["direct"]
                )
            ),
            "keepalive": int(task_vars.get("mesh_keepalive", planner.DEFAULT_KEEPALIVE)),
            "sites": sites,
            "relays": relays,
            "previous_allocations": previous_allocations,
        }
        try:
            plan = planner.build_plan(planner.mesh_from_dict(mesh_input))
        except planner.PlanError as exc:
            raise AnsibleActionFail(f"the mesh cannot be planned: {exc}") from None

        plan_json = plan.to_json()
        plan_dict = json.loads(plan_json)  # one serialisation, shared by file and facts
        # TLS for UDP-blocked sites: public certificates and fingerprints only (every private
        # key stays on its node), from this run's facts or, outside --limit, the state file.
        certificates = {
            s["name"]: cert
            for s in sites
            if (cert := _fresh_or_saved(hostvars, state, "sites", s["name"], "certificate"))
        }
        fingerprints = {
            r["name"]: fp
            for r in relays
            if (fp := _fresh_or_saved(hostvars, state, "relays", r["name"], "tls_fingerprint"))
        }
        new_state = {
            "version": STATE_VERSION,
            "sites": {
                s["name"]: {
                    "public_key": s["public_key"],
                    "nat_class": s["nat_class"],
                    "endpoint": s["endpoint"],
                    **(
                        {"certificate": certificates[s["name"]]}
                        if s["name"] in certificates
                        else {}
                    ),
                }
                for s in sites
            },
            "relays": {
                r["name"]: {
                    "public_key": r["public_key"],
                    **(
                        {"tls_fingerprint": fingerprints[r["name"]]}
                        if r["name"] in fingerprints
                        else {}
                    ),
                }
                for r in relays
            },
        }
        sidecars = sidecar_configs(plan_dict, sites, hostvars, fingerprints)
        state_json = json.dumps(new_state, indent=2, sort_keys=True) + "\n"
        old_plan = plan_path.read_text() if plan_path.exists() else ""
        old_state = state_path.read_text() if state_path.exists() else ""
        changed = old_plan != plan_json or old_state != state_json
        if changed and not self._task.check_mode:
            _write(plan_path, plan_json)
            _write(state_path, state_json)
        result.update(
            changed=changed,
            plan_file=str(plan_path),
            state_file=str(state_path),
            table=planner.format_table(plan).splitlines(),
            unreachable_sites=plan_dict.get("unreachable", {}),
            ansible_facts={
                "mesh_plan": plan_dict,
                "mesh_tls_sites": certificates,
                "mesh_sidecars": sidecars,
            },
        )
        if self._task.diff and old_plan != plan_json:
            result["diff"] = {
                "before_header": str(plan_path),
                "after_header": str(plan_path),
                "prepared": "".join(
                    difflib.unified_diff(
                        old_plan.splitlines(True),
                        plan_json.splitlines(True),
                        str(plan_path),
                        str(plan_path),
                    )
                ),
            }
        return result
