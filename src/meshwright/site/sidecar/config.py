"""The sidecar's configuration (JSON, written by the sidecar role): parsed and checked, no I/O
but reading the file. Errors name the entry and the value."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshwright.metrics import MetricsSetting, parse_setting
from meshwright.wire.endpoint import EndpointError, parse_endpoint
from meshwright.wire.frames import normalize_fingerprint


class SidecarConfigError(ValueError):
    """The configuration is unusable; the message names the entry and the value."""


@dataclass(frozen=True)
class TlsRelay:
    name: str
    address: str
    port: int
    fingerprint: str  # "sha256:<hex>" of the certificate the relay serves
    # The relay's standby certificate: pinned too, so that the relay may switch to it (a
    # rotation) before this site's configuration names it alone. RFC 7469's backup pin.
    standby_fingerprint: str | None = None

    @property
    def pins(self) -> tuple[str, ...]:
        """Every fingerprint the relay may present."""
        standby = () if self.standby_fingerprint is None else (self.standby_fingerprint,)
        return (self.fingerprint, *standby)


@dataclass(frozen=True)
class PeerSpec:
    name: str
    relay: str
    port: int  # the allocation port on the relay, and the local UDP port WireGuard talks to


@dataclass(frozen=True)
class Config:
    relays: dict[str, TlsRelay]
    peers: dict[str, PeerSpec]
    certificate: Path
    key: Path
    wireguard_port: int


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFFF:
        raise SidecarConfigError(f"{where}: {value!r} is not a port")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SidecarConfigError(f"{where}: {value!r} is not a non-empty string")
    return value


def _pin(value: object, where: str) -> str:
    try:
        return normalize_fingerprint(_text(value, where))
    except ValueError as exc:
        raise SidecarConfigError(f"{where}: {exc}") from None


def parse_config(data: Any) -> Config:
    """The configuration from its JSON value; SidecarConfigError names what is wrong."""
    if not isinstance(data, dict):
        raise SidecarConfigError("the configuration is not a JSON object")
    relays: dict[str, TlsRelay] = {}
    raw_relays = data.get("relays") or {}
    if not isinstance(raw_relays, dict):
        raise SidecarConfigError("relays: not an object")
    for name, entry in raw_relays.items():
        where = f"relays.{name}"
        if not isinstance(entry, dict):
            raise SidecarConfigError(f"{where}: not an object")
        pin = _pin(entry.get("fingerprint"), f"{where}.fingerprint")
        standby = entry.get("standby_fingerprint")
        relays[name] = TlsRelay(
            name,
            _text(entry.get("address"), f"{where}.address"),
            _port(entry.get("port", 443), f"{where}.port"),
            pin,
            None if standby is None else _pin(standby, f"{where}.standby_fingerprint"),
        )
    wireguard_port = _port(data.get("wireguard_port", 51820), "wireguard_port")
    peers: dict[str, PeerSpec] = {}
    used: dict[int, str] = {}
    raw_peers = data.get("peers") or []
    if not isinstance(raw_peers, list):
        raise SidecarConfigError("peers: not a list")
    for position, entry in enumerate(raw_peers):
        where = f"peers[{position}]"
        if not isinstance(entry, dict):
            raise SidecarConfigError(f"{where}: not an object")
        name = _text(entry.get("name"), f"{where}.name")
        relay = _text(entry.get("relay"), f"{where}.relay")
        port = _port(entry.get("port"), f"{where}.port")
        if relay not in relays:
            raise SidecarConfigError(f"{where}: relay {relay!r} is not in relays")
        if name in peers:
            raise SidecarConfigError(f"{where}: peer {name!r} appears twice")
        # Every peer needs its own local port, whichever relay it is on.
        if port in used or port == wireguard_port:
            other = used.get(port, "wireguard_port")
            raise SidecarConfigError(f"{where}: local port {port} is also {other}'s")
        used[port] = name
        peers[name] = PeerSpec(name, relay, port)
    return Config(
        relays,
        peers,
        Path(_text(data.get("certificate"), "certificate")),
        Path(_text(data.get("key"), "key")),
        wireguard_port,
    )


def load_config(path: Path) -> Config:
    """Read and parse the file; OSError or SidecarConfigError."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SidecarConfigError(f"not JSON: {exc}") from None
    return parse_config(data)


# --- traversal (UDP sites): the punch peers the sidecar upgrades ------------------------------


@dataclass(frozen=True)
class StunRelayPeer:
    """A relay's WG-STUN service, reached inside WireGuard at its overlay address."""

    name: str
    overlay_address: str
    port: int


