"""wg_keypair and roles/wireguard against the lab: keys made on the node, a working overlay,
idempotence, check mode, and peers added and removed live without dropping a packet.

Sites: public (no NAT, 198.51.100.20), easy1 (behind an endpoint-independent NAT: it holds
public's endpoint and a keepalive, public learns easy1's) and cone (full-cone NAT,
203.0.113.26), the third peer added and removed while public and easy1 ping each other.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshwright.lab import podman

from .conftest import ansible, recap

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK = "tests/lab/playbooks/wireguard.yml"
KEY = "/etc/wireguard/mesh0.key"
SITES = ("public", "easy1", "cone")
OVERLAY = {"public": "10.99.0.1", "easy1": "10.99.0.2", "cone": "10.99.0.3"}
ENDPOINT = {"public": "198.51.100.20:51820", "cone": "203.0.113.26:51820"}
TEST_KEYS = "/etc/wgtest"  # the module's own tests, on easy2, away from mesh0's key

pytestmark = pytest.mark.lab


def keypair(lab, host: str, *args: str) -> dict:
    """Run wg_keypair ad hoc on one host; its result, and the whole output in `_output`."""
    proc = ansible(lab, host, "-m", "meshwright.mesh.wg_keypair", "-o", *args, tool="ansible")
    line = re.search(rf"^{host} \| ([A-Z!]+) => (\{{.*\}})$", proc.stdout, re.M)
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(line.group(2))
    return {**result, "failed": line.group(1) == "FAILED!", "_output": proc.stdout + proc.stderr}


def peer(keys: dict, name: str, *, endpoint: str | None, keepalive: int | None) -> dict:
    # `mode` as the planner gives it: the role must ignore keys it does not use.
    return {
        "name": name,
        "public_key": keys[name],
        "endpoint": endpoint,
        "allowed_ips": [f"{OVERLAY[name]}/32"],
        "keepalive": keepalive,
        "mode": "direct",
    }


def site_vars(keys: dict, *, cone: bool) -> dict:
    public_peers = [peer(keys, "easy1", endpoint=None, keepalive=None)]
    if cone:
        public_peers.append(peer(keys, "cone", endpoint=ENDPOINT["cone"], keepalive=None))
    sites = {
        "public": {"address": f"{OVERLAY['public']}/24", "peers": public_peers},
        "easy1": {
            "address": f"{OVERLAY['easy1']}/24",
            "peers": [peer(keys, "public", endpoint=ENDPOINT["public"], keepalive=25)],
        },
        "cone": {
            "address": f"{OVERLAY['cone']}/24",
            "peers": [peer(keys, "public", endpoint=ENDPOINT["public"], keepalive=None)],
        },
    }
    return {"wg_test_sites": sites}


class Deployer:
    """Runs the test playbook and keeps every output, to search them for private keys."""

    def __init__(self, lab, keys: dict, tmp: Path):
        self.lab, self.keys, self.tmp = lab, keys, tmp
        self.outputs: list[str] = []

    def __call__(
        self, hosts: str, *extra: str, cone: bool, address: dict | None = None
    ) -> subprocess.CompletedProcess:
        sites = site_vars(self.keys, cone=cone)
        for host, changed in (address or {}).items():
            sites["wg_test_sites"][host]["address"] = changed
        variables = self.tmp / f"vars{len(self.outputs)}.json"
        variables.write_text(json.dumps(sites))
        proc = ansible(
            self.lab, PLAYBOOK, "--limit", hosts, "-e", f"@{variables}", "-v", "--diff", *extra
        )
        self.outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return proc


def cleanup(lab, hosts) -> None:
    for host in hosts:
        podman.exec_sh(
            lab.container(host),
            "systemctl disable --now wg-quick@mesh0 >/dev/null 2>&1 || true;"
            " ip link del mesh0 2>/dev/null || true; rm -f /etc/wireguard/mesh0.*;"
            f" rm -rf {TEST_KEYS}",
            timeout=180,
        )


@pytest.fixture(scope="module", autouse=True)
def node_artifact(lab):
    """The modules import their code from the node artifact: install it, as the collection's
    playbooks do first."""
    done = ansible(lab, "tests/lab/playbooks/node.yml")
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.fixture(scope="module")
def mesh(lab, tmp_path_factory):
    """Keys on public, easy1 and cone; public and easy1 converged with each other."""
    cleanup(lab, SITES)
    made = {host: keypair(lab, host) for host in SITES}
    for result in made.values():
        assert result["changed"] is True, result
    keys = {host: result["public_key"] for host, result in made.items()}
    deploy = Deployer(lab, keys, tmp_path_factory.mktemp("wireguard"))
    deploy.outputs += [result["_output"] for result in made.values()]
    deploy("public,easy1", cone=False)
    # easy1 initiates (public has no endpoint for it); then both ways work.
    lab.sh("easy1", f"ping -c 3 -W 2 {OVERLAY['public']} >/dev/null || true")
    yield deploy
    cleanup(lab, SITES)


def ping_ok(lab, source: str, target: str) -> bool:
    out = lab.sh(source, f"ping -c 3 -W 2 {OVERLAY[target]} || true")
    return " 0% packet loss" in out


def interface_identity(lab, host: str) -> tuple[str, str]:
    out = lab.sh(host, "cat /sys/class/net/mesh0/ifindex; pgrep -x wireguard-go")
    ifindex, pid = out.split()
    return ifindex, pid


def start_ping(lab, source: str, target: str) -> None:
    lab.sh(
        source,
        f"rm -f /tmp/mw-ping.log; ping -i 0.2 {OVERLAY[target]} >/tmp/mw-ping.log 2>&1"
        " </dev/null & echo $! >/tmp/mw-ping.pid",
    )


def stop_ping(lab, source: str) -> tuple[int, set[int], str]:
    """(packets sent, sequence numbers answered, log) of the background ping."""
    log = lab.sh(source, "kill -INT $(cat /tmp/mw-ping.pid); sleep 0.5; cat /tmp/mw-ping.log")
    sent = int(re.search(r"(\d+) packets transmitted", log).group(1))
    answered = {int(n) for n in re.findall(r"icmp_seq=(\d+) ttl=", log)}
    return sent, answered, log


def assert_no_packet_lost(sent: int, answered: set[int], log: str) -> None:
    # Every echo but the last was answered: the last may still have been in flight when
    # ping was stopped, a second after the run, so it proves nothing either way.
    assert sent >= 20, log[-1500:]
    missing = set(range(1, sent)) - answered
    assert not missing, f"lost icmp_seq {sorted(missing)}:\n{log[-1500:]}"


def live_peers(lab, host: str) -> set[str]:
    return set(lab.sh(host, "wg show mesh0 peers").split())


# --- wg_keypair -------------------------------------------------------------------------


def test_keys_are_wg_pubkeys_of_root_only_files(lab, mesh):
    for host in SITES:
        out = lab.sh(
            host,
            f"stat -c '%a %U %G' {KEY} /etc/wireguard; wg pubkey < {KEY}",
        ).split("\n")
        assert out[0] == "600 root root"
        assert out[1] == "700 root root"
        assert out[2] == mesh.keys[host]
        assert "PrivateKey" not in lab.sh(host, "cat /etc/wireguard/mesh0.conf || true")


def test_node_artifact_keys_agree_with_wg_pubkey_on_the_node(lab, mesh):
    # The keys code the modules run (wireguard-tools inside the node artifact the roles
    # installed), on the node's own python3, against wg for 200 keys from wg genkey.
    out = lab.sh(
        "easy2",
        'for i in $(seq 200); do k=$(wg genkey); echo "$k $(echo $k | wg pubkey)"; done'
        " | python3 -c 'import sys\n"
        'sys.path.insert(0, "/opt/meshwright/lib/meshwright-node.pyz")\n'
        "from meshwright.site import keys\n"
        "pairs = [line.split() for line in sys.stdin]\n"
        "bad = [p for p, q in pairs if str(keys.parse_key(p).public_key()) != q]\n"
        "print(len(pairs), len(bad))'",
    )
    assert out.split() == ["200", "0"]


def test_keypair_module_lifecycle(lab):
    host, path = "easy2", f"{TEST_KEYS}/k.key"
    lab.sh(host, f"rm -rf {TEST_KEYS}")
    outputs = []

    checked = keypair(lab, host, "-a", f"path={path}", "--check", "--diff")
    outputs.append(checked["_output"])
    assert checked["changed"] is True and checked["public_key"] is None
    assert "not known in check mode" in checked["msg"]
    assert lab.sh(host, f"test -e {TEST_KEYS} && echo exists || echo absent").strip() == "absent"

    made = keypair(lab, host, "-a", f"path={path}", "--diff")
    outputs.append(made["_output"])
    assert made["changed"] is True
    assert made["ansible_facts"]["mesh_wg_public_key"] == made["public_key"]
    assert lab.sh(host, f"wg pubkey < {path}").strip() == made["public_key"]
    assert lab.sh(host, f"stat -c '%a %U' {path} {TEST_KEYS}").split("\n")[:2] == [
        "600 root",
        "700 root",
    ]

    again = keypair(lab, host, "-a", f"path={path}")
    outputs.append(again["_output"])
    assert again["changed"] is False and again["public_key"] == made["public_key"]

    lab.sh(host, f"chmod 0644 {path}; chmod 0755 {TEST_KEYS}")
    fixed = keypair(lab, host, "-a", f"path={path}")
    assert fixed["changed"] is True and fixed["public_key"] == made["public_key"]
    assert lab.sh(host, f"stat -c '%a' {path} {TEST_KEYS}").split() == ["600", "700"]

    private = lab.sh(host, f"cat {path}").strip()
    would = keypair(lab, host, "-a", f"path={path} rotate=true", "--check", "--diff")
    outputs.append(would["_output"])
    assert would["changed"] is True and would["public_key"] is None
    assert lab.sh(host, f"cat {path}").strip() == private

    rotated = keypair(lab, host, "-a", f"path={path} rotate=true", "--diff")
    outputs.append(rotated["_output"])
    assert rotated["changed"] is True
    assert rotated["previous_public_key"] == made["public_key"]
    assert rotated["public_key"] != made["public_key"]
    new_private = lab.sh(host, f"cat {path}").strip()
    assert lab.sh(host, f"wg pubkey < {path}").strip() == rotated["public_key"]

    for output in outputs:
        for secret in (private, new_private):
            assert secret not in output
            assert base64.b64decode(secret).hex() not in output


def test_malformed_key_fails_and_is_kept_unless_rotated(lab):
    host, path = "easy2", f"{TEST_KEYS}/bad.key"
    garbage = "not-a-key-" + "Q" * 30
    lab.sh(host, f"mkdir -p -m 0700 {TEST_KEYS}; printf '%s\\n' {garbage} > {path}")
    failed = keypair(lab, host, "-a", f"path={path}")
    assert failed.get("failed") is True
    assert path in failed["msg"] and "not a WireGuard private key" in failed["msg"]
    assert "rotate" in failed["msg"]
    assert garbage not in failed["_output"]
    assert lab.sh(host, f"cat {path}").strip() == garbage

    modes = lab.sh(host, "stat -c %a / /etc")
    for refused in ("/etc/mesh0.key", "/mesh0.key", f"{TEST_KEYS}/"):
        result = keypair(lab, host, "-a", f"path={refused} rotate=true")
        assert result.get("failed") is True, result
    assert lab.sh(host, "stat -c %a / /etc") == modes

    replaced = keypair(lab, host, "-a", f"path={path} rotate=true")
    assert replaced["changed"] is True and replaced["previous_public_key"] is None
    assert lab.sh(host, f"wg pubkey < {path}").strip() == replaced["public_key"]


# --- roles/wireguard --------------------------------------------------------------------


def test_overlay_works_over_wireguard_go_with_a_unit_enabled_at_boot(lab, mesh):
    # No WireGuard in this kernel: the role chose wireguard-go, and says so.
    assert '"wireguard_implementation": "userspace"' in "".join(mesh.outputs)
    assert ping_ok(lab, "easy1", "public")
    assert ping_ok(lab, "public", "easy1")
    for host in ("public", "easy1"):
        assert lab.sh(host, "systemctl is-enabled wg-quick@mesh0").strip() == "enabled"
        assert lab.sh(host, "systemctl is-active wg-quick@mesh0").strip() == "active"
        assert lab.sh(host, "ip -d link show mesh0 | grep -c 'tun type tun'").strip() == "1"
        # Table = off: the role adds no routes (only the address's own subnet route).
        routes = lab.sh(host, "ip route show dev mesh0").strip().splitlines()
        assert routes == [f"10.99.0.0/24 proto kernel scope link src {OVERLAY[host]}"]


def test_second_run_changes_nothing_and_check_mode_too(lab, mesh):
    before = {h: interface_identity(lab, h) for h in ("public", "easy1")}
    again = mesh("public,easy1", cone=False)
    assert {h: r["changed"] for h, r in recap(again.stdout).items()} == {"public": 0, "easy1": 0}
    assert "RUNNING HANDLER" not in again.stdout
    checked = mesh("public,easy1", "--check", cone=False)
    assert {h: r["changed"] for h, r in recap(checked.stdout).items()} == {"public": 0, "easy1": 0}
    assert {h: interface_identity(lab, h) for h in ("public", "easy1")} == before


def test_check_mode_reports_a_new_peer_without_adding_it(lab, mesh):
    checked = mesh("public", "--check", cone=True)
    assert recap(checked.stdout)["public"]["changed"] >= 1
    assert f"add peer cone ({mesh.keys['cone'][:8]}" in checked.stdout
    assert mesh.keys["cone"] not in live_peers(lab, "public")


def test_adding_a_peer_is_live_and_drops_no_packet(lab, mesh):
    before = {h: interface_identity(lab, h) for h in ("public", "easy1")}
    start_ping(lab, "public", "easy1")
    try:
        added = mesh("public,easy1,cone", cone=True)
    finally:
        lab.sh("public", "sleep 1")
        sent, answered, log = stop_ping(lab, "public")
    rows = recap(added.stdout)
    assert rows["public"]["changed"] >= 1 and rows["easy1"]["changed"] == 0
    assert_no_packet_lost(sent, answered, log)
    assert {h: interface_identity(lab, h) for h in ("public", "easy1")} == before
    assert live_peers(lab, "public") == {mesh.keys["easy1"], mesh.keys["cone"]}
    assert ping_ok(lab, "public", "cone")
    assert ping_ok(lab, "cone", "public")


def test_a_peer_removed_by_hand_is_restored_live(lab, mesh):
    before = interface_identity(lab, "public")
    lab.sh("public", f"wg set mesh0 peer {mesh.keys['cone']} remove")
    restored = mesh("public", cone=True)
    assert recap(restored.stdout)["public"]["changed"] == 1  # wg_sync only
    assert mesh.keys["cone"] in live_peers(lab, "public")
    assert interface_identity(lab, "public") == before
    assert ping_ok(lab, "public", "cone")


def test_listen_port_address_and_rotated_key_change_live(lab, mesh):
    before = interface_identity(lab, "cone")
    rotated = keypair(lab, "cone", "-a", "rotate=true")
    mesh.outputs.append(rotated["_output"])
    assert rotated["changed"] is True and rotated["previous_public_key"] == mesh.keys["cone"]
    changed = mesh(
        "cone", "-e", "wireguard_listen_port=51821", cone=True, address={"cone": "10.99.0.33/24"}
    )
    # wg_keypair (kept), the file for boot, and wg_sync.
    assert recap(changed.stdout)["cone"]["changed"] == 2
    assert lab.sh("cone", "wg show mesh0 public-key").strip() == rotated["public_key"]
    assert "set the private key from /etc/wireguard/mesh0.key" in changed.stdout
    assert "set listen-port 51820 -> 51821" in changed.stdout
    assert "remove address 10.99.0.3/24" in changed.stdout
    assert "add address 10.99.0.33/24" in changed.stdout
    assert lab.sh("cone", "wg show mesh0 listen-port").strip() == "51821"
    addresses = lab.sh("cone", "ip -4 -o addr show dev mesh0 | awk '{print $4}'").split()
    assert addresses == ["10.99.0.33/24"]
    assert interface_identity(lab, "cone") == before
    # And back, live too.
    mesh("cone", cone=True)
    assert lab.sh("cone", "wg show mesh0 listen-port").strip() == "51820"
    assert interface_identity(lab, "cone") == before


def test_removing_a_peer_is_live_and_drops_no_packet(lab, mesh):
    before = {h: interface_identity(lab, h) for h in ("public", "easy1")}
    start_ping(lab, "public", "easy1")
    try:
        removed = mesh("public,easy1", cone=False)
    finally:
        lab.sh("public", "sleep 1")
        sent, answered, log = stop_ping(lab, "public")
    rows = recap(removed.stdout)
    assert rows["public"]["changed"] >= 1 and rows["easy1"]["changed"] == 0
    assert_no_packet_lost(sent, answered, log)
    assert {h: interface_identity(lab, h) for h in ("public", "easy1")} == before
    assert live_peers(lab, "public") == {mesh.keys["easy1"]}
    assert "cone" not in lab.sh("public", "cat /etc/wireguard/mesh0.conf")


def test_private_keys_never_appear_in_any_run_output(lab, mesh):
    assert len(mesh.outputs) >= 8
    for host in SITES:
        private = lab.sh(host, f"cat {KEY}").strip()
        assert len(private) == 44
        hexed = base64.b64decode(private).hex()
        for output in mesh.outputs:
            assert private not in output
            assert hexed not in output
