"""meshwright.plan routing: properties on random meshes, a reference Dijkstra, stability.

The reference (plan_reference) tests every pair with its own copy of the link rules
and runs a textbook Dijkstra per site with the same link weights; the planner must find exactly
the same paths, whatever shortcuts it takes.
"""

from __future__ import annotations

import ipaddress
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_reference import reference_link, reference_paths

from meshwright.plan import LINK_COST, LINK_KINDS, Mesh, Plan, Policy, Relay, Site, build_plan
from meshwright.plan.routing import SHIFT, site_hash
from meshwright.plan.synthetic import public_key, synthetic_mesh

RELAY = Relay(name="r1", addresses=("198.51.100.10",))
POOL = [f"{word}{k}" for word in ("hq", "dc", "br", "edge", "vpc") for k in range(12)]
CLASSES = ("open", "open", "open*", "easy", "easy", "hard", "hard", "blocked")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_site(name: str, index: int, cls: str, policy: Policy, required: bool) -> Site:
    nat = "open" if cls == "open*" else cls
    endpoint = f"203.0.113.{index + 1}:51820" if cls == "open" else None
    return Site(
        name=name,
        public_key=public_key(name),
        overlay_address=f"100.64.0.{index + 1}",
        lan_prefixes=(f"10.{index}.0.0/16",) + ((f"fd00:{index}::/48",) if index % 3 == 0 else ()),
        nat_class=nat,
        endpoint=endpoint,
        policy=policy,
        required=required,
    )


@st.composite
def meshes(draw, min_sites: int = 2, max_sites: int = 14) -> Mesh:
    """Random meshes that always plan: the first site is required, the others are not."""
    names = draw(
        st.lists(st.sampled_from(POOL), min_size=min_sites, max_size=max_sites, unique=True)
    )
    kinds = draw(st.frozensets(st.sampled_from(LINK_KINDS), min_size=1))
    relays = (RELAY,) if draw(st.booleans()) else ()
    sites = []
    for index, name in enumerate(names):
        cls = draw(st.sampled_from(CLASSES))
        hubs = None
        if draw(st.integers(0, 3)) == 0:
            hubs = tuple(
                draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
            )
        policy = Policy(
            allow_direct=draw(st.integers(0, 7)) > 0,
            allow_relay=draw(st.integers(0, 7)) > 0,
            hubs=hubs,
        )
        sites.append(make_site(name, index, cls, policy, required=index == 0))
    return Mesh(
        sites=tuple(sites), relays=relays, overlay_network="100.64.0.0/24", link_kinds=kinds
    )


# --- the checks --------------------------------------------------------------------------------


def weight(mesh: Mesh, path: tuple[str, ...]) -> int:
    """A path's weight, from the reference link rules and the documented link weight."""
    sites = {s.name: s for s in mesh.sites}
    total = 0
    for u, v in pairwise(path):
        kind = reference_link(sites[u], sites[v], mesh)
        assert kind is not None, (u, v)
        total += (LINK_COST[kind] << SHIFT) + (site_hash(u) - site_hash(v)) ** 2
    return total


def prefixes_of(site: Site) -> set[str]:
    address = ipaddress.ip_address(site.overlay_address)
    lans = (str(ipaddress.ip_network(p)) for p in site.lan_prefixes)
    return {f"{address}/{address.max_prefixlen}", *lans}


