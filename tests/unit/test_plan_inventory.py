"""meshwright.plan.inventory: the decisions between Ansible's inventory and the planner.

Endpoint reachability from NAT facts, this run's facts or the state file, the operator's
override, the mesh-wide settings, relay port ranges, sidecar configurations, the state file's
layout, every site's mesh prefixes, and the static validation; errors word for word.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshwright.plan import DEFAULT_RELAY_FIRST_PORT, DEFAULT_RELAY_LAST_PORT, PlanError
from meshwright.plan.inventory import (
    TLS_RELAY_MAX_MTU,
    Inventory,
    RelayState,
    SiteState,
    State,
    StateError,
    check_rotations,
    endpoint_from_nat,
    plan_inventory,
    previous_allocations,
    read_state,
    rotation_names,
    validate_inventory,
)
from meshwright.plan.synthetic import public_key
from meshwright.wire.frames import MAX_PAYLOAD

OVERLAY = "10.99.0.0/24"


def nat(nat_class: str, address: str = "198.51.100.20", **kw: Any) -> dict[str, Any]:
    """A mesh_nat fact as nat_probe sets it (the part the planner reads)."""
    return {
        "nat_class": nat_class,
        "public_addresses": [address],
        "behind_nat": False,
        "port_preservation": False,
        "rtt_ms": {"relay1": 5.0},
        **kw,
    }


def site(number: int, nat_class: str | None = "easy", **kw: Any) -> dict[str, Any]:
    """A site host's variables: inventory, and the facts of this run unless nat_class is None."""
    host: dict[str, Any] = {
        "mesh_overlay_network": OVERLAY,
        "mesh_overlay_address": f"10.99.0.{number}",
        "mesh_lan_prefixes": [f"10.10.{number}.0/24"],
    }
    if nat_class is not None:
        host["mesh_wg_public_key"] = public_key(f"site{number}")
        host["mesh_nat"] = nat(nat_class, f"198.51.100.{20 + number}")
    host.update(kw)
    return host


def relay(**kw: Any) -> dict[str, Any]:
    return {
        "relay_public_addresses": ["203.0.113.10"],
        "mesh_wg_public_key": public_key("relay1"),
        "mesh_overlay_address": "10.99.0.250",
        "relay_tls_fingerprint": "sha256:aa",
        **kw,
    }


def inventory(sites: dict[str, dict[str, Any]], relays: dict[str, Any] | None = None, **kw: Any):
    return Inventory(sites=sites, relays=relays or {}, **kw)


def planned(sites, relays=None, state: State | None = None, previous: str | None = None, **kw):
    return plan_inventory(inventory(sites, relays, **kw), state or State(), previous)


def site_plan(result, name: str) -> dict[str, Any]:
    return result.facts()["mesh_plan"]["sites"][name]


def peer(result, a: str, b: str) -> dict[str, Any]:
    (found,) = [p for p in site_plan(result, a)["peers"] if p["name"] == b]
    return found


# --- a site's endpoint, from its NAT facts -----------------------------------------------------


def test_an_open_site_is_reached_on_its_public_address_and_listen_port():
    assert endpoint_from_nat(nat("open"), 51821) == "198.51.100.20:51821"


def test_an_ipv6_endpoint_is_written_in_brackets():
    assert endpoint_from_nat(nat("open", "2001:db8::20"), 51820) == "[2001:db8::20]:51820"


@pytest.mark.parametrize(
    "facts",
    [
        nat("easy"),
        nat("hard"),
        nat("blocked"),
        nat("open", public_addresses=[]),
        # behind a full cone that does not keep ports: the public port is not the listen port
        nat("open", behind_nat=True, port_preservation=False),
    ],
    ids=["easy", "hard", "blocked", "no address", "cone without port preservation"],
)
def test_no_endpoint_unless_open_and_the_port_is_known(facts):
    assert endpoint_from_nat(facts, 51820) is None


def test_a_full_cone_that_keeps_ports_is_reached_on_the_listen_port():
    facts = nat("open", behind_nat=True, port_preservation=True)
    assert endpoint_from_nat(facts, "51820") == "198.51.100.20:51820"


