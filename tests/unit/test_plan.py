"""meshwright.plan: link rules, peer settings, output forms, determinism, mesh_from_dict."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from meshwright.plan import (
    LINK_KINDS,
    Mesh,
    Pair,
    PlanError,
    Policy,
    Relay,
    Site,
    build_plan,
    format_table,
    mesh_from_dict,
    wanted_kind,
)
from meshwright.plan.synthetic import public_key, synthetic_mesh
from meshwright.plan.synthetic import synthetic_site as site

RELAY = Relay(name="r1", addresses=("198.51.100.10",))
ALL_KINDS = frozenset(LINK_KINDS)


def mesh(*sites: Site, kinds=frozenset({"direct"}), relays=(RELAY,), **kw) -> Mesh:
    return Mesh(
        sites=tuple(sites),
        relays=tuple(relays),
        overlay_network="10.99.0.0/24",
        link_kinds=frozenset(kinds),
        **kw,
    )


def pair(plan, a: str, b: str) -> Pair:
    (found,) = [p for p in plan.pairs if {p.a, p.b} == {a, b}]
    return found


# --- the decision table ----------------------------------------------------------------------

# The kind a pair of NAT classes wants ("open*": open without an endpoint, planned as easy).
WANTED = {
    ("open", "open"): "direct",
    ("open", "open*"): "direct",
    ("open", "easy"): "direct",
    ("open", "hard"): "direct",
    ("open", "blocked"): "relay-tcp",
    ("open*", "open*"): "punch",
    ("open*", "easy"): "punch",
    ("open*", "hard"): "relay",  # birthday punching: a later issue
    ("open*", "blocked"): "relay-tcp",
    ("easy", "easy"): "punch",
    ("easy", "hard"): "relay",  # birthday punching: a later issue
    ("easy", "blocked"): "relay-tcp",
    ("hard", "hard"): "relay",
    ("hard", "blocked"): "relay-tcp",
    ("blocked", "blocked"): "relay-tcp",
}
CLASSES = ("open", "open*", "easy", "hard", "blocked")
POLICIES = {
    "default": (Policy(), Policy()),
    "a no direct": (Policy(allow_direct=False), Policy()),
    "b no direct": (Policy(), Policy(allow_direct=False)),
    "a no relay": (Policy(allow_relay=False), Policy()),
    "b no relay": (Policy(), Policy(allow_relay=False)),
    "a hubs name b": (Policy(hubs=("b",)), Policy()),
    "a hubs exclude b": (Policy(hubs=("c",)), Policy()),
    "b hubs exclude a": (Policy(), Policy(hubs=("c",))),
}


def _two(class_a: str, class_b: str, policies, kinds, relays) -> Mesh:
    def make(name, cls, number, policy):
        nat = "open" if cls == "open*" else cls
        extra = {"endpoint": None} if cls == "open*" else {}
        return site(name, nat, number, policy=policy, required=False, **extra)

    # "c" exists so that hubs may name it; it links to nobody.
    c = site("c", "blocked", 3, required=False, policy=Policy(allow_relay=False))
    return mesh(
        make("a", class_a, 1, policies[0]),
        make("b", class_b, 2, policies[1]),
        c,
        kinds=kinds,
        relays=relays,
    )


def _expected(kind: str, policy: str, kinds: frozenset[str], relays: bool) -> str:
    if kind == "punch" and "punch" not in kinds and "relay" in kinds:
        kind = "relay"  # connect first through a relay; the sidecar upgrades it
    if kind not in kinds:
        return "none"
    relay = kind in ("relay", "relay-tcp")
    if relay and not relays:
        return "none"
    if policy in ("a no direct", "b no direct") and not relay:
        return "none"
    if policy in ("a no relay", "b no relay") and relay:
        return "none"
    if policy in ("a hubs exclude b", "b hubs exclude a"):
        return "none"
    return kind


def test_wanted_kind_table_is_symmetric_and_complete():
    for (a, b), kind in WANTED.items():
        ca = "easy" if a == "open*" else a
        cb = "easy" if b == "open*" else b
        assert wanted_kind(ca, cb) == wanted_kind(cb, ca) == kind


def test_decision_table_every_class_pair_kind_set_and_policy():
    kind_sets = [
        frozenset(c)
        for r in range(len(LINK_KINDS) + 1)
        for c in itertools.combinations(LINK_KINDS, r)
    ]
    checked = 0
    for (class_a, class_b), kind in WANTED.items():
        for kinds in kind_sets:
            for policy, policies in POLICIES.items():
                for relays in ((RELAY,), ()):
                    plan = build_plan(_two(class_a, class_b, policies, kinds, relays))
                    expected = _expected(kind, policy, kinds, bool(relays))
                    got = pair(plan, "a", "b")
                    assert got.mode == expected, (class_a, class_b, sorted(kinds), policy, relays)
                    if expected == "none":
                        assert got.path == ()
                        assert got.cost is None
                        assert "a" in plan.unreachable or "b" in plan.unreachable
                    else:
                        assert got.path == ("a", "b")
                        assert got.cost == {"direct": 10, "punch": 10, "relay": 15}.get(
                            expected, 19
                        )
                    checked += 1
    assert checked == len(WANTED) * 16 * len(POLICIES) * 2


def test_default_link_kinds_are_direct_only():
    m = Mesh(sites=(site("a", "open", 1), site("b", "easy", 2)), overlay_network="10.99.0.0/24")
    assert m.link_kinds == frozenset({"direct"})
    assert pair(build_plan(m), "a", "b").mode == "direct"


# --- peer settings: endpoints and keepalives -------------------------------------------------


def _peer(plan, at: str, name: str):
    (found,) = [p for p in plan.sites[at].peers if p.name == name]
    return found


def test_direct_open_to_natted_natted_side_initiates():
    plan = build_plan(mesh(site("o", "open", 1), site("n", "hard", 2), keepalive=17))
    at_nat = _peer(plan, "n", "o")
    assert (at_nat.endpoint, at_nat.keepalive, at_nat.mode) == ("203.0.113.1:51820", 17, "direct")
    at_open = _peer(plan, "o", "n")
    assert (at_open.endpoint, at_open.keepalive) == (None, None)


def test_direct_open_to_open_both_endpoints_no_keepalive():
    plan = build_plan(mesh(site("a", "open", 1), site("b", "open", 2)))
    assert (_peer(plan, "a", "b").endpoint, _peer(plan, "a", "b").keepalive) == (
        "203.0.113.2:51820",
        None,
    )
    assert (_peer(plan, "b", "a").endpoint, _peer(plan, "b", "a").keepalive) == (
        "203.0.113.1:51820",
        None,
    )


def test_open_without_endpoint_is_planned_as_easy():
    plan = build_plan(mesh(site("a", "open", 1), site("b", "open", 2, endpoint=None)))
    assert _peer(plan, "b", "a").endpoint == "203.0.113.1:51820"
    assert _peer(plan, "b", "a").keepalive == 25
    assert _peer(plan, "a", "b").endpoint is None
    # two open sites without endpoints want a punch
    plan = build_plan(
        mesh(
            site("a", "open", 1, endpoint=None),
            site("b", "open", 2, endpoint=None),
            kinds={"punch"},
        )
    )
    assert pair(plan, "a", "b").mode == "punch"


def test_a_punch_link_leaves_the_endpoint_to_the_sidecar_and_keeps_alive():
    plan = build_plan(mesh(site("a", "easy", 1), site("b", "easy", 2), kinds={"punch"}, relays=()))
    for x, y in (("a", "b"), ("b", "a")):
        peer = _peer(plan, x, y)
        assert (peer.endpoint, peer.keepalive) == (None, 25)


def test_a_punch_pair_starts_on_its_relay_allocation():
    plan = build_plan(mesh(site("a", "easy", 1), site("b", "easy", 2), kinds={"punch"}))
    (allocation,) = plan.allocations.values()
    assert _peer(plan, "a", "b").mode == "punch"
    assert _peer(plan, "a", "b").endpoint == f"198.51.100.10:{allocation.ports[0]}"
    assert _peer(plan, "b", "a").endpoint == f"198.51.100.10:{allocation.ports[1]}"
    assert _peer(plan, "a", "b").keepalive == _peer(plan, "b", "a").keepalive == 25


def test_a_relayed_pair_holds_its_own_side_of_the_relay_allocation():
    plan = build_plan(mesh(site("a", "hard", 1), site("b", "hard", 2), kinds={"relay"}))
    (allocation,) = plan.allocations.values()
    assert (allocation.a, allocation.b, allocation.relay) == ("a", "b", "r1")
    assert _peer(plan, "a", "b").endpoint == f"198.51.100.10:{allocation.ports[0]}"
    assert _peer(plan, "b", "a").endpoint == f"198.51.100.10:{allocation.ports[1]}"
    assert _peer(plan, "a", "b").keepalive == _peer(plan, "b", "a").keepalive == 25
    assert plan.to_dict()["allocations"] == [allocation.to_dict()]


def test_without_punch_an_easy_pair_connects_through_a_relay_first():
    plan = build_plan(mesh(site("a", "easy", 1), site("b", "easy", 2), kinds={"relay"}))
    assert pair(plan, "a", "b").mode == "relay"
    assert len(plan.allocations) == 1


def test_a_blocked_site_reaches_its_relay_through_its_sidecar_on_loopback():
    plan = build_plan(mesh(site("a", "blocked", 1), site("b", "open", 2), kinds={"relay-tcp"}))
    (allocation,) = plan.allocations.values()
    assert allocation.kind == "relay-tcp"
    local = plan.local_ports("a")["r1"]  # its sidecar's socket for r1
    assert _peer(plan, "a", "b").endpoint == f"127.0.0.1:{local}"
    assert _peer(plan, "b", "a").endpoint == f"198.51.100.10:{allocation.ports[1]}"
    assert not plan.standby_allocations  # one relay; and a TLS pair has no standby


def test_every_peer_relayed_through_a_relay_shares_the_sites_one_endpoint_there():
    r2 = Relay(name="r2", addresses=("203.0.113.20",))
    plan = build_plan(
        mesh(
            site("a", "open", 1),
            site("b", "easy", 2),
            site("c", "hard", 3),
            site("d", "blocked", 4),
            kinds=set(LINK_KINDS),
            relays=(RELAY, r2),
        )
    )
    modes = {(p.a, p.b): p.mode for p in plan.pairs}
    assert modes[("a", "b")] == "direct" and modes[("b", "c")] == "relay"
    # Every linked pair has an allocation and a standby on the other relay, relay-tcp ones too.
    assert set(plan.allocations) == {k for k, m in modes.items() if not m.startswith("via")}
    assert set(plan.standby_allocations) == set(plan.allocations)
    assert "relay-tcp" in {modes[k] for k in plan.standby_allocations}
    for key, spare in plan.standby_allocations.items():
        assert (spare.relay != plan.allocations[key].relay) and spare.ports == plan.allocations[
            key
        ].ports
    address = {"r1": "198.51.100.10", "r2": "203.0.113.20"}
    for (x, y), allocation in plan.allocations.items():
        for me, other in ((x, y), (y, x)):
            peer = _peer(plan, me, other)

            def via(relay: str, me: str = me) -> str:
                if me == "d":
                    return f"127.0.0.1:{plan.local_ports('d')[relay]}"
                return f"{address[relay]}:{plan.site_port(me)}"

            standby = via(plan.standby_allocations[(x, y)].relay)
            if peer.mode == "direct":  # its direct endpoint; the relay is its fallback
                assert not peer.endpoint or not peer.endpoint.startswith(tuple(address.values()))
                assert peer.fallback_endpoints == (via(allocation.relay), standby)
            else:
                assert peer.endpoint == via(allocation.relay)
                assert peer.fallback_endpoints == (standby,)
    ports = {name: plan.site_port(name) for name in "abcd"}
    assert len(set(ports.values())) == 4
    relays = plan.to_dict()["relays"]
    assert set(relays) == {"r1", "r2"}
    for name, relay in relays.items():
        assert relay["address"] == address[name]
        on = {s for a in plan.allocations.values() if a.relay == name for s in (a.a, a.b)}
        on |= {s for a in plan.standby_allocations.values() if a.relay == name for s in (a.a, a.b)}
        assert relay["sites"] == [
            {"name": s, "port": ports[s], "public_key": public_key(s)} for s in sorted(on)
        ]
    local = plan.local_ports("d")
    assert local["r1"] != local["r2"]


def test_ipv6_endpoint_is_normalised():
    plan = build_plan(
        mesh(site("a", "open", 1, endpoint="[2001:DB8::1]:51820"), site("b", "easy", 2))
    )
    assert _peer(plan, "b", "a").endpoint == "[2001:db8::1]:51820"


# --- multi-hop, peers and routes -------------------------------------------------------------


def triangle() -> Mesh:
    """Two NATed sites that only reach each other through an open one, each with a LAN."""
    return mesh(
        site("hub", "open", 1, lan_prefixes=("192.168.1.0/24",)),
        site("east", "hard", 2, lan_prefixes=("192.168.2.0/24", "172.16.0.0/16")),
        site("west", "easy", 3, lan_prefixes=("192.168.3.0/24",)),
    )


def test_two_natted_sites_go_through_the_open_one():
    plan = build_plan(triangle())
    assert pair(plan, "east", "west") == Pair(
        "east", "west", "via hub", ("east", "hub", "west"), 20
    )
    east = plan.sites["east"]
    assert [p.name for p in east.peers] == ["hub"]
    assert east.peers[0].allowed_ips == (
        "10.99.0.1/32",
        "10.99.0.3/32",
        "192.168.1.0/24",
        "192.168.3.0/24",
    )
    hub = plan.sites["hub"]
    assert {p.name: p.allowed_ips for p in hub.peers} == {
        "east": ("10.99.0.2/32", "172.16.0.0/16", "192.168.2.0/24"),
        "west": ("10.99.0.3/32", "192.168.3.0/24"),
    }
    assert [(r.prefix, r.via, r.path, r.cost) for r in east.routes] == [
        ("10.99.0.1/32", "hub", ("east", "hub"), 10),
        ("10.99.0.3/32", "hub", ("east", "hub", "west"), 20),
        ("192.168.1.0/24", "hub", ("east", "hub"), 10),
        ("192.168.3.0/24", "hub", ("east", "hub", "west"), 20),
    ]
    assert east.overlay_address == "10.99.0.2"
    assert east.listen_port == 51820


def test_routes_sort_by_address_not_by_text():
    plan = build_plan(
        mesh(
            site("a", "open", 1, lan_prefixes=("10.10.0.0/16", "10.9.0.0/16", "fd00::/64")),
            site("b", "open", 2, lan_prefixes=("10.100.0.0/16",)),
        )
    )
    assert [r.prefix for r in plan.sites["b"].routes] == [
        "10.9.0.0/16",
        "10.10.0.0/16",
        "10.99.0.1/32",
        "fd00::/64",
    ]


def test_a_linked_pair_always_uses_its_link():
    # relay-tcp (19) still beats two direct links (20)
    plan = build_plan(
        mesh(
            site("blk", "blocked", 1),
            site("o1", "open", 2),
            site("o2", "open", 3),
            kinds={"direct", "relay-tcp"},
        )
    )
    assert pair(plan, "blk", "o1").mode == "relay-tcp"
    assert pair(plan, "blk", "o2").path == ("blk", "o2")


def test_relay_link_beats_a_transit_site_but_policy_can_force_transit():
    sites = [site("h1", "hard", 1), site("h2", "hard", 2), site("o", "open", 3)]
    plan = build_plan(mesh(*sites, kinds={"direct", "relay"}))
    assert pair(plan, "h1", "h2").mode == "relay"
    sites[0] = site("h1", "hard", 1, policy=Policy(allow_relay=False))
    plan = build_plan(mesh(*sites, kinds={"direct", "relay"}))
    assert pair(plan, "h1", "h2").mode == "via o"


def test_hubs_make_a_spoke_go_through_its_hub():
    plan = build_plan(
        mesh(
            site("hq", "open", 1),
            site("dc", "open", 2),
            site("branch", "open", 3, policy=Policy(hubs=("hq",))),
        )
    )
    assert pair(plan, "branch", "dc").path == ("branch", "hq", "dc")
    assert [p.name for p in plan.sites["branch"].peers] == ["hq"]


def test_three_link_paths_between_spokes_of_different_hubs():
    plan = build_plan(
        mesh(
            site("hq1", "open", 1),
            site("hq2", "open", 2),
            site("s1", "easy", 3, policy=Policy(hubs=("hq1",))),
            site("s2", "easy", 4, policy=Policy(hubs=("hq2",))),
        )
    )
    assert pair(plan, "s1", "s2") == Pair("s1", "s2", "via hq1", ("s1", "hq1", "hq2", "s2"), 30)
    # the transit sites agree with the path
    hq1 = {r.prefix: r for r in plan.sites["hq1"].routes}
    assert hq1["10.99.0.4/32"].via == "hq2"
    assert hq1["10.99.0.3/32"].via == "s1"


def test_optional_unreachable_site_gets_nothing_and_nobody_routes_to_it():
    plan = build_plan(
        mesh(
            site("a", "open", 1),
            site("b", "easy", 2),
            site("x", "blocked", 3, lan_prefixes=("192.168.9.0/24",), required=False),
        )
    )
    assert plan.unreachable == {
        "x": "no path reaches it: its links need relay-tcp, which is not available"
        " (link kinds: direct)"
    }
    assert plan.sites["x"].peers == () and plan.sites["x"].routes == ()
    for name in ("a", "b"):
        prefixes = {r.prefix for r in plan.sites[name].routes}
        assert "192.168.9.0/24" not in prefixes and "10.99.0.3/32" not in prefixes
    assert pair(plan, "a", "x") == Pair("a", "x", "none", (), None)


def test_an_island_of_optional_sites_keeps_its_own_links():
    plan = build_plan(
        mesh(
            site("a", "open", 1),
            site("b", "easy", 2),
            site("x", "easy", 3, required=False, policy=Policy(hubs=("y",))),
            site("y", "easy", 4, required=False, policy=Policy(hubs=("x",))),
            kinds={"direct", "punch"},
        )
    )
    assert plan.unreachable["x"] == (
        "no path reaches it: it links only with y, which no path reaches either;"
        " its links are not in its hubs (y)"
    )
    assert pair(plan, "x", "y").mode == "punch"
    assert pair(plan, "a", "x").mode == "none"
    assert [p.name for p in plan.sites["x"].peers] == ["y"]
    assert [r.prefix for r in plan.sites["x"].routes] == ["10.99.0.4/32"]
    assert [r.prefix for r in plan.sites["a"].routes] == ["10.99.0.2/32"]


def test_single_site_mesh_and_empty_mesh():
    plan = build_plan(mesh(site("a", "open", 1)))
    assert plan.sites["a"].peers == () and list(plan.pairs) == []
    assert build_plan(mesh()).to_dict()["sites"] == {}


# --- output forms ----------------------------------------------------------------------------


def test_to_dict_shape_and_json_round_trip():
    plan = build_plan(triangle())
    data = plan.to_dict()
    assert set(data) == {
        "overlay_network",
        "link_kinds",
        "keepalive",
        "sites",
        "pairs",
        "unreachable",
        "allocations",
        "standby_allocations",
        "relays",
    }
    assert data["link_kinds"] == ["direct"]
    assert data["sites"]["east"]["peers"][0] == {
        "name": "hub",
        "public_key": public_key("hub"),
        "endpoint": "203.0.113.1:51820",
        "keepalive": 25,
        "mode": "direct",
        "allowed_ips": ["10.99.0.1/32", "10.99.0.3/32", "192.168.1.0/24", "192.168.3.0/24"],
        # Its relay allocation: where the sidecar moves it when the direct path dies.
        "fallback_endpoints": ["198.51.100.10:40000"],
    }
    assert data["pairs"][0] == {
        "a": "east",
        "b": "hub",
        "mode": "direct",
        "path": ["east", "hub"],
        "cost": 10,
    }
    text = plan.to_json()
    assert text.endswith("}\n")
    assert json.loads(text) == data
    # one line per pair, per peer, per route: a plan change diffs as changed lines
    lines = text.splitlines()
    assert (
        '  {"a": "east", "b": "west", "cost": 20, "mode": "via hub",'
        ' "path": ["east", "hub", "west"]},'
    ) in lines
    assert (
        '    {"cost": 20, "path": ["east", "hub", "west"], "prefix": "192.168.3.0/24",'
        ' "via": "hub"}'
    ) in lines
    assert ' "link_kinds": ["direct"],' in lines


def test_pairs_is_a_sequence_in_order():
    plan = build_plan(synthetic_mesh(9, seed=4))
    pairs = list(plan.pairs)
    assert len(pairs) == len(plan.pairs) == 36
    assert [(p.a, p.b) for p in pairs] == sorted((p.a, p.b) for p in pairs)
    assert all(p.a < p.b for p in pairs)
    assert [plan.pairs[k] for k in range(36)] == pairs
    assert plan.pairs[-1] == pairs[-1]
    assert plan.pairs[3:6] == pairs[3:6]
    with pytest.raises(IndexError):
        plan.pairs[36]


def test_sites_is_a_mapping():
    plan = build_plan(triangle())
    assert list(plan.sites) == ["east", "hub", "west"]
    assert "hub" in plan.sites and "nope" not in plan.sites
    assert len(plan.sites) == 3
    with pytest.raises(KeyError):
        plan.sites["nope"]


def test_format_table():
    plan = build_plan(
        mesh(
            site("hub", "open", 1),
            site("east", "hard", 2),
            site("west", "easy", 3),
            site("x", "blocked", 4, required=False),
        )
    )
    lines = format_table(plan).splitlines()
    assert lines[0].split() == ["pair", "mode", "cost", "path"]
    assert any(
        " ".join(line.split()) == "east -- west via hub 20 east > hub > west" for line in lines
    )
    assert any(
        line.startswith("east -- x") and line.split()[3:] == ["none", "-", "-"] for line in lines
    )
    assert lines[-1].startswith("unreachable: x: no path reaches it")


# --- determinism -----------------------------------------------------------------------------


def _shuffled(m: Mesh, seed: int) -> Mesh:
    rng = random.Random(seed)
    sites = []
    for s in m.sites:
        hubs = s.policy.hubs
        if hubs is not None:
            hubs = tuple(rng.sample(hubs, len(hubs)))
        lans = tuple(rng.sample(s.lan_prefixes, len(s.lan_prefixes)))
        sites.append(
            Site(
                name=s.name,
                public_key=s.public_key,
                overlay_address=s.overlay_address,
                lan_prefixes=lans,
                nat_class=s.nat_class,
                endpoint=s.endpoint,
                listen_port=s.listen_port,
                policy=Policy(
                    allow_direct=s.policy.allow_direct,
                    allow_relay=s.policy.allow_relay,
                    hubs=hubs,
                ),
                required=s.required,
            )
        )
    rng.shuffle(sites)
    relays = list(m.relays)
    rng.shuffle(relays)
    return Mesh(
        sites=tuple(sites),
        relays=tuple(relays),
        overlay_network=m.overlay_network,
        link_kinds=m.link_kinds,
        keepalive=m.keepalive,
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"link_kinds": ALL_KINDS, "relays": 2},
        {"spokes": 0.4, "no_direct": 0.1, "link_kinds": {"direct", "relay-tcp"}, "relays": 1},
    ],
)
def test_same_input_same_bytes_whatever_the_order(options):
    m = synthetic_mesh(60, seed=11, lans_per_site=2, **options)
    first = build_plan(m).to_json()
    assert build_plan(m).to_json() == first
    for seed in range(3):
        assert build_plan(_shuffled(m, seed)).to_json() == first


# --- mesh_from_dict --------------------------------------------------------------------------


def plain() -> dict:
    return {
        "overlay_network": "10.99.0.0/24",
        "link_kinds": ["direct", "relay-tcp"],
        "keepalive": 20,
        "relays": [{"name": "r1", "addresses": ["198.51.100.10"]}],
        "sites": [
            {
                "name": "a",
                "public_key": public_key("a"),
                "overlay_address": "10.99.0.1",
                "lan_prefixes": ["192.168.1.0/24"],
                "nat_class": "open",
                "endpoint": "203.0.113.1:51820",
                "listen_port": 51821,
                "policy": {"allow_direct": True, "allow_relay": True, "hubs": None},
                "required": True,
            },
            {
                "name": "b",
                "public_key": public_key("b"),
                "overlay_address": "10.99.0.2",
                "nat_class": "blocked",
                "policy": {},
            },
        ],
    }


def test_mesh_from_dict_reads_everything():
    m = mesh_from_dict(plain())
    assert m.link_kinds == frozenset({"direct", "relay-tcp"})
    assert m.keepalive == 20
    assert m.relays == (Relay(name="r1", addresses=("198.51.100.10",)),)
    a, b = m.sites
    assert a.listen_port == 51821 and a.lan_prefixes == ("192.168.1.0/24",)
    assert b.listen_port == 51820 and b.policy == Policy() and b.required is True
    plan = build_plan(m)
    assert pair(plan, "a", "b").mode == "relay-tcp"
    assert plan.sites["a"].listen_port == 51821


def test_mesh_from_dict_takes_mappings_and_defaults():
    data = plain()
    data["sites"] = {s.pop("name"): s for s in data["sites"]}
    del data["link_kinds"], data["keepalive"], data["relays"]
    m = mesh_from_dict(data)
    assert [s.name for s in m.sites] == ["a", "b"]
    assert m.link_kinds == frozenset({"direct"}) and m.keepalive == 25 and m.relays == ()


def test_mesh_from_dict_reports_shape_and_content_problems_together():
    data = plain()
    data["colour"] = "blue"
    data["keepalive"] = "often"
    data["sites"][0]["policy"] = {"allow_direct": "yes", "hub": ["b"]}
    data["sites"][0]["lan_prefixes"] = "192.168.1.0/24"
    data["sites"][1]["overlay_address"] = 7
    data["sites"][1]["public_key"] = None
    data["sites"].append({"overlay_address": "10.99.0.3"})
    data["sites"].append("c")
    with pytest.raises(PlanError) as error:
        mesh_from_dict(data)
    problems = error.value.problems
    assert "mesh: unknown key 'colour'" in problems[0]
    expected = [
        "keepalive 'often' is not a whole number of seconds",
        "site a: policy: unknown key 'hub'",
        "site a: policy allow_direct 'yes' is not true or false",
        "site a: lan_prefixes '192.168.1.0/24' is not a list of prefixes",
        "site b: overlay address 7 is not an address string",
        "sites[2]: no name",
        "sites[3]: 'c' is not a mapping",
        # found by the content checks on what could be read
        "site b: no public key",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    # a field already reported is not reported again
    assert not any("overlay address ''" in p for p in problems)


def test_mesh_from_dict_rejects_a_non_mapping():
    with pytest.raises(PlanError, match="not a mapping"):
        mesh_from_dict(["sites"])  # type: ignore[arg-type]


def test_relays_with_keys_are_control_plane_peers_of_every_udp_site():
    relay = Relay(
        name="r1",
        addresses=("198.51.100.10",),
        public_key=public_key("r1"),
        overlay_address="10.99.0.254",
    )
    plan = build_plan(
        mesh(
            site("a", "open", 1),
            site("b", "hard", 2),
            site("c", "blocked", 3),
            relays=(relay,),
            kinds={"direct", "relay-tcp"},
        )
    )
    a, b = _peer(plan, "a", "r1"), _peer(plan, "b", "r1")
    assert a.allowed_ips == b.allowed_ips == ("10.99.0.254/32",)
    assert a.endpoint == b.endpoint == "198.51.100.10:51820"
    assert (a.keepalive, b.keepalive) == (None, 25)  # the NATed side keeps its mapping open
    assert "r1" not in [p.name for p in plan.sites["c"].peers]  # blocked: no UDP to a relay
    relay_plan = plan.to_dict()["relays"]["r1"]
    assert relay_plan["overlay_address"] == "10.99.0.254"
    assert [(p["name"], p["allowed_ips"]) for p in relay_plan["peers"]] == [
        ("a", ["10.99.0.1/32"]),
        ("b", ["10.99.0.2/32"]),
    ]
    # no site's traffic is routed to a relay: it holds no LAN prefix, and no route names it
    assert all(r.via != "r1" for s in "abc" for r in plan.sites[s].routes)


def test_a_relay_named_like_a_site_or_on_a_site_overlay_address_is_refused():
    relay = Relay(name="a", addresses=("198.51.100.10",), overlay_address="10.99.0.2")
    with pytest.raises(PlanError) as error:
        build_plan(mesh(site("a", "open", 1), site("b", "easy", 2), relays=(relay,)))
    text = str(error.value)
    assert "relay a: a site has the same name" in text
    assert "same overlay address 10.99.0.2" in text


def test_an_ipv6_relays_endpoints_are_bracketed():
    relay = Relay(name="r6", addresses=("2001:DB8::10",))
    plan = build_plan(
        mesh(site("a", "hard", 1), site("b", "hard", 2), kinds={"relay"}, relays=(relay,))
    )
    assert _peer(plan, "a", "b").endpoint == f"[2001:db8::10]:{plan.site_port('a')}"
