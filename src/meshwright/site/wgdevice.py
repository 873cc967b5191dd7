"""The running WireGuard interface: read it, and apply :mod:`meshwright.site.wgstate`'s changes
live, without ever recreating the interface.

Through wireguard-tools: its UAPI device for wireguard-go's socket
(``/var/run/wireguard/<ifname>.sock``) or, without one, kernel WireGuard over generic netlink
(pyroute2). wireguard-go's state is read with the library's ``get_config``. The rest is our own,
kept small (docs/architecture.md, "Where we keep our own code", says why):

* changes go one at a time, as UAPI ``set=1`` lines for one peer or setting (wireguard-go) or
  one pyroute2 ``WireGuard.set`` call (kernel), never as a whole configuration: the library's
  ``set_config`` always replaces every peer, and for wireguard-go it writes ``endpoint=None:None``
  for a peer without endpoint and the preshared key in base64, both refused;
* the kernel's state is read from pyroute2's netlink messages directly, because the library's
  reader keeps only the last message's allowed IPs of a peer the kernel splits across messages.

Addresses and MTU are iproute2's ``ip``, as the module always ran it (``ip -j`` parses as JSON;
the runner can point it into a network namespace, which the tests use).

The private key is read into this process only (to load it, and to derive the public key that
stands for it); it is in no state, change, error or log line. Preshared keys are kept as
digests, except in the :class:`~meshwright.site.wgstate.SetPeer` that sets one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, cast

from wireguard_tools.wireguard_device import WireguardDevice
from wireguard_tools.wireguard_key import WireguardKey
from wireguard_tools.wireguard_uapi import WireguardUAPIDevice

from meshwright.site.keys import parse_key
from meshwright.site.wgstate import (
    AddAddress,
    Change,
    PeerState,
    PendingPeer,
    RemoveAddress,
    RemovePeer,
    RunningState,
    SetListenPort,
    SetMtu,
    SetPeer,
    SetPrivateKey,
    address_order,
    networks,
    psk_digest,
)
from meshwright.wire.endpoint import Endpoint, EndpointError

__all__ = [
    "DeviceError",
    "InterfaceMissing",
    "LiveInterface",
    "netlink_state",
    "read_key_file",
    "resolve",
    "run_command",
    "sync_secret_files",
]

Runner = Callable[[Sequence[str]], str]
UAPI_TIMEOUT_S = 10.0
MAX_KEY_FILE = 4096
_ZERO_KEY = WireguardKey(bytes(32))


class DeviceError(RuntimeError):
    """Reading or changing the interface failed. Messages hold public data only."""


class InterfaceMissing(DeviceError):
    """The interface does not exist."""


def run_command(argv: Sequence[str]) -> str:
    """Run a command; its output, or DeviceError with its error output."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip()
        raise DeviceError(f"{' '.join(argv)} failed ({done.returncode}): {detail}")
    return done.stdout


def _device(name: str) -> WireguardDevice:
    """wireguard-go's UAPI socket when it has one, else the kernel's netlink. The library's
    ``WireguardDevice.get`` does the same, but imports pyroute2 (a third of a second) even
    for wireguard-go, which the sidecar would pay at every start."""
    try:
        return WireguardUAPIDevice(name)
    except FileNotFoundError:
        from wireguard_tools.wireguard_netlink import WireguardNetlinkDevice

        return WireguardNetlinkDevice(name)