def test_the_operator_overrides_the_endpoint_even_with_none():
    sites = {
        "a": site(1, "easy"),
        "b": site(2, "open", mesh_endpoint="203.0.113.99:51999"),
        "c": site(3, "open"),
    }
    result = planned(sites)
    assert peer(result, "a", "b")["endpoint"] == "203.0.113.99:51999"  # not its NAT facts'
    assert peer(result, "a", "c")["endpoint"] == "198.51.100.23:51820"  # from its NAT facts
    assert result.state.sites["b"].endpoint == "203.0.113.99:51999"
    # null: b is open, yet not reachable unsolicited (planned as easy): a reaches it through c
    sites["b"]["mesh_endpoint"] = None
    result = planned(sites)
    assert result.state.sites["b"].endpoint is None
    assert [p["name"] for p in site_plan(result, "a")["peers"]] == ["c"]


# --- this run's facts, or the state file (hosts outside --limit) ---------------------------------


def test_a_site_without_facts_this_run_keeps_what_the_state_file_says():
    state = State(
        sites={
            "b": SiteState(
                public_key=public_key("site2"), nat_class="open", endpoint="198.51.100.22:51820"
            )
        }
    )
    result = planned({"a": site(1, "easy"), "b": site(2, None)}, state=state)
    assert peer(result, "a", "b")["endpoint"] == "198.51.100.22:51820"
    assert peer(result, "a", "b")["public_key"] == public_key("site2")
    assert result.state.sites["b"] == state.sites["b"]


def test_fresh_facts_win_over_the_state_file():
    state = State(sites={"a": SiteState(public_key=public_key("old"), nat_class="hard")})
    result = planned({"a": site(1, "open"), "b": site(2, "easy")}, state=state)
    assert result.state.sites["a"] == SiteState(
        public_key=public_key("site1"), nat_class="open", endpoint="198.51.100.21:51820"
    )


def test_no_facts_and_no_state_is_an_error_naming_the_site():
    with pytest.raises(PlanError) as raised:
        planned({"a": site(1, "open"), "b": site(2, None)})
    assert raised.value.problems == (
        "site b: no public key (the keys step has not run on it)",
        "site b: no NAT facts (nat_class is unknown: the probe has not run on it)",
    )


# --- mesh-wide settings -----------------------------------------------------------------------


def test_mesh_settings_must_agree_across_sites():
    sites = {"a": site(1, "open"), "b": site(2, "easy", mesh_overlay_network="10.98.0.0/24")}
    del sites["a"]["mesh_overlay_network"]
    sites["b"]["mesh_keepalive"] = 30
    with pytest.raises(PlanError) as raised:
        planned(sites)
    assert raised.value.problems[:2] == (
        "site b: mesh_overlay_network '10.98.0.0/24' differs from (not set) (site a): set it"
        " once for every site (group_vars/all)",
        "site b: mesh_keepalive 30 differs from (not set) (site a): set it once for every"
        " site (group_vars/all)",
    )


def test_no_overlay_network_is_one_error_naming_the_variable():
    sites = {"a": site(1, "open"), "b": site(2, "easy")}
    for host in sites.values():
        del host["mesh_overlay_network"]
    assert validate_inventory(inventory(sites)) == [
        "mesh_overlay_network is not set: give every site the overlay's prefix, such as"
        " 10.99.0.0/24 (group_vars/all)"
    ]
    # the task's option wins over the variables
    assert validate_inventory(inventory(sites, overlay_network=OVERLAY)) == []


def test_link_kinds_default_to_the_relay_kinds_when_there_are_relays():
    sites = {"a": site(1, "open"), "b": site(2, "hard"), "c": site(3, "hard")}
    without = planned(sites)
    assert json.loads(without.plan_json)["link_kinds"] == ["direct"]
    assert [p["name"] for p in site_plan(without, "b")["peers"]] == ["a"]  # c through a
    with_relay = planned(sites, {"relay1": relay()})
    assert json.loads(with_relay.plan_json)["link_kinds"] == [
        "direct",
        "punch",
        "relay",
        "relay-tcp",
    ]
    assert peer(with_relay, "b", "c")["mode"] == "relay"
    only = planned(sites, {"relay1": relay()}, link_kinds=["direct"])
    assert json.loads(only.plan_json)["link_kinds"] == ["direct"]


