#!/usr/bin/python
"""Ansible module nat_probe: measure the NAT in front of a site against the relays' STUN."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nat_probe
short_description: Measure the NAT in front of a site (RFC 4787 / RFC 5780 terms)
description:
  - Sends STUN binding requests (RFC 8489) from one UDP socket of its own to the relays'
    STUN service and measures, in RFC 4787 terms, the NAT in front of this host - whether
    UDP works at all, the public address(es), mapping and filtering behaviour (RFC 5780
    behaviour discovery), hairpinning, port preservation and how ports are allocated across
    successive destinations - and whether TCP 443 to each relay connects, and the RTT to each.
  - Summarises it as a class the planner uses, C(open) (no NAT and no filtering measured,
    or endpoint-independent filtering), C(easy) (endpoint-independent mapping),
    C(hard) (endpoint-dependent mapping, or mapping not measurable) or C(blocked) (no UDP;
    only TCP reaches a relay). A host with no NAT but a stateful firewall that filters is
    C(easy), not C(open), because inbound needs a punch.
  - Filtering needs a relay with two addresses (its STUN service then honours
    CHANGE-REQUEST); without one it is C(unknown) and C(filtering_reason) says why.
  - The probe binds its own socket, so it runs before WireGuard is up. Its result describes
    the NAT, not the WireGuard port's own mapping. Under an endpoint-independent NAT they
    agree in kind (and usually in port, when the NAT preserves ports); under an
    endpoint-dependent one the WireGuard port gets a mapping of its own per peer. The traversal
    sidecar learns the WireGuard port's mapping through the relays, which see it as a peer.
  - The probe changes nothing on the host; check mode runs it in full.
  - Fails when no relay answers at all, over UDP or TCP, naming every relay and address tried
    and what happened.
  - Usually called through its action plugin, which fills O(relays) from the C(mesh_relays)
    inventory group when it is not given.
version_added: "0.1.0"
author: meshwright
extends_documentation_fragment:
  - meshwright.mesh.node
options:
  relays:
    description:
      - The relays' STUN services. Defaults (through the action plugin) to every host of the
        C(mesh_relays) group, with C(relay_stun_addresses) (or C(relay_public_addresses)),
        C(relay_stun_port) and C(relay_stun_alt_port) from its variables.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: The relay's name, used in the report.
        type: str
        required: true
      addresses:
        description: One or two addresses of the relay's STUN service.
        type: list
        elements: str
        required: true
      port:
        description: The primary STUN port.
        type: int
        default: 3478
      alt_port:
        description: The alternate STUN port.
        type: int
        default: 3479
  local_port:
    description: Local UDP port to probe from; 0 picks a free one.
    type: int
    default: 0
  bind_address:
    description: Local address to probe from.
    type: str
    default: 0.0.0.0
  tcp_port:
    description: TCP port to check each relay on (UDP-blocked sites reach relays there); 0 skips it.
    type: int
    default: 443
  rto_ms:
    description:
      - Initial retransmission timeout (RFC 8489 section 6.2.1), doubled after every try.
        RFC 8489 says 500 ms; the default is shorter so a missing relay costs seconds, not 39.5 s.
    type: int
    default: 250
  tries:
    description: Requests sent per transaction before giving up (RFC 8489 Rc).
    type: int
    default: 4
  hairpin:
    description: Whether to test hairpinning (a request to our own mapped address).
    type: bool
    default: true
notes:
  - Needs only Python 3 and meshwright's node artifact on the target.
attributes:
  check_mode:
    support: full
    description: The probe changes nothing on the host, so check mode runs it in full.
  diff_mode:
    support: none
    description: Nothing on the host changes, so there is nothing to show.
  platform:
    support: full
    platforms: posix
    description: Any POSIX system with Python 3.
"""

EXAMPLES = r"""
- name: Probe the NAT with the relays from inventory (group mesh_relays)
  nat_probe:

- name: Probe against one relay with two addresses
  nat_probe:
    relays:
      - name: relay1
        addresses: [198.51.100.10, 198.51.100.11]

- name: Use the result
  ansible.builtin.debug:
    msg: "{{ inventory_hostname }} is {{ mesh_nat.nat_class }} ({{ mesh_nat.mapping }} mapping)"
"""

