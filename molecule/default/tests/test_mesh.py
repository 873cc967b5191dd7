"""Verify the converged mesh on the lab: reachability, direct paths, transit paths, secrets."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from mesh_lab import (
    CONNECTED,
    EPHEMERAL,
    INVENTORY,
    PLAN,
    PROJECT,
    SITES,
    host,
    lan_address,
    site_run,
)

from meshwright.site import keys as wgkeys


def test_every_lan_host_reaches_every_other_sites_lan_host():
    failures = []
    for src in CONNECTED:
        targets = [lan_address(dst) for dst in CONNECTED if dst != src]
        # All of one host's pings at once: the run stays short, each is still a real ping.
        script = " ".join(
            f"(ping -c 3 -i 0.3 -W 2 -q {t} >/dev/null 2>&1 && echo ok {t} || echo FAIL {t}) &"
            for t in targets
        )
        out = host(f"{src}-lan1").check_output(f"{script} wait")
        failures += [
            f"{src}-lan1 -> {line.split()[1]}" for line in out.splitlines() if "FAIL" in line
        ]
    assert failures == []


def test_every_site_is_planned_reachable():
    assert PLAN["unreachable"] == {}


DIRECT = [p for p in PLAN["pairs"] if p["mode"] == "direct"]
PUNCH = [p for p in PLAN["pairs"] if p["mode"] == "punch"]
RELAYED = [p for p in PLAN["pairs"] if p["mode"] in ("relay", "relay-tcp")]


def test_plan_has_direct_punch_and_relayed_pairs():
    assert DIRECT and PUNCH and RELAYED, PLAN["pairs"]


@pytest.mark.parametrize("pair", DIRECT, ids=[f"{p['a']}-{p['b']}" for p in DIRECT])
def test_direct_pairs_hold_each_others_public_address(pair):
    a, b = pair["a"], pair["b"]
    for me, other in ((a, b), (b, a)):
        endpoints = host(me).check_output("wg show mesh0 endpoints")
        key = next(p["public_key"] for p in PLAN["sites"][me]["peers"] if p["name"] == other)
        line = next(line for line in endpoints.splitlines() if line.startswith(key))
        public = INVENTORY["mesh_sites"]["hosts"][other]["lab_public_address"]
        assert line.split()[1].rsplit(":", 1)[0] == public, (me, other, line)


def test_a_direct_pair_keeps_working_with_every_other_site_down():
    pair = next(p for p in DIRECT if {p["a"], p["b"]} == {"public", "easy1"})
    others = [s for s in CONNECTED if s not in (pair["a"], pair["b"])]
    try:
        for site in others:
            host(site).check_output("systemctl stop wg-quick@mesh0")
        out = host("easy1-lan1").check_output(
            f"ping -c 5 -i 0.3 -W 2 {lan_address('public')} | tail -2"
        )
        assert " 0% packet loss" in out, out
    finally:
        for site in others:
            host(site).run("systemctl start wg-quick@mesh0")


def private_keys() -> dict[str, str]:
    return {s: host(s).check_output("cat /etc/wireguard/mesh0.key").strip() for s in SITES}


def preshared_keys(site: str) -> dict[str, str]:
    """The running preshared key of each of a site's peers, by peer name."""
    names = {p["public_key"]: p["name"] for p in PLAN["sites"][site]["peers"]}
    rows = host(site).check_output("wg show mesh0 preshared-keys").splitlines()
    return {names[key]: psk for key, psk in (row.split("\t") for row in rows)}


def fingerprint(secret: str) -> str:
    """What a failed assertion may show of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def test_both_ends_of_every_pair_hold_the_same_derived_preshared_key():
    private = {s: wgkeys.parse_key(k) for s, k in private_keys().items()}
    secret = b"molecule-test-mesh-secret"
    running = {s: preshared_keys(s) for s in CONNECTED}
    wrong = []
    for a, b in itertools.combinations(CONNECTED, 2):
        if b not in running[a]:
            continue  # not peers: their traffic goes via another site
        expected = str(wgkeys.pair_preshared_key(private[a], private[b].public_key(), secret))
        for me, other in ((a, b), (b, a)):
            if running[me][other] != expected:
                wrong.append(f"{me} -> {other}: {fingerprint(running[me][other])}")
    assert sum(len(peers) for peers in running.values()) > 0
    assert wrong == []


def test_no_private_or_preshared_key_on_the_controller():
    secrets = {f"{s} private key": k for s, k in private_keys().items()}
    for site in CONNECTED:
        secrets.update(
            {f"{site}-{peer} preshared key": k for peer, k in preshared_keys(site).items()}
        )
    assert all(len(k) == 44 for k in secrets.values())
    roots = [EPHEMERAL, PROJECT / "inventory"]
    leaked = []
    for path in itertools.chain.from_iterable(r.rglob("*") for r in roots):
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            leaked += [f"{what} in {path}" for what, key in secrets.items() if key in text]
    assert leaked == []


def test_a_limited_run_keeps_every_other_sites_peers():
    """--limit easy1: the plan still covers every site (keys and NAT facts of the others come
    from .meshwright/state.json), so easy1 keeps all its peers and nothing changes anywhere."""
    before = {s: sorted(host(s).check_output("wg show mesh0 peers").split()) for s in SITES}
    recap = site_run("easy1")
    assert "easy1" in recap, recap
    assert "changed=0 " in recap["easy1"] and "failed=0 " in recap["easy1"], recap
    assert {s: sorted(host(s).check_output("wg show mesh0 peers").split()) for s in SITES} == before
    state = json.loads((EPHEMERAL / "inventory/.meshwright/state.json").read_text())
    assert sorted(state["sites"]) == SITES
