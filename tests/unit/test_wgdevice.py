"""meshwright.site.wgdevice against a real wireguard-go, with `wg` as the independent oracle.

Every test gets its own wireguard-go interface inside a network namespace this module creates
(`mwtest-<pid>`) and deletes. The namespace has no route anywhere (only a down loopback), so
whatever WireGuard would send to the test endpoints cannot leave it. wireguard-go's UAPI socket
lives in /var/run/wireguard, shared by all namespaces: interface names are unique per run.

Needs root and Debian's wireguard-go and wg: without them these tests fail, never skip.
The kernel's netlink path cannot run here (no WireGuard module): its message handling is
checked on messages encoded and decoded by pyroute2 itself.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import wgmsg
from wireguard_tools import WireguardKey

from meshwright.site import wgdevice, wgstate
from meshwright.site.keys import KeyFormatError, pair_preshared_key
from meshwright.wire.endpoint import Endpoint

NAMESPACE = f"mwtest-{os.getpid()}"
SOCKETS = Path("/var/run/wireguard")
_numbers = itertools.count()


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def in_ns(*argv: str) -> str:
    return sh("ip", "netns", "exec", NAMESPACE, *argv)


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("test_wgdevice needs root (network namespaces, wireguard-go)")
    for tool in ("wireguard-go", "wg", "ip"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install -y wireguard-go wireguard-tools")
    sh("ip", "netns", "add", NAMESPACE)
    try:
        yield NAMESPACE
    finally:
        sh("ip", "netns", "del", NAMESPACE)


@dataclass
class Wg:
    """One wireguard-go interface in the test namespace, and the way to drive it."""

    name: str
    process: subprocess.Popen[bytes]

    def run(self, argv: Sequence[str]) -> str:
        return wgdevice.run_command(["ip", "netns", "exec", NAMESPACE, *argv])

    def open(self) -> wgdevice.LiveInterface:
        return wgdevice.LiveInterface.open(self.name, self.run)

    def show(self, field: str) -> dict[str, str]:
        """`wg show <if> <field>`: peer public key -> value."""
        rows = in_ns("wg", "show", self.name, field).splitlines()
        return dict(row.split("\t", 1) for row in rows if row)

    def value(self, field: str) -> str:
        return in_ns("wg", "show", self.name, field).strip()

    def ifindex(self) -> int:
        link = json.loads(sh("ip", "-n", NAMESPACE, "-j", "link", "show", "dev", self.name))
        return int(link[0]["ifindex"])


@pytest.fixture
def wg(namespace: str) -> Iterator[Wg]:
    name = f"mwt{os.getpid()}x{next(_numbers)}"
    assert len(name) <= 15
    process = subprocess.Popen(
        ["ip", "netns", "exec", namespace, "wireguard-go", "-f", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (SOCKETS / f"{name}.sock").exists():
            assert process.poll() is None, f"wireguard-go exited with {process.returncode}"
            assert time.monotonic() < deadline, "wireguard-go made no UAPI socket in 10 s"
            time.sleep(0.05)
        yield Wg(name, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        (SOCKETS / f"{name}.sock").unlink(missing_ok=True)


OWN = WireguardKey.generate()
KEYS = {name: WireguardKey.generate() for name in "abcde"}
PUBLIC = {name: str(key.public_key()) for name, key in KEYS.items()}


def peer(name: str, **kw: Any) -> dict[str, Any]:
    number = ord(name) - 96
    return {
        "name": name,
        "public_key": PUBLIC[name],
        "endpoint": None,
        "allowed_ips": [f"10.99.0.{number}/32", f"10.{number}.0.0/16"],
        "keepalive": None,
        **kw,
    }


def want(*peers: dict[str, Any], **kw: Any) -> wgstate.WantedState:
    args: dict[str, Any] = {
        "listen_port": 51820,
        "addresses": ["10.99.0.9/24"],
        "mtu": None,
        "private_key_file": "/unused",
        "own_private": OWN,
        "peers": list(peers),
        **kw,
    }
    return wgstate.desired(**args)


def sync(wg: Wg, wanted: wgstate.WantedState) -> list[str]:
    """What the module does: read, diff, apply; then the diff must be empty."""
    with wg.open() as live:
        changes = wgstate.diff(live.read(), wanted)
        live.apply(changes, OWN)
        assert wgstate.diff(live.read(), wanted) == []
    return [change.describe() for change in changes]


# --- against wireguard-go -------------------------------------------------------------------


def test_peers_are_added_changed_and_removed_live(wg: Wg):
    before = (wg.ifindex(), wg.process.pid)
    actions = sync(
        wg,
        want(
            peer("a", endpoint="198.51.100.1:51820", keepalive=25),
            peer("b", endpoint="[2001:db8::2]:51821"),
            peer("c"),
        ),
    )
    assert len(actions) == 6  # key, port, 3 peers, address
    assert set(wg.value("peers").split()) == {PUBLIC["a"], PUBLIC["b"], PUBLIC["c"]}
    assert wg.show("endpoints") == {
        PUBLIC["a"]: "198.51.100.1:51820",
        PUBLIC["b"]: "[2001:db8::2]:51821",
        PUBLIC["c"]: "(none)",
    }
    assert set(wg.show("allowed-ips")[PUBLIC["a"]].split()) == {"10.99.0.1/32", "10.1.0.0/16"}
    assert wg.show("persistent-keepalive") == {
        PUBLIC["a"]: "25",
        PUBLIC["b"]: "off",
        PUBLIC["c"]: "off",
    }

    # Change a (a prefix moves to it from c, keepalive off), b (IPv6 -> IPv4 endpoint);
    # remove c; add d with an IPv6 endpoint.
    actions = sync(
        wg,
        want(
            peer("a", endpoint="198.51.100.1:51820", allowed_ips=["10.99.0.1/32", "10.3.0.0/16"]),
            peer("b", endpoint="203.0.113.2:4000"),
            peer("d", endpoint="[2001:db8::4]:51820", keepalive=5),
        ),
    )
    assert actions == [
        f"remove peer {PUBLIC['c'][:8]}...",
        f"change peer a ({PUBLIC['a'][:8]}...): allowed-ips 10.3.0.0/16, 10.99.0.1/32,"
        " keepalive off",
        f"change peer b ({PUBLIC['b'][:8]}...): endpoint 203.0.113.2:4000",
        f"add peer d ({PUBLIC['d'][:8]}...): allowed-ips 10.4.0.0/16, 10.99.0.4/32,"
        " keepalive 5, endpoint [2001:db8::4]:51820",
    ]
    assert set(wg.value("peers").split()) == {PUBLIC["a"], PUBLIC["b"], PUBLIC["d"]}
    assert wg.show("endpoints")[PUBLIC["b"]] == "203.0.113.2:4000"
    assert wg.show("endpoints")[PUBLIC["d"]] == "[2001:db8::4]:51820"
    assert set(wg.show("allowed-ips")[PUBLIC["a"]].split()) == {"10.99.0.1/32", "10.3.0.0/16"}
    assert wg.show("persistent-keepalive")[PUBLIC["a"]] == "off"
    assert wg.show("persistent-keepalive")[PUBLIC["d"]] == "5"

    # Never recreated: same interface, same wireguard-go.
    assert (wg.ifindex(), wg.process.pid) == before
    assert wg.process.poll() is None


def test_a_rerun_changes_nothing_and_learned_endpoints_stay(wg: Wg):
    wanted = want(peer("a"), peer("b", endpoint="198.51.100.2:51820"))
    sync(wg, wanted)
    # WireGuard learns a's endpoint (roaming); a has none wanted, so it is kept.
    in_ns("wg", "set", wg.name, "peer", PUBLIC["a"], "endpoint", "[2001:db8::99]:40000")
    assert sync(wg, wanted) == []
    assert wg.show("endpoints")[PUBLIC["a"]] == "[2001:db8::99]:40000"
    with wg.open() as live:
        assert live.read().peers[PUBLIC["a"]].endpoint == Endpoint("2001:db8::99", 40000)


def test_preshared_keys_are_set_changed_and_removed(wg: Wg):
    wanted = want(peer("a"), peer("b"), preshared_keys=True, preshared_dir="/unused")
    sync(wg, wanted)
    derived = {n: str(pair_preshared_key(OWN, KEYS[n].public_key())) for n in "ab"}
    assert wg.show("preshared-keys") == {PUBLIC[n]: derived[n] for n in "ab"}
    # The other end derives the same.
    assert str(pair_preshared_key(KEYS["a"], OWN.public_key())) == derived["a"]

    actions = sync(wg, want(peer("a"), peer("b"), preshared_keys=True, preshared_secret=b"s"))
    assert all(a.endswith("preshared key set") for a in actions) and len(actions) == 2
    assert wg.show("preshared-keys")[PUBLIC["a"]] == str(
        pair_preshared_key(OWN, KEYS["a"].public_key(), b"s")
    )

    assert len(sync(wg, want(peer("a"), peer("b")))) == 2
    assert wg.show("preshared-keys") == {PUBLIC["a"]: "(none)", PUBLIC["b"]: "(none)"}


def test_a_restarted_session_keeps_the_peer_as_it_was(wg: Wg):
    # The traversal sidecar's failover to another relay: the peer is removed and added back,
    # so WireGuard forgets its session; everything configured, the preshared key too, stays.
    endpoint = "127.0.0.1:40001"
    wanted = want(
        peer("a", endpoint=endpoint, keepalive=25),
        peer("b"),
        preshared_keys=True,
        preshared_dir="/unused",
    )
    sync(wg, wanted)
    shown = {field: wg.show(field) for field in ("preshared-keys", "endpoints", "allowed-ips")}
    with wg.open() as live:
        live.restart_session(PUBLIC["a"])
        assert wgstate.diff(live.read(), wanted) == []
    assert {field: wg.show(field) for field in shown} == shown
    assert wg.show("persistent-keepalive")[PUBLIC["a"]] == "25"
    with wg.open() as live, pytest.raises(wgdevice.DeviceError, match="no peer"):
        live.restart_session(PUBLIC["c"])


def test_listen_port_and_private_key(wg: Wg):
    before = wg.ifindex()
    sync(wg, want(listen_port=51999))
    assert wg.value("listen-port") == "51999"
    assert wg.value("public-key") == str(OWN.public_key())
    sync(wg, want(listen_port=52000))
    assert wg.value("listen-port") == "52000"

    rotated = WireguardKey.generate()
    wanted = wgstate.desired(
        listen_port=52000,
        addresses=["10.99.0.9/24"],
        mtu=None,
        private_key_file="/unused",
        own_private=rotated,
        peers=[],
    )
    with wg.open() as live:
        (change,) = wgstate.diff(live.read(), wanted)
        assert isinstance(change, wgstate.SetPrivateKey)
        # The key given must be the one planned.
        with pytest.raises(wgdevice.DeviceError, match="not the one planned"):
            live.apply([change], OWN)
        live.apply([change], rotated)
    assert wg.value("public-key") == str(rotated.public_key())
    assert wg.ifindex() == before


def test_addresses_and_mtu_with_ip(wg: Wg):
    sync(wg, want(addresses=["10.99.0.9/24", "fd99::9/64"], mtu=1380))
    link = json.loads(sh("ip", "-n", NAMESPACE, "-j", "address", "show", "dev", wg.name))[0]
    assert link["mtu"] == 1380
    found = {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]}
    assert {"10.99.0.9/24", "fd99::9/64"} <= found
    actions = sync(wg, want(addresses=["fd99::9/64"], mtu=1420))
    assert actions == ["set mtu 1380 -> 1420", "remove address 10.99.0.9/24"]
    link = json.loads(sh("ip", "-n", NAMESPACE, "-j", "address", "show", "dev", wg.name))[0]
    assert "10.99.0.9" not in {a["local"] for a in link["addr_info"]}


def test_nothing_secret_is_read_into_the_state(wg: Wg):
    sync(wg, want(peer("a"), preshared_keys=True, preshared_dir="/unused"))
    secret = wg.show("preshared-keys")[PUBLIC["a"]]
    with wg.open() as live:
        text = repr(live.read())
    assert str(OWN) not in text and OWN.hex not in text
    assert secret not in text and base64.b64decode(secret).hex() not in text


def test_a_refused_change_names_the_change_and_nothing_secret(wg: Wg):
    sync(wg, want(peer("a"), preshared_keys=True, preshared_dir="/unused"))
    # A socket of our own holds the port, in the namespace; wireguard-go cannot take it.
    holder = subprocess.Popen(
        [
            *("ip", "netns", "exec", NAMESPACE, "python3", "-c"),
            "import socket, time\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            "s.bind(('::', 51830))\n"
            "print('bound', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "bound\n"
        with wg.open() as live, pytest.raises(wgdevice.DeviceError) as caught:
            live.apply(wgstate.diff(live.read(), want(peer("a"), listen_port=51830)))
    finally:
        holder.kill()
        holder.wait()
    message = str(caught.value)
    assert message.startswith(f"{wg.name}: set listen-port 51820 -> 51830: wireguard-go refused")
    assert str(OWN) not in message and OWN.hex not in message
    with wg.open() as live, pytest.raises(wgdevice.DeviceError, match="cannot add peer x"):
        live.apply([wgstate.PendingPeer("x")])


def test_a_missing_interface(namespace: str):
    def run(argv: Sequence[str]) -> str:
        return wgdevice.run_command(["ip", "netns", "exec", namespace, *argv])

    with pytest.raises(wgdevice.InterfaceMissing):
        wgdevice.LiveInterface.open("mwtnone0", run)


# --- the kernel's netlink messages, and the change encodings ----------------------------------


def _encoded(attrs: list[Any]) -> wgmsg:
    """A WG_CMD_GET_DEVICE answer as the kernel sends it, decoded by pyroute2."""
    message = wgmsg()
    message["cmd"] = 0
    message["version"] = 1
    message["attrs"] = attrs
    message.encode()
    decoded = wgmsg(message.data)
    decoded.decode()
    return decoded


def _allowed(family: int, raw: bytes, cidr: int) -> dict[str, Any]:
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", raw],
            ["WGALLOWEDIP_A_CIDR_MASK", cidr],
        ]
    }


def test_netlink_state_adds_up_a_peer_split_across_messages():
    psk = WireguardKey.generate()
    b64 = {name: str(key).encode() for name, key in (("own", OWN.public_key()), ("psk", psk))}
    first = _encoded(
        [
            ["WGDEVICE_A_IFNAME", "mesh0"],
            ["WGDEVICE_A_PRIVATE_KEY", str(OWN).encode()],
            ["WGDEVICE_A_PUBLIC_KEY", b64["own"]],
            ["WGDEVICE_A_LISTEN_PORT", 51820],
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", PUBLIC["a"].encode()],
                            ["WGPEER_A_PRESHARED_KEY", b64["psk"]],
                            ["WGPEER_A_ENDPOINT", {"addr": "2001:db8::1", "port": 5}],
                            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                            ["WGPEER_A_ALLOWEDIPS", [_allowed(2, bytes([10, 1, 0, 0]), 16)]],
                        ]
                    },
                ],
            ],
        ]
    )
    # The kernel continues a peer in the next message: its key and more allowed IPs only.
    second = _encoded(
        [
            ["WGDEVICE_A_IFNAME", "mesh0"],
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", PUBLIC["a"].encode()],
                            ["WGPEER_A_ALLOWEDIPS", [_allowed(10, bytes(15) + b"\1", 128)]],
                        ]
                    },
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", PUBLIC["b"].encode()],
                            ["WGPEER_A_PRESHARED_KEY", base64.b64encode(bytes(32))],
                            ["WGPEER_A_ENDPOINT", {"addr": "198.51.100.2", "port": 51820}],
                            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 0],
                        ]
                    },
                ],
            ],
        ]
    )
    public, port, peers = wgdevice.netlink_state([first, second])
    assert (public, port) == (str(OWN.public_key()), 51820)
    a, b = peers[PUBLIC["a"]], peers[PUBLIC["b"]]
    assert [str(n) for n in a.allowed_ips] == ["10.1.0.0/16", "::1/128"]
    assert a.endpoint == Endpoint("2001:db8::1", 5)
    assert a.keepalive == 25
    assert a.preshared_digest == wgstate.psk_digest(psk)
    assert b == wgstate.PeerState((), Endpoint("198.51.100.2", 51820), 0, None)


def test_netlink_state_of_an_interface_without_key_or_peers():
    empty = _encoded([["WGDEVICE_A_IFNAME", "mesh0"], ["WGDEVICE_A_LISTEN_PORT", 0]])
    assert wgdevice.netlink_state([empty]) == (None, 0, {})


def test_changes_as_netlink_arguments_and_uapi_lines():
    psk = WireguardKey.generate()
    add = wgstate.SetPeer(
        PUBLIC["a"],
        "a",
        new=True,
        allowed_ips=tuple(want(peer("a")).peers[PUBLIC["a"]].allowed_ips),
        endpoint=Endpoint("2001:db8::1", 5),
        keepalive=25,
        preshared_changed=True,
        preshared_key=psk,
    )
    assert wgdevice.netlink_arguments(add, None) == {
        "peer": {
            "public_key": PUBLIC["a"],
            "endpoint_addr": "2001:db8::1",
            "endpoint_port": 5,
            "persistent_keepalive": 25,
            "preshared_key": str(psk),
            "replace_allowed_ips": True,
            "allowed_ips": ["10.1.0.0/16", "10.99.0.1/32"],
        }
    }
    assert wgdevice.uapi_lines(add, None) == [
        f"public_key={KEYS['a'].public_key().hex}",
        "endpoint=[2001:db8::1]:5",
        "persistent_keepalive_interval=25",
        f"preshared_key={psk.hex}",
        "replace_allowed_ips=true",
        "allowed_ip=10.1.0.0/16",
        "allowed_ip=10.99.0.1/32",
    ]
    # No endpoint: no endpoint line at all (the library writes "endpoint=None:None").
    bare = wgstate.SetPeer(PUBLIC["a"], "a", new=False, preshared_changed=True)
    assert wgdevice.uapi_lines(bare, None) == [
        f"public_key={KEYS['a'].public_key().hex}",
        f"preshared_key={'0' * 64}",
    ]
    assert wgdevice.netlink_arguments(bare, None)["peer"]["preshared_key"] == str(
        WireguardKey(bytes(32))
    )
    remove = wgstate.RemovePeer(PUBLIC["b"])
    assert wgdevice.netlink_arguments(remove, None) == {
        "peer": {"public_key": PUBLIC["b"], "remove": True}
    }
    assert wgdevice.uapi_lines(remove, None)[-1] == "remove=true"
    rotate = wgstate.SetPrivateKey("/k", None, str(OWN.public_key()))
    assert wgdevice.netlink_arguments(rotate, OWN) == {"private_key": str(OWN)}
    assert wgdevice.uapi_lines(rotate, OWN) == [f"private_key={OWN.hex}"]
    assert wgdevice.uapi_lines(wgstate.SetListenPort(1, 2), None) == ["listen_port=2"]


# --- files and names ---------------------------------------------------------------------


def test_secret_files_are_kept_exactly(tmp_path: Path):
    directory = tmp_path / "mesh0.psk"
    files = {"a.psk": "key-a\n", "b.psk": "key-b\n"}
    assert wgdevice.sync_secret_files(str(directory), files, check_mode=True)
    assert not directory.exists()
    assert wgdevice.sync_secret_files(str(directory), files, check_mode=False)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name, text in files.items():
        assert (directory / name).read_text() == text
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert not wgdevice.sync_secret_files(str(directory), files, check_mode=False)
    (directory / "other.txt").write_text("left alone")
    changed = {"a.psk": "key-a2\n"}
    assert wgdevice.sync_secret_files(str(directory), changed, check_mode=True)
    assert (directory / "b.psk").exists()
    assert wgdevice.sync_secret_files(str(directory), changed, check_mode=False)
    assert sorted(p.name for p in directory.iterdir()) == ["a.psk", "other.txt"]
    assert (directory / "a.psk").read_text() == "key-a2\n"


def test_key_files(tmp_path: Path):
    assert wgdevice.read_key_file(str(tmp_path / "none")) is None
    (tmp_path / "k").write_text(f"{OWN}\n")
    assert wgdevice.read_key_file(str(tmp_path / "k")) == OWN
    (tmp_path / "bad").write_text(OWN.hex)
    with pytest.raises(KeyFormatError) as caught:
        wgdevice.read_key_file(str(tmp_path / "bad"))
    assert OWN.hex[:8] not in str(caught.value)


def test_resolve_gives_ip_endpoints(monkeypatch: pytest.MonkeyPatch):
    # A fake resolver: a real lookup could send a DNS query off this machine.
    answers: dict[str, list[str]] = {"relay1.example": ["2001:db8:0::1", "198.51.100.1"] * 2}

    def getaddrinfo(host: str, port: int, *args: Any, **kw: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(0, 0, 0, "", (address, port)) for address in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert wgdevice.resolve(Endpoint("relay1.example", 51820)) == [
        Endpoint("2001:db8::1", 51820),
        Endpoint("198.51.100.1", 51820),
    ]
    assert wgdevice.resolve(Endpoint("gone.example", 1)) == []