class LiveInterface:
    """One running WireGuard interface, kernel or wireguard-go."""

    def __init__(self, name: str, device: WireguardDevice, run: Runner) -> None:
        self.name = name
        self.device = device
        self.run = run
        # pyroute2's WireGuard socket, for kernel WireGuard; None for wireguard-go.
        self.netlink: Any = (
            None if isinstance(device, WireguardUAPIDevice) else cast(Any, device).wg
        )

    @classmethod
    def open(cls, name: str, run: Runner = run_command) -> LiveInterface:
        """InterfaceMissing when there is no such interface."""
        try:
            run(["ip", "link", "show", "dev", name])
        except DeviceError:
            raise InterfaceMissing(f"{name} does not exist") from None
        try:
            device = _device(name)
        except OSError as exc:  # a stale socket of a wireguard-go that is gone
            raise DeviceError(f"{name}: cannot reach wireguard-go: {exc}") from None
        if isinstance(device, WireguardUAPIDevice):
            # The library reads without a timeout: a hung wireguard-go would hang the run.
            device.uapi_socket.settimeout(UAPI_TIMEOUT_S)
        return cls(name, device, run)

    @property
    def userspace(self) -> bool:
        return isinstance(self.device, WireguardUAPIDevice)

    def close(self) -> None:
        self.device.close()

    def __enter__(self) -> LiveInterface:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- reading -------------------------------------------------------------------------------

    def read(self) -> RunningState:
        public_key, listen_port, peers = self._read_wireguard()
        links = json.loads(self.run(["ip", "-j", "address", "show", "dev", self.name]) or "[]")
        addresses = sorted(
            {
                ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
                for link in links
                for info in link.get("addr_info", [])
                if info.get("scope") == "global"
            },
            key=address_order,
        )
        return RunningState(
            public_key=public_key,
            listen_port=listen_port,
            addresses=tuple(addresses),
            mtu=int(links[0]["mtu"]) if links and "mtu" in links[0] else None,
            peers=peers,
        )

    def _read_wireguard(self) -> tuple[str | None, int, dict[str, PeerState]]:
        if self.netlink is not None:
            try:
                return netlink_state(self.netlink.info(self.name))
            except Exception as exc:  # pyroute2's NetlinkError, or no WireGuard in the kernel
                raise DeviceError(f"{self.name}: cannot read it as WireGuard: {exc}") from None
        try:
            config = self.device.get_config()
        except (OSError, RuntimeError) as exc:
            raise DeviceError(f"{self.name}: cannot read it from wireguard-go: {exc}") from None
        public = None if not config.private_key else str(config.private_key.public_key())
        peers = {
            str(key): PeerState(
                allowed_ips=networks([ip.network for ip in peer.allowed_ips]),
                endpoint=_endpoint(peer.endpoint_host, peer.endpoint_port),
                keepalive=peer.persistent_keepalive or 0,
                preshared_digest=psk_digest(peer.preshared_key),
            )
            for key, peer in config.peers.items()
        }
        return public, config.listen_port or 0, peers

    # --- changing ------------------------------------------------------------------------------

    def restart_session(self, public_key: str) -> None:
        """Remove the peer and add it back as it was, so that WireGuard forgets its session
        and starts a handshake with the next packet (its keepalive, at once). The preshared
        key is read and put back, never kept or shown."""
        peer = self._read_wireguard()[2].get(public_key)
        if peer is None:
            raise DeviceError(f"{self.name}: no peer {public_key[:8]}...")
        again = SetPeer(
            public_key,
            "",
            new=True,
            allowed_ips=peer.allowed_ips,
            endpoint=peer.endpoint,
            keepalive=peer.keepalive,
            preshared_changed=peer.preshared_digest is not None,
            preshared_key=self._preshared_key(public_key),
        )
        self.apply([RemovePeer(public_key), again])

    def _preshared_key(self, public_key: str) -> WireguardKey | None:
        if self.netlink is not None:
            for part in self.netlink.info(self.name):
                for peer in part.get("WGDEVICE_A_PEERS") or []:
                    attrs = dict(peer["attrs"])
                    psk = attrs.get("WGPEER_A_PRESHARED_KEY")
                    if attrs["WGPEER_A_PUBLIC_KEY"].decode() == public_key and psk:
                        return WireguardKey(psk.decode())
            return None
        peer = self.device.get_config().peers.get(WireguardKey(public_key))
        psk = None if peer is None else peer.preshared_key
        return WireguardKey(psk) if psk else None

    def apply(self, changes: Iterable[Change], private_key: WireguardKey | None = None) -> None:
        """Apply the changes in order; ``private_key`` is needed for a SetPrivateKey."""
        for change in changes:
            try:
                self._apply(change, private_key)
            except DeviceError:
                raise
            except Exception as exc:  # netlink or socket errors: name the change, not the data
                raise DeviceError(f"{self.name}: {change.describe()}: {exc}") from None

    def _apply(self, change: Change, private_key: WireguardKey | None) -> None:
        if isinstance(change, SetMtu):
            self.run(["ip", "link", "set", "dev", self.name, "mtu", str(change.new)])
        elif isinstance(change, RemoveAddress):
            self.run(["ip", "address", "del", str(change.address), "dev", self.name])
        elif isinstance(change, AddAddress):
            self.run(["ip", "address", "replace", str(change.address), "dev", self.name])
        elif isinstance(change, PendingPeer):
            raise DeviceError(f"{self.name}: cannot {change.describe()}")
        elif isinstance(change, SetPrivateKey):
            if private_key is None or str(private_key.public_key()) != change.new_public:
                raise DeviceError(
                    f"{self.name}: the private key to load is not the one planned"
                    f" ({change.new_public}): did {change.file} change during the run?"
                )
            self._set_wireguard(change, private_key)
        else:
            self._set_wireguard(change, None)

    def _set_wireguard(
        self, change: SetPrivateKey | SetListenPort | RemovePeer | SetPeer, key: WireguardKey | None
    ) -> None:
        if self.netlink is not None:
            self.netlink.set(self.name, **netlink_arguments(change, key))
            return
        errno = self.uapi_set(uapi_lines(change, key))
        if errno != 0:
            raise DeviceError(
                f"{self.name}: {change.describe()}: wireguard-go refused it (errno {errno})"
            )

    def uapi_set(self, lines: Sequence[str]) -> int:
        """Send one ``set=1`` transaction on the library's socket; wireguard-go's errno."""
        device = self.device
        assert isinstance(device, WireguardUAPIDevice)
        device.uapi_socket.sendall(("set=1\n" + "".join(f"{x}\n" for x in lines) + "\n").encode())
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = device.uapi_socket.recv(4096)
            if not chunk:
                raise DeviceError(f"{self.name}: wireguard-go closed its socket")
            answer += chunk
        fields = dict(line.split("=", 1) for line in answer.decode().split("\n") if "=" in line)
        return int(fields.get("errno", "-1"))


