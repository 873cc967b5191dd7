#!/usr/bin/python
"""Ansible module mesh_status: what this site's WireGuard interface and traversal sidecar are
doing now, as plain public data, for `meshwright status` (playbook meshwright.mesh.status)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mesh_status
short_description: Read this site's WireGuard peers and its sidecar's state, changing nothing
description:
  - Reads the running WireGuard interface O(interface) through the Python package
    wireguard-tools from meshwright's node artifact (wireguard-go's UAPI socket, or netlink for
    kernel WireGuard), as the sidecar does, and returns every peer's public key, endpoint,
    latest handshake (and its age, measured on this node's clock), bytes received and sent,
    and persistent keepalive.
  - Reads the traversal sidecar's state file O(sidecar_state_file) when it exists (each punch
    peer's path, phase, round-trip time, next attempt, suspicion; C(meshwright sidecar status)
    prints the same file) and asks systemd whether O(sidecar_service) is active.
  - Returns public data only. The private key that the interface holds is read into this
    process by the library and never returned; preshared keys are not returned either.
  - A missing interface is reported (RV(interface_present=false)), not an error, so that a
    status run shows the site instead of stopping.
  - The C(meshwright.mesh.status) playbook runs it on every site and combines the results
    with the plan on the controller (C(meshwright.status)); see docs/status.md.
version_added: "0.1.0"
author: meshwright
extends_documentation_fragment:
  - meshwright.mesh.node
options:
  interface:
    description: The WireGuard interface.
    type: str
    default: mesh0
  sidecar_state_file:
    description: The traversal sidecar's state file; a missing file is reported, not an error.
    type: path
    default: /run/meshwright-sidecar/state.json
  sidecar_service:
    description:
      - The sidecar's systemd unit, whose state (C(systemctl is-active)) is returned. An empty
        string skips the question.
    type: str
    default: meshwright-sidecar.service
notes:
  - Runs as root (C(become) true), since reading WireGuard's peers needs it.
  - Needs only Python 3 and meshwright's node artifact on the target.
attributes:
  check_mode:
    support: full
    description: It only reads; check mode returns the same.
  diff_mode:
    support: none
  platform:
    support: full
    platforms: posix
    description: Linux with kernel WireGuard or wireguard-go.
"""

EXAMPLES = r"""
- name: Read this site's WireGuard peers and sidecar state
  meshwright.mesh.mesh_status:
  register: mesh_status_site

- name: Show the peers whose last handshake is older than 3 minutes
  ansible.builtin.debug:
    msg: "{{ mesh_status_site.peers | rejectattr('handshake_age_s', 'le', 180) | list }}"
"""

RETURN = r"""
interface:
  description: The interface read.
  returned: always
  type: str
  sample: mesh0
interface_present:
  description: Whether the interface exists.
  returned: always
  type: bool
public_key:
  description: The interface's public key (null when it has no private key, or is missing).
  returned: always
  type: str
listen_port:
  description: The interface's UDP listen port (null when it is missing).
  returned: always
  type: int
  sample: 51820
time:
  description: This node's clock when it read the interface (seconds since the epoch).
  returned: always
  type: float
peers:
  description: Every peer of the interface, sorted by public key.
  returned: always
  type: list
  elements: dict
  contains:
    public_key:
      description: The peer's public key.
      type: str
    endpoint:
      description:
        - Where WireGuard sends this peer's packets (C(ip:port), C([ipv6]:port)); null when
          it has none.
      type: str
    latest_handshake:
      description: When the latest handshake completed (seconds since the epoch); null for never.
      type: float
    handshake_age_s:
      description: Seconds since the latest handshake, on this node's clock; null for never.
      type: float
    rx_bytes:
      description: Bytes received from the peer since the interface came up.
      type: int
    tx_bytes:
      description: Bytes sent to the peer since the interface came up.
      type: int
    persistent_keepalive:
      description: The persistent keepalive interval in seconds (0 for off).
      type: int
  sample:
    - public_key: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
      endpoint: 198.51.100.10:40016
      latest_handshake: 1700000000.5
      handshake_age_s: 41.2
      rx_bytes: 15284
      tx_bytes: 17092
      persistent_keepalive: 25
sidecar:
  description: The traversal sidecar, as far as this site has one.
  returned: always
  type: dict
  contains:
    state_file:
      description: The state file read.
      type: str
    state:
      description: The state file's content (null when there is none); see docs/sidecar.md.
      type: dict
    age_s:
      description: Seconds since the state file was last written (null without one).
      type: float
    service:
      description:
        - What C(systemctl is-active) says of the sidecar's unit; null when not asked or when
          systemd cannot say.
      type: str
      sample: active
    error:
      description: Why the state file could not be read (null when it could, or does not exist).
      type: str
"""

