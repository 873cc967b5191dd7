"""Relay failover on the lab: when the relay of a relayed pair dies, the traversal sidecars move
the pair to its standby allocation on the other relay within 10 s, with no plan and no Ansible
run; nothing moves back when the relay returns; with both relays dead, every direct pair still
answers.

A relay "dies" by dropping every packet in and out of it (an nftables table at the first hook
priorities): to the sites it is a host that vanished. Runs after test_traversal (file order):
it leaves pairs on their standby relays, and its teardown brings the relays back and restarts
the sidecars, which put every pair back on its plan's relay.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator

import pytest
from mesh_lab import INVENTORY, PLAN, endpoint_of, host, lan_address, relay_counters
from test_relay import direct_pairs_losing_pings

HARD = ("hard1", "hard2")
NAME = "--".join(HARD)
PREFERRED = next(a for a in PLAN["allocations"] if (a["a"], a["b"]) == HARD)
STANDBY = next(a for a in PLAN.get("standby_allocations", []) if (a["a"], a["b"]) == HARD)
RELAYS = sorted(INVENTORY["mesh_relays"]["hosts"])
SIDECAR_SITES = sorted({p for a in PLAN["allocations"] for p in (a["a"], a["b"])})
DEAD = "mwdead"


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


def pair_on(allocation: dict) -> bool:
    return all(endpoint_of(s, o) == endpoint(allocation, s) for s, o in (HARD, HARD[::-1]))


@pytest.fixture
def relays_come_back() -> Iterator[None]:
    yield
    for relay in RELAYS:
        revive(relay)
    # A restarted sidecar puts every pair back on its plan's relay (a new session there).
    for site in SIDECAR_SITES:
        host(site).run("systemctl restart meshwright-sidecar")
    deadline = time.monotonic() + 60
    while not pair_on(PREFERRED):
        assert time.monotonic() < deadline, "the hard pair is not back on its plan's relay"
        time.sleep(1)


def longest_gap(output: str) -> float:
    """The longest time between two answered pings of `ping -D` output (seconds)."""
    times = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.M)]
    assert len(times) >= 2, output
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.usefixtures("relays_come_back")
def test_a_relayed_pair_moves_to_its_standby_relay_within_10_s_and_stays():
    assert PREFERRED["relay"] != STANDBY["relay"]
    assert pair_on(PREFERRED)
    before = relay_counters(STANDBY["relay"]).get(NAME, {}).get("forwarded", 0)
    sender = host("hard1-lan1")
    # 10 pings a second for 40 s, timestamped: the longest gap between answers is the outage.
    sender.check_output(
        "systemd-run --quiet --unit=mw-failover-ping sh -c "
        f"'ping -D -n -i 0.1 -c 400 -W 1 {lan_address('hard2')} > /tmp/mw-failover-ping.txt'"
    )
    try:
        time.sleep(3)
        kill(PREFERRED["relay"])
        deadline = time.monotonic() + 20
        while not pair_on(STANDBY):
            assert time.monotonic() < deadline, "the sidecars did not move the pair"
            time.sleep(0.5)
        time.sleep(10)
        revive(PREFERRED["relay"])  # it returns: nothing moves back
        for _ in range(10):
            time.sleep(1)
            assert pair_on(STANDBY), "the pair moved again when its relay returned"
        while sender.run("systemctl is-active mw-failover-ping").stdout.strip() == "active":
            time.sleep(1)
        output = sender.check_output("cat /tmp/mw-failover-ping.txt")
    finally:
        sender.run("systemctl stop mw-failover-ping")
    gap = longest_gap(output)
    print(f"relay failover: longest gap between answered pings {gap:.2f} s")
    assert gap < 10, output[-2000:]
    # Judged from where the packets went: through the standby relay.
    after = relay_counters(STANDBY["relay"]).get(NAME, {}).get("forwarded", 0)
    assert after - before >= 200, (before, after)


@pytest.mark.usefixtures("relays_come_back")
def test_with_both_relays_dead_every_direct_pair_answers():
    for relay in RELAYS:
        kill(relay)
    time.sleep(6)  # the sidecars have found both down: nothing better to go to
    assert direct_pairs_losing_pings() == []
