"""Verify the UDP relay on the lab: hard1<->hard2 goes through its relay (each site on its own
port, the same for all its relayed peers), which reads nothing, drops and counts what does not
belong, survives its own restart, and disturbs no direct pair."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from mesh_lab import (
    PLAN,
    PROJECT,
    SITES,
    endpoint_of,
    host,
    lan_address,
    pair,
    ping_loss,
    public_addresses,
    relay_counters,
)

from meshwright.relay.messages import MAPPING_KEEPALIVE

HARD = ("hard1", "hard2")
ALLOCATION = next(a for a in PLAN.get("allocations", []) if (a["a"], a["b"]) == HARD)
RELAY = ALLOCATION["relay"]
PORTS = dict(zip(HARD, ALLOCATION["ports"], strict=True))
CAPTURE = "/tmp/mw-hard-pair.pcap"


def relay_state() -> dict:
    """The hard pair on its relay: what was forwarded between the two sites, what the relay
    dropped of what arrived on their ports (by reason), and their confirmed addresses."""
    state = json.loads(host(RELAY).check_output("cat /var/lib/meshwright-relay/state.json"))
    counters = {"forwarded": 0, **state.get("pairs", {}).get("hard1--hard2", {})}
    for site in HARD:
        for key, value in state["sites"][site]["counters"].items():
            if key.startswith("dropped_"):
                counters[key] = counters.get(key, 0) + value
    return {"counters": counters, "confirmed": [state["sites"][s].get("confirmed") for s in HARD]}


def udp_packets(pcap: bytes) -> list[tuple[bytes, bytes]]:
    """(IPv4 header, UDP header and payload) of the UDP packets of a classic pcap file of
    Ethernet or Linux-cooked IPv4 frames."""
    link = int.from_bytes(pcap[20:24], "little")
    offset, packets = 24, []
    header = {1: 14, 113: 16, 276: 20}[link]
    while offset + 16 <= len(pcap):
        length = int.from_bytes(pcap[offset + 8 : offset + 12], "little")
        frame = pcap[offset + 16 : offset + 16 + length]
        offset += 16 + length
        ip = frame[header:]
        if len(ip) >= 28 and ip[9] == 17:
            ihl = (ip[0] & 15) * 4
            packets.append((ip[:ihl], ip[ihl:]))
    return packets


def udp_payloads(pcap: bytes) -> list[tuple[int, bytes]]:
    """(destination port, UDP payload) of a classic pcap file of Ethernet or Linux-cooked
    IPv4 frames."""
    return [(int.from_bytes(udp[2:4], "big"), udp[8:]) for _, udp in udp_packets(pcap)]


@pytest.fixture(scope="module", autouse=True)
def capture_on_the_relay():
    """tcpdump on the relay, on the pair's two ports, for the whole module."""
    ports = " or ".join(f"udp port {p}" for p in PORTS.values())
    relay = host(RELAY)
    relay.run(f"rm -f {CAPTURE}")
    relay.check_output(
        f"systemd-run --quiet --unit=mw-capture tcpdump -i any -U -s 0 -w {CAPTURE} '{ports}'"
    )
    time.sleep(1)
    yield
    relay.run("systemctl stop mw-capture")


def test_the_hard_pair_is_relayed():
    assert pair(*HARD)["mode"] == "relay"
    assert ALLOCATION["address"] in public_addresses(RELAY)
    for me, other in (HARD, HARD[::-1]):
        assert endpoint_of(me, other) == f"{ALLOCATION['address']}:{PORTS[me]}", me


def test_hard_lan_hosts_reach_each_other_through_the_relay():
    before = relay_state()["counters"]["forwarded"]
    assert ping_loss("hard1-lan1", lan_address("hard2"), count=10) == 0
    assert relay_state_after(lambda s: s["counters"]["forwarded"] >= before + 20)