def test_numbers_given_as_text_are_numbers():
    sites = {
        "a": site(1, "open", mesh_keepalive="30", mesh_listen_port="51821"),
        "b": site(2, "easy", mesh_keepalive="30"),
    }
    result = planned(sites)
    assert peer(result, "b", "a")["keepalive"] == 30
    assert peer(result, "b", "a")["endpoint"] == "198.51.100.21:51821"


def test_an_overlay_address_may_carry_its_prefix_length():
    result = planned({"a": site(1, "open", mesh_overlay_address="10.99.0.1/24"), "b": site(2)})
    assert site_plan(result, "a")["overlay_address"] == "10.99.0.1"


def test_a_string_is_never_split_into_prefixes():
    sites = {"a": site(1, "open", mesh_lan_prefixes="10.10.1.0/24"), "b": site(2)}
    assert validate_inventory(inventory(sites)) == [
        "site a: lan_prefixes '10.10.1.0/24' is not a list of prefixes"
    ]


# --- relays: port ranges, defined once --------------------------------------------------------


def test_a_relays_site_ports_come_from_its_inventory():
    sites = {"a": site(1, "hard"), "b": site(2, "hard")}
    (allocation,) = planned(sites, {"relay1": relay()}).facts()["mesh_plan"]["allocations"]
    assert allocation["ports"] == [DEFAULT_RELAY_FIRST_PORT, DEFAULT_RELAY_FIRST_PORT + 1]
    ranged = relay(relay_first_port=45000, relay_last_port="45099")
    (allocation,) = planned(sites, {"relay1": ranged}).facts()["mesh_plan"]["allocations"]
    assert allocation["ports"] == [45000, 45001]
    assert peer(planned(sites, {"relay1": ranged}), "a", "b")["endpoint"] == "203.0.113.10:45000"


def test_the_default_range_is_the_planners():
    assert (DEFAULT_RELAY_FIRST_PORT, DEFAULT_RELAY_LAST_PORT) == (40000, 59999)


def test_a_bad_relay_port_range_names_the_relay_and_the_ports():
    sites = {"a": site(1, None), "b": site(2, None)}
    relays = {
        "relay1": relay(relay_first_port=50000, relay_last_port=40000),
        "relay2": relay(relay_first_port=0, relay_last_port=70000, mesh_overlay_address=None),
        "relay3": relay(relay_first_port="many", mesh_overlay_address=None),
    }
    assert validate_inventory(inventory(sites, relays)) == [
        "relay relay3: first port 'many' is not a port number",
        "relay relay1: site ports 50000-40000 hold no port (the first must not be above the last)",
        "relay relay2: site ports 0-70000 are not ports in 1-65535",
    ]


# --- sidecars of UDP-blocked sites --------------------------------------------------------------


def test_a_blocked_site_gets_its_relays_with_its_port_and_a_local_port_for_each():
    sites = {
        "a": site(1, "blocked", sidecar_certificate="PEM a"),
        "b": site(2, "open"),
        "c": site(3, "hard"),
    }
    relays = {
        "relay1": relay(relay_tls_port=8443),
        "relay2": relay(relay_public_addresses=["198.51.100.99"], mesh_overlay_address=None),
    }
    for host in sites.values():  # relay2 is far from every site: relay1 carries a's pairs
        if "mesh_nat" in host:
            host["mesh_nat"]["rtt_ms"] = {"relay1": 5.0, "relay2": 90.0}
    result = planned(sites, relays)
    data = result.facts()["mesh_plan"]
    port = {s["name"]: s["port"] for s in data["relays"]["relay1"]["sites"]}
    local = result.plan.local_ports("a")
    # A TLS connection to relay1, and one to relay2, which carries the standby of a's pairs.
    assert result.sidecars["a"] == {
        "relays": {
            "relay1": {
                "address": "203.0.113.10",
                "port": 8443,
                "fingerprint": "sha256:aa",
                "site_port": port["a"],
                "local_port": local["relay1"],
            },
            "relay2": {
                "address": "198.51.100.99",
                "port": 443,
                "fingerprint": "sha256:aa",
                "site_port": port["a"],
                "local_port": local["relay2"],
            },
        }
    }
    assert result.tls_sites == {"a": "PEM a"}
    # Every peer relayed through relay1 is reached through the one local socket for it.
    assert peer(result, "a", "b")["endpoint"] == f"127.0.0.1:{local['relay1']}"
    assert peer(result, "a", "c")["endpoint"] == f"127.0.0.1:{local['relay1']}"
    # The UDP side: relay1's address and its own port.
    assert peer(result, "c", "a")["endpoint"] == f"203.0.113.10:{port['c']}"
    # relay2 carries only standbys, and has no WireGuard of its own.
    assert data["relays"]["relay2"] == {
        "address": "198.51.100.99",
        "sites": [
            {"name": name, "port": port[name], "public_key": public_key(f"site{n}")}
            for name, n in (("a", 1), ("b", 2), ("c", 3))
        ],
    }


