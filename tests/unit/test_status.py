"""`meshwright status`: meshwright.status on planned meshes and site reports shaped as the
mesh_status module returns them (exact table and JSON), the module itself against two real
wireguard-go interfaces, and the playbook and command end to end on hosts that cannot be
reached (the lab test runs them against the lab).

The five-site plan is test_graph's: a open, b and c easy (b -- c punch through r1), d hard
behind hub c (c -- d relay), e UDP-blocked behind hub a (a -- e relay-tcp), the rest via c or a.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshwright import artifact, status_cli
from meshwright.graph import live_from_dict, to_dot
from meshwright.plan import LINK_KINDS, Mesh, Policy, Relay, build_plan
from meshwright.plan.relays import local_ports
from meshwright.plan.synthetic import public_key, synthetic_site
from meshwright.status import (
    DOWN_AFTER_S,
    StatusError,
    build_status,
    format_age,
    format_bytes,
    judge_endpoint,
    relay_view,
    render_table,
    to_json,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests/data"
BIN = Path(sys.executable).parent
COLLECTIONS = ROOT / ".cache/collections"

SITES = (
    synthetic_site("a", "open", 1),
    synthetic_site("b", "easy", 2),
    synthetic_site("c", "easy", 3),
    synthetic_site("d", "hard", 4, policy=Policy(hubs=("c",))),
    synthetic_site("e", "blocked", 5, policy=Policy(hubs=("a",))),
)
RELAY = Relay(
    name="r1", addresses=("192.0.2.1",), public_key=public_key("r1"), overlay_address="10.99.0.250"
)
# Every site's relay port (one per site, the same on every relay), in name order, and e's
# sidecar's loopback port for r1: e holds 127.0.0.1:LOCAL for every peer r1 carries.
PORT = {name: 40000 + k for k, name in enumerate("abcde")}
LOCAL = local_ports(["r1"], avoid=(51820,))["r1"]


def plan_of(*sites: Any, relays: tuple[Relay, ...] = (RELAY,)) -> dict[str, Any]:
    mesh = Mesh(
        sites=sites, relays=relays, overlay_network="10.99.0.0/24", link_kinds=frozenset(LINK_KINDS)
    )
    data: dict[str, Any] = json.loads(build_plan(mesh).to_json())  # as read from plan.json
    return data


def peer(
    endpoint: str | None,
    age: float | None,
    rx: int,
    tx: int,
    *,
    of: str,
    keepalive: int = 25,
) -> dict[str, Any]:
    """One peer as mesh_status returns it; ``of`` names the peer (its key is derived)."""
    return {
        "public_key": public_key(of),
        "endpoint": endpoint,
        "latest_handshake": None if age is None else 1_700_000_000.0 - age,
        "handshake_age_s": age,
        "rx_bytes": rx,
        "tx_bytes": tx,
        "persistent_keepalive": keepalive,
    }


def report(
    site: str, *peers: dict[str, Any], sidecar: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A site's mesh_status result, as Ansible registers it."""
    return {
        "changed": False,
        "interface": "mesh0",
        "interface_present": True,
        "public_key": public_key(site),
        "listen_port": 51820,
        "time": 1_700_000_000.0,
        "peers": sorted(peers, key=lambda p: str(p["public_key"])),
        "sidecar": {
            "state_file": "/run/meshwright-sidecar/state.json",
            "state": sidecar,
            "age_s": None if sidecar is None else 0.4,
            "service": "active",
            "error": None,
        },
    }


def sidecar_peer(name: str, **kw: Any) -> dict[str, Any]:
    """One peer of the sidecar's state file (traversal.PeerLink.status)."""
    return {
        "peer": name,
        "path": "relay",
        "endpoint": None,
        "relay_endpoint": "192.0.2.1:40002",
        "rtt_ms": None,
        "last_proof_age_s": None,
        "direct_for_s": None,
        "phase": "idle",
        "controlling": False,
        "attempts": 1,
        "upgrades": 1,
        "fallbacks": 0,
        "pings_sent": 30,
        "pongs_sent": 30,
        "failures": 0,
        "next_attempt_in_s": None,
        "suspect": False,
        **kw,
    }


