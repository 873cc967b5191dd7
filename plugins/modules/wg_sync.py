#!/usr/bin/python
"""Ansible module wg_sync (role wireguard): bring a running WireGuard interface to the desired
peers, listen port, key and addresses, live, changing only what differs."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: wg_sync
short_description: Apply WireGuard peers, listen port, key and addresses to a running interface
description:
  - Reads the running interface (C(wg show) for kernel WireGuard and wireguard-go alike,
    C(ip -j address)) and changes only what differs from the desired state, with C(wg set)
    and C(ip address), never by restarting the interface. Traffic to peers that do not
    change is not interrupted; a run with nothing to change changes nothing.
  - Peers are matched by public key. A peer that is not desired is removed; a desired one that
    is missing is added; an existing one gets new allowed IPs, keepalive or endpoint only when
    they differ. A peer without a desired endpoint keeps whatever endpoint WireGuard learned
    (roaming); a peer with one is set to it when the running endpoint differs.
  - Allowed IPs are compared as networks (host bits cleared, as WireGuard stores them). An
    allowed-IP prefix belongs to exactly one peer (cryptokey routing); a prefix given to two
    peers is an error.
  - The private key is set from O(private_key_file) when the interface's public key is not the
    file's (a rotated key, or an interface without a key); the key itself is never read into
    a result, a diff or an error.
  - Never reads C(wg show dump) or C(wg showconf), which print the private key.
  - With O(preshared_keys), every peer gets a preshared key that this node derives for the
    pair from its own private key and the peer's public key (and O(preshared_key_secret)); the
    peer derives the same one. Each is kept in a root-only file under
    O(preshared_key_dir) (which the wg-quick configuration loads at boot) and set live when
    the running one differs. Preshared keys are compared by digest and never returned.
  - Check mode reports what would change. A missing interface in check mode is reported, not
    an error (the service that creates it has not run); otherwise it is an error.
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
        or seconds). Other keys (such as the planner's C(mode)) are ignored.
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
import hashlib
import ipaddress
import json
import os
import re
import socket
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.meshwright.mesh.plugins.module_utils.node import (
    NODE_ARTIFACT_SPEC,
    import_node,
)

wgkeys: Any = None  # meshwright.site.keys, imported from the node artifact by main()


class SpecError(ValueError):
    """The desired state is invalid."""


def short(key: str) -> str:
    return key[:8] + "..."


def canonical_endpoint(host: str, port: int) -> str:
    address = ipaddress.ip_address(host)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"endpoint {text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def endpoint_candidates(text: str) -> set[str] | None:
    """The running endpoints that mean `text`; None when a name cannot be resolved now."""
    host, port = parse_endpoint(text)
    try:
        return {canonical_endpoint(host, port)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    return {canonical_endpoint(info[4][0], port) for info in infos}


def desired_peers(peers: list[dict], own_public: str | None) -> dict[str, dict]:
    """Validate the peers; key them by public key."""
    wanted: dict[str, dict] = {}
    owner_of: dict[str, str] = {}
    names: set[str] = set()
    for index, peer in enumerate(peers):
        name = peer.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError(f"peers[{index}] has no name")
        if name in names:
            raise SpecError(f"peer {name} is given twice")
        names.add(name)
        key = peer.get("public_key")
        try:
            key = wgkeys.encode(wgkeys.decode(key if isinstance(key, str) else ""))
        except wgkeys.KeyFormatError as exc:
            raise SpecError(f"peer {name}: public_key is not a WireGuard key: {exc}") from None
        if key in wanted:
            raise SpecError(f"peers {wanted[key]['name']} and {name} have the same public key")
        if key == own_public:
            raise SpecError(f"peer {name} has this node's own public key")
        endpoint = peer.get("endpoint") or None
        if endpoint is not None:
            parse_endpoint(str(endpoint))
        keepalive = peer.get("keepalive") or 0
        if not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
            raise SpecError(f"peer {name}: keepalive must be null or 0..65535 seconds")
        allowed = peer.get("allowed_ips") or []
        if isinstance(allowed, str) or not isinstance(allowed, list):
            raise SpecError(f"peer {name}: allowed_ips must be a list of prefixes")
        networks = []
        for prefix in allowed:
            try:
                network = str(ipaddress.ip_network(str(prefix), strict=False))
            except ValueError:
                raise SpecError(f"peer {name}: {prefix!r} is not an IP prefix") from None
            if network in owner_of:
                raise SpecError(
                    f"{network} is an allowed IP of both {owner_of[network]} and {name};"
                    " a prefix belongs to exactly one peer"
                )
            owner_of[network] = name
            networks.append(network)
        wanted[key] = {
            "name": name,
            "endpoint": str(endpoint) if endpoint else None,
            "allowed_ips": sorted(networks, key=network_order),
            "keepalive": keepalive,
        }
    return wanted


def desired_addresses(addresses: list[str]) -> list[str]:
    result = set()
    for address in addresses:
        try:
            if "/" not in address:
                raise ValueError("no prefix length")
            result.add(str(ipaddress.ip_interface(address)))
        except ValueError as exc:
            raise SpecError(
                f"address {address!r} is not an address with prefix length, such as"
                f" 10.99.0.1/24 ({exc})"
            ) from None
    return sorted(result, key=address_order)


def address_order(text: str) -> tuple:
    interface = ipaddress.ip_interface(text)
    return interface.version, interface.ip, interface.network.prefixlen


def network_order(text: str) -> tuple:
    network = ipaddress.ip_network(text)
    return network.version, network.network_address, network.prefixlen


class Interface:
    """The running interface, read with `wg show <if> <field>` (never dump/showconf)."""

    def __init__(self, module: AnsibleModule, name: str):
        self.module = module
        self.name = name

    def run(self, *argv: str) -> str:
        rc, out, err = self.module.run_command(list(argv))
        if rc != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({rc}): {err.strip() or out.strip()}")
        return out

    def exists(self) -> bool:
        rc, _, _ = self.module.run_command(["ip", "link", "show", "dev", self.name])
        return rc == 0

    def table(self, field: str) -> dict[str, str]:
        rows = {}
        for line in self.run("wg", "show", self.name, field).splitlines():
            if line.strip():
                key, _, value = line.partition("\t")
                rows[key] = value.strip()
        return rows

    def read(self) -> dict:
        public = self.run("wg", "show", self.name, "public-key").strip()
        port = int(self.run("wg", "show", self.name, "listen-port").strip() or 0)
        allowed = self.table("allowed-ips")
        endpoints = self.table("endpoints")
        keepalives = self.table("persistent-keepalive")
        # Secret: only its digest is kept, so the key never reaches a result or a diff.
        preshared = {k: digest(v) for k, v in self.table("preshared-keys").items()}
        peers = {}
        for key, ips in allowed.items():
            networks = [] if ips == "(none)" else ips.split()
            keepalive = keepalives.get(key, "off")
            peers[key] = {
                "allowed_ips": sorted(
                    (str(ipaddress.ip_network(n, strict=False)) for n in networks),
                    key=network_order,
                ),
                "endpoint": None if endpoints.get(key, "(none)") == "(none)" else endpoints[key],
                "keepalive": 0 if keepalive == "off" else int(keepalive),
                "preshared_key": preshared.get(key),
            }
        links = json.loads(self.run("ip", "-j", "address", "show", "dev", self.name) or "[]")
        addresses = sorted(
            (
                str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}"))
                for link in links
                for a in link.get("addr_info", [])
                if a.get("scope") == "global"
            ),
            key=address_order,
        )
        return {
            "public_key": None if public == "(none)" else public,
            "listen_port": port,
            "addresses": addresses,
            "mtu": int(links[0].get("mtu", 0)) if links else 0,
            "peers": peers,
        }


def digest(preshared_key: str) -> str | None:
    """A preshared key's digest, to compare without holding it; None for no key."""
    text = preshared_key.strip()
    if text in ("", "(none)") or text == wgkeys.encode(bytes(wgkeys.KEY_LEN)):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


