"""The sidecar's configuration (JSON, written by the sidecar role): parsed and checked, no I/O
but reading the file. Errors name the entry and the value.

Two parts, both optional: the TLS carrier's (a UDP-blocked site: ``relays``, ``certificate``,
``key``, ``wireguard_port``; :mod:`.carrier` shows the format) and ``traversal`` (a UDP site
with relayed, punch or direct peers; :func:`parse_traversal`)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshwright.metrics import MetricsSetting, parse_setting
from meshwright.wire.endpoint import EndpointError, parse_endpoint
from meshwright.wire.frames import normalize_fingerprint

from .traversal import MODES, PeerConfig


class SidecarConfigError(ValueError):
    """The configuration is unusable; the message names the entry and the value."""


@dataclass(frozen=True)
class TlsRelay:
    name: str
    address: str
    port: int  # the relay's TLS port
    fingerprint: str  # "sha256:<hex>" of the certificate the relay serves
    site_port: int  # this site's relay port (the same on every relay): what its frames carry
    local_port: int  # 127.0.0.1:<it>: WireGuard's endpoint for every peer through this relay
    # The relay's standby certificate: pinned too, so that the relay may switch to it (a
    # rotation) before this site's configuration names it alone. RFC 7469's backup pin.
    standby_fingerprint: str | None = None

    @property
    def pins(self) -> tuple[str, ...]:
        """Every fingerprint the relay may present."""
        standby = () if self.standby_fingerprint is None else (self.standby_fingerprint,)
        return (self.fingerprint, *standby)


@dataclass(frozen=True)
class Config:
    relays: dict[str, TlsRelay]
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
    """The carrier's configuration from its JSON value; SidecarConfigError names what is
    wrong."""
    if not isinstance(data, dict):
        raise SidecarConfigError("the configuration is not a JSON object")
    if data.get("peers"):
        # The carrier of a relay pair per peer: its plan has no site_port or local_port.
        raise SidecarConfigError(
            "peers: no longer used (one local port per relay: relays.<name>.local_port);"
            " run the playbook again"
        )
    wireguard_port = _port(data.get("wireguard_port", 51820), "wireguard_port")
    relays: dict[str, TlsRelay] = {}
    raw_relays = data.get("relays") or {}
    if not isinstance(raw_relays, dict):
        raise SidecarConfigError("relays: not an object")
    used: dict[int, str] = {wireguard_port: "wireguard_port"}
    for name, entry in raw_relays.items():
        where = f"relays.{name}"
        if not isinstance(entry, dict):
            raise SidecarConfigError(f"{where}: not an object")
        pin = _pin(entry.get("fingerprint"), f"{where}.fingerprint")
        standby = entry.get("standby_fingerprint")
        local_port = _port(entry.get("local_port"), f"{where}.local_port")
        # WireGuard tells the relays apart by these endpoints: one each.
        if local_port in used:
            raise SidecarConfigError(
                f"{where}.local_port: {local_port} is also {used[local_port]}'s"
            )
        used[local_port] = name
        relays[name] = TlsRelay(
            name,
            _text(entry.get("address"), f"{where}.address"),
            _port(entry.get("port", 443), f"{where}.port"),
            pin,
            _port(entry.get("site_port"), f"{where}.site_port"),
            local_port,
            None if standby is None else _pin(standby, f"{where}.standby_fingerprint"),
        )
    return Config(
        relays,
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


# --- traversal (UDP sites): the peers whose path the sidecar chooses -------------------------


@dataclass(frozen=True)
class StunRelayPeer:
    """A relay's WG-STUN service, reached inside WireGuard at its overlay address."""

    name: str
    overlay_address: str
    port: int


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
    peers: tuple[PeerConfig, ...]
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


def _mode(entry: dict[str, Any], where: str) -> str:
    """The peer's mode; a configuration without one (written before direct peers had any)
    says ``upgrade``: true for punch, false for relay. Both given must agree."""
    upgrade = entry.get("upgrade")
    if upgrade is not None and not isinstance(upgrade, bool):
        raise SidecarConfigError(f"{where}.upgrade: not true or false")
    mode = entry.get("mode")
    if mode is None:
        return "relay" if upgrade is False else "punch"
    if mode not in MODES:
        raise SidecarConfigError(f"{where}.mode: {mode!r} is not one of {', '.join(MODES)}")
    if upgrade is not None and upgrade != (mode != "relay"):
        raise SidecarConfigError(f"{where}.upgrade: {upgrade} contradicts mode {mode}")
    return str(mode)


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
        direct = entry.get("direct_endpoint")
        peers.append(
            PeerConfig(
                name,
                _text(entry.get("public_key"), f"{where}.public_key"),
                _address(entry.get("overlay_address"), f"{where}.overlay_address"),
                endpoint,
                str(entry.get("relay") or ""),
                None if standby is None else _endpoint(standby, f"{where}.standby_endpoint"),
                str(entry.get("standby_relay") or ""),
                _mode(entry, where),
                None if direct is None else _endpoint(direct, f"{where}.direct_endpoint"),
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
    carrier = parse_config(data) if data.get("relays") or data.get("peers") else None
    traversal = parse_traversal(data["traversal"]) if data.get("traversal") else None
    return carrier, traversal
