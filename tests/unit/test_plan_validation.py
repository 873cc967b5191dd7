"""meshwright.plan validation: every problem is reported, all at once, naming sites and values."""

from __future__ import annotations

import pytest

from meshwright.plan import Mesh, PlanError, Policy, Relay, Site, build_plan
from meshwright.plan.synthetic import public_key
from meshwright.plan.synthetic import synthetic_site as site

RELAY = Relay(name="r1", addresses=("198.51.100.10",))


def problems(*sites: Site, **kw) -> tuple[str, ...]:
    kw.setdefault("overlay_network", "10.99.0.0/24")
    with pytest.raises(PlanError) as error:
        build_plan(Mesh(sites=tuple(sites), **kw))
    return error.value.problems


def one(*sites: Site, **kw) -> str:
    found = problems(*sites, **kw)
    assert len(found) == 1, found
    return found[0]


def test_lan_prefixes_of_two_sites_overlap():
    assert (
        one(
            site("a", number=1, lan_prefixes=("10.1.0.0/16",)),
            site("b", number=2, lan_prefixes=("10.1.2.0/24",)),
        )
        == "sites a and b: LAN prefixes 10.1.0.0/16 (a) and 10.1.2.0/24 (b) overlap"
    )


def test_equal_lan_prefixes_and_nested_ones_are_all_reported():
    found = problems(
        site("a", number=1, lan_prefixes=("172.16.0.0/12",)),
        site("b", number=2, lan_prefixes=("172.17.0.0/16",)),
        site("c", number=3, lan_prefixes=("172.17.0.0/16", "192.168.0.0/24")),
        site("d", number=4, lan_prefixes=("192.168.1.0/24",)),
    )
    assert sorted(found) == [
        "sites a and b: LAN prefixes 172.16.0.0/12 (a) and 172.17.0.0/16 (b) overlap",
        "sites a and c: LAN prefixes 172.16.0.0/12 (a) and 172.17.0.0/16 (c) overlap",
        "sites b and c: LAN prefixes 172.17.0.0/16 (b) and 172.17.0.0/16 (c) overlap",
    ]


def test_lan_prefixes_of_one_site_overlap():
    assert (
        one(site("a", lan_prefixes=("10.1.0.0/16", "10.1.128.0/17")))
        == "site a: LAN prefixes 10.1.0.0/16 and 10.1.128.0/17 overlap"
    )


def test_lan_prefix_overlaps_the_overlay():
    assert (
        one(site("a", lan_prefixes=("10.99.0.0/16",)))
        == "site a: LAN prefix 10.99.0.0/16 overlaps the overlay network 10.99.0.0/24"
    )


def test_ipv4_and_ipv6_prefixes_never_overlap():
    plan = build_plan(
        Mesh(
            sites=(site("a", lan_prefixes=("128.0.0.0/1", "::/1")), site("b", "easy", 2)),
            overlay_network="10.99.0.0/24",
        )
    )
    assert plan.sites["b"].peers[0].allowed_ips == ("10.99.0.1/32", "128.0.0.0/1", "::/1")


def test_duplicate_overlay_addresses():
    assert one(site("a", number=1), site("b", "easy", 2, overlay_address="10.99.0.1")) == (
        "sites a, b: same overlay address 10.99.0.1"
    )


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("10.98.0.1", "overlay address 10.98.0.1 is outside the overlay network 10.99.0.0/24"),
        ("fd00::1", "overlay address fd00::1 is outside the overlay network 10.99.0.0/24"),
        ("10.99.0.0", "overlay address 10.99.0.0 is the network address of 10.99.0.0/24"),
        ("10.99.0.255", "overlay address 10.99.0.255 is the broadcast address of 10.99.0.0/24"),
        ("10.99.0.300", "overlay address '10.99.0.300' is not an IP address"),
        ("10.99.0.1/24", "overlay address '10.99.0.1/24' is not an IP address"),
    ],
)
def test_overlay_address_problems(address, message):
    assert one(site("a", overlay_address=address)) == f"site a: {message}"


def test_ipv6_overlay_works():
    plan = build_plan(
        Mesh(
            sites=(
                site("a", overlay_address="fd99::1"),
                site("b", "easy", 2, overlay_address="fd99::2"),
            ),
            overlay_network="fd99::/64",
        )
    )
    assert plan.sites["b"].peers[0].allowed_ips == ("fd99::1/128",)


def test_bad_overlay_network():
    assert one(site("a"), overlay_network="10.99.0.1/24").startswith(
        "overlay_network '10.99.0.1/24' is not a valid prefix"
    )