def test_every_udp_site_with_allocations_gets_a_traversal_peer_of_each_relay_path():
    sites = {
        "a": site(1, "open"),
        "b": site(2, "easy"),
        "c": site(3, "easy"),
        "d": site(4, "hard", mesh_policy={"hubs": ["c"]}),
        "e": site(5, "blocked", sidecar_certificate="PEM e"),
    }
    relays = {
        "relay1": relay(),
        "relay2": relay(relay_public_addresses=["198.51.100.99"], mesh_overlay_address=None),
    }
    for host in sites.values():
        host["mesh_nat"]["rtt_ms"] = {"relay1": 5.0, "relay2": 90.0}
    result = planned(sites, relays)
    data = result.facts()["mesh_plan"]
    port = {s["name"]: s["port"] for s in data["relays"]["relay1"]["sites"]}
    traversal = result.sidecars["c"]["traversal"]
    by_name = {p["name"]: p for p in traversal["peers"]}
    assert sorted(by_name) == ["a", "b", "d", "e"]
    relay_end, standby_end = f"203.0.113.10:{port['c']}", f"198.51.100.99:{port['c']}"
    common = {
        "relay_endpoint": relay_end,
        "relay": "relay1",
        "standby_endpoint": standby_end,
        "standby_relay": "relay2",
    }
    assert by_name["a"] == {
        "name": "a",
        "public_key": public_key("site1"),
        "overlay_address": "10.99.0.1",
        "mode": "direct",
        "direct_endpoint": "198.51.100.21:51820",
        "upgrade": True,
        **common,
    }
    assert by_name["b"] == {
        "name": "b",
        "public_key": public_key("site2"),
        "overlay_address": "10.99.0.2",
        "mode": "punch",
        "direct_endpoint": None,
        "upgrade": True,
        **common,
    }
    assert by_name["d"] == {
        "name": "d",
        "public_key": public_key("site4"),
        "overlay_address": "10.99.0.4",
        "mode": "relay",
        "direct_endpoint": None,
        "upgrade": False,
        **common,
    }
    # The UDP side of a relay-tcp pair is relayed: failed over like one (e's WireGuard follows).
    assert by_name["e"] == {
        "name": "e",
        "public_key": public_key("site5"),
        "overlay_address": "10.99.0.5",
        "mode": "relay",
        "direct_endpoint": None,
        "upgrade": False,
        **common,
    }
    # The open site knows no endpoint of c (it roams to it): its direct peer starts without one.
    a_side = {p["name"]: p for p in result.sidecars["a"]["traversal"]["peers"]}
    assert a_side["c"]["mode"] == "direct" and a_side["c"]["direct_endpoint"] is None
    assert "traversal" not in result.sidecars["e"]


def test_a_tls_relayed_pair_carries_mtu_2016_and_no_more():
    """A TLS relay's frame holds 2048 bytes of WireGuard datagram: MTU + 32 (header and tag).
    Both ends of a relay-tcp pair are checked (the UDP side's datagrams go into the TLS
    connection too); pairs that no TLS relay carries may use any MTU."""
    assert TLS_RELAY_MAX_MTU == MAX_PAYLOAD - 32 == 2016
    relays = {"relay1": relay()}
    fits = {
        "a": site(1, "blocked", sidecar_certificate="PEM a", wireguard_mtu=2016),
        "b": site(2, "open", wireguard_mtu="2016"),  # -e gives text
        "c": site(3, "hard", wireguard_mtu=9000),
        "d": site(4, "open", wireguard_mtu=9000, mesh_policy={"allow_relay": False}),
    }
    with pytest.raises(PlanError) as raised:
        planned(fits, relays)
    assert raised.value.problems == (
        "site c: wireguard_mtu 9000 is too big for its TLS-relayed pair a-c: a TLS relay"
        " carries WireGuard datagrams (MTU + 32 bytes) of at most 2048 bytes, so the MTU must be"
        " at most 2016",
    )
    fits["c"]["wireguard_mtu"] = 1420
    result = planned(fits, relays)
    modes = {(p["a"], p["b"]): p["mode"] for p in result.facts()["mesh_plan"]["pairs"]}
    assert modes[("a", "b")] == modes[("a", "c")] == "relay-tcp"
    assert modes[("b", "d")] == modes[("c", "d")] == "direct"  # 9000 is d's business
    assert "a" not in {p["name"] for p in site_plan(result, "d")["peers"]}