def relay_state_after(predicate, seconds: float = 5.0) -> bool:
    """The relay writes its state once a second: wait for it to show what is expected."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate(relay_state()):
            return True
        time.sleep(0.5)
    return False


def test_the_relay_sees_only_wireguard_messages():
    # A pattern in the pings' payload: it must never appear in clear on the relay.
    host("hard1-lan1").run(f"ping -c 5 -i 0.2 -W 2 -p 6d657368777269676874 {lan_address('hard2')}")
    time.sleep(1.5)
    raw = base64.b64decode(host(RELAY).check_output(f"base64 -w0 {CAPTURE}"))
    captured = udp_payloads(raw)
    # The sidecars' mapping keepalives (4 bytes, the probe magic) come in on the sites' ports
    # and are never sent on; everything else is WireGuard's.
    keepalives = [(port, p) for port, p in captured if p == MAPPING_KEEPALIVE]
    assert all(port in PORTS.values() for port, _ in keepalives), keepalives
    payloads = [payload for _, payload in captured if payload != MAPPING_KEEPALIVE]
    assert len(payloads) >= 10
    for payload in payloads:
        assert payload[0] in (1, 2, 3, 4) and payload[1:4] == b"\0\0\0", payload[:8].hex()
        size = {1: 148, 2: 92, 3: 64}.get(payload[0])
        assert size is None or len(payload) == size
        assert payload[0] != 4 or len(payload) >= 32
    assert b"meshwright" not in raw  # the ping pattern
    inner = [bytes(map(int, lan_address(s).split("."))) for s in HARD]
    assert not any(address in p for p in payloads for address in inner)  # no inner IP header


def kernel_routes() -> str:
    return host(RELAY).run("nft list map ip meshwright_forward arrive").stdout


def test_confirmed_sessions_go_through_the_kernel_and_are_still_counted():
    # The relay service handed the pair's transport data to the kernel (meshwright.relay.kernel):
    # a route each way (a handshake takes them back to the code for a moment: wait for them).
    wanted = [f"{port} : jump a{port}" for port in PORTS.values()]
    deadline = time.monotonic() + 20
    while not all(route in kernel_routes() for route in wanted):
        assert time.monotonic() < deadline, kernel_routes()
        time.sleep(0.5)
    before = relay_state()["counters"]
    assert ping_loss("hard1-lan1", lan_address("hard2"), count=20) == 0
    # What the kernel forwarded is counted, as forwarded too.
    assert relay_state_after(
        lambda s: (
            s["counters"].get("kernel_forwarded", 0) >= before.get("kernel_forwarded", 0) + 40
            and s["counters"]["forwarded"] >= before["forwarded"] + 40
        )
    )
    # The relay routes nothing else.
    chain = host(RELAY).check_output("nft list chain inet meshwright_relay forward")
    assert "policy drop;" in chain and "0x4d570000" in chain, chain


def _send_from(sender: str, payloads: list[bytes], port: int) -> None:
    script = (
        "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"[s.sendto(bytes.fromhex(h),('{ALLOCATION['address']}',{port})) for h in sys.argv[1:]]"
    )
    host(sender).check_output("python3 -c " + f'"{script}" ' + " ".join(p.hex() for p in payloads))


def test_garbage_bad_mac1_and_a_replayed_handshake_are_dropped_and_move_nothing():
    port, initiation = _captured_initiation()
    forged = bytearray(initiation)
    forged[120] ^= 1  # inside mac1
    garbage = [os.urandom(n) for n in (1, 40, 148, 92, 300)]
    before = relay_state()
    for sender in ("public", "easy2"):  # other addresses than the handshake's own
        # The replay goes where it was captured: its mac1 is for the other side's key.
        _send_from(sender, [*garbage, bytes(forged), initiation], port)
    assert relay_state_after(
        lambda s: (
            sum(v for k, v in s["counters"].items() if k.startswith("dropped_"))
            >= sum(v for k, v in before["counters"].items() if k.startswith("dropped_")) + 14
        )
    )
    after = relay_state()
    assert after["confirmed"] == before["confirmed"]
    assert after["counters"].get("dropped_bad_mac1", 0) > before["counters"].get(
        "dropped_bad_mac1", 0
    )
    assert (
        after["counters"].get("dropped_replay", 0)
        >= before["counters"].get("dropped_replay", 0) + 2
    )
    assert ping_loss("hard1-lan1", lan_address("hard2")) == 0


def _captured_initiation(seconds: float = 150.0) -> tuple[int, bytes]:
    """A real handshake initiation from hard1 or hard2, from the relay's capture (WireGuard
    rekeys every two minutes, so one comes within that)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        raw = base64.b64decode(host(RELAY).check_output(f"base64 -w0 {CAPTURE}"))
        for port, payload in udp_payloads(raw):
            if payload[0] == 1 and len(payload) == 148 and port in PORTS.values():
                return port, payload
        time.sleep(3)
    raise AssertionError(f"no handshake initiation on the relay in {seconds:.0f} s")


