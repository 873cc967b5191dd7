"""Each NAT kind behaves as RFC 4787 names it, measured from the lab's own hosts.

Probes go from one UDP socket to two public echo endpoints (relay1 and relay2); the third
public address (relay1's second) then sends an unsolicited datagram to the mapping.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

ECHO_A = "198.51.100.10:7"  # relay1
ECHO_B = "203.0.113.10:7"  # relay2
THIRD = "198.51.100.11:7"  # relay1's second address: a host the site never sent to

# site -> (same mapped port towards both endpoints, unsolicited datagram passes)
EXPECTED = {
    "public": (True, True),
    "easy1": (True, False),
    "easy2": (True, False),
    "hard1": (False, False),
    "hard2": (False, False),
    "cone": (True, True),
    "cgn": (True, False),
}
UDP_SITES = sorted(EXPECTED)


@pytest.fixture(scope="module")
def probes(lab):
    """One probe per UDP site's gateway, run side by side (they are independent)."""

    def probe(site: str) -> dict:
        return lab.labtool(
            site, "probe", "--sport", "40001", "--to", ECHO_A, "--to", ECHO_B, "--third", THIRD
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(UDP_SITES, pool.map(probe, UDP_SITES), strict=True))


@pytest.mark.lab
@pytest.mark.parametrize("site", UDP_SITES)
def test_mapping_behaviour(lab, probes, site):
    same_port, _ = EXPECTED[site]
    result = probes[site]
    mapped = [m["mapped"] for m in result["mappings"]]
    assert all(mapped), f"{site}: an echo endpoint did not answer: {result}"
    ips = {m.rsplit(":", 1)[0] for m in mapped}
    ports = {m.rsplit(":", 1)[1] for m in mapped}
    assert ips == {lab.lab.host(site).public_address}, f"{site}: mapped from {ips}"
    if same_port:
        assert len(ports) == 1, f"{site}: endpoint-independent mapping expected, got {mapped}"
    else:
        assert len(ports) == 2, f"{site}: endpoint-dependent mapping expected, got {mapped}"


@pytest.mark.lab
@pytest.mark.parametrize("site", UDP_SITES)
def test_filtering_behaviour(probes, site):
    _, passes = EXPECTED[site]
    assert probes[site]["unsolicited"] is passes, f"{site}: {probes[site]}"


@pytest.mark.lab
def test_udp_blocked_drops_udp_and_passes_tcp_443(lab):
    result = lab.labtool(
        "blocked", "probe", "--sport", "40002", "--to", ECHO_A, "--to", ECHO_B, "--tries", "2"
    )
    assert [m["mapped"] for m in result["mappings"]] == [None, None], result
    # A TCP listener on 443 for this test only (the relay's own service comes later).
    lab.sh(
        "relay1",
        "systemd-run --quiet --unit=mw-echo443 python3 "
        f"{'/usr/local/lib/meshwright/labtool.py'} echo --udp-port 17443 --tcp-port 443 "
        "--address 198.51.100.10",
    )
    try:
        for _ in range(20):
            tcp443 = lab.labtool("blocked", "tcp", "--to", "198.51.100.10:443")
            if tcp443["connected"]:
                break
        assert tcp443 == {"connected": True, "seen_as": tcp443["seen_as"]}
        assert tcp443["seen_as"].startswith("198.51.100.25:"), tcp443
        tcp7 = lab.labtool("blocked", "tcp", "--to", "198.51.100.10:7", "--timeout", "1.5")
        assert tcp7["connected"] is False, "TCP to a port other than 80/443 must be dropped"
    finally:
        lab.sh("relay1", "systemctl stop mw-echo443", check=False)


@pytest.mark.lab
@pytest.mark.parametrize("site", [*UDP_SITES, "blocked"])
def test_lan_host_reaches_internet_only_through_its_own_nat(lab, site):
    lan_host = f"{site}-lan1"
    public = lab.lab.host(site).public_address
    if site == "blocked":
        seen = lab.labtool(lan_host, "tcp", "--to", "203.0.113.10:7")
        assert seen["connected"] is False  # only 80/443 leave a udp-blocked network
    else:
        result = lab.labtool(lan_host, "probe", "--sport", "40003", "--to", ECHO_B)
        mapped = result["mappings"][0]["mapped"]
        assert mapped and mapped.split(":")[0] == public, f"{lan_host} seen as {mapped}"
    # Its only way out is its LAN; its default route is its own gateway.
    links = lab.sh(lan_host, "ip -o -4 addr show | awk '{print $2}' | sort -u").split()
    assert links == ["lan", "lo"]
    route = lab.sh(lan_host, "ip route show default").split()
    assert route[:3] == ["default", "via", str(lab.topology.site(site).lan.network_address + 1)]


@pytest.mark.lab
def test_lans_are_not_routed_across_the_internet(lab):
    # Before the mesh exists, one site's LAN cannot reach another's: private space is
    # not routed on the lab's internet.
    out = lab.sh(
        "easy1-lan1", "ping -c 2 -W 1 10.10.3.10 >/dev/null && echo reached || echo no", check=False
    )
    assert out.strip() == "no"


@pytest.mark.lab
def test_wan_links_add_their_latency(lab):
    # easy1's NAT and relay2 each add 10 ± 2 ms one way: a round trip takes at least 16 ms.
    out = lab.sh("easy1", "ping -c 5 -i 0.2 -q 203.0.113.10 | tail -1")
    rtt_min = float(out.split("=")[1].split("/")[0])
    assert rtt_min >= 16, out


@pytest.mark.lab
def test_status_reports_every_host(lab):
    from meshwright.lab.runner import status

    rows = {row["name"]: row for row in status(lab.lab.name)}
    assert set(rows) == {h.name for h in lab.lab.hosts}
    assert rows["relay1"]["addresses"] == {
        "mwtest-internet": ["198.51.100.10/24", "198.51.100.11/24"]
    }
    assert rows["cgn-nat"]["role"] == "router" and rows["cgn-nat"]["nat"] == "cgnat"
    assert rows["hard1-lan1"]["site"] == "hard1"
    assert all(row["state"] == "running" for row in rows.values())