def test_missing_and_malformed_and_duplicate_public_keys():
    found = problems(
        site("a", number=1, public_key=None),
        site("b", "easy", 2, public_key="not-a-key"),
        site("c", "easy", 3, public_key=public_key("d")),
        site("d", "easy", 4),
    )
    assert found == (
        "site a: no public key (the keys step has not run on it)",
        "site b: public key 'not-a-key' is not a WireGuard key (44 characters of base64, 32 bytes)",
        f"sites c, d: same public key {public_key('d')}",
    )


def test_missing_and_unknown_nat_class():
    found = problems(site("a", None, 1), site("b", "cone", 2), site("c", "open", 3))
    assert found == (
        "site a: no NAT facts (nat_class is unknown: the probe has not run on it)",
        "site b: NAT class 'cone' is unknown (known: open, easy, hard, blocked)",
    )


def test_unknown_hub():
    assert (
        one(site("a", policy=Policy(hubs=("b", "ghost", "phantom"))), site("b", "easy", 2))
        == "site a: hubs name unknown site(s) ghost, phantom"
    )


def test_duplicate_site_names():
    twin = site("a", "easy", 2, public_key=public_key("twin"))
    assert one(site("a", number=1), twin, site("b", "easy", 3)) == "site a: defined 2 times"


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        (
            "10.1.2.3/24",
            "LAN prefix '10.1.2.3/24' is not a valid prefix (did you mean 10.1.2.0/24?)",
        ),
        ("10.1.0.0/33", "LAN prefix '10.1.0.0/33' is not a valid prefix ("),
        ("lan", "LAN prefix 'lan' is not a valid prefix ("),
    ],
)
def test_bad_lan_prefix(prefix, message):
    assert one(site("a", lan_prefixes=(prefix,))).startswith(f"site a: {message}")


@pytest.mark.parametrize(
    "endpoint", ["203.0.113.1", "203.0.113.1:0", "2001:db8::1:51820", "[2001:db8::1]", "host:1"]
)
def test_bad_endpoint(endpoint):
    assert one(site("a", endpoint=endpoint)).startswith(
        f"site a: endpoint {endpoint!r} is not valid"
    )


def test_duplicate_endpoints():
    assert one(site("a", number=1), site("b", "open", 2, endpoint="203.0.113.1:51820")) == (
        "sites a, b: same endpoint 203.0.113.1:51820"
    )


def test_mesh_settings():
    found = problems(
        site("a", listen_port=0),
        link_kinds=frozenset({"direct", "carrier-pigeon"}),
        keepalive=0,
        listen_port=70000,
    )
    assert found == (
        "link_kinds: unknown kind(s) carrier-pigeon (known: direct, punch, relay, relay-tcp)",
        "keepalive 0 is not a number of seconds in 1-65535",
        "listen_port 70000 is not a port in 1-65535",
        "site a: listen port 0 is not a port in 1-65535",
    )


def test_relays():
    found = problems(
        site("a"),
        relays=(
            Relay(name="r1", addresses=("198.51.100.300",)),
            Relay(name="r2"),
            Relay(name="r2", addresses=("198.51.100.2",)),
        ),
        link_kinds=frozenset({"direct", "relay"}),
    )
    assert found == (
        "relay r1: address '198.51.100.300' is not an IP address",
        "relay r2: no addresses (link kinds include relays)",
        "relay r2: defined 2 times",
    )


def test_relay_without_addresses_is_fine_when_no_relay_kind_is_used():
    build_plan(Mesh(sites=(site("a"),), relays=(Relay(name="r"),), overlay_network="10.99.0.0/24"))


# --- reachability ----------------------------------------------------------------------------


def test_required_site_that_no_path_reaches():
    sites = (site("a", number=1), site("b", "easy", 2), site("x", "blocked", 3))
    assert one(*sites, relays=(RELAY,)) == (
        "site x: no path reaches it: its links need relay-tcp, which is not available"
        " (link kinds: direct)"
    )
    assert one(*sites) == (
        "site x: no path reaches it: its links need relay-tcp, which is not available"
        " (link kinds: direct) and needs a relay, and the mesh has none"
    )


def test_unreachable_because_no_relay():
    assert one(
        site("a", "open", 1),
        site("b", "open", 2),
        site("x", "blocked", 3),
        link_kinds=frozenset({"direct", "relay-tcp"}),
    ) == (
        "site x: no path reaches it: its links need relay-tcp, which needs a relay,"
        " and the mesh has none"
    )


def test_of_two_lone_sites_the_first_name_is_planned():
    assert one(site("b", "open", 1), site("a", "blocked", 2)) == (
        "site b: no path reaches it: its link to a needs relay-tcp, which is not available"
        " (link kinds: direct) and needs a relay, and the mesh has none"
    )


