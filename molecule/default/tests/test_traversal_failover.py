"""Relay failover on the lab: when the relay of a relayed pair dies, the traversal sidecars move
the pair to its standby allocation on the other relay within 10 s, with no plan and no Ansible
run; nothing moves back when the relay returns; with both relays dead, every direct pair still
answers. The same holds for a TLS-relayed pair on that relay: its UDP side's sidecar moves it,
and the UDP-blocked side's WireGuard follows through its TLS carrier's socket for the standby.

A relay dies in one of two ways: it vanishes (every packet in and out of it dropped by an
nftables table at the first hook priorities), or only its forwarding service stops while its
WireGuard and WG-STUN go on (WG-STUN then stops answering: the sidecars' sign of life is the
forwarding service's). Runs after test_traversal (file order): it leaves pairs on their standby
relays, and its teardown brings the relays back and restarts the sidecars, which put every pair
back on its plan's relay.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
from collections.abc import Iterable, Iterator

import pytest
from mesh_lab import INVENTORY, PLAN, endpoint_of, host, lan_address, relay_counters, site_run
from test_relay import direct_pairs_losing_pings

HARD = ("hard1", "hard2")
NAME = "--".join(HARD)
PREFERRED = next(a for a in PLAN["allocations"] if (a["a"], a["b"]) == HARD)
STANDBY = next(a for a in PLAN.get("standby_allocations", []) if (a["a"], a["b"]) == HARD)
RELAYS = sorted(INVENTORY["mesh_relays"]["hosts"])
SIDECAR_SITES = sorted({p for a in PLAN["allocations"] for p in (a["a"], a["b"])})
DEAD = "mwdead"
# A pair of the UDP-blocked site that the same relay carries, and its UDP side.
TLS = next(
    (
        a
        for a in PLAN["allocations"]
        if a["kind"] == "relay-tcp" and a["relay"] == PREFERRED["relay"]
    ),
    None,
)


def endpoint(allocation: dict, site: str) -> str:
    return f"{allocation['address']}:{allocation['ports'][HARD.index(site)]}"


def kill(relay: str) -> None:
    host(relay).check_output(
        f"nft 'add table inet {DEAD}; "
        f"add chain inet {DEAD} in {{ type filter hook prerouting priority -500; policy drop; }}; "
        f"add chain inet {DEAD} out {{ type filter hook output priority -500; policy drop; }}'"
    )


def revive(relay: str) -> None:
    host(relay).run(f"nft delete table inet {DEAD}")


def stop_forwarding(relay: str) -> None:
    host(relay).check_output("systemctl stop meshwright-relay")


def start_forwarding(relay: str) -> None:
    host(relay).check_output("systemctl start meshwright-relay")


DEATHS = {"vanished": (kill, revive), "forwarding stopped": (stop_forwarding, start_forwarding)}


def pair_on(allocation: dict) -> bool:
    return all(endpoint_of(s, o) == endpoint(allocation, s) for s, o in (HARD, HARD[::-1]))


def tls_sides() -> tuple[str, str]:
    assert TLS is not None, "the lab plan has no relay-tcp pair on the hard pair's relay"
    udp = TLS["b"] if TLS["a"] == "blocked" else TLS["a"]
    return "blocked", udp


def tls_pair_on(relay: str) -> bool:
    """Both sides of the TLS pair on ``relay``: the UDP side at the relay's address and its own
    port, the blocked side at its TLS carrier's socket for the relay."""
    blocked, udp = tls_sides()
    allocation = next(
        a
        for a in (*PLAN["allocations"], *PLAN.get("standby_allocations", []))
        if {a["a"], a["b"]} == {blocked, udp} and a["relay"] == relay
    )
    udp_end = f"{allocation['address']}:{allocation['ports'][[TLS['a'], TLS['b']].index(udp)]}"
    return endpoint_of(udp, blocked) == udp_end and endpoint_of(blocked, udp) == (
        f"127.0.0.1:{carrier_port(blocked, relay)}"
    )


@functools.cache
def carrier_port(site: str, relay: str) -> int:
    """The UDP-blocked site's carrier socket for ``relay`` (its sidecar's configuration, which
    only Ansible writes)."""
    carrier = json.loads(host(site).check_output("cat /etc/meshwright/sidecar.json"))
    return int(carrier["relays"][relay]["local_port"])


def on_the_plans_relays() -> bool:
    return pair_on(PREFERRED) and tls_pair_on(PREFERRED["relay"])


def back_on_the_plans_relays(sites: Iterable[str]) -> None:
    """A restarted sidecar puts every relayed pair back on its plan's relay (a new session
    there); a UDP-blocked site's WireGuard follows its peers."""
    for site in sites:
        host(site).run("systemctl restart meshwright-sidecar")
    deadline = time.monotonic() + 60
    while not on_the_plans_relays():
        assert time.monotonic() < deadline, "the pairs are not back on their plan's relay"
        time.sleep(1)


