"""meshwright.site.wgstate: the wanted state's validation and the diff's rules, one by one."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from wireguard_tools import WireguardKey

from meshwright.site import wgstate
from meshwright.site.keys import pair_preshared_key
from meshwright.site.wgstate import (
    AddAddress,
    PeerState,
    PendingPeer,
    RemoveAddress,
    RemovePeer,
    RunningState,
    SetListenPort,
    SetMtu,
    SetPeer,
    SetPrivateKey,
    SpecError,
)
from meshwright.wire.endpoint import Endpoint, parse_endpoint

OWN = WireguardKey.generate()
OWN_PUBLIC = str(OWN.public_key())
PRIVATE = {name: WireguardKey.generate() for name in ("a", "b", "c")}
PUBLIC = {name: str(key.public_key()) for name, key in PRIVATE.items()}
net = ipaddress.ip_network
iface = ipaddress.ip_interface


def peer(name: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "public_key": PUBLIC[name],
        "endpoint": None,
        "allowed_ips": [f"10.99.0.{ord(name) - 96}/32"],
        "keepalive": None,
        **kw,
    }


def want(*peers: dict[str, Any], **kw: Any) -> wgstate.WantedState:
    args: dict[str, Any] = {
        "listen_port": 51820,
        "addresses": ["10.99.0.9/24"],
        "mtu": None,
        "private_key_file": "/etc/wireguard/mesh0.key",
        "own_private": OWN,
        "peers": list(peers),
        **kw,
    }
    return wgstate.desired(**args)


def running(peers: dict[str, PeerState] | None = None, **kw: Any) -> RunningState:
    args: dict[str, Any] = {
        "public_key": OWN_PUBLIC,
        "listen_port": 51820,
        "addresses": (iface("10.99.0.9/24"),),
        "mtu": 1420,
        "peers": peers or {},
        **kw,
    }
    return RunningState(**args)


def live_peer(name: str, **kw: Any) -> PeerState:
    return PeerState(allowed_ips=(net(f"10.99.0.{ord(name) - 96}/32"),), **kw)


def described(changes: list[wgstate.Change]) -> list[str]:
    return [change.describe() for change in changes]


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peers", "kw", "message"),
    [
        ([peer("a")], {"listen_port": 0}, "listen_port 0 is not 1..65535"),
        ([peer("a")], {"listen_port": 65536}, "listen_port 65536 is not 1..65535"),
        ([peer("a")], {"mtu": 20}, "mtu 20 is not 68..65535"),
        ([peer("a")], {"addresses": ["10.99.0.9"]}, "address '10.99.0.9' is not an address"),
        ([peer("a")], {"addresses": ["10.99.0.999/24"]}, "address '10.99.0.999/24'"),
        ([{**peer("a"), "name": ""}], {}, "peers[0] has no name"),
        ([peer("a"), peer("a")], {}, "peer a is given twice"),
        ([peer("a", public_key="x")], {}, "peer a: public_key is not a WireGuard key"),
        ([peer("a", public_key=None)], {}, "peer a: public_key is not a WireGuard key"),
        ([peer("a"), peer("b", public_key=PUBLIC["a"])], {}, "peers a and b have the same"),
        ([peer("a", public_key=OWN_PUBLIC)], {}, "peer a has this node's own public key"),
        ([peer("a", endpoint="2001:db8::1:51820")], {}, "peer a: endpoint '2001:db8::1:51820'"),
        ([peer("a", endpoint="198.51.100.1:0")], {}, "port '0' is not 1-65535"),
        ([peer("a", keepalive=-1)], {}, "peer a: keepalive must be null or 0..65535"),
        ([peer("a", keepalive=70000)], {}, "peer a: keepalive must be null or 0..65535"),
        ([peer("a", keepalive="25")], {}, "peer a: keepalive must be null or 0..65535"),
        ([peer("a", keepalive=True)], {}, "peer a: keepalive must be null or 0..65535"),
        ([peer("a", allowed_ips="10.0.0.0/8")], {}, "peer a: allowed_ips must be a list"),
        ([peer("a", allowed_ips=["10.0.0.300/8"])], {}, "peer a: '10.0.0.300/8' is not"),
    ],
)
def test_invalid_input_is_refused_naming_field_and_value(peers, kw, message):
    with pytest.raises(SpecError) as caught:
        want(*peers, **kw)
    assert message in str(caught.value)


def test_an_allowed_ip_given_to_two_peers_is_an_error():
    with pytest.raises(SpecError) as caught:
        want(peer("a", allowed_ips=["10.1.0.0/24"]), peer("b", allowed_ips=["10.1.0.7/24"]))
    assert str(caught.value) == (
        "10.1.0.0/24 is an allowed IP of both a and b; a prefix belongs to exactly one peer"
    )


def test_allowed_ips_are_networks_sorted_without_duplicates():
    wanted = want(peer("a", allowed_ips=["fd00::1/64", "10.1.0.7/24", "10.1.0.0/24", "10.0.0.0/8"]))
    assert wanted.peers[PUBLIC["a"]].allowed_ips == (
        net("10.0.0.0/8"),
        net("10.1.0.0/24"),
        net("fd00::/64"),
    )


def test_in_check_mode_a_peer_without_a_key_is_pending():
    wanted = want(peer("a"), peer("b", public_key=None), check_mode=True)
    assert list(wanted.peers) == [PUBLIC["a"]]
    assert wanted.pending == ("b",)
    changes = wgstate.diff(running({PUBLIC["a"]: live_peer("a")}), wanted)
    assert changes == [PendingPeer("b")]
    assert described(changes) == ["add peer b (its key is not made yet)"]


def test_peer_keys_are_taken_only_in_wg_form():
    hex_key = PRIVATE["a"].public_key().hex  # WireguardKey itself would take hex
    with pytest.raises(SpecError, match="peer a: public_key is not a WireGuard key"):
        want(peer("a", public_key=hex_key))


# --- peers ---------------------------------------------------------------------------------


def test_nothing_to_change_changes_nothing():
    wanted = want(peer("a", endpoint="198.51.100.1:51820", keepalive=25))
    live = running(
        {PUBLIC["a"]: live_peer("a", endpoint=parse_endpoint("198.51.100.1:51820"), keepalive=25)}
    )
    assert wgstate.diff(live, wanted) == []


def test_a_missing_peer_is_added_with_everything_it_has():
    wanted = want(peer("a", endpoint="[2001:db8::1]:51820", keepalive=25))
    changes = wgstate.diff(running(), wanted)
    assert changes == [
        SetPeer(
            PUBLIC["a"],
            "a",
            new=True,
            allowed_ips=(net("10.99.0.1/32"),),
            endpoint=Endpoint("2001:db8::1", 51820),
            keepalive=25,
        )
    ]
    assert described(changes) == [
        f"add peer a ({PUBLIC['a'][:8]}...): allowed-ips 10.99.0.1/32, keepalive 25,"
        " endpoint [2001:db8::1]:51820"
    ]


def test_a_new_peer_without_endpoint_or_keepalive_sets_neither():
    (change,) = wgstate.diff(running(), want(peer("a", allowed_ips=[])))
    assert isinstance(change, SetPeer)
    assert change.endpoint is None and change.keepalive is None and not change.preshared_changed
    assert change.describe().endswith(": allowed-ips (none)")


def test_peers_not_wanted_are_removed_and_matched_by_public_key():
    stranger = str(WireguardKey.generate().public_key())
    live = running({PUBLIC["a"]: live_peer("a"), stranger: PeerState()})
    changes = wgstate.diff(live, want(peer("a")))
    assert changes == [RemovePeer(stranger)]
    assert described(changes) == [f"remove peer {stranger[:8]}..."]


def test_allowed_ips_are_compared_as_networks():
    live = running({PUBLIC["a"]: PeerState(allowed_ips=(net("10.1.0.0/24"),))})
    assert wgstate.diff(live, want(peer("a", allowed_ips=["10.1.0.99/24"]))) == []
    (change,) = wgstate.diff(live, want(peer("a", allowed_ips=["10.1.0.0/25"])))
    assert change == SetPeer(PUBLIC["a"], "a", new=False, allowed_ips=(net("10.1.0.0/25"),))


def test_only_the_keepalive_changes():
    live = running({PUBLIC["a"]: live_peer("a", keepalive=25)})
    (change,) = wgstate.diff(live, want(peer("a", keepalive=None)))
    assert change == SetPeer(PUBLIC["a"], "a", new=False, keepalive=0)
    assert change.describe().endswith(": keepalive off")


def test_a_peer_without_a_wanted_endpoint_keeps_the_learned_one():
    learned = parse_endpoint("203.0.113.7:40123")
    live = running({PUBLIC["a"]: live_peer("a", endpoint=learned)})
    assert wgstate.diff(live, want(peer("a"))) == []
    assert wgstate.expected(live, want(peer("a"))).peers[PUBLIC["a"]].endpoint == learned


@pytest.mark.parametrize("wanted", ["198.51.100.1:51820", "[2001:db8::1]:51820"])
def test_a_wanted_endpoint_replaces_another_running_one(wanted):
    live = running({PUBLIC["a"]: live_peer("a", endpoint=parse_endpoint("203.0.113.7:4"))})
    (change,) = wgstate.diff(live, want(peer("a", endpoint=wanted)))
    assert change == SetPeer(PUBLIC["a"], "a", new=False, endpoint=parse_endpoint(wanted))
    assert change.describe().endswith(f": endpoint {wanted}")


def test_an_endpoint_given_by_name_is_compared_with_what_it_resolves_to():
    names = {
        "relay1.example:51820": [parse_endpoint("198.51.100.1:51820")],
        "gone.example:51820": [],
    }

    def resolve(endpoint: Endpoint) -> list[Endpoint]:
        return names[str(endpoint)]

    on_it = running({PUBLIC["a"]: live_peer("a", endpoint=parse_endpoint("198.51.100.1:51820"))})
    off_it = running({PUBLIC["a"]: live_peer("a", endpoint=parse_endpoint("198.51.100.2:51820"))})
    nowhere = running({PUBLIC["a"]: live_peer("a")})
    by_name = want(peer("a", endpoint="relay1.example:51820"), resolve=resolve)
    assert wgstate.diff(on_it, by_name) == []
    assert wgstate.diff(off_it, by_name) == [
        SetPeer(PUBLIC["a"], "a", new=False, endpoint=parse_endpoint("198.51.100.1:51820"))
    ]
    # A name that does not resolve now keeps what it resolved to before; with nothing
    # before, there is nothing to set.
    gone = want(peer("a", endpoint="gone.example:51820"), resolve=resolve)
    assert wgstate.diff(off_it, gone) == []
    with pytest.raises(SpecError) as caught:
        wgstate.diff(nowhere, gone)
    assert str(caught.value) == (
        "peer a: endpoint gone.example:51820 does not resolve to an address"
    )


# --- the interface -------------------------------------------------------------------------


def test_the_private_key_is_compared_by_its_public_key():
    other = str(WireguardKey.generate().public_key())
    assert wgstate.diff(running(), want()) == []
    changes = wgstate.diff(running(public_key=other), want())
    assert changes == [SetPrivateKey("/etc/wireguard/mesh0.key", other, OWN_PUBLIC)]
    assert described(changes) == [
        f"set the private key from /etc/wireguard/mesh0.key (public key {other} -> {OWN_PUBLIC})"
    ]
    assert described(wgstate.diff(running(public_key=None), want()))[0].endswith(
        f"(public key (none) -> {OWN_PUBLIC})"
    )
    # No key file yet (check mode): nothing to compare with.
    assert wgstate.diff(running(public_key=other), want(own_private=None)) == []


def test_listen_port():
    assert wgstate.diff(running(listen_port=51821), want()) == [SetListenPort(51821, 51820)]


def test_addresses_are_added_and_removed():
    live = running(addresses=(iface("10.99.0.9/24"), iface("10.98.0.9/24")))
    changes = wgstate.diff(live, want(addresses=["10.99.0.9/24", "fd99::9/64"]))
    assert changes == [RemoveAddress(iface("10.98.0.9/24")), AddAddress(iface("fd99::9/64"))]
    # The same address with another prefix length is another address.
    assert wgstate.diff(running(), want(addresses=["10.99.0.9/16"])) == [
        RemoveAddress(iface("10.99.0.9/24")),
        AddAddress(iface("10.99.0.9/16")),
    ]


def test_mtu_is_set_only_when_wanted_and_different():
    assert wgstate.diff(running(mtu=1500), want(mtu=None)) == []
    assert wgstate.diff(running(mtu=1420), want(mtu=1420)) == []
    assert wgstate.diff(running(mtu=1500), want(mtu=1420)) == [SetMtu(1500, 1420)]


# --- preshared keys ------------------------------------------------------------------------


def test_preshared_keys_are_derived_per_pair_and_compared_by_digest():
    wanted = want(peer("a"), preshared_keys=True, preshared_secret=b"s", preshared_dir="/p")
    a = wanted.peers[PUBLIC["a"]]
    expected_key = pair_preshared_key(OWN, WireguardKey(PUBLIC["a"]), b"s")
    assert a.preshared_key == expected_key
    # The other end derives the same key.
    assert pair_preshared_key(PRIVATE["a"], OWN.public_key(), b"s") == expected_key
    assert a.preshared_key_file == "/p/a.psk"
    assert wanted.preshared_files == {"a.psk": f"{expected_key}\n"}

    digest = wgstate.psk_digest(a.preshared_key)
    same = running({PUBLIC["a"]: live_peer("a", preshared_digest=digest)})
    assert wgstate.diff(same, wanted) == []
    (change,) = wgstate.diff(running({PUBLIC["a"]: live_peer("a")}), wanted)
    assert change == SetPeer(
        PUBLIC["a"], "a", new=False, preshared_changed=True, preshared_key=expected_key
    )
    assert change.describe().endswith(": preshared key set")
    # Turned off: removed.
    (change,) = wgstate.diff(same, want(peer("a")))
    assert change == SetPeer(PUBLIC["a"], "a", new=False, preshared_changed=True)
    assert change.describe().endswith(": preshared key removed")


def test_a_zero_preshared_key_is_none():
    assert wgstate.psk_digest(None) is None
    assert wgstate.psk_digest(WireguardKey(bytes(32))) is None
    assert wgstate.psk_digest(WireguardKey(bytes(31) + b"\1"))


def test_preshared_keys_need_file_names_and_a_key():
    with pytest.raises(SpecError, match="peer name 'a b' cannot name a preshared key file"):
        want({**peer("a"), "name": "a b"}, preshared_keys=True, preshared_dir="/p")
    # Without the node's key (check mode, not made yet) there is nothing to derive.
    assert want(peer("a"), own_private=None, preshared_keys=True).preshared_files == {}


def test_preshared_keys_never_show():
    wanted = want(peer("a"), preshared_keys=True, preshared_dir="/p")
    secret = str(wanted.peers[PUBLIC["a"]].preshared_key)
    changes = wgstate.diff(running(), wanted)
    after = wgstate.expected(running(), wanted)
    names = {PUBLIC["a"]: "a"}
    shown = [
        *described(changes),
        *map(repr, changes),
        repr(wanted),
        wgstate.render(after, names),
        repr(after),
    ]
    assert all(secret not in text and OWN.hex not in text for text in shown)
    assert all(str(OWN) not in text for text in shown)


# --- the whole ---------------------------------------------------------------------------


def test_changes_come_in_a_safe_order():
    stranger = str(WireguardKey.generate().public_key())
    live = running(
        {stranger: PeerState(), PUBLIC["b"]: live_peer("b", keepalive=5)},
        public_key=None,
        listen_port=1,
        mtu=1500,
        addresses=(iface("10.98.0.9/24"),),
    )
    wanted = want(peer("c"), peer("b"), peer("a"), mtu=1420)
    kinds = [type(change).__name__ for change in wgstate.diff(live, wanted)]
    assert kinds == [
        "SetPrivateKey",
        "SetListenPort",
        "RemovePeer",
        "SetPeer",  # a
        "SetPeer",  # b
        "SetPeer",  # c
        "SetMtu",
        "RemoveAddress",
        "AddAddress",
    ]
    names = [c.name for c in wgstate.diff(live, wanted) if isinstance(c, SetPeer)]
    assert names == ["a", "b", "c"]


def test_the_expected_state_needs_no_further_change():
    stranger = str(WireguardKey.generate().public_key())
    live = running(
        {
            stranger: PeerState(),
            PUBLIC["a"]: live_peer("a", endpoint=parse_endpoint("203.0.113.7:4"), keepalive=5),
        },
        public_key=None,
        listen_port=1,
        mtu=1500,
    )
    wanted = want(
        peer("a"),
        peer("b", endpoint="[2001:db8::2]:51820", keepalive=25),
        peer("c", allowed_ips=["10.3.0.0/16", "fd03::/48"]),
        mtu=1420,
        addresses=["10.99.0.9/24", "fd99::9/64"],
        preshared_keys=True,
        preshared_dir="/p",
    )
    after = wgstate.expected(live, wanted)
    assert wgstate.diff(after, wanted) == []
    assert after.peers[PUBLIC["a"]].endpoint == parse_endpoint("203.0.113.7:4")  # learned, kept


def test_render_shows_public_state_by_peer_name():
    live = running(
        {PUBLIC["a"]: live_peer("a", endpoint=parse_endpoint("[2001:db8::1]:5"), keepalive=25)}
    )
    assert wgstate.render(live, {PUBLIC["a"]: "a"}, ["b"]) == (
        f"public_key: {OWN_PUBLIC}\n"
        "listen_port: 51820\n"
        "mtu: 1420\n"
        "addresses: 10.99.0.9/24\n"
        f"peer a {PUBLIC['a']}\n"
        "  allowed_ips: 10.99.0.1/32\n"
        "  endpoint: [2001:db8::1]:5\n"
        "  keepalive: 25\n"
        "  preshared_key: (none)\n"
        "peer b (its key is not made yet)\n"
    )
    assert f"peer (not desired) {PUBLIC['a']}" in wgstate.render(live, {})


def test_a_punch_peers_endpoint_is_set_only_when_the_peer_is_new() -> None:
    from meshwright.site import wgstate as ws
    from meshwright.wire.endpoint import parse_endpoint

    key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
    relay = {"name": "b", "public_key": key, "endpoint": "198.51.100.10:40001", "mode": "punch"}
    (wanted,) = ws._peers([relay], None, None).values()
    assert wanted.endpoint_initial_only
    assert ws._endpoint_change(wanted, None) == parse_endpoint("198.51.100.10:40001")
    # The sidecar moved it to a direct path: a run leaves it there.
    assert ws._endpoint_change(wanted, parse_endpoint("203.0.113.22:51820")) is None
    plain = {**relay, "mode": "relay"}
    (wanted,) = ws._peers([plain], None, None).values()
    assert ws._endpoint_change(wanted, parse_endpoint("203.0.113.22:51820")) == parse_endpoint(
        "198.51.100.10:40001"
    )


def test_a_peer_on_one_of_its_fallback_endpoints_stays_there() -> None:
    """After a relay failover the sidecar has the pair on its standby relay (or a UDP-blocked
    site's WireGuard roamed to its carrier's socket for that relay): a run leaves it there,
    and moves only a peer that is somewhere the plan does not know."""
    from meshwright.site import wgstate as ws
    from meshwright.wire.endpoint import parse_endpoint

    key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
    peer = {
        "name": "b",
        "public_key": key,
        "endpoint": "198.51.100.10:40001",
        "mode": "relay",
        "fallback_endpoints": ["203.0.113.30:40001"],
    }
    (wanted,) = ws._peers([peer], None, None).values()
    assert ws._endpoint_change(wanted, parse_endpoint("203.0.113.30:40001")) is None
    assert ws._endpoint_change(wanted, parse_endpoint("198.51.100.10:40001")) is None
    assert ws._endpoint_change(wanted, parse_endpoint("203.0.113.22:51820")) == parse_endpoint(
        "198.51.100.10:40001"
    )
    assert ws._endpoint_change(wanted, None) == parse_endpoint("198.51.100.10:40001")
    for bad in ("203.0.113.30", ["not an endpoint"]):
        with pytest.raises(ws.SpecError, match="peer b"):
            ws._peers([{**peer, "fallback_endpoints": bad}], None, None)