def test_unreachable_because_of_policies_and_hubs():
    found = problems(
        site("hub", number=1),
        site("o2", number=2),
        site("p", "easy", 3, policy=Policy(allow_direct=False)),
        site("q", "easy", 4, policy=Policy(hubs=("p",))),
        site("r", "hard", 5),
        site("s", "open", 6, policy=Policy(hubs=("hub",))),
        site("t", "open", 7, policy=Policy(hubs=("s",))),
        relays=(RELAY,),
    )
    assert found == (
        "site p: no path reaches it: its links to hub, o2 need direct, which its policy forbids"
        " (allow_direct: false); its link to r needs relay, which is not available (link kinds:"
        " direct); its link to s needs direct, which"
        " its policy forbids (allow_direct: false) and is refused by that site's hubs",
        "site q: no path reaches it: its links to hub, o2 are not in its hubs (p); its link"
        " to r needs relay, which is not available (link kinds: direct) and is not in its hubs"
        " (p); its link to s is not in its hubs (p) and is refused by that site's hubs",
        "site t: no path reaches it: its links to hub, o2, r are not in its hubs (s); its link"
        " to s is refused by that site's hubs",
    )


def test_unreachable_because_the_other_side_forbids():
    found = problems(
        site("a", "hard", 1, policy=Policy(allow_relay=False)),
        site("b", "hard", 2, policy=Policy(allow_relay=False)),
        site("x", "blocked", 3),
        link_kinds=frozenset({"relay", "relay-tcp"}),
        relays=(RELAY,),
    )
    # a and b link to nobody: the first name wins, and the others say why
    assert found[1] == (
        "site x: no path reaches it: its link to a needs relay-tcp, which that site's policy"
        " forbids (allow_relay: false)"
    )


def test_unreachable_site_linked_only_to_other_unreachable_sites():
    plan = build_plan(
        Mesh(
            sites=(site("a", number=1), site("b", "easy", 2), site("x", "blocked", 3)),
            link_kinds=frozenset({"direct", "relay-tcp"}),
            relays=(RELAY,),
            overlay_network="10.99.0.0/24",
        )
    )
    assert plan.unreachable == {}  # blocked sites reach everyone over relay-tcp
    found = problems(
        site("a", number=1),
        site("b", "easy", 2),
        site("x", "hard", 3, policy=Policy(hubs=("y",))),
        site("y", "hard", 4, policy=Policy(hubs=("x",))),
        link_kinds=frozenset({"direct", "relay"}),
        relays=(RELAY,),
    )
    assert found[0] == (
        "site x: no path reaches it: it links only with y, which no path reaches either;"
        " its links are not in its hubs (y)"
    )  # b is easy: without punch it would link through the relay, but the hubs refuse it


def test_many_names_are_abbreviated():
    sites = [site(f"o{k:02d}", number=k + 1) for k in range(9)]
    sites.append(site("x", "blocked", 20))
    message = one(*sites, relays=(RELAY,))
    assert message == (
        "site x: no path reaches it: its links need relay-tcp, which is not available"
        " (link kinds: direct)"
    )
    sites.append(site("y", "open", 21, policy=Policy(hubs=("o00",))))
    sites[-2] = site("x", "blocked", 20, policy=Policy(hubs=("y",)))
    message = one(*sites, relays=(RELAY,))
    assert message.startswith(
        "site x: no path reaches it: its links to o00, o01, o02, o03, o04 and 4 more need"
        " relay-tcp, which is not available (link kinds: direct) and are not in its hubs (y);"
    )


def test_every_problem_at_once():
    found = problems(
        site("a", None, 1, public_key=None, lan_prefixes=("10.1.0.0/16",)),
        site("b", "easy", 1, lan_prefixes=("10.1.1.0/24",), policy=Policy(hubs=("zz",))),
        site("c", "blocked", 3),
    )
    assert len(found) == 6, found
    for text in (
        "site a: no public key",
        "site a: no NAT facts",
        "site b: hubs name unknown site(s) zz",
        "sites a, b: same overlay address 10.99.0.1",
        "sites a and b: LAN prefixes 10.1.0.0/16 (a) and 10.1.1.0/24 (b) overlap",
        "site c: no path reaches it",
    ):
        assert any(p.startswith(text) for p in found), (text, found)
    message = str(PlanError(found))
    assert message.startswith("6 problems:\n- ")


def test_plan_error_with_one_problem_is_just_that_problem():
    assert str(PlanError(["site a: bad"])) == "site a: bad"