def check_plan(mesh: Mesh, plan: Plan) -> None:
    """Every property the brief asks of a plan, against the reference."""
    reference = reference_paths(mesh)
    sites = {s.name: s for s in mesh.sites}
    part = {name: {name, *reference[name]} for name in sites}  # its connected part
    owner = {p: name for name in sites for p in prefixes_of(sites[name])}
    routes = {name: {r.prefix: r for r in plan.sites[name].routes} for name in sites}

    # the required sites and every reachable site form one connected part; each unreachable
    # site is outside it (and routes only within its own island, if it has one)
    required = [name for name, s in sites.items() if s.required]
    main = part[required[0]]
    assert set(plan.unreachable) == set(sites) - main
    for name in plan.unreachable:
        assert not sites[name].required
        assert plan.unreachable[name].startswith("no path reaches it: ")
        if len(part[name]) == 1:
            assert plan.sites[name].peers == () and plan.sites[name].routes == ()

    for pair in plan.pairs:
        assert pair.a < pair.b
        if pair.b not in part[pair.a]:
            assert (pair.mode, pair.path, pair.cost) == ("none", (), None)
            continue
        path = pair.path
        assert path == reference[pair.a][pair.b]  # the reference Dijkstra's unique path
        assert len(set(path)) == len(path)  # loop-free
        assert (path[0], path[-1]) == (pair.a, pair.b)
        kinds = [reference_link(sites[u], sites[v], mesh) for u, v in pairwise(path)]
        assert None not in kinds
        assert pair.cost == sum(LINK_COST[k] for k in kinds)  # type: ignore[index]
        if reference_link(sites[pair.a], sites[pair.b], mesh):
            assert len(path) == 2  # a linked pair always uses its own link
        assert pair.mode == (kinds[0] if len(path) == 2 else f"via {path[1]}")
        # symmetric: the other end's route runs the same path backwards
        back = routes[pair.b][next(iter(prefixes_of(sites[pair.a])))]
        assert back.path == tuple(reversed(path))
        # hop by hop: every site on the path forwards both ways along it
        for k in range(1, len(path) - 1):
            x = path[k]
            for p in prefixes_of(sites[pair.b]):
                assert routes[x][p].via == path[k + 1]
            for p in prefixes_of(sites[pair.a]):
                assert routes[x][p].via == path[k - 1]

    for name in sites:
        site_plan = plan.sites[name]
        remote = {p for p, o in owner.items() if o != name and o in part[name]}
        assert set(routes[name]) == remote
        for prefix, route in routes[name].items():
            assert route.path == (name, *reference[name][owner[prefix]][1:])
            assert route.via == route.path[1]
            assert route.cost == sum(
                LINK_COST[reference_link(sites[u], sites[v], mesh) or ""]
                for u, v in pairwise(route.path)
            )
        # allowed IPs partition the remote prefixes among the peers, by next hop
        seen: set[str] = set()
        for peer in site_plan.peers:
            assert peer.mode == reference_link(sites[name], sites[peer.name], mesh)
            assert peer.public_key == sites[peer.name].public_key
            assert list(peer.allowed_ips) == sorted(
                peer.allowed_ips,
                key=lambda p: (lambda n: (n.version, int(n.network_address), n.prefixlen))(
                    ipaddress.ip_network(p)
                ),
            )
            assert not seen & set(peer.allowed_ips)
            seen |= set(peer.allowed_ips)
            for prefix in peer.allowed_ips:
                assert routes[name][prefix].via == peer.name
        assert seen == remote
        # the peers are exactly the sites it has a link with
        linked = {
            other
            for other in sites
            if other != name and reference_link(sites[name], sites[other], mesh)
        }
        assert [p.name for p in site_plan.peers] == sorted(linked)


@SETTINGS
@given(meshes())
def test_random_meshes_match_the_reference_and_every_property(mesh):
    check_plan(mesh, build_plan(mesh))


@SETTINGS
@given(meshes(), st.randoms(use_true_random=False))
def test_input_order_never_changes_the_bytes(mesh, rng):
    sites = list(mesh.sites)
    rng.shuffle(sites)
    shuffled = Mesh(
        sites=tuple(sites),
        relays=mesh.relays,
        overlay_network=mesh.overlay_network,
        link_kinds=frozenset(sorted(mesh.link_kinds, reverse=True)),
    )
    assert build_plan(shuffled).to_json() == build_plan(mesh).to_json()


# --- stability ---------------------------------------------------------------------------------


def _peer_view(plan: Plan, name: str) -> dict[str, tuple]:
    return {p.name: (p.public_key, p.endpoint, p.keepalive, p.mode) for p in plan.sites[name].peers}


def _holder(plan: Plan, name: str) -> dict[str, str]:
    """prefix -> the peer whose allowed IPs hold it, at site ``name``."""
    return {ip: p.name for p in plan.sites[name].peers for ip in p.allowed_ips}


def _paths(plan: Plan) -> dict[tuple[str, str], tuple[str, ...]]:
    return {(p.a, p.b): p.path for p in plan.pairs if p.mode != "none"}


@st.composite
def mesh_and_extra_site(draw):
    mesh = draw(meshes(max_sites=12))
    used = {s.name for s in mesh.sites}
    name = draw(st.sampled_from([n for n in POOL if n not in used]))
    hubs = None
    if draw(st.integers(0, 3)) == 0:
        hubs = tuple(draw(st.lists(st.sampled_from(sorted(used)), min_size=1, max_size=2)))
    extra = make_site(
        name,
        len(mesh.sites),
        draw(st.sampled_from(CLASSES)),
        Policy(allow_direct=draw(st.integers(0, 7)) > 0, hubs=hubs),
        required=False,
    )
    return mesh, extra