@dataclass(frozen=True)
class PunchPeer:
    name: str
    public_key: str
    overlay_address: str
    relay_endpoint: tuple[str, int]
    relay: str = ""
    standby_endpoint: tuple[str, int] | None = None
    standby_relay: str = ""
    upgrade: bool = True


@dataclass(frozen=True)
class TraversalConfig:
    site: str
    public_key: str
    interface: str
    listen_port: int
    overlay_address: str
    control_port: int
    public_addresses: tuple[str, ...]
    relays: tuple[StunRelayPeer, ...]
    peers: tuple[PunchPeer, ...]
    state_file: Path
    metrics: MetricsSetting | None = None  # Prometheus metrics (meshwright.metrics); None: off


def _address(value: object, where: str) -> str:
    text = _text(value, where)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise SidecarConfigError(f"{where}: {text!r} is not an IP address") from None


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise SidecarConfigError(f"{where}: not a list")
    return value


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SidecarConfigError(f"{where}: not an object")
    return value


def _endpoint(value: object, where: str) -> tuple[str, int]:
    try:
        endpoint = parse_endpoint(_text(value, where))
    except EndpointError as exc:
        raise SidecarConfigError(f"{where}: {exc}") from None
    return (endpoint.host, endpoint.port)


def parse_traversal(data: Any) -> TraversalConfig:
    """The ``traversal`` part of the sidecar's configuration."""
    data = _object(data, "traversal")
    relays = []
    for position, entry in enumerate(_list(data.get("relays", []), "traversal.relays")):
        where = f"traversal.relays[{position}]"
        entry = _object(entry, where)
        relays.append(
            StunRelayPeer(
                _text(entry.get("name"), f"{where}.name"),
                _address(entry.get("overlay_address"), f"{where}.overlay_address"),
                _port(entry.get("port", 3480), f"{where}.port"),
            )
        )
    try:
        metrics = parse_setting(data.get("metrics"), "traversal.metrics")
    except ValueError as exc:
        raise SidecarConfigError(str(exc)) from None
    peers = []
    seen: set[str] = set()
    for position, entry in enumerate(_list(data.get("peers", []), "traversal.peers")):
        where = f"traversal.peers[{position}]"
        entry = _object(entry, where)
        name = _text(entry.get("name"), f"{where}.name")
        if name in seen:
            raise SidecarConfigError(f"{where}: peer {name!r} appears twice")
        seen.add(name)
        endpoint = _endpoint(entry.get("relay_endpoint"), f"{where}.relay_endpoint")
        standby = entry.get("standby_endpoint")
        upgrade = entry.get("upgrade", True)
        if not isinstance(upgrade, bool):
            raise SidecarConfigError(f"{where}.upgrade: not true or false")
        peers.append(
            PunchPeer(
                name,
                _text(entry.get("public_key"), f"{where}.public_key"),
                _address(entry.get("overlay_address"), f"{where}.overlay_address"),
                endpoint,
                str(entry.get("relay") or ""),
                None if standby is None else _endpoint(standby, f"{where}.standby_endpoint"),
                str(entry.get("standby_relay") or ""),
                upgrade,
            )
        )
    return TraversalConfig(
        site=_text(data.get("site"), "traversal.site"),
        public_key=_text(data.get("public_key"), "traversal.public_key"),
        interface=_text(data.get("interface", "mesh0"), "traversal.interface"),
        listen_port=_port(data.get("listen_port", 51820), "traversal.listen_port"),
        overlay_address=_address(data.get("overlay_address"), "traversal.overlay_address"),
        control_port=_port(data.get("control_port", 51821), "traversal.control_port"),
        public_addresses=tuple(
            _address(a, "traversal.public_addresses")
            for a in _list(data.get("public_addresses", []), "traversal.public_addresses")
        ),
        relays=tuple(relays),
        peers=tuple(peers),
        state_file=Path(
            _text(
                data.get("state_file", "/run/meshwright-sidecar/state.json"),
                "traversal.state_file",
            )
        ),
        metrics=metrics,
    )


def load_sidecar_file(path: Path) -> tuple[Config | None, TraversalConfig | None]:
    """Both parts of the file: the TLS carrier's (UDP-blocked sites) and traversal's."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SidecarConfigError(f"not JSON: {exc}") from None
    data = _object(data, "the configuration")
    carrier = parse_config(data) if data.get("peers") or data.get("relays") else None
    traversal = parse_traversal(data["traversal"]) if data.get("traversal") else None
    return carrier, traversal
