#!/usr/bin/python
"""Ansible module wg_sync (role wireguard): bring a running WireGuard interface to the desired
peers, listen port, key and addresses, live, changing only what differs."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: wg_sync
short_description: Apply WireGuard peers, listen port, key and addresses to a running interface
description:
  - Reads the running interface through the Python package wireguard-tools (wireguard-go's
    UAPI socket, or netlink for kernel WireGuard) and C(ip -j address), and changes only what
    differs from the desired state, one peer or setting at a time, never by restarting the
    interface. Traffic to peers that do not change is not interrupted; a run with nothing to
    change changes nothing.
  - Peers are matched by public key. A peer that is not desired is removed; a desired one that
    is missing is added; an existing one gets new allowed IPs, keepalive or endpoint only when
    they differ. A peer without a desired endpoint keeps whatever endpoint WireGuard learned
    (roaming); a peer with one is set to it when the running endpoint differs.
  - Allowed IPs are compared as networks (host bits cleared, as WireGuard stores them). An
    allowed-IP prefix belongs to exactly one peer (cryptokey routing); a prefix given to two
    peers is an error.
  - The private key is set from O(private_key_file) when the interface's public key is not the
    file's (a rotated key, or an interface without a key); the key itself is never put into
    a result, a diff or an error.
  - With O(preshared_keys), every peer gets a preshared key that this node derives for the
    pair from its own private key and the peer's public key (and O(preshared_key_secret)); the
    peer derives the same one. Each is kept in a root-only file under
    O(preshared_key_dir) (which the wg-quick configuration loads at boot) and set live when
    the running one differs. Preshared keys are compared by digest and never returned.
  - Check mode reports what would change. A missing interface in check mode is reported, not
    an error (the service that creates it has not run); otherwise it is an error.
  - Diff mode shows the interface's public state before and after (keys, listen port, MTU,
    addresses, peers); a preshared key is shown as set or not, never itself.
version_added: "0.1.0"
author: meshwright
extends_documentation_fragment:
  - meshwright.mesh.node
options:
  interface:
    description: The WireGuard interface.
    type: str
    required: true
  listen_port:
    description: The UDP port the interface listens on.
    type: int
    required: true
  addresses:
    description: The interface's addresses with prefix length; other global addresses are removed.
    type: list
    elements: str
    required: true
  private_key_file:
    description: The node's private key file (made by wg_keypair).
    type: path
    required: true
  peers:
    description:
      - The peers, each a dict with C(name), C(public_key), C(endpoint) (null or C(host:port),
        C([v6]:port) for IPv6), C(allowed_ips) (list of prefixes) and C(keepalive) (null, 0
        or seconds). A peer whose C(mode) is C(punch) gets its endpoint only when it is new
        (its relay allocation); after that the site's sidecar decides it (relayed or direct),
        and a run leaves it alone. A peer found at one of its C(fallback_endpoints) (a list of
        the pair's other relay paths, where the sidecar moves it after a relay failover or a
        dead direct path) is left there too. Other keys are ignored.
    type: list
    elements: dict
    required: true
  mtu:
    description:
      - The interface's MTU, set live when it differs. Unset, the MTU is left as it is.
      - wg-quick otherwise derives it from the route to the peers' endpoints, which for a
        sidecar's loopback endpoints would be far too large.
    type: int
  preshared_keys:
    description: Give every peer a derived preshared key; false removes them.
    type: bool
    default: false
  preshared_key_secret:
    description:
      - An optional secret mixed into every derived preshared key, the same on every site
        (keep it in Ansible Vault). Without it, the keys add no protection against an attacker
        who can break X25519; see docs/keys.md.
    type: str
    default: ""
  preshared_key_dir:
    description: Where the derived preshared keys are kept, one C(<peer name>.psk) file each.
    type: path
    default: /etc/wireguard/<interface>.psk
attributes:
  check_mode:
    support: full
    description: Reports what would change, changes nothing.
  diff_mode:
    support: full
    description: Shows the interface's public state before and after.
  platform:
    support: full
    platforms: posix
    description: Linux with kernel WireGuard or wireguard-go, and iproute2.
"""

EXAMPLES = r"""
- name: Apply the peers to mesh0, live
  wg_sync:
    interface: mesh0
    listen_port: 51820
    addresses: [10.99.0.1/24]
    private_key_file: /etc/wireguard/mesh0.key
    peers:
      - name: easy1
        public_key: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
        endpoint: null
        allowed_ips: [10.99.0.2/32]
        keepalive: null
"""