PEER_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def write_secret(path: str, text: str) -> bool:
    """Write a root-only file atomically unless it already holds `text`; True if written."""
    try:
        with open(path) as handle:
            if handle.read() == text:
                return False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".psk-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def plan(name: str, live: dict, want: dict) -> list[tuple[str, list[str]]]:
    """The (description, argv) steps that turn `live` into `want`, in a safe order."""
    steps: list[tuple[str, list[str]]] = []
    if want["public_key"] is not None and live["public_key"] != want["public_key"]:
        steps.append(
            (
                f"set the private key from {want['private_key_file']}"
                f" (public key {live['public_key'] or '(none)'} -> {want['public_key']})",
                ["wg", "set", name, "private-key", want["private_key_file"]],
            )
        )
    if live["listen_port"] != want["listen_port"]:
        steps.append(
            (
                f"set listen-port {live['listen_port']} -> {want['listen_port']}",
                ["wg", "set", name, "listen-port", str(want["listen_port"])],
            )
        )
    for key in sorted(set(live["peers"]) - set(want["peers"])):
        steps.append((f"remove peer {short(key)}", ["wg", "set", name, "peer", key, "remove"]))
    for key, peer in sorted(want["peers"].items(), key=lambda item: item[1]["name"]):
        current = live["peers"].get(key)
        argv: list[str] = []
        what: list[str] = []
        if current is None or current["allowed_ips"] != peer["allowed_ips"]:
            argv += ["allowed-ips", ",".join(peer["allowed_ips"])]
            what.append(f"allowed-ips {', '.join(peer['allowed_ips']) or '(none)'}")
        if current is None or current["keepalive"] != peer["keepalive"]:
            argv += ["persistent-keepalive", str(peer["keepalive"] or "off")]
            what.append(f"keepalive {peer['keepalive'] or 'off'}")
        if peer["endpoint"] is not None:
            running = None if current is None else current["endpoint"]
            candidates = endpoint_candidates(peer["endpoint"])
            unresolved_but_set = candidates is None and running is not None
            if not unresolved_but_set and (candidates is None or running not in candidates):
                argv += ["endpoint", peer["endpoint"]]
                what.append(f"endpoint {peer['endpoint']}")
        if (None if current is None else current["preshared_key"]) != peer["preshared_key"]:
            # /dev/null reads as no key: `wg set` removes it.
            argv += ["preshared-key", peer["preshared_key_file"] or "/dev/null"]
            what.append("preshared key " + ("set" if peer["preshared_key"] else "removed"))
        if argv:
            verb = "add" if current is None else "change"
            steps.append(
                (
                    f"{verb} peer {peer['name']} ({short(key)}): {', '.join(what)}",
                    ["wg", "set", name, "peer", key, *argv],
                )
            )
    if want.get("mtu") and live.get("mtu") != want["mtu"]:
        steps.append(
            (
                f"set mtu {live.get('mtu')} -> {want['mtu']}",
                ["ip", "link", "set", "dev", name, "mtu", str(want["mtu"])],
            )
        )
    for address in live["addresses"]:
        if address not in want["addresses"]:
            steps.append(
                (f"remove address {address}", ["ip", "address", "del", address, "dev", name])
            )
    for address in want["addresses"]:
        if address not in live["addresses"]:
            steps.append(
                (f"add address {address}", ["ip", "address", "replace", address, "dev", name])
            )
    return steps