def test_the_udp_blocked_site_reaches_its_peers_through_its_sidecar_and_tls():
    tcp = [a for a in PLAN["allocations"] if a["kind"] == "relay-tcp"]
    assert tcp and all("blocked" in (a["a"], a["b"]) for a in tcp)
    # WireGuard's endpoint for each of them is the sidecar's socket for the pair's relay, one
    # socket per relay, shared by every peer relayed through it.
    by_relay: dict[str, set[str]] = {}
    for allocation in tcp:
        other = allocation["b"] if allocation["a"] == "blocked" else allocation["a"]
        endpoint = endpoint_of("blocked", other) or ""
        assert endpoint.startswith("127.0.0.1:"), (other, endpoint)
        by_relay.setdefault(allocation["relay"], set()).add(endpoint)
    assert all(len(endpoints) == 1 for endpoints in by_relay.values()), by_relay
    assert len({e for endpoints in by_relay.values() for e in endpoints}) == len(by_relay)
    assert host("blocked").service("meshwright-sidecar").is_running
    # blocked -> relay over TLS, relay -> hard2 over UDP: the two relay kinds meet.
    assert ping_loss("blocked-lan1", lan_address("hard2")) == 0


# Full-size packets (docs/relays.md, "MTU and full-size packets"): the interface MTU the roles
# set, the largest ICMP echo payload that fills it (20 bytes of IPv4, 8 of ICMP), and the
# WireGuard transport message that carries it (16-byte header, the packet, 16-byte tag).
WIREGUARD_DEFAULTS = PROJECT / "roles/wireguard/defaults/main.yml"
MTU = int(yaml.safe_load(WIREGUARD_DEFAULTS.read_text())["wireguard_mtu"])
FULL = MTU - 28
DATAGRAM = MTU + 32
FULL_PINGS = 3
TOO_BIG = re.compile(r"message too long, mtu=(\d+)|Frag needed and DF set \(mtu = (\d+)\)")


def live_path(a: str, b: str) -> str:
    """Where a pair's packets go now, from the WireGuard endpoints both sides hold: "via"
    (the plan routes it through other sites), "relay-tcp" (a side's endpoint is its TLS
    sidecar), "relay" (both hold their relay allocation) or "direct"."""
    if pair(a, b)["mode"].startswith("via"):
        return "via"
    ends = {a: endpoint_of(a, b), b: endpoint_of(b, a)}
    if any((end or "").startswith("127.0.0.1:") for end in ends.values()):
        return "relay-tcp"
    low, high = sorted((a, b))
    # Its plan's relay, or its standby relay after a failover (test_traversal_failover).
    for allocation in PLAN["allocations"] + PLAN.get("standby_allocations", []):
        if (allocation["a"], allocation["b"]) == (low, high) and all(
            ends[site] == f"{allocation['address']}:{port}"
            for site, port in zip((low, high), allocation["ports"], strict=True)
        ):
            return "relay"
    return "direct"


def full_size_pings(source: str, target: str) -> tuple[str, str]:
    """From source's LAN host to target's, with don't-fragment: FULL_PINGS pings that fill the
    tunnel's MTU, then one a byte bigger (which the source's own gateway must refuse)."""
    lan = host(f"{source}-lan1")
    address = lan_address(target)
    fits = lan.run(f"ping -M do -s {FULL} -c {FULL_PINGS} -i 0.3 -W 2 -q {address}")
    over = lan.run(f"ping -M do -s {FULL + 1} -c 2 -i 0.3 -W 2 {address}")
    return fits.stdout + fits.stderr, over.stdout + over.stderr


def answers(source: str, target: str) -> bool:
    """Whether one of three ordinary pings from source's LAN host to target's is answered."""
    return host(f"{source}-lan1").run(f"ping -c 3 -i 0.3 -W 2 -q {lan_address(target)}").rc == 0


def captured_full_size() -> tuple[int, int]:
    """In the relay's capture of the hard pair: datagrams of DATAGRAM bytes in one unfragmented
    IPv4 packet, and IPv4 fragments of anything."""
    raw = base64.b64decode(host(RELAY).check_output(f"base64 -w0 {CAPTURE}"))
    whole = fragments = 0
    for ip, udp in udp_packets(raw):
        fragmented = int.from_bytes(ip[6:8], "big") & 0x3FFF  # MF flag and fragment offset
        if fragmented:
            fragments += 1
        elif len(udp) - 8 == DATAGRAM and int.from_bytes(ip[2:4], "big") == DATAGRAM + 28:
            whole += 1
    return whole, fragments