@SETTINGS
@given(mesh_and_extra_site())
def test_adding_a_site_changes_only_what_it_makes_strictly_cheaper(case):
    mesh, extra = case
    before = build_plan(mesh)
    grown = Mesh(
        sites=(*mesh.sites, extra),
        relays=mesh.relays,
        overlay_network=mesh.overlay_network,
        link_kinds=mesh.link_kinds,
        previous_allocations=tuple(before.to_dict()["allocations"]),
    )
    after = build_plan(grown)
    old, new = _paths(before), _paths(after)
    changed = set()
    for key, path in old.items():
        assert key in new  # nothing reachable becomes unreachable
        if new[key] != path:
            assert extra.name in new[key]
            assert weight(grown, new[key]) < weight(grown, path)
            changed.add(key)
    for name in {s.name for s in mesh.sites}:
        peers_before, peers_after = _peer_view(before, name), _peer_view(after, name)
        assert {k: v for k, v in peers_after.items() if k != extra.name} == peers_before
        holder_before, holder_after = _holder(before, name), _holder(after, name)
        for site in mesh.sites:
            key = tuple(sorted((name, site.name)))
            if key not in old or key in changed:
                continue
            for prefix in prefixes_of(site):
                assert holder_after[prefix] == holder_before[prefix]


def _forget(site: Site, gone: str) -> Site:
    hubs = site.policy.hubs
    if hubs is None or gone not in hubs:
        return site
    policy = Policy(
        allow_direct=site.policy.allow_direct,
        allow_relay=site.policy.allow_relay,
        hubs=tuple(h for h in hubs if h != gone),
    )
    return Site(**{**{f: getattr(site, f) for f in site.__dataclass_fields__}, "policy": policy})


@SETTINGS
@given(meshes(min_sites=3), st.data())
def test_removing_a_site_changes_only_the_pairs_that_used_it(mesh, data):
    gone = data.draw(st.sampled_from([s.name for s in mesh.sites[1:]]))
    before = build_plan(mesh)
    # the other sites' hubs forget it too (their links to the rest stay the same)
    shrunk = Mesh(
        sites=tuple(_forget(s, gone) for s in mesh.sites if s.name != gone),
        relays=mesh.relays,
        overlay_network=mesh.overlay_network,
        link_kinds=mesh.link_kinds,
        previous_allocations=tuple(before.to_dict()["allocations"]),
    )
    after = build_plan(shrunk)
    old, new = _paths(before), _paths(after)
    kept = {key: path for key, path in old.items() if gone not in path}
    for key, path in kept.items():
        assert new.get(key) == path
    for name in {s.name for s in shrunk.sites}:
        peers_before = {k: v for k, v in _peer_view(before, name).items() if k != gone}
        assert _peer_view(after, name) == peers_before
        holder_before, holder_after = _holder(before, name), _holder(after, name)
        for site in shrunk.sites:
            key = tuple(sorted((name, site.name)))
            if key in kept:
                for prefix in prefixes_of(site):
                    assert holder_after[prefix] == holder_before[prefix]


# --- bigger synthetic meshes against the reference ----------------------------------------------

ALL = tuple(LINK_KINDS)


@pytest.mark.parametrize(
    ("size", "options"),
    [
        (120, {}),
        (120, {"link_kinds": ("direct", "punch")}),
        (100, {"link_kinds": ("relay", "relay-tcp"), "relays": 1}),
        (100, {"link_kinds": ALL, "relays": 1, "no_direct": 0.2, "no_relay": 0.2}),
        (120, {"spokes": 0.5, "hq_count": 4}),
        (100, {"spokes": 0.4, "no_direct": 0.1, "link_kinds": ALL, "relays": 1}),
    ],
)
def test_synthetic_meshes_match_the_reference(size, options):
    mesh = synthetic_mesh(size, seed=size, lans_per_site=2, **options)
    check_plan(mesh, build_plan(mesh))


def test_hub_chains_need_the_general_search():
    """Each site names only its neighbours on a line: paths of every length."""
    names = [f"c{k:02d}" for k in range(30)]
    sites = tuple(
        make_site(
            name,
            k,
            "open",
            Policy(hubs=tuple(names[j] for j in (k - 1, k + 1) if 0 <= j < len(names))),
            required=True,
        )
        for k, name in enumerate(names)
    )
    mesh = Mesh(sites=sites, overlay_network="100.64.0.0/24")
    plan = build_plan(mesh)
    check_plan(mesh, plan)
    first_last = plan.pairs[len(names) - 2]
    assert (first_last.a, first_last.b, first_last.path) == ("c00", "c29", tuple(names))
    assert plan.stats["pending_pairs"] > 0


def test_transit_load_spreads_over_open_sites():
    """NATed pairs pick the open site nearest their hash midpoint, not one favourite."""
    plan = build_plan(synthetic_mesh(300, seed=5))
    transits: dict[str, int] = {}
    for pair in plan.pairs:
        if pair.mode.startswith("via "):
            transits[pair.path[1]] = transits.get(pair.path[1], 0) + 1
    opens = sum(1 for s in synthetic_mesh(300, seed=5).sites if s.endpoint)
    assert len(transits) > opens // 2
    assert max(transits.values()) < sum(transits.values()) / 5