def render(state: dict, names: dict[str, str]) -> str:
    """A stable text of public state, for diff mode."""
    lines = [
        f"public_key: {state['public_key'] or '(none)'}",
        f"listen_port: {state['listen_port']}",
        f"addresses: {', '.join(state['addresses']) or '(none)'}",
    ]
    for key in sorted(state["peers"], key=lambda k: (names.get(k, "~"), k)):
        peer = state["peers"][key]
        lines += [
            f"peer {names.get(key, '(not desired)')} {key}",
            f"  allowed_ips: {', '.join(peer['allowed_ips']) or '(none)'}",
            f"  endpoint: {peer['endpoint'] or '(none)'}",
            f"  keepalive: {peer['keepalive'] or 'off'}",
            f"  preshared_key: {'set' if peer.get('preshared_key') else '(none)'}",
        ]
    return "\n".join(lines) + "\n"


def preshared_keys(peers: dict[str, dict], own_private: bytes | None, secret: bytes) -> dict:
    """Each desired peer's derived preshared key (base64), by public key; {} when off."""
    if own_private is None:
        return {}
    keys = {}
    for key, peer in peers.items():
        if not PEER_FILE_NAME.match(peer["name"]):
            raise SpecError(f"peer name {peer['name']!r} cannot name a preshared key file")
        derived = wgkeys.pair_preshared_key(own_private, wgkeys.decode(key), secret)
        keys[key] = wgkeys.encode(derived)
    return keys