def test_the_blocked_sides_mtu_names_every_pair_once():
    sites = {
        "a": site(1, "blocked", sidecar_certificate="PEM a", wireguard_mtu=2017),
        "b": site(2, "open"),
        "c": site(3, "hard"),
    }
    with pytest.raises(PlanError) as raised:
        planned(sites, {"relay1": relay()})
    assert raised.value.problems == (
        "site a: wireguard_mtu 2017 is too big for its TLS-relayed pairs a-b, a-c: a TLS relay"
        " carries WireGuard datagrams (MTU + 32 bytes) of at most 2048 bytes, so the MTU must be"
        " at most 2016",
    )


def test_certificates_and_fingerprints_outside_the_run_come_from_the_state_file():
    state = State(
        sites={
            "a": SiteState(public_key=public_key("site1"), nat_class="blocked", certificate="PEM")
        },
        relays={"relay1": RelayState(public_key=public_key("relay1"), tls_fingerprint="sha256:bb")},
    )
    sites = {"a": site(1, None), "b": site(2, "open")}
    host = relay()
    del host["relay_tls_fingerprint"]
    result = planned(sites, {"relay1": host}, state=state)
    assert result.tls_sites == {"a": "PEM"}
    assert result.sidecars["a"]["relays"]["relay1"] == {
        "address": "203.0.113.10",
        "port": 443,
        "fingerprint": "sha256:bb",
        "site_port": DEFAULT_RELAY_FIRST_PORT,
        "local_port": result.plan.local_ports("a")["relay1"],
    }
    assert result.state.sites["a"] == state.sites["a"]
    assert result.state.relays["relay1"] == state.relays["relay1"]


def test_a_relays_standby_certificate_is_pinned_too_and_kept_in_the_state():
    sites = {"a": site(1, "blocked", sidecar_certificate="PEM a"), "b": site(2, "open")}
    result = planned(sites, {"relay1": relay(relay_tls_standby_fingerprint="sha256:cc")})
    assert result.sidecars["a"]["relays"]["relay1"] == {
        "address": "203.0.113.10",
        "port": 443,
        "fingerprint": "sha256:aa",
        "standby_fingerprint": "sha256:cc",
        "site_port": DEFAULT_RELAY_FIRST_PORT,
        "local_port": result.plan.local_ports("a")["relay1"],
    }
    saved = result.state.relays["relay1"]
    assert (saved.tls_fingerprint, saved.tls_standby_fingerprint) == ("sha256:aa", "sha256:cc")
    # A later run without the relay's facts pins the same two, from the state file.
    host = relay()
    del host["relay_tls_fingerprint"]
    again = planned(sites, {"relay1": host}, state=read_state(result.state.to_json()))
    assert again.sidecars == result.sidecars
    # A relay's facts without a standby never mix with an older standby from the state file.
    rotated = planned(
        sites, {"relay1": relay(relay_tls_fingerprint="sha256:cc")}, state=result.state
    )
    assert "standby_fingerprint" not in rotated.sidecars["a"]["relays"]["relay1"]


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (None, []),
        ("", []),
        ("easy1", ["easy1"]),
        ("easy1, relay1", ["easy1", "relay1"]),
        ("easy1 relay1", ["easy1", "relay1"]),
        (["easy1", "relay1"], ["easy1", "relay1"]),
    ],
)
def test_rotation_names_take_a_list_or_what_dash_e_gives(value, names):
    assert rotation_names(value) == names


