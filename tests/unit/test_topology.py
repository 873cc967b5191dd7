"""Topology parsing, validation and derivation: pure, no podman."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest
import yaml

from meshwright.lab.runner import render_inventory
from meshwright.lab.topology import TopologyError, build_lab, load_topology

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((ROOT / "inventory/lab/topology.yml").read_text())
LAB_PUBLIC = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24")]


def small() -> dict:
    return {
        "name": "t",
        "relays": {"r1": {"addresses": ["198.51.100.10"]}},
        "sites": {"a": {"nat": "eim", "public_address": "198.51.100.21", "lan": "10.1.0.0/24"}},
    }


def test_default_topology_has_every_nat_kind_and_two_relays():
    top = load_topology(DEFAULT)
    assert {s.name: s.nat for s in top.sites} == {
        "public": "none",
        "easy1": "eim",
        "easy2": "eim",
        "hard1": "edm",
        "hard2": "edm",
        "blocked": "udp-blocked",
        "cone": "fullcone",
        "cgn": "cgnat",
        "easy3": "eim",  # behind easy1's NAT: the same-LAN pair
    }
    assert [len(r.addresses) for r in top.relays] == [2, 1]
    assert all(s.lan_hosts == 1 for s in top.sites)


def test_default_lab_hosts_roles_and_public_space():
    lab = build_lab(load_topology(DEFAULT))
    roles = {h.name: h.role for h in lab.hosts}
    assert roles["relay1"] == "relay" and roles["easy1"] == "site"
    assert roles["easy1-lan1"] == "lan-host" and roles["easy1-nat"] == "router"
    assert "public-nat" not in roles  # a public site has no NAT router
    assert roles["cgn-nat"] == roles["cgn-cgnat"] == "router"  # two NAT layers
    assert len(lab.hosts) == 28  # easy3 and its LAN host share easy1's NAT
    # Every address on the internet segment is in the lab's public space; nothing else is.
    for host in lab.hosts:
        for iface in host.interfaces:
            for cidr in iface.addresses:
                addr = ipaddress.ip_interface(cidr).ip
                on_internet = iface.network == "mwlab-internet"
                assert on_internet == any(addr in n for n in LAB_PUBLIC), (host.name, cidr)


def test_nat_rules_match_their_kind():
    lab = build_lab(load_topology(DEFAULT))
    setup = {h.name: "\n".join(h.setup) for h in lab.hosts}
    assert "MASQUERADE\n" in setup["easy1-nat"] + "\n" and "--random" not in setup["easy1-nat"]
    assert "MASQUERADE --random-fully" in setup["hard1-nat"]
    assert "DNAT --to-destination 172.31.5.2" in setup["cone-nat"]
    assert "--dports 80,443 -j ACCEPT" in setup["blocked-nat"]
    assert "FORWARD -j DROP" in setup["blocked-nat"]
    assert "MASQUERADE" in setup["cgn-nat"] and "MASQUERADE" in setup["cgn-cgnat"]
    # LAN hosts leave only through their own gateway; gateways only through their own NAT.
    assert "default via 10.10.2.1 dev lan" in setup["easy1-lan1"]
    assert "default via 172.31.0.1 dev wan" in setup["easy1"]
    assert "default via 100.64.0.1 dev wan" in setup["cgn-nat"]


def test_link_shaping_is_on_the_internet_facing_host():
    lab = build_lab(load_topology(DEFAULT))
    shaped = {h.name for h in lab.hosts if any("NFQUEUE" in line for line in h.setup)}
    assert shaped == {
        "relay1",
        "relay2",
        "public",
        "easy1-nat",
        "easy2-nat",
        "hard1-nat",
        "hard2-nat",
        "blocked-nat",
        "cone-nat",
        "cgn-cgnat",
    }
    cgn = "\n".join(lab.host("cgn-cgnat").setup)
    assert "--latency-ms 15 --jitter-ms 3" in cgn


def test_loss_uses_statistic_match():
    data = small()
    data["sites"]["a"]["wan"] = {"latency_ms": 0, "loss_pct": 5}
    setup = "\n".join(build_lab(load_topology(data)).host("a-nat").setup)
    assert "--probability 0.0500 -j DROP" in setup
    assert "NFQUEUE" not in setup


def test_sites_behind_one_nat_share_its_router_and_uplink():
    data = small()
    data["sites"]["b"] = {"behind": "a", "lan": "10.2.0.0/24"}
    lab = build_lab(load_topology(data))
    a, b, router = lab.host("a"), lab.host("b"), lab.host("a-nat")
    assert a.interfaces[0].network == b.interfaces[0].network == "t-a-uplink"
    assert b.nat == "eim" and b.public_address == "198.51.100.21"
    assert "ip route replace 10.2.0.0/24 via 172.31.0.3 dev inside" in router.setup
    assert "b-nat" not in {h.name for h in lab.hosts}


def test_derivation_is_deterministic():
    first = build_lab(load_topology(copy.deepcopy(DEFAULT)))
    second = build_lab(load_topology(copy.deepcopy(DEFAULT)))
    assert first == second


def test_inventory_groups():
    top = load_topology(DEFAULT)
    inv = yaml.safe_load(render_inventory(build_lab(top), top))
    children = inv["all"]["children"]
    assert set(children["mesh_sites"]["hosts"]) == {s.name for s in top.sites}
    assert set(children["mesh_relays"]["hosts"]) == {"relay1", "relay2"}
    assert "easy1-lan1" in children["lan_hosts"]["hosts"]
    easy1 = children["mesh_sites"]["hosts"]["easy1"]
    assert easy1["ansible_host"] == "mwlab-easy1"
    assert easy1["mesh_lan_prefixes"] == ["10.10.2.0/24"]
    assert easy1["mesh_overlay_address"] == "10.99.0.2/24"
    assert inv["all"]["vars"]["mesh_overlay_network"] == "10.99.0.0/24"
    assert inv["all"]["vars"]["ansible_connection"] == "meshwright.mesh.podman_exec"


def _set(data: dict, path: str, value):
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


_DELETE = object()

BAD = [
    ("sites.a.nat", "symmetric", r"sites\.a\.nat: 'symmetric' is not one of"),
    ("sites.a.public_address", "192.0.2.5", r"sites\.a\.public_address: 192\.0\.2\.5 is outside"),
    ("sites.a.public_address", "10.0.0.1", r"sites\.a\.public_address: 10\.0\.0\.1 is outside"),
    ("sites.a.public_address", "198.51.100.1", r"reserved in 198\.51\.100\.0/24"),
    ("sites.a.public_address", "198.51.100.10", r"198\.51\.100\.10 is already used by relays\.r1"),
    (
        "sites.a.public_address",
        "not-an-ip",
        r"sites\.a\.public_address: 'not-an-ip' is not an IPv4",
    ),
    ("sites.a.public_address", _DELETE, r"sites\.a\.public_address: required"),
    ("sites.a.lan", "10.1.0.0/33", r"sites\.a\.lan: '10\.1\.0\.0/33' is not an IPv4 prefix"),
    ("sites.a.lan", "172.31.4.0/24", r"sites\.a\.lan: 172\.31\.4\.0/24 overlaps pools\.uplink"),
    ("sites.a.lan", _DELETE, r"sites\.a\.lan: required"),
    ("sites.a.lan_hosts", 99, r"sites\.a\.lan_hosts: 99 is out of range"),
    ("sites.a.lan_hosts", "two", r"sites\.a\.lan_hosts: 'two' is not a whole number"),
    ("sites.a.wan", {"latency_ms": -1}, r"sites\.a\.wan\.latency_ms: -1 is out of range"),
    ("sites.a.wan", {"latency_ms": 5, "jitter_ms": 9}, r"jitter_ms: 9 is larger than latency_ms 5"),
    ("sites.a.wan", {"delay": 5}, r"sites\.a\.wan: unknown field\(s\) delay"),
    ("sites.a.colour", "red", r"sites\.a: unknown field\(s\) colour"),
    ("relays.r1.addresses", [], r"relays\.r1\.addresses: expected a list of 1 or 2"),
    ("relays.r1.addresses", ["198.51.100.10"] * 2, r"relays\.r1\.addresses: .* repeats"),
    (
        "internet.subnets",
        ["192.0.2.0/24"],
        r"internet\.subnets\[0\]: 192\.0\.2\.0/24 is not inside",
    ),
    ("name", "Bad_Name", r"name: 'Bad_Name' is not a valid name"),
    ("sites", {}, r"sites: at least one site"),
    ("sites", None, r"sites: expected a mapping"),
    ("pools.uplink", "172.31.0.0/25", r"pools\.uplink: 172\.31\.0\.0/25 is too small"),
    (
        "overlay",
        "10.1.0.0/16",
        r"sites\.a\.lan: 10\.1\.0\.0/24 overlaps overlay \(10\.1\.0\.0/16\)",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD, ids=[b[0] + "=" + str(b[1]) for b in BAD]
)
def test_bad_topology_names_the_field(path, value, message):
    data = small()
    data.setdefault("internet", {})
    data.setdefault("pools", {})
    _set(data, path, value)
    with pytest.raises(TopologyError, match=message):
        load_topology(data)


def test_overlapping_lans_name_both_sites():
    data = small()
    data["sites"]["b"] = {"nat": "edm", "public_address": "198.51.100.22", "lan": "10.1.0.128/25"}
    with pytest.raises(
        TopologyError, match=r"sites\.b\.lan: 10\.1\.0\.128/25 overlaps sites\.a\.lan"
    ):
        load_topology(data)


@pytest.mark.parametrize(
    ("owner", "extra", "message"),
    [
        (
            {"nat": "none", "public_address": "198.51.100.30", "lan": "10.9.0.0/24"},
            {},
            r"sites\.b\.behind: 'o' has no NAT",
        ),
        (
            {"nat": "fullcone", "public_address": "198.51.100.30", "lan": "10.9.0.0/24"},
            {},
            r"fullcone NAT, which forwards",
        ),
        (
            {"nat": "eim", "public_address": "198.51.100.30", "lan": "10.9.0.0/24"},
            {"nat": "edm"},
            r"sites\.b\.nat: 'edm' differs from 'eim'",
        ),
        (
            {"nat": "eim", "public_address": "198.51.100.30", "lan": "10.9.0.0/24"},
            {"public_address": "198.51.100.31"},
            r"sites\.b\.public_address: a site behind 'o'",
        ),
    ],
)
def test_bad_shared_nat(owner, extra, message):
    data = small()
    data["sites"]["o"] = owner
    data["sites"]["b"] = {"behind": "o", "lan": "10.2.0.0/24", **extra}
    with pytest.raises(TopologyError, match=message):
        load_topology(data)


def test_behind_unknown_site():
    data = small()
    data["sites"]["b"] = {"behind": "nope", "lan": "10.2.0.0/24"}
    with pytest.raises(TopologyError, match=r"sites\.b\.behind: no site named 'nope'"):
        load_topology(data)


def test_generated_host_names_may_not_clash():
    data = small()
    data["relays"]["anat"] = {"addresses": ["198.51.100.40"]}
    data["sites"]["a"]["lan_hosts"] = 1
    # `a-nat` is generated; a relay can't be named with a dash, so clash via site/relay name.
    data["sites"]["r1"] = {"nat": "eim", "public_address": "198.51.100.41", "lan": "10.3.0.0/24"}
    with pytest.raises(TopologyError, match=r"sites\.r1: the name is already used by relays\.r1"):
        load_topology(data)