RETURN = r"""
actions:
  description: What was changed (in check mode, what would be), one line each; public data only.
  returned: always
  type: list
  elements: str
  sample: ["add peer cone (HIo9xNzC...): allowed-ips 10.99.0.3/32, endpoint 203.0.113.26:51820"]
interface_present:
  description: Whether the interface exists.
  returned: always
  type: bool
"""

# Imports follow DOCUMENTATION/EXAMPLES/RETURN, by Ansible's convention.
from collections.abc import Sequence
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.meshwright.mesh.plugins.module_utils.node import (
    NODE_ARTIFACT_SPEC,
    import_node,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "interface": {"type": "str", "required": True},
            "listen_port": {"type": "int", "required": True},
            "addresses": {"type": "list", "elements": "str", "required": True},
            "private_key_file": {"type": "path", "required": True},
            "peers": {"type": "list", "elements": "dict", "required": True},
            "mtu": {"type": "int"},
            "preshared_keys": {"type": "bool", "default": False},
            "preshared_key_secret": {"type": "str", "default": "", "no_log": True},
            "preshared_key_dir": {"type": "path"},
            "node_artifact": NODE_ARTIFACT_SPEC,
        },
        supports_check_mode=True,
    )
    keys = import_node(module, "site.keys")
    wgstate = import_node(module, "site.wgstate")
    wgdevice = import_node(module, "site.wgdevice")
    params = module.params
    name = params["interface"]
    key_file = params["private_key_file"]
    psk_dir = params["preshared_key_dir"] or f"/etc/wireguard/{name}.psk"
    check = module.check_mode

    def run(argv: Sequence[str]) -> str:
        rc, out, err = module.run_command(list(argv))
        if rc != 0:
            raise wgdevice.DeviceError(f"{' '.join(argv)} failed ({rc}): {err.strip() or out}")
        return str(out)

    try:
        try:
            own_private = wgdevice.read_key_file(key_file)
        except keys.KeyFormatError as exc:
            raise wgstate.SpecError(f"{key_file}: {exc}") from None
        if own_private is None and not check:
            raise wgstate.SpecError(f"{key_file} does not exist: run wg_keypair first")
        wanted = wgstate.desired(
            listen_port=params["listen_port"],
            addresses=params["addresses"],
            mtu=params["mtu"],
            private_key_file=key_file,
            own_private=own_private,
            peers=params["peers"],
            preshared_keys=params["preshared_keys"],
            preshared_secret=params["preshared_key_secret"].encode(),
            preshared_dir=psk_dir,
            check_mode=check,
            resolve=wgdevice.resolve,
        )
    except wgstate.SpecError as exc:
        module.fail_json(msg=f"{name}: {exc}")

    try:
        live = wgdevice.LiveInterface.open(name, run)
    except wgdevice.InterfaceMissing:
        if check:
            module.exit_json(
                changed=False,
                actions=[],
                interface_present=False,
                msg=f"{name} does not exist yet; the service that brings it up has not run",
            )
        module.fail_json(msg=f"{name} does not exist: is wg-quick@{name} running?")
    except wgdevice.DeviceError as exc:
        module.fail_json(msg=str(exc))
    try:
        with live:
            running = live.read()
            changes = wgstate.diff(running, wanted)
            # The files first: wg-quick loads them at boot, whatever happens next.
            files_changed = wgdevice.sync_secret_files(psk_dir, wanted.preshared_files, check)
            if not check:
                live.apply(changes, own_private)
    except wgdevice.DeviceError as exc:  # names the interface or the command itself
        module.fail_json(msg=str(exc))
    except (wgstate.SpecError, OSError) as exc:
        # OSError messages name a file and an errno, never a file's content.
        module.fail_json(msg=f"{name}: {exc}")

    result: dict[str, Any] = {
        "changed": bool(changes) or files_changed,
        "actions": [change.describe() for change in changes],
        "interface_present": True,
    }
    if module._diff and changes:
        names = {key: peer.name for key, peer in wanted.peers.items()}
        after = wgstate.expected(running, wanted)
        result["diff"] = {
            "before_header": f"{name} (running)",
            "after_header": f"{name} (desired)",
            "before": wgstate.render(running, names),
            "after": wgstate.render(after, names, wanted.pending),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