def five_site_results() -> dict[str, Any]:
    """a--b direct and up; a--c direct but its handshake is 7 minutes old (down), so c--e,
    via a, is down too; b--c punch, upgraded by the sidecars (c controls: its key is the
    smaller); c--d relayed through r1, d unreachable; a--e over TLS through r1."""
    mib = 1 << 20
    return {
        "a": report(
            "a",
            peer("203.0.113.2:51820", 12.0, 2 * mib, 3 * mib, of="b", keepalive=0),
            peer("198.51.100.3:51820", 421.0, 900, 1200, of="c", keepalive=0),
            peer(f"192.0.2.1:{PORT['a']}", 31.5, 5000, 7000, of="e", keepalive=25),
        ),
        "b": report(
            "b",
            peer("203.0.113.1:51820", 12.3, 3 * mib, 2 * mib, of="a"),
            peer("198.51.100.3:62000", 40.0, 150_000, 160_000, of="c"),
            sidecar={
                "site": "b",
                "peers": {
                    "c": sidecar_peer(
                        "c",
                        path="direct",
                        endpoint="198.51.100.3:62000",
                        rtt_ms=23.4,
                        direct_for_s=312.0,
                    )
                },
            },
        ),
        "c": report(
            "c",
            peer("203.0.113.1:51820", 430.0, 1200, 900, of="a"),
            peer("198.51.100.2:51820", 40.2, 160_000, 150_000, of="b"),
            peer(f"192.0.2.1:{PORT['c']}", 55.0, 8000, 9000, of="d"),
            sidecar={
                "site": "c",
                "peers": {
                    "b": sidecar_peer(
                        "b",
                        path="direct",
                        endpoint="198.51.100.2:51820",
                        rtt_ms=23.1,
                        direct_for_s=311.5,
                        controlling=True,
                    )
                },
            },
        ),
        "d": {"unreachable": True, "msg": "Failed to connect to the host via ssh: timed out\n"},
        "e": report("e", peer(f"127.0.0.1:{LOCAL}", 31.0, 7000, 5000, of="a")),
    }


def test_five_sites_give_exactly_this_table() -> None:
    status = build_status(plan_of(*SITES), five_site_results())
    # checked by eye against five_site_results' docstring
    assert render_table(status) == (DATA / "status_five_sites.txt").read_text("utf-8")


def test_five_sites_give_exactly_this_json() -> None:
    status = build_status(plan_of(*SITES), five_site_results())
    assert to_json(status) == (DATA / "status_five_sites.json").read_text("utf-8")


def test_the_live_view_is_what_meshwright_graph_draws() -> None:
    plan = plan_of(*SITES)
    status = build_status(plan, five_site_results())
    # only the pairs that are up (or idle): graph draws the others as planned
    assert live_from_dict(status) == {
        ("a", "b"): "direct",
        ("a", "e"): "relay-tcp",
        ("b", "c"): "direct",
        ("b", "d"): "via",
        ("b", "e"): "via",
        ("c", "d"): "relay",
    }
    dot = to_dot(plan, None, live_from_dict(json.loads(to_json(status))))
    assert '"site:b" -- "site:c" [color="#1f6fd1", label="punched"' in dot


def test_a_side_that_fell_back_a_missing_interface_and_a_missing_peer() -> None:
    """b -- c: b still sends direct, c fell back to the relay (its sidecar waits to retry);
    a has no interface (its pairs are down); e lacks a's peer."""
    results = five_site_results()
    results["a"] = {**report("a"), "interface_present": False, "public_key": None}
    results["e"] = report("e")
    results["c"]["peers"][1]["endpoint"] = f"192.0.2.1:{PORT['c']}"
    results["c"]["sidecar"]["state"]["peers"]["b"].update(
        path="relay", endpoint=f"192.0.2.1:{PORT['c']}", next_attempt_in_s=31.2, failures=2
    )
    results["b"]["sidecar"]["state"]["peers"]["c"].update(suspect=True)
    status = build_status(plan_of(*SITES), results)
    lines = render_table(status).splitlines()
    # a's pairs are down, and so are the pairs routed through a -- b or a -- c
    assert lines[0] == (
        "mesh status: 4 of 5 sites answered; 10 pairs: 3 up, 0 idle, 7 down, 0 unknown"
    )
    rows = {tuple(line.split()[:2]): line for line in lines[2:12]}
    assert rows[("a", "b")].split()[3:5] == ["down", "-"]
    assert rows[("a", "b")].endswith("a has no interface mesh0")
    assert rows[("a", "e")].endswith("a has no interface mesh0; a is not a WireGuard peer of e")
    assert rows[("b", "c")].split("  ")[0:1] == ["b"]
    assert " relay (r1) " in rows[("b", "c")]
    assert rows[("b", "c")].endswith(
        "relay, next try 31 s, 2 failed  b sends direct, c sends relayed through r1"
    )
    assert lines[12:] == [
        "not reached: d: unreachable: Failed to connect to the host via ssh: timed out",
        "problem: a: interface mesh0 does not exist",
    ]
    row = next(r for r in status["rows"] if (r["a"], r["b"]) == ("b", "c"))
    assert (row["state"], row["path"], row["relay"]) == ("up", "relay", "r1")
    assert row["sidecar_a"]["suspect"] is True and row["sidecar_b"]["controlling"] is True