# Imports follow DOCUMENTATION/EXAMPLES/RETURN, by Ansible's convention.
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.meshwright.mesh.plugins.module_utils.node import (
    NODE_ARTIFACT_SPEC,
    import_node,
)

MAX_STATE_FILE = 1 << 20
_NO_ADDRESS = ("0.0.0.0", "::")


def read_peers(
    config: Any, now: float, format_endpoint: Callable[[str, int], str]
) -> list[dict[str, Any]]:
    """Every peer of wireguard-tools' ``WireguardConfig`` as public data. The config also holds
    the private and preshared keys: nothing of them is copied."""
    peers = []
    for key, peer in config.peers.items():
        endpoint = None
        host, port = peer.endpoint_host, peer.endpoint_port
        if host is not None and port and str(host) not in _NO_ADDRESS:
            endpoint = format_endpoint(str(host), int(port))
        # wireguard-go and the kernel both say 0 for "never"
        latest = float(peer.last_handshake) if peer.last_handshake else None
        peers.append(
            {
                "public_key": str(key),
                "endpoint": endpoint,
                "latest_handshake": latest,
                "handshake_age_s": None if latest is None else round(max(0.0, now - latest), 3),
                "rx_bytes": int(peer.rx_bytes or 0),
                "tx_bytes": int(peer.tx_bytes or 0),
                "persistent_keepalive": int(peer.persistent_keepalive or 0),
            }
        )
    return sorted(peers, key=lambda p: str(p["public_key"]))


def read_sidecar_state(path: str, now: float) -> dict[str, Any]:
    """The sidecar's state file: its content and age, or why it could not be read."""
    found: dict[str, Any] = {"state_file": path, "state": None, "age_s": None, "error": None}
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_STATE_FILE + 1)
            age = now - os.fstat(handle.fileno()).st_mtime
    except FileNotFoundError:
        return found
    except OSError as exc:
        found["error"] = f"{path}: {exc.strerror}"
        return found
    if len(data) > MAX_STATE_FILE:
        found["error"] = f"{path}: larger than {MAX_STATE_FILE} bytes"
        return found
    try:
        state = json.loads(data)
    except ValueError as exc:
        found["error"] = f"{path}: not JSON ({exc})"
        return found
    if not isinstance(state, dict):
        found["error"] = f"{path}: not a JSON object"
        return found
    found.update(state=state, age_s=round(max(0.0, age), 3))
    return found


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "interface": {"type": "str", "default": "mesh0"},
            "sidecar_state_file": {
                "type": "path",
                "default": "/run/meshwright-sidecar/state.json",
            },
            "sidecar_service": {"type": "str", "default": "meshwright-sidecar.service"},
            "node_artifact": NODE_ARTIFACT_SPEC,
        },
        supports_check_mode=True,
    )
    wgdevice = import_node(module, "site.wgdevice")
    endpoints = import_node(module, "wire.endpoint")
    name = module.params["interface"]

    def run(argv: Sequence[str]) -> str:
        rc, out, err = module.run_command(list(argv))
        if rc != 0:
            raise wgdevice.DeviceError(f"{' '.join(argv)} failed ({rc}): {err.strip() or out}")
        return str(out)

    result: dict[str, Any] = {
        "changed": False,
        "interface": name,
        "interface_present": False,
        "public_key": None,
        "listen_port": None,
        "peers": [],
    }
    try:
        live = wgdevice.LiveInterface.open(name, run)
    except wgdevice.InterfaceMissing:
        live = None
    except wgdevice.DeviceError as exc:  # names the interface or the command, never a key
        module.fail_json(msg=str(exc), **result)
    now = time.time()
    if live is not None:
        with live:
            try:
                config = live.device.get_config()
            except (OSError, RuntimeError, AssertionError) as exc:
                module.fail_json(msg=f"{name}: cannot read it as WireGuard: {exc}", **result)
            now = time.time()
            own = config.private_key
            result.update(
                interface_present=True,
                public_key=str(own.public_key()) if own else None,
                listen_port=config.listen_port or None,
                peers=read_peers(config, now, endpoints.format_endpoint),
            )
            del config, own
    result["time"] = now

    sidecar = read_sidecar_state(module.params["sidecar_state_file"], time.time())
    sidecar["service"] = None
    systemctl = module.get_bin_path("systemctl") if module.params["sidecar_service"] else None
    if systemctl:
        _, out, _ = module.run_command([systemctl, "is-active", module.params["sidecar_service"]])
        words = str(out).split()
        sidecar["service"] = words[0] if words else None
    result["sidecar"] = sidecar
    module.exit_json(**result)


if __name__ == "__main__":
    main()