def uapi_lines(
    change: SetPrivateKey | SetListenPort | RemovePeer | SetPeer, key: WireguardKey | None
) -> list[str]:
    """One change as wireguard-go's UAPI lines (keys in hex, IPv6 endpoints in brackets)."""
    if isinstance(change, SetPrivateKey):
        assert key is not None
        return [f"private_key={key.hex}"]
    if isinstance(change, SetListenPort):
        return [f"listen_port={change.new}"]
    lines = [f"public_key={WireguardKey(change.public_key).hex}"]
    if isinstance(change, RemovePeer):
        return [*lines, "remove=true"]
    if change.endpoint is not None:
        lines.append(f"endpoint={change.endpoint}")
    if change.keepalive is not None:
        lines.append(f"persistent_keepalive_interval={change.keepalive}")
    if change.preshared_changed:
        lines.append(f"preshared_key={(change.preshared_key or _ZERO_KEY).hex}")
    if change.allowed_ips is not None:
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={network}" for network in change.allowed_ips]
    return lines


def netlink_arguments(
    change: SetPrivateKey | SetListenPort | RemovePeer | SetPeer, key: WireguardKey | None
) -> dict[str, Any]:
    """One change as the arguments of pyroute2's ``WireGuard.set`` (keys in base64)."""
    if isinstance(change, SetPrivateKey):
        assert key is not None
        return {"private_key": str(key)}
    if isinstance(change, SetListenPort):
        return {"listen_port": change.new}
    peer: dict[str, Any] = {"public_key": change.public_key}
    if isinstance(change, RemovePeer):
        return {"peer": {**peer, "remove": True}}
    if change.endpoint is not None:
        peer["endpoint_addr"] = change.endpoint.host
        peer["endpoint_port"] = change.endpoint.port
    if change.keepalive is not None:
        peer["persistent_keepalive"] = change.keepalive
    if change.preshared_changed:
        peer["preshared_key"] = str(change.preshared_key or _ZERO_KEY)
    if change.allowed_ips is not None:
        peer["replace_allowed_ips"] = True
        peer["allowed_ips"] = [str(network) for network in change.allowed_ips]
    return {"peer": peer}