def test_idle_pairs_of_open_sites_and_pairs_nobody_could_read() -> None:
    """Two open sites hold each other's endpoints and no keepalive: an old handshake, or none,
    is quiet, not down. A pair whose two sites could not be read is unknown."""
    plan = plan_of(
        synthetic_site("x", "open", 1),
        synthetic_site("y", "open", 2),
        synthetic_site("z", "open", 3),
        relays=(),
    )
    results = {
        "x": report(
            "x",
            peer("203.0.113.2:51820", 600.0, 100, 200, of="y", keepalive=0),
            peer("203.0.113.3:51820", None, 0, 0, of="z", keepalive=0),
        ),
        "y": {"failed": False, "msg": "meshwright's node artifact is not installed at /opt"},
    }
    status = build_status(plan, results)
    assert render_table(status) == (
        "mesh status: 1 of 3 sites answered; 3 pairs: 0 up, 2 idle, 0 down, 1 unknown\n"
        "a  b  planned  path           a sends to         b sends to  rtt ms  handshake  a->b   "
        "b->a   sidecar  notes\n"
        "x  y  direct   direct (idle)  203.0.113.2:51820  -           -       10 min     200 B  "
        "100 B  -\n"
        "x  z  direct   direct (idle)  203.0.113.3:51820  -           -       never      0 B    "
        "0 B    -\n"
        "y  z  direct   unknown        -                  -           -       -          -      "
        "-      -\n"
        "not reached: y: not read: meshwright's node artifact is not installed at /opt\n"
        "not reached: z: not asked (not in this run)\n"
    )
    assert status["pairs"] == [
        {"a": "x", "b": "y", "path": "direct"},
        {"a": "x", "b": "z", "path": "direct"},
    ]
    assert status["summary"] == {
        "sites": 3,
        "answered": 1,
        "pairs": 3,
        "up": 0,
        "idle": 2,
        "down": 0,
        "unknown": 1,
    }


def test_a_host_outside_the_plan_is_named() -> None:
    results = {**five_site_results(), "f": report("f")}
    table = render_table(build_status(plan_of(*SITES), results))
    assert table.endswith("problem: f: not in the plan (run meshwright.mesh.site)\n")


def test_endpoints_are_judged_by_where_packets_go() -> None:
    view = relay_view(plan_of(*SITES))
    judged = {
        (endpoint, site): None if route is None else (route.path, route.relay, route.note)
        for endpoint, site in (
            (None, "a"),
            (f"192.0.2.1:{PORT['a']}", "a"),  # a's port on r1: relayed (a -- e, or a fallback)
            (f"192.0.2.1:{PORT['b']}", "b"),  # b's side of the punch pair b -- c
            (f"192.0.2.1:{PORT['d']}", "d"),  # d's side of c -- d
            (f"192.0.2.1:{PORT['c']}", "d"),  # c's port, held by d: not d's own
            (f"127.0.0.1:{LOCAL}", "e"),  # e's TLS carrier for r1
            (f"[::1]:{LOCAL}", "e"),
            ("127.0.0.1:9", "e"),
            ("192.0.2.1:51820", "a"),  # the relay's own WireGuard port: no site's
            ("198.51.100.7:51820", "a"),
            ("[2001:db8::7]:51820", "a"),
        )
        for route in [judge_endpoint(endpoint, site, view)]
    }
    assert judged == {
        (None, "a"): None,
        (f"192.0.2.1:{PORT['a']}", "a"): ("relay", "r1", None),
        (f"192.0.2.1:{PORT['b']}", "b"): ("relay", "r1", None),
        (f"192.0.2.1:{PORT['d']}", "d"): ("relay", "r1", None),
        (f"192.0.2.1:{PORT['c']}", "d"): (
            "relay",
            "r1",
            f"192.0.2.1:{PORT['c']} is r1 but not d's port {PORT['d']}",
        ),
        (f"127.0.0.1:{LOCAL}", "e"): ("relay-tcp", "r1", None),
        (f"[::1]:{LOCAL}", "e"): ("relay-tcp", "r1", None),
        ("127.0.0.1:9", "e"): ("relay-tcp", None, "127.0.0.1:9 is no relay's local port of e"),
        ("192.0.2.1:51820", "a"): ("relay", "r1", "192.0.2.1:51820 is r1 but not a's port 40000"),
        ("198.51.100.7:51820", "a"): ("direct", None, None),
        ("[2001:db8::7]:51820", "a"): ("direct", None, None),
    }