def test_rotations_must_name_hosts_of_their_groups():
    inventory = Inventory(sites={"a": site(1)}, relays={"relay1": relay()})
    assert check_rotations(inventory, "a,relay1", ["relay1"]) == []
    assert check_rotations(inventory, "a,nosuch", "a") == [
        "mesh_rotate_keys: 'nosuch' is not a host of mesh_sites or a host of mesh_relays",
        "mesh_rotate_tls: 'a' is not a host of mesh_relays",
    ]
    assert check_rotations(inventory, {"a": 1}, 7) == [
        "mesh_rotate_keys: {'a': 1} is not a list of host names",
        "mesh_rotate_tls: 7 is not a list of host names",
    ]


# --- every site's mesh prefixes (the firewall's) ----------------------------------------------


def test_every_site_gets_the_overlay_and_the_lan_prefixes_of_the_mesh():
    sites = {
        "a": site(1, "open", mesh_lan_prefixes=["192.168.1.0/24", "10.10.1.0/24"]),
        "b": site(2, "easy"),
        "c": site(3, "easy", mesh_required=False, mesh_policy={"allow_direct": False}),
    }
    result = planned(sites)
    mesh = [OVERLAY, "10.10.1.0/24", "10.10.2.0/24", "192.168.1.0/24"]
    assert site_plan(result, "a")["mesh_prefixes"] == mesh
    assert site_plan(result, "b")["mesh_prefixes"] == mesh
    # c links with no one: alone, it passes only its own LAN
    assert site_plan(result, "c")["mesh_prefixes"] == [OVERLAY, "10.10.3.0/24"]


# --- the state file ---------------------------------------------------------------------------


def test_the_state_file_layout_is_stable_and_round_trips():
    state = State(
        sites={
            "b": SiteState(public_key="kb", nat_class="blocked", certificate="PEM"),
            "a": SiteState(public_key="ka", nat_class="open", endpoint="198.51.100.1:51820"),
        },
        relays={"r1": RelayState(public_key="kr"), "r2": RelayState(tls_fingerprint="sha256:x")},
    )
    text = state.to_json()
    assert json.loads(text) == {
        "version": 1,
        "sites": {
            "a": {"public_key": "ka", "nat_class": "open", "endpoint": "198.51.100.1:51820"},
            "b": {
                "public_key": "kb",
                "nat_class": "blocked",
                "endpoint": None,
                "certificate": "PEM",
            },
        },
        "relays": {
            "r1": {"public_key": "kr"},
            "r2": {"public_key": None, "tls_fingerprint": "sha256:x"},
        },
    }
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert read_state(text) == state
    assert read_state(None) == State()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{",
            "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2"
            " (char 1))",
        ),
        ("[]", "not a JSON object but list"),
        (
            '{"version": 2}',
            "version 2 is not 1, the one this meshwright reads (a newer meshwright"
            " wrote it, or it was edited)",
        ),
        (
            '{"sites": {}}',
            "version None is not 1, the one this meshwright reads (a newer"
            " meshwright wrote it, or it was edited)",
        ),
        ('{"version": 1, "hosts": {}}', "unknown key(s) 'hosts'"),
        ('{"version": 1, "sites": []}', "sites is not a mapping of name to entry"),
        ('{"version": 1, "sites": {"a": {"key": "x"}}}', "site a: unknown key 'key'"),
        (
            '{"version": 1, "relays": {"r": {"public_key": 5}}}',
            "relay r: public_key 5 is not a string",
        ),
    ],
)
def test_a_broken_state_file_is_an_error_saying_why(text, message):
    with pytest.raises(StateError) as raised:
        read_state(text)
    assert str(raised.value) == message


def test_the_previous_plans_allocations_are_kept_and_a_broken_plan_is_ignored():
    sites = {"a": site(1, "hard"), "b": site(2, "hard"), "c": site(3, "hard")}
    relays = {
        "relay1": relay(),
        "relay2": relay(
            relay_public_addresses=["198.51.100.10"], mesh_overlay_address="10.99.0.251"
        ),
    }
    first = planned(sites, relays)
    # RTTs change: a new run keeps every pair on its relay and ports
    for host in sites.values():
        host["mesh_nat"]["rtt_ms"] = {"relay2": 1.0, "relay1": 90.0}
    again = planned(sites, relays, previous=first.plan_json)
    assert again.plan_json == first.plan_json
    assert previous_allocations("not json") == [] and previous_allocations(None) == []
    assert previous_allocations('{"allocations": 5}') == []