def netlink_state(parts: Iterable[Any]) -> tuple[str | None, int, dict[str, PeerState]]:
    """(public key, listen port, peers) from the kernel's WG_CMD_GET_DEVICE answer, decoded by
    pyroute2. A peer with many allowed IPs continues in the next message (its public key
    again, then more allowed IPs): they are added up, not replaced."""
    public: str | None = None
    port = 0
    found: dict[str, dict[str, Any]] = {}
    for part in parts:
        if part.get("WGDEVICE_A_PUBLIC_KEY"):
            public = part.get("WGDEVICE_A_PUBLIC_KEY").decode()
        port = part.get("WGDEVICE_A_LISTEN_PORT") or port
        for peer in part.get("WGDEVICE_A_PEERS") or []:
            attrs = dict(peer["attrs"])
            entry = found.setdefault(attrs["WGPEER_A_PUBLIC_KEY"].decode(), {"allowed": []})
            entry["allowed"] += [a["addr"] for a in attrs.pop("WGPEER_A_ALLOWEDIPS", [])]
            entry.update(attrs)
    peers = {}
    for key, attrs in found.items():
        endpoint = attrs.get("WGPEER_A_ENDPOINT") or {}
        psk = attrs.get("WGPEER_A_PRESHARED_KEY")
        peers[key] = PeerState(
            allowed_ips=networks([ipaddress.ip_network(a, strict=False) for a in attrs["allowed"]]),
            endpoint=_endpoint(endpoint.get("addr"), endpoint.get("port")),
            keepalive=attrs.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
            preshared_digest=psk_digest(WireguardKey(psk.decode())) if psk else None,
        )
    if public is not None and not WireguardKey(public):
        public = None  # a kernel interface without a private key reports zeros
    return public, port, peers


def _endpoint(host: object, port: int | None) -> Endpoint | None:
    if host is None or not port:
        return None
    try:
        return Endpoint.of(str(host), port)
    except EndpointError:  # the kernel's "0.0.0.0:0" for a peer that has none
        return None


# --- the node's files and names ----------------------------------------------------------------


def read_key_file(path: str) -> WireguardKey | None:
    """The private key in ``path``; None when there is no file. KeyFormatError when it does not
    hold one (the message never quotes the file)."""
    try:
        with open(path, "rb") as handle:
            return parse_key(handle.read(MAX_KEY_FILE))
    except FileNotFoundError:
        return None


def resolve(endpoint: Endpoint) -> list[Endpoint]:
    """The IP endpoints a host-name endpoint names now (DNS), in the resolver's order; [] when
    it does not resolve."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except OSError:
        return []
    found = [Endpoint.of(str(info[4][0]), endpoint.port) for info in infos]
    return list(dict.fromkeys(found))


def sync_secret_files(
    directory: str, files: Mapping[str, str], check_mode: bool, suffix: str = ".psk"
) -> bool:
    """Keep exactly ``files`` (name -> secret content) among the ``suffix`` files of a
    root-only directory; True if anything changed (would change, in check mode)."""
    present = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    stale = sorted(name for name in present if name.endswith(suffix) and name not in files)
    outdated = [name for name, text in files.items() if _read(directory, name) != text]
    if check_mode or not (stale or outdated):
        return bool(stale or outdated)
    if files and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
    for name in outdated:
        _write_secret(os.path.join(directory, name), files[name])
    for name in stale:
        os.unlink(os.path.join(directory, name))
    return True


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name)) as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_secret(path: str, text: str) -> None:
    """Write a root-only file atomically: readers see the old content or the new one."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".secret-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