def test_a_pair_that_failed_over_is_relayed_through_its_standby() -> None:
    """With two relays, a relayed pair the sidecars moved to the standby relay is judged by
    the endpoints they hold: the standby's address and each site's own port."""
    r2 = Relay(name="r2", addresses=("192.0.2.2",))
    plan = plan_of(*SITES, relays=(RELAY, r2))
    (spare,) = [a for a in plan["standby_allocations"] if (a["a"], a["b"]) == ("c", "d")]
    results = five_site_results()
    (to_d,) = [p for p in results["c"]["peers"] if p["public_key"] == public_key("d")]
    to_d["endpoint"] = f"{spare['address']}:{spare['ports'][0]}"
    results["d"] = report("d", peer(f"{spare['address']}:{spare['ports'][1]}", 20.0, 1, 2, of="c"))
    row = next(r for r in build_status(plan, results)["rows"] if (r["a"], r["b"]) == ("c", "d"))
    assert (row["state"], row["path"], row["relay"], row["notes"]) == (
        "up",
        "relay",
        spare["relay"],
        [],
    )


def test_malformed_plans_are_named() -> None:
    with pytest.raises(StatusError, match=r"no sites: run the meshwright\.mesh\.site playbook"):
        build_status({"sites": {}}, {})
    plan = plan_of(*SITES)
    plan["allocations"][0]["ports"] = "40000"
    with pytest.raises(StatusError, match=r"allocations\[0\]: 'ports' is '40000'"):
        build_status(plan, {})
    plan = plan_of(*SITES)
    plan["pairs"][0]["b"] = "q"
    with pytest.raises(StatusError, match=r"pairs\[0\]: a -- q: q is not in the plan's sites"):
        build_status(plan, {})


def test_ages_and_sizes_for_people() -> None:
    assert [format_age(s) for s in (None, 0.4, 99.4, 179.9, DOWN_AFTER_S, 7199, 86400 * 3)] == [
        "never",
        "0 s",
        "99 s",
        "2 min",
        "3 min",
        "1 h",
        "3 d",
    ]
    assert [format_bytes(n) for n in (None, 0, 1023, 1024, 1536, 5 << 20, 3 << 40)] == [
        "-",
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]


# --- the module against two real wireguard-go interfaces -------------------------------------
# Both in a network namespace of their own (`mwstatus-<pid>`), with two addresses on its
# loopback, so that what they send cannot leave it. Needs root and Debian's wireguard-go and
# wg: without them these tests fail, never skip (as test_wgdevice).

NAMESPACE = f"mwstatus-{os.getpid()}"
SOCKETS = Path("/var/run/wireguard")
MODULE = ROOT / "plugins/modules/mesh_status.py"