@pytest.fixture
def relays_come_back() -> Iterator[None]:
    # test_traversal stops the forwarding of both relays and starts them again one after the
    # other: meanwhile the pairs of the later one move to the earlier one, as they should.
    if not on_the_plans_relays():
        back_on_the_plans_relays((*HARD, tls_sides()[1]))
    yield
    for relay in RELAYS:
        revive(relay)
        start_forwarding(relay)
    back_on_the_plans_relays(SIDECAR_SITES)


def longest_gap(output: str) -> float:
    """The longest time between two answered pings of `ping -D` output (seconds)."""
    times = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.M)]
    assert len(times) >= 2, output
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.usefixtures("relays_come_back")
@pytest.mark.parametrize("death", sorted(DEATHS))
def test_a_relayed_pair_moves_to_its_standby_relay_within_10_s_and_stays(death):
    die, come_back = DEATHS[death]
    assert PREFERRED["relay"] != STANDBY["relay"]
    assert on_the_plans_relays()
    blocked, udp = tls_sides()
    before = relay_counters(STANDBY["relay"]).get(NAME, {}).get("forwarded", 0)
    # 10 pings a second for 40 s over each pair, timestamped: the longest gap between answers
    # is the outage.
    senders = {"hard": (host("hard1-lan1"), "hard2"), "tls": (host(f"{blocked}-lan1"), udp)}
    for sender, target in senders.values():
        sender.check_output(
            f"systemd-run --quiet --unit=mw-failover-ping sh -c 'ping -D -n -i 0.1 -c 400 -W 1"
            f" {lan_address(target)} > /tmp/mw-failover-ping.txt'"
        )
    outputs = {}
    try:
        time.sleep(3)
        die(PREFERRED["relay"])
        deadline = time.monotonic() + 20
        while not (pair_on(STANDBY) and tls_pair_on(STANDBY["relay"])):
            assert time.monotonic() < deadline, "the sidecars did not move the pairs"
            time.sleep(0.5)
        moved = time.monotonic()
        assert direct_pairs_losing_pings() == []  # no direct pair noticed
        time.sleep(max(0.0, 10 - (time.monotonic() - moved)))
        come_back(PREFERRED["relay"])  # it returns: nothing moves back
        for _ in range(10):
            time.sleep(1)
            assert pair_on(STANDBY), "the pair moved again when its relay returned"
            assert tls_pair_on(STANDBY["relay"]), "the TLS pair moved again"
        for name, (sender, _) in senders.items():
            while sender.run("systemctl is-active mw-failover-ping").stdout.strip() == "active":
                time.sleep(1)
            outputs[name] = sender.check_output("cat /tmp/mw-failover-ping.txt")
    finally:
        for sender, _ in senders.values():
            sender.run("systemctl stop mw-failover-ping")
    for name, output in outputs.items():
        gap = longest_gap(output)
        print(f"relay failover ({death}, {name} pair): longest gap between answers {gap:.2f} s")
        assert gap < 10, output[-2000:]
    # Judged from where the packets went: through the standby relay.
    after = relay_counters(STANDBY["relay"]).get(NAME, {}).get("forwarded", 0)
    assert after - before >= 200, (before, after)


@pytest.mark.usefixtures("relays_come_back")
def test_a_site_run_after_a_failover_changes_nothing_and_leaves_the_pair_on_its_standby():
    """The plan still names the relay that died; a run of site.yml after the failover (the
    relay back) must not put the pair back on it: WireGuard's live endpoint is the sidecar's
    to choose between the plan's relay and its standby (docs/sidecar.md), and a run that
    changes nothing touches no live tunnel."""
    kill(PREFERRED["relay"])
    deadline = time.monotonic() + 20
    while not pair_on(STANDBY):
        assert time.monotonic() < deadline, "the sidecars did not move the pair"
        time.sleep(0.5)
    revive(PREFERRED["relay"])
    recap = site_run(",".join((*HARD, PREFERRED["relay"])))
    for name in (*HARD, PREFERRED["relay"]):
        assert "changed=0 " in recap.get(name, "") and "failed=0 " in recap[name], recap
    assert pair_on(STANDBY), "the run moved the pair back to the relay it had left"
    sender = host(f"{HARD[0]}-lan1")
    out = sender.run(f"ping -c 5 -i 0.2 -W 1 -q {lan_address(HARD[1])}").stdout
    assert " 0% packet loss" in out, out


@pytest.mark.usefixtures("relays_come_back")
def test_with_both_relays_dead_every_direct_pair_answers():
    for relay in RELAYS:
        kill(relay)
    time.sleep(6)  # the sidecars have found both down: nothing better to go to
    assert direct_pairs_losing_pings() == []