def test_a_previous_plan_with_per_pair_ports_is_replanned_with_site_ports():
    """Plans before per-site ports gave each allocation a slot and a port pair of its own."""
    sites = {"a": site(1, "hard"), "b": site(2, "hard"), "c": site(3, "hard")}
    relays = {"relay1": relay()}
    old = {
        "allocations": [
            {"a": "a", "b": "b", "kind": "relay", "relay": "relay1", "address": "203.0.113.10",
             "slot": 0, "ports": [40000, 40001], "public_keys": ["", ""]},
            {"a": "a", "b": "c", "kind": "relay", "relay": "relay1", "address": "203.0.113.10",
             "slot": 1, "ports": [40002, 40003], "public_keys": ["", ""]},
            {"a": "b", "b": "c", "kind": "relay", "relay": "gone", "address": "192.0.2.1",
             "slot": 2, "ports": [40004, 40005], "public_keys": ["", ""]},
        ],
        "standby_allocations": [{"a": "b", "b": "c", "slot": 3, "ports": ["x", None]}],
    }  # fmt: skip
    result = planned(sites, relays, previous=json.dumps(old))
    data = result.facts()["mesh_plan"]
    ports = {s["name"]: s["port"] for s in data["relays"]["relay1"]["sites"]}
    assert ports == {"a": 40000, "b": 40001, "c": 40003}  # each site's first valid port
    assert all("slot" not in a for a in data["allocations"])
    # and the next run changes nothing
    assert planned(sites, relays, previous=result.plan_json).plan_json == result.plan_json


# --- static validation (no facts) --------------------------------------------------------------


def test_a_valid_inventory_needs_no_facts():
    sites = {"a": site(1, None), "b": site(2, None, mesh_policy={"hubs": ["a"]})}
    assert validate_inventory(inventory(sites, {"relay1": relay()})) == []


def test_static_validation_names_hosts_and_values():
    sites = {
        "a": site(1, None, mesh_lan_prefixes=["10.10.0.0/16"]),
        "b": site(2, None, mesh_overlay_address="10.98.0.2", mesh_policy={"hubs": ["z"]}),
        "c": site(3, None, mesh_lan_prefixes=["10.99.0.128/25"], mesh_listen_port=70000),
        "d": site(1, None, mesh_lan_prefixes=["172.16.0.1/24"]),
        "e": site(5, None, mesh_endpoint="2001:db8::1:51820", wireguard_mtu="big"),
    }
    del sites["e"]["mesh_overlay_address"]
    sites["b"]["wireguard_mtu"] = 67
    assert validate_inventory(inventory(sites, {"a": relay()})) == [
        "site b: wireguard_mtu 67 is not a whole number in 68-65535",
        "site e: mesh_overlay_address is not set",
        "site e: wireguard_mtu 'big' is not a whole number in 68-65535",
        "relay a: a site has the same name (WireGuard peers are named uniquely)",
        "site b: overlay address 10.98.0.2 is outside the overlay network 10.99.0.0/24",
        "site b: hubs name unknown site(s) z",
        "site c: LAN prefix 10.99.0.128/25 overlaps the overlay network 10.99.0.0/24",
        "site c: listen port 70000 is not a port in 1-65535",
        "site d: LAN prefix '172.16.0.1/24' is not a valid prefix (did you mean 172.16.0.0/24?)",
        "site e: endpoint '2001:db8::1:51820' is not valid (an IPv6 address needs brackets:"
        " [ipv6]:port)",
        "sites a, d: same overlay address 10.99.0.1",
        "sites a and b: LAN prefixes 10.10.0.0/16 (a) and 10.10.2.0/24 (b) overlap",
        "sites a and e: LAN prefixes 10.10.0.0/16 (a) and 10.10.5.0/24 (e) overlap",
    ]


def test_an_empty_sites_group_is_an_error_naming_the_group():
    assert validate_inventory(inventory({}, sites_group="branches")) == [
        "the branches inventory group is empty: nothing to plan",
        "mesh_overlay_network is not set: give every site the overlay's prefix, such as"
        " 10.99.0.0/24 (group_vars/all)",
    ]