RETURN = r"""
ansible_facts:
  description: Facts set on the host.
  returned: success
  type: dict
  contains:
    mesh_nat:
      description: The NAT report (every key below is also returned at the top level).
      type: dict
nat_class:
  description: C(open), C(easy), C(hard) or C(blocked).
  returned: success
  type: str
  sample: easy
udp:
  description: Whether any relay answered over UDP.
  returned: success
  type: bool
behind_nat:
  description: Whether the mapped address differs from the local one (null when UDP is blocked).
  returned: success
  type: bool
public_addresses:
  description: The mapped (public) IP addresses the relays saw.
  returned: success
  type: list
  elements: str
  sample: [198.51.100.21]
local_address:
  description: The probe socket's local address and port.
  returned: success
  type: dict
mapping:
  description: >-
    Mapping behaviour: endpoint-independent, address-dependent, address-and-port-dependent
    or unknown.
  returned: success
  type: str
mapping_reason:
  description: What was compared to decide the mapping behaviour.
  returned: success
  type: str
filtering:
  description: >-
    Filtering behaviour: endpoint-independent, address-dependent, address-and-port-dependent
    or unknown.
  returned: success
  type: str
filtering_reason:
  description: Which RFC 5780 test decided the filtering behaviour, or why none could.
  returned: success
  type: str
hairpinning:
  description: Whether a datagram to our own mapped address came back (null when not tested).
  returned: success
  type: bool
port_preservation:
  description: Whether every mapping kept the local port.
  returned: success
  type: bool
port_allocation:
  description: >-
    How mapped ports are allocated across successive destinations - kind (preserved,
    sequential, random, unknown), delta (for sequential), samples and reason.
  returned: success
  type: dict
rtt_ms:
  description: Round-trip time to each relay that answered, in milliseconds.
  returned: success
  type: dict
best_relay:
  description: The relay with the lowest RTT.
  returned: success
  type: str
tcp443:
  description: Whether TCP to each relay's O(tcp_port) connected.
  returned: success
  type: dict
mappings:
  description: Every binding that answered - relay, server address and mapped address.
  returned: success
  type: list
  elements: dict
errors:
  description: What went wrong with each relay address that did not answer.
  returned: success
  type: list
  elements: str
probe_seconds:
  description: How long the probe took on this host.
  returned: success
  type: float
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.meshwright.mesh.plugins.module_utils.node import (
    NODE_ARTIFACT_SPEC,
    import_node,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "relays": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "name": {"type": "str", "required": True},
                    "addresses": {"type": "list", "elements": "str", "required": True},
                    "port": {"type": "int", "default": 3478},
                    "alt_port": {"type": "int", "default": 3479},
                },
            },
            "local_port": {"type": "int", "default": 0},
            "bind_address": {"type": "str", "default": "0.0.0.0"},
            "tcp_port": {"type": "int", "default": 443},
            "rto_ms": {"type": "int", "default": 250},
            "tries": {"type": "int", "default": 4},
            "hairpin": {"type": "bool", "default": True},
            "node_artifact": NODE_ARTIFACT_SPEC,
        },
        # The probe only sends STUN requests from a socket of its own: nothing to change.
        supports_check_mode=True,
    )
    natprobe = import_node(module, "site.nat.probe")
    params = module.params
    try:
        relays = [natprobe.StunRelay.from_dict(r) for r in params["relays"]]
        retransmission = natprobe.Retransmission(rto=params["rto_ms"] / 1000, rc=params["tries"])
    except ValueError as exc:
        module.fail_json(msg=f"invalid relays or timing: {exc}")
    if not relays:
        module.fail_json(msg="no relays to probe: the mesh_relays group is empty")
    started = time.monotonic()
    report = natprobe.probe(
        relays,
        local_port=params["local_port"],
        bind_address=params["bind_address"],
        tcp_port=params["tcp_port"] or None,
        retransmission=retransmission,
        hairpin=params["hairpin"],
        software="meshwright nat_probe",
    )
    result = {**report.to_dict(), "probe_seconds": round(time.monotonic() - started, 2)}
    if not report.udp and not any(report.tcp443.values()):
        module.fail_json(
            msg="no relay answered over UDP or TCP: " + report.failure_message(), **result
        )
    module.exit_json(changed=False, ansible_facts={"mesh_nat": result}, **result)


if __name__ == "__main__":
    main()