def sync_preshared_files(
    module: AnsibleModule, directory: str, peers: dict[str, dict], preshared: dict[str, str]
) -> bool:
    """Keep one root-only file per peer's preshared key, and none other; True if changed."""
    wanted = {peers[key]["name"] + ".psk": text + "\n" for key, text in preshared.items()}
    present = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    stale = sorted(f for f in present if f.endswith(".psk") and f not in wanted)
    if module.check_mode:
        return bool(stale) or any(not os.path.exists(os.path.join(directory, f)) for f in wanted)
    changed = False
    if wanted and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
        changed = True
    for file_name, text in wanted.items():
        changed |= write_secret(os.path.join(directory, file_name), text)
    for file_name in stale:
        os.unlink(os.path.join(directory, file_name))
        changed = True
    return changed


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
    global wgkeys
    wgkeys = import_node(module, "site.keys")
    params = module.params
    name = params["interface"]
    interface = Interface(module, name)
    try:
        if not 0 < params["listen_port"] < 65536:
            raise SpecError(f"listen_port {params['listen_port']} is not 1..65535")
        addresses = desired_addresses(params["addresses"])
        own_private = None
        try:
            with open(params["private_key_file"], "rb") as handle:
                own_private = wgkeys.decode(handle.read(4096))
                own_public = wgkeys.encode(wgkeys.public_key(own_private))
        except FileNotFoundError:
            own_public = None
            if not module.check_mode:
                raise SpecError(
                    f"{params['private_key_file']} does not exist: run wg_keypair first"
                ) from None
        except wgkeys.KeyFormatError as exc:
            raise SpecError(f"{params['private_key_file']}: {exc}") from None
        peers = params["peers"]
        # In check mode a peer whose key is not made yet (wg_keypair returns null there)
        # would be added; it cannot be compared with anything.
        unknown = [p for p in peers if module.check_mode and p.get("public_key") is None]
        want = {
            "public_key": own_public,
            "private_key_file": params["private_key_file"],
            "listen_port": params["listen_port"],
            "addresses": addresses,
            "mtu": params["mtu"],
            "peers": desired_peers([p for p in peers if p not in unknown], own_public),
        }
        psk_dir = params["preshared_key_dir"] or f"/etc/wireguard/{name}.psk"
        preshared = preshared_keys(
            want["peers"],
            own_private if params["preshared_keys"] else None,
            params["preshared_key_secret"].encode(),
        )
        for key, peer in want["peers"].items():
            peer["preshared_key"] = digest(preshared[key]) if key in preshared else None
            peer["preshared_key_file"] = (
                os.path.join(psk_dir, peer["name"] + ".psk") if key in preshared else None
            )
    except SpecError as exc:
        module.fail_json(msg=f"{name}: {exc}")

    if not interface.exists():
        if module.check_mode:
            module.exit_json(
                changed=False,
                actions=[],
                interface_present=False,
                msg=f"{name} does not exist yet; the service that brings it up has not run",
            )
        module.fail_json(msg=f"{name} does not exist: is wg-quick@{name} running?")
    try:
        live = interface.read()
        steps = plan(name, live, want)
        steps += [(f"add peer {p.get('name')} (its key is not made yet)", []) for p in unknown]
        files_changed = sync_preshared_files(module, psk_dir, want["peers"], preshared)
        if not module.check_mode:
            for _, argv in steps:
                interface.run(*argv)  # never empty outside check mode
    except (RuntimeError, ValueError) as exc:
        module.fail_json(msg=f"{name}: {exc}")

    result = {
        "changed": bool(steps) or files_changed,
        "actions": [description for description, _ in steps],
        "interface_present": True,
    }
    if module._diff and steps:
        names = {key: peer["name"] for key, peer in want["peers"].items()}
        after_peers = {
            key: {
                **peer,
                "endpoint": peer["endpoint"] or live["peers"].get(key, {}).get("endpoint"),
            }
            for key, peer in want["peers"].items()
        }
        result["diff"] = {
            "before_header": f"{name} (running)",
            "after_header": f"{name} (desired)",
            "before": render(live, names),
            "after": render({**want, "peers": after_peers}, names),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
