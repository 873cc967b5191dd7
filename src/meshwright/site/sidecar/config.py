"""The sidecar's configuration (JSON, written by the sidecar role): parsed and checked, no I/O
but reading the file. Errors name the entry and the value."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshwright.wire.frames import normalize_fingerprint


class SidecarConfigError(ValueError):
    """The configuration is unusable; the message names the entry and the value."""


@dataclass(frozen=True)
class TlsRelay:
    name: str
    address: str
    port: int
    fingerprint: str  # "sha256:<hex>"


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
        try:
            pin = normalize_fingerprint(_text(entry.get("fingerprint"), f"{where}.fingerprint"))
        except ValueError as exc:
            raise SidecarConfigError(f"{where}.fingerprint: {exc}") from None
        relays[name] = TlsRelay(
            name,
            _text(entry.get("address"), f"{where}.address"),
            _port(entry.get("port", 443), f"{where}.port"),
            pin,
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