def test_every_sites_wireguard_interface_has_the_mtu_the_roles_set():
    # Set explicitly: wg-quick would derive 65456 from a UDP-blocked site's loopback endpoints.
    mtus = {site: host(site).check_output("cat /sys/class/net/mesh0/mtu").strip() for site in SITES}
    assert mtus == {site: str(MTU) for site in SITES}


def test_full_size_packets_pass_every_path_and_one_byte_more_is_refused():
    """Every pair of the plan, all at once (eight at a time): pings that fill the tunnel's MTU
    pass whole (don't-fragment), a relayed pair's relay forwarded them, and a byte more is
    refused at the source's gateway with the MTU we say."""
    pairs = [(p["a"], p["b"]) for p in PLAN["pairs"]]
    # Only size may fail here: a path still coming back (a relay just redeployed or restarted,
    # a sidecar reconnecting) is waited for with ordinary pings first.
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while True:
            answered = dict(zip(pairs, pool.map(lambda p: answers(*p), pairs), strict=True))
            if all(answered.values()):
                break
            silent = [p for p, ok in answered.items() if not ok]
            assert time.monotonic() < deadline, f"no answer to small pings: {silent}"
            time.sleep(1)
        before, captured = relay_counters(), captured_full_size()
        outputs = dict(zip(pairs, pool.map(lambda p: full_size_pings(*p), pairs), strict=True))
    time.sleep(1.5)  # the relays save their counters each second
    after = relay_counters()
    paths = {p: live_path(*p) for p in pairs}
    # Both kinds of relay, and direct paths: multi-hop ones too when the plan has any.
    assert {"direct", "relay", "relay-tcp"} <= set(paths.values()), paths
    wrong = []
    for (a, b), path in paths.items():
        fits, over = outputs[(a, b)]
        if f"{FULL_PINGS} received" not in fits:
            small = "pass" if answers(a, b) else "fail too"
            wrong.append(f"{a}-{b} ({path}): full-size pings lost, small ones {small}: {fits}")
        refused = TOO_BIG.search(over)
        if refused is None or int(refused.group(1) or refused.group(2)) != MTU:
            wrong.append(f"{a}-{b}: {FULL + 1} bytes with don't-fragment not refused: {over}")
        name = f"{min(a, b)}--{max(a, b)}"
        grew = {
            key: after.get(name, {}).get(key, 0) - before.get(name, {}).get(key, 0)
            for key in ("forwarded", "forwarded_bytes")
        }
        if path in ("relay", "relay-tcp"):
            # Each ping and its answer, one datagram each, of DATAGRAM bytes at least.
            if grew["forwarded"] < 2 * FULL_PINGS or grew["forwarded_bytes"] < (
                2 * FULL_PINGS * DATAGRAM
            ):
                wrong.append(f"{a}-{b} ({path}): the relay forwarded only {grew}")
        elif path == "direct" and grew["forwarded"]:
            wrong.append(f"{a}-{b} (direct): {grew['forwarded']} datagrams through the relay")
    assert wrong == []
    # The UDP relay's pair on the wire: whole datagrams of DATAGRAM bytes, no IPv4 fragment
    # (each datagram is captured twice on the relay: in, then out).
    whole, fragments = captured_full_size()
    assert whole - captured[0] >= 4 * FULL_PINGS
    assert fragments == captured[1]


def test_full_size_packets_pass_multi_hop_paths_through_their_transit_sites():
    """A pair the plan routes through other sites: each transit site decrypts and re-encrypts
    the packet with the same MTU, so full-size pings pass, and they are seen arriving on every
    transit site's interface (one at a time, so no other ping adds to its counter)."""
    routed = [(p["a"], p["b"], p["path"][1:-1]) for p in PLAN["pairs"] if len(p["path"]) > 2]
    if not routed:
        pytest.skip("the plan routes no pair through another site")
    wrong = []
    for a, b, transits in routed:
        before = {t: mesh0_received_bytes(t) for t in transits}
        fits, over = full_size_pings(a, b)
        if f"{FULL_PINGS} received" not in fits:
            wrong.append(f"{a}-{b} via {transits}: full-size pings lost: {fits.strip()[-200:]}")
        for transit in transits:
            grew = mesh0_received_bytes(transit) - before[transit]
            if grew < 2 * FULL_PINGS * MTU:  # each ping and its answer pass the transit
                wrong.append(f"{a}-{b}: only {grew} bytes arrived on {transit}'s mesh0")
        if not TOO_BIG.search(over):
            wrong.append(f"{a}-{b}: {FULL + 1} bytes with don't-fragment not refused: {over}")
    assert wrong == []