def sh(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(
        argv, capture_output=True, text=True, check=True, input=stdin
    ).stdout.strip()


def in_ns(*argv: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", NAMESPACE, *argv, stdin=stdin)


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the mesh_status module test needs root (network namespaces, wireguard-go)")
    for tool in ("wireguard-go", "wg", "ip"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install -y wireguard-go wireguard-tools")
    sh("ip", "netns", "add", NAMESPACE)
    try:
        in_ns("ip", "link", "set", "lo", "up")
        for address in ("10.77.0.1/32", "10.77.0.2/32"):
            in_ns("ip", "address", "add", address, "dev", "lo")
        yield NAMESPACE
    finally:
        sh("ip", "netns", "del", NAMESPACE)


@pytest.fixture(scope="module")
def node_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The node artifact the module imports its code from, as on a node."""
    return artifact.build(tmp_path_factory.mktemp("artifact"))


@pytest.fixture
def pair(namespace: str, tmp_path: Path) -> Iterator[dict[str, dict[str, str]]]:
    """Two wireguard-go interfaces, peers of each other, after their first handshake."""
    names = {"x": f"mws{os.getpid()}x", "y": f"mws{os.getpid()}y"}
    processes = []
    try:
        for name in names.values():
            processes.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", namespace, "wireguard-go", "-f", name],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 10
        while not all((SOCKETS / f"{n}.sock").exists() for n in names.values()):
            assert time.monotonic() < deadline, "wireguard-go made no UAPI socket in 10 s"
            time.sleep(0.05)
        sites: dict[str, dict[str, str]] = {}
        for site, name in names.items():
            private = sh("wg", "genkey")
            key_file = tmp_path / f"{site}.key"
            key_file.write_text(private + "\n")
            sites[site] = {
                "interface": name,
                "private": private,
                "key_file": str(key_file),
                "public": sh("wg", "pubkey", stdin=private),
            }
        x, y = sites["x"], sites["y"]
        in_ns("wg", "set", x["interface"], "listen-port", "51001", "private-key", x["key_file"])
        in_ns("wg", "set", y["interface"], "listen-port", "51002", "private-key", y["key_file"])
        # y learns x's endpoint from the handshake x starts (a keepalive needs a session)
        in_ns(
            "wg", "set", x["interface"], "peer", y["public"], "allowed-ips", "10.98.0.2/32",
            "endpoint", "10.77.0.2:51002", "persistent-keepalive", "1",
        )  # fmt: skip
        in_ns("wg", "set", y["interface"], "peer", x["public"], "allowed-ips", "10.98.0.1/32")
        for name in names.values():
            in_ns("ip", "link", "set", name, "up")
        deadline = time.monotonic() + 10
        while in_ns("wg", "show", y["interface"], "latest-handshakes").split()[-1] == "0":
            assert time.monotonic() < deadline, "no handshake in 10 s"
            time.sleep(0.05)
        yield sites
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for name in names.values():
            (SOCKETS / f"{name}.sock").unlink(missing_ok=True)


def run_module(tmp_path: Path, **args: Any) -> dict[str, Any]:
    """The module as Ansible runs it on a node: its own process (here inside the namespace)."""
    args_file = tmp_path / f"args-{time.monotonic_ns()}.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    done = subprocess.run(
        ["ip", "netns", "exec", NAMESPACE, sys.executable, str(MODULE), str(args_file)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(COLLECTIONS)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    result["_stdout"] = done.stdout
    return result


def test_the_module_reads_real_wireguard_and_the_sidecars_state(
    pair: dict[str, dict[str, str]], node_artifact: Path, tmp_path: Path
) -> None:
    x, y = pair["x"], pair["y"]
    state = {"site": "x", "peers": {"y": sidecar_peer("y", path="direct", controlling=True)}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    common = {"node_artifact": str(node_artifact), "sidecar_service": ""}
    before = in_ns("wg", "show", x["interface"], "transfer").split()[1:]
    seen_x = run_module(
        tmp_path,
        interface=x["interface"],
        sidecar_state_file=str(tmp_path / "state.json"),
        **common,
    )
    after = in_ns("wg", "show", x["interface"], "transfer").split()[1:]
    seen_y = run_module(
        tmp_path,
        interface=y["interface"],
        sidecar_state_file=str(tmp_path / "absent.json"),
        _ansible_check_mode=True,  # it only reads: the same answer
        **common,
    )
    # no private key, in any form
    for site in (x, y):
        key = site["private"]
        for text in (seen_x["_stdout"], seen_y["_stdout"]):
            assert key not in text and base64_hex(key) not in text

    assert seen_x["changed"] is False and seen_y["changed"] is False
    assert (seen_x["interface_present"], seen_x["public_key"], seen_x["listen_port"]) == (
        True,
        x["public"],
        51001,
    )
    [peer_y] = seen_x["peers"]
    assert peer_y["public_key"] == y["public"]
    assert peer_y["endpoint"] == "10.77.0.2:51002"
    assert peer_y["persistent_keepalive"] == 1
    handshake = int(in_ns("wg", "show", x["interface"], "latest-handshakes").split()[-1])
    assert int(peer_y["latest_handshake"]) == handshake
    assert 0 <= peer_y["handshake_age_s"] < 30
    assert seen_x["time"] - peer_y["latest_handshake"] == pytest.approx(
        peer_y["handshake_age_s"], abs=0.01
    )
    assert int(before[0]) <= peer_y["rx_bytes"] <= int(after[0]) and peer_y["rx_bytes"] > 0
    assert int(before[1]) <= peer_y["tx_bytes"] <= int(after[1]) and peer_y["tx_bytes"] > 0
    sidecar = seen_x["sidecar"]
    assert sidecar["state"] == state and sidecar["error"] is None and sidecar["service"] is None
    assert 0 <= sidecar["age_s"] < 60

    [peer_x] = seen_y["peers"]
    assert peer_x["public_key"] == x["public"] and peer_x["endpoint"].endswith(":51001")
    assert seen_y["sidecar"]["state"] is None and seen_y["sidecar"]["error"] is None

    # ... and what the controller makes of the two answers
    plan = {
        "sites": {
            "x": {"peers": [{"name": "y", "public_key": y["public"], "keepalive": 1}]},
            "y": {"peers": [{"name": "x", "public_key": x["public"], "keepalive": None}]},
        },
        "pairs": [{"a": "x", "b": "y", "mode": "direct", "path": ["x", "y"]}],
        "allocations": [],
    }
    [row] = build_status(plan, {"x": seen_x, "y": seen_y})["rows"]
    assert (row["state"], row["path"], row["a_endpoint"]) == ("up", "direct", "10.77.0.2:51002")
    assert row["bytes_a_to_b"] == peer_y["tx_bytes"] and row["sidecar_a"] is None


def base64_hex(key: str) -> str:
    import base64

    return base64.b64decode(key).hex()


def test_the_module_reports_a_missing_interface(
    namespace: str, node_artifact: Path, tmp_path: Path
) -> None:
    seen = run_module(
        tmp_path,
        interface="mwnothere",
        node_artifact=str(node_artifact),
        sidecar_state_file=str(tmp_path / "absent.json"),
        sidecar_service="",
    )
    assert (seen["interface_present"], seen["peers"], seen["public_key"]) == (False, [], None)
    assert seen["changed"] is False


# --- the playbook and the command, end to end --------------------------------------------------


def inventory(tmp_path: Path, plan: dict[str, Any] | None) -> Path:
    """Two sites that refuse every connection (SSH to port 1 of loopback): nothing is reached."""
    hosts = {
        name: {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_connection": "ssh"}
        for name in ("s1", "s2")
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"children": {"mesh_sites": {"hosts": hosts}}}}))
    if plan is not None:
        (tmp_path / ".meshwright").mkdir()
        (tmp_path / ".meshwright/plan.json").write_text(json.dumps(plan))
    return path


@pytest.fixture
def ansible_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANSIBLE_CONFIG", str(ROOT / "ansible.cfg"))
    monkeypatch.setenv("ANSIBLE_COLLECTIONS_PATH", str(COLLECTIONS))


def test_the_command_reports_sites_it_cannot_reach(
    tmp_path: Path, ansible_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = plan_of(synthetic_site("s1", "open", 1), synthetic_site("s2", "easy", 2))
    hosts = inventory(tmp_path, plan)
    out = tmp_path / "status.json"
    assert status_cli.run([str(hosts)], False, out, sys.stdout, sys.stderr) == 1
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[:3] == [
        "mesh status: 0 of 2 sites answered; 1 pairs: 0 up, 0 idle, 0 down, 1 unknown",
        "a   b   planned  path     a sends to  b sends to  rtt ms  handshake  a->b  b->a  sidecar"
        "  notes",
        "s1  s2  direct   unknown  -           -           -       -          -     -     -",
    ]
    assert [line.split(":")[0:2] for line in lines[3:]] == [
        ["not reached", " s1"],
        ["not reached", " s2"],
    ]
    assert "Connection refused" in lines[3]
    # -o wrote the JSON that --json prints, and graph reads it as a live view (nothing up)
    assert status_cli.run([str(hosts)], True, None, sys.stdout, sys.stderr) == 1
    printed = capsys.readouterr()
    saved = json.loads(out.read_text())
    assert json.loads(printed.out)["rows"] == saved["rows"]
    assert saved["version"] == 1 and live_from_dict(saved) == {}


def test_the_command_without_a_plan_says_so(
    tmp_path: Path, ansible_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts = inventory(tmp_path, None)
    assert status_cli.run([str(hosts)], False, None, sys.stdout, sys.stderr) == 1
    err = capsys.readouterr().err
    assert err.startswith("status: ansible-playbook meshwright.mesh.status wrote no status")
    assert f"no plan at {tmp_path}/.meshwright/plan.json" in err


def test_the_command_line() -> None:
    argv = status_cli.command("/bin/ansible-playbook", Path("/tmp/x y.json"), ["a.yml", "b,"])
    assert argv == [
        "/bin/ansible-playbook",
        "meshwright.mesh.status",
        "-e",
        '{"mesh_status_file": "/tmp/x y.json"}',
        "-i",
        "a.yml",
        "-i",
        "b,",
    ]