def mesh0_received_bytes(site: str) -> int:
    return int(host(site).check_output("cat /sys/class/net/mesh0/statistics/rx_bytes"))


def direct_pairs_losing_pings() -> list[str]:
    """Every direct pair, LAN host to LAN host, 5 pings each, all at once per source."""
    direct = [(p["a"], p["b"]) for p in PLAN["pairs"] if p["mode"] == "direct"]
    losing = []
    for source in sorted({a for a, _ in direct}):
        targets = [lan_address(b) for a, b in direct if a == source]
        script = " ".join(
            f"(ping -c 5 -i 0.3 -W 2 -q {t} >/dev/null 2>&1 && echo ok {t} || echo FAIL {t}) &"
            for t in targets
        )
        out = host(f"{source}-lan1").check_output(f"{script} wait")
        losing += [f"{source} -> {line.split()[1]}" for line in out.splitlines() if "FAIL" in line]
    return losing


@pytest.mark.parametrize(
    ("node", "unit", "capabilities"),
    [
        # 443, and its own nftables table (kernel forwarding of confirmed sessions)
        ("relay1", "meshwright-relay", "cap_net_bind_service cap_net_admin"),
        ("relay1", "meshwright-stun", ""),
        ("blocked", "meshwright-sidecar", ""),
    ],
)
def test_services_run_hardened_under_their_own_user(node, unit, capabilities):
    shown = host(node).check_output(
        f"systemctl show {unit} -p User -p CapabilityBoundingSet -p ProtectSystem"
        " -p NoNewPrivileges -p MainPID"
    )
    fields = dict(line.split("=", 1) for line in shown.splitlines())
    assert fields["User"] == "meshwright"
    assert fields["CapabilityBoundingSet"] == capabilities
    assert (fields["ProtectSystem"], fields["NoNewPrivileges"]) == ("strict", "yes")
    owner = host(node).check_output(f"ps -o user= -p {fields['MainPID']}")
    assert owner.strip().startswith("meshwri")  # ps cuts long names


@pytest.mark.parametrize(
    ("node", "unit", "capabilities"),
    [
        ("easy1", "meshwright-sidecar", "cap_net_admin cap_net_raw"),
        ("relay1", "meshwright-wgstun", "cap_net_admin"),
    ],
)
def test_root_services_keep_only_the_capabilities_they_need(node, unit, capabilities):
    # wireguard-go's control socket is root's: these two run as root, with a bounding set of
    # just what they use (raw sockets for probes, WireGuard and nftables changes).
    shown = host(node).check_output(
        f"systemctl show {unit} -p CapabilityBoundingSet -p ProtectSystem -p NoNewPrivileges"
        " -p ActiveState"
    )
    fields = dict(line.split("=", 1) for line in shown.splitlines())
    assert fields["ActiveState"] == "active"
    assert fields["CapabilityBoundingSet"] == capabilities
    assert (fields["ProtectSystem"], fields["NoNewPrivileges"]) == ("strict", "yes")


def test_the_relay_firewall_lets_in_only_its_ports():
    rules = host(RELAY).check_output("nft list chain inet meshwright_relay input")
    assert "policy drop;" in rules
    accepted = re.findall(r"(udp|tcp) dport (.+?) accept", rules)
    assert sorted(accepted) == sorted(
        [
            ("udp", "{ 3478, 3479 }"),
            ("tcp", "443"),
            ("udp", "40000-59999"),
            ("udp", "51820"),
            ("tcp", "9588"),  # the relay's metrics, and only from inside WireGuard
            ("udp", "3480"),  # WG-STUN, and only from inside WireGuard:
            ("udp", "7"),  # the lab's echo service, which its NAT tests use
            ("tcp", "7"),
        ]
    ), rules
    assert re.search(r'iifname "mesh0" udp dport 3480 accept', rules), rules
    assert re.search(r'iifname "mesh0" tcp dport 9588 accept', rules), rules
