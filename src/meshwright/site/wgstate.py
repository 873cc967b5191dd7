"""A WireGuard interface's running state, the state it should have, and the changes between.

Pure: no I/O. :func:`desired` validates the ``wg_sync`` module's input into a
:class:`WantedState`; :func:`diff` compares it with the :class:`RunningState` that
:mod:`meshwright.site.wgdevice` reads and returns typed changes, in the order they are safe to
apply, which that adapter applies live and whose :meth:`describe` lines the module reports;
:func:`expected` and :func:`render` give diff mode's before and after.

The rules:

* peers are matched by public key: one not wanted is removed, a missing one added, an existing
  one changed only in what differs;
* allowed IPs are compared as networks (host bits cleared, as WireGuard stores them); a prefix
  given to two peers is an error (cryptokey routing: a prefix belongs to exactly one peer);
* a peer without a wanted endpoint keeps the one WireGuard learned (roaming); one with an
  endpoint gets it when the running endpoint is not one of the addresses it names;
* the private key is compared by its public key, so neither state holds it;
* preshared keys are compared by digest, and only :class:`SetPeer` carries one (never shown);
* listen port, addresses (global ones; others are left alone) and MTU (when wanted).
"""

from __future__ import annotations

import hashlib
import ipaddress
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from wireguard_tools import WireguardKey

from meshwright.site.keys import KeyFormatError, pair_preshared_key, parse_key
from meshwright.wire.endpoint import Endpoint, EndpointError, parse_endpoint

__all__ = [
    "AddAddress",
    "Change",
    "PeerState",
    "PendingPeer",
    "RemoveAddress",
    "RemovePeer",
    "RunningState",
    "SetListenPort",
    "SetMtu",
    "SetPeer",
    "SetPrivateKey",
    "SpecError",
    "WantedPeer",
    "WantedState",
    "address_order",
    "desired",
    "diff",
    "expected",
    "networks",
    "psk_digest",
    "render",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Resolver = Callable[[Endpoint], Sequence[Endpoint]]

PEER_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SpecError(ValueError):
    """The wanted state is invalid, or cannot be reached. Messages hold public data only."""


def short(public_key: str) -> str:
    return public_key[:8] + "..."


def network_order(network: Network) -> tuple[int, int, int]:
    return network.version, int(network.network_address), network.prefixlen


def address_order(address: Address) -> tuple[int, int, int]:
    return address.version, int(address.ip), address.network.prefixlen


def networks(values: Sequence[Network]) -> tuple[Network, ...]:
    """Sorted, without duplicates: the form both states keep allowed IPs in."""
    return tuple(sorted(set(values), key=network_order))


def psk_digest(key: WireguardKey | None) -> str | None:
    """A preshared key's digest, to compare without keeping it; None for none (all zeros, as
    WireGuard reports a peer without one)."""
    if key is None or not key:
        return None
    return hashlib.sha256(key.keydata).hexdigest()


# --- the two states ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerState:
    """A running peer, public data only."""

    allowed_ips: tuple[Network, ...] = ()
    endpoint: Endpoint | None = None
    keepalive: int = 0  # 0: off
    preshared_digest: str | None = None


@dataclass(frozen=True)
class RunningState:
    """The running interface; ``public_key`` is derived from its private key (None: none)."""

    public_key: str | None
    listen_port: int
    addresses: tuple[Address, ...]
    mtu: int | None
    peers: Mapping[str, PeerState]


@dataclass(frozen=True)
class WantedPeer:
    name: str
    public_key: str
    allowed_ips: tuple[Network, ...] = ()
    endpoint: Endpoint | None = None  # as given, maybe a host name
    endpoint_addresses: tuple[Endpoint, ...] = ()  # what it names now; empty: unresolvable
    keepalive: int = 0
    preshared_key: WireguardKey | None = field(default=None, repr=False)
    preshared_key_file: str | None = None
    # A punch peer's endpoint is the sidecar's once the peer exists (relayed or direct):
    # the wanted endpoint (its relay allocation) is only where a new peer starts.
    endpoint_initial_only: bool = False
    # The pair's other relay paths (the plan's fallback_endpoints): a peer the sidecar moved
    # there (a relay failover, a dead direct path), or that roamed there, stays there.
    fallback_addresses: tuple[Endpoint, ...] = ()

    @property
    def preshared_digest(self) -> str | None:
        return psk_digest(self.preshared_key)


@dataclass(frozen=True)
class WantedState:
    public_key: str | None  # None: the key file is not made yet (check mode)
    private_key_file: str
    listen_port: int
    addresses: tuple[Address, ...]
    mtu: int | None  # None: leave it
    peers: Mapping[str, WantedPeer]  # by public key
    pending: tuple[str, ...] = ()  # names of peers whose key is not made yet (check mode)

    @property
    def preshared_files(self) -> dict[str, str]:
        """The preshared key files' names and contents (secret), by file name."""
        return {
            f"{peer.name}.psk": f"{peer.preshared_key}\n"
            for peer in self.peers.values()
            if peer.preshared_key is not None
        }


# --- changes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetPrivateKey:
    """Load the private key (the adapter is given it); compared by public key."""

    file: str
    old_public: str | None
    new_public: str

    def describe(self) -> str:
        return (
            f"set the private key from {self.file}"
            f" (public key {self.old_public or '(none)'} -> {self.new_public})"
        )


@dataclass(frozen=True)
class SetListenPort:
    old: int
    new: int

    def describe(self) -> str:
        return f"set listen-port {self.old} -> {self.new}"


@dataclass(frozen=True)
class RemovePeer:
    public_key: str

    def describe(self) -> str:
        return f"remove peer {short(self.public_key)}"


@dataclass(frozen=True)
class SetPeer:
    """Add a peer or change it. A None field is left as it is; ``preshared_changed`` says
    whether ``preshared_key`` is to be set (None: removed)."""

    public_key: str
    name: str
    new: bool
    allowed_ips: tuple[Network, ...] | None = None
    endpoint: Endpoint | None = None
    keepalive: int | None = None
    preshared_changed: bool = False
    preshared_key: WireguardKey | None = field(default=None, repr=False)

    def describe(self) -> str:
        what = []
        if self.allowed_ips is not None:
            what.append(f"allowed-ips {', '.join(map(str, self.allowed_ips)) or '(none)'}")
        if self.keepalive is not None:
            what.append(f"keepalive {self.keepalive or 'off'}")
        if self.endpoint is not None:
            what.append(f"endpoint {self.endpoint}")
        if self.preshared_changed:
            what.append("preshared key " + ("set" if self.preshared_key else "removed"))
        verb = "add" if self.new else "change"
        return f"{verb} peer {self.name} ({short(self.public_key)}): {', '.join(what)}"


@dataclass(frozen=True)
class SetMtu:
    old: int | None
    new: int

    def describe(self) -> str:
        return f"set mtu {self.old} -> {self.new}"


@dataclass(frozen=True)
class RemoveAddress:
    address: Address

    def describe(self) -> str:
        return f"remove address {self.address}"


@dataclass(frozen=True)
class AddAddress:
    address: Address

    def describe(self) -> str:
        return f"add address {self.address}"


@dataclass(frozen=True)
class PendingPeer:
    """Check mode only: a peer whose key is not made yet would be added."""

    name: str

    def describe(self) -> str:
        return f"add peer {self.name} (its key is not made yet)"


Change = (
    SetPrivateKey
    | SetListenPort
    | RemovePeer
    | SetPeer
    | SetMtu
    | RemoveAddress
    | AddAddress
    | PendingPeer
)


# --- the wanted state from the module's input --------------------------------------------------


def desired(
    *,
    listen_port: int,
    addresses: Sequence[str],
    mtu: int | None,
    private_key_file: str,
    own_private: WireguardKey | None,
    peers: Sequence[Mapping[str, Any]],
    preshared_keys: bool = False,
    preshared_secret: bytes = b"",
    preshared_dir: str = "",
    check_mode: bool = False,
    resolve: Resolver | None = None,
) -> WantedState:
    """Validate the input into the wanted state; SpecError names the field and value.

    ``own_private`` is None when the key file does not exist yet (check mode). ``resolve``
    turns a host-name endpoint into the addresses it names (the module's DNS lookup); without
    it, names resolve to nothing.
    """
    if not 0 < listen_port < 65536:
        raise SpecError(f"listen_port {listen_port} is not 1..65535")
    if mtu is not None and not 68 <= mtu <= 65535:  # 68: Linux's minimum for IPv4
        raise SpecError(f"mtu {mtu} is not 68..65535")
    own_public = None if own_private is None else str(own_private.public_key())
    # In check mode a peer's key may not be made yet (wg_keypair returns null there): such a
    # peer would be added, and cannot be compared with anything.
    known, pending = [], []
    for peer in peers:
        if check_mode and peer.get("public_key") is None:
            pending.append(str(peer.get("name") or "(no name)"))
        else:
            known.append(peer)
    wanted = _peers(known, own_public, resolve)
    if preshared_keys and own_private is not None:
        wanted = _with_preshared_keys(wanted, own_private, preshared_secret, preshared_dir)
    return WantedState(
        public_key=own_public,
        private_key_file=private_key_file,
        listen_port=listen_port,
        addresses=_addresses(addresses),
        mtu=mtu,
        peers=wanted,
        pending=tuple(pending),
    )


def _addresses(addresses: Sequence[str]) -> tuple[Address, ...]:
    result = set()
    for address in addresses:
        try:
            if "/" not in str(address):
                raise ValueError("no prefix length")
            result.add(ipaddress.ip_interface(address))
        except ValueError as exc:
            raise SpecError(
                f"address {address!r} is not an address with prefix length, such as"
                f" 10.99.0.1/24 ({exc})"
            ) from None
    return tuple(sorted(result, key=address_order))


def _peers(
    peers: Sequence[Mapping[str, Any]], own_public: str | None, resolve: Resolver | None
) -> dict[str, WantedPeer]:
    wanted: dict[str, WantedPeer] = {}
    owner_of: dict[Network, str] = {}
    names: set[str] = set()
    for index, peer in enumerate(peers):
        name = peer.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError(f"peers[{index}] has no name")
        if name in names:
            raise SpecError(f"peer {name} is given twice")
        names.add(name)
        raw_key = peer.get("public_key")
        try:
            key = str(parse_key(raw_key if isinstance(raw_key, str) else ""))
        except KeyFormatError as exc:
            raise SpecError(f"peer {name}: public_key is not a WireGuard key: {exc}") from None
        if key in wanted:
            raise SpecError(f"peers {wanted[key].name} and {name} have the same public key")
        if key == own_public:
            raise SpecError(f"peer {name} has this node's own public key")
        endpoint, addresses = _endpoint(name, peer.get("endpoint"), resolve)
        fallbacks = peer.get("fallback_endpoints") or []
        if isinstance(fallbacks, str) or not isinstance(fallbacks, list):
            raise SpecError(f"peer {name}: fallback_endpoints must be a list of endpoints")
        fallback_addresses = tuple(
            found for value in fallbacks for found in _endpoint(name, value, resolve)[1]
        )
        keepalive = peer.get("keepalive") or 0
        valid = isinstance(keepalive, int) and not isinstance(keepalive, bool)
        if not valid or not 0 <= keepalive <= 65535:
            raise SpecError(f"peer {name}: keepalive must be null or 0..65535 seconds")
        allowed = peer.get("allowed_ips") or []
        if isinstance(allowed, str) or not isinstance(allowed, list):
            raise SpecError(f"peer {name}: allowed_ips must be a list of prefixes")
        own: list[Network] = []
        for prefix in allowed:
            try:
                network = ipaddress.ip_network(str(prefix), strict=False)
            except ValueError:
                raise SpecError(f"peer {name}: {prefix!r} is not an IP prefix") from None
            if owner_of.get(network, name) != name:
                raise SpecError(
                    f"{network} is an allowed IP of both {owner_of[network]} and {name};"
                    " a prefix belongs to exactly one peer"
                )
            owner_of[network] = name
            own.append(network)
        wanted[key] = WantedPeer(
            name=name,
            public_key=key,
            allowed_ips=networks(own),
            endpoint=endpoint,
            endpoint_addresses=addresses,
            keepalive=keepalive,
            endpoint_initial_only=peer.get("mode") == "punch",
            fallback_addresses=fallback_addresses,
        )
    return wanted


def _endpoint(
    name: str, value: object, resolve: Resolver | None
) -> tuple[Endpoint | None, tuple[Endpoint, ...]]:
    if value is None or value == "":
        return None, ()
    try:
        endpoint = parse_endpoint(str(value), names=True)
    except EndpointError as exc:
        raise SpecError(f"peer {name}: {exc}") from None
    if endpoint.address is not None:
        return endpoint, (endpoint,)
    return endpoint, tuple(resolve(endpoint)) if resolve is not None else ()


def _with_preshared_keys(
    peers: dict[str, WantedPeer], own_private: WireguardKey, secret: bytes, directory: str
) -> dict[str, WantedPeer]:
    result = {}
    for key, peer in peers.items():
        if not PEER_FILE_NAME.match(peer.name):
            raise SpecError(f"peer name {peer.name!r} cannot name a preshared key file")
        try:
            psk = pair_preshared_key(own_private, WireguardKey(key), secret)
        except KeyFormatError as exc:
            raise SpecError(f"peer {peer.name}: {exc}") from None
        file = posixpath.join(directory, f"{peer.name}.psk")
        result[key] = replace(peer, preshared_key=psk, preshared_key_file=file)
    return result


# --- the diff ----------------------------------------------------------------------------------


def diff(running: RunningState, wanted: WantedState) -> list[Change]:
    """The changes that turn ``running`` into ``wanted``, in a safe order: key and port, peers
    removed (freeing their prefixes), peers added or changed by name, MTU, addresses."""
    changes: list[Change] = []
    new_public = wanted.public_key
    if new_public is not None and running.public_key != new_public:
        changes.append(SetPrivateKey(wanted.private_key_file, running.public_key, new_public))
    if running.listen_port != wanted.listen_port:
        changes.append(SetListenPort(running.listen_port, wanted.listen_port))
    changes += [RemovePeer(key) for key in sorted(set(running.peers) - set(wanted.peers))]
    for key, peer in sorted(wanted.peers.items(), key=lambda item: item[1].name):
        change = _peer_change(peer, running.peers.get(key))
        if change is not None:
            changes.append(change)
    changes += [PendingPeer(name) for name in wanted.pending]
    if wanted.mtu is not None and running.mtu != wanted.mtu:
        changes.append(SetMtu(running.mtu, wanted.mtu))
    changes += [RemoveAddress(a) for a in running.addresses if a not in wanted.addresses]
    changes += [AddAddress(a) for a in wanted.addresses if a not in running.addresses]
    return changes


def _peer_change(peer: WantedPeer, current: PeerState | None) -> SetPeer | None:
    if current is None:
        return SetPeer(
            peer.public_key,
            peer.name,
            new=True,
            allowed_ips=peer.allowed_ips,
            endpoint=_endpoint_change(peer, None),
            keepalive=peer.keepalive or None,  # off is WireGuard's default
            preshared_changed=peer.preshared_key is not None,
            preshared_key=peer.preshared_key,
        )
    change = SetPeer(
        peer.public_key,
        peer.name,
        new=False,
        allowed_ips=None if current.allowed_ips == peer.allowed_ips else peer.allowed_ips,
        endpoint=_endpoint_change(peer, current.endpoint),
        keepalive=None if current.keepalive == peer.keepalive else peer.keepalive,
        preshared_changed=current.preshared_digest != peer.preshared_digest,
        preshared_key=peer.preshared_key,
    )
    unchanged = SetPeer(peer.public_key, peer.name, new=False, preshared_key=peer.preshared_key)
    return None if change == unchanged else change


def _endpoint_change(peer: WantedPeer, running: Endpoint | None) -> Endpoint | None:
    """The endpoint to set, None to leave it (none wanted, or the running one is wanted or
    one of the pair's fallbacks, or the sidecar owns it)."""
    if peer.endpoint is None or running in peer.endpoint_addresses:
        return None
    if running is not None and running in peer.fallback_addresses:
        return None
    if peer.endpoint_initial_only and running is not None:
        return None
    if peer.endpoint_addresses:
        return peer.endpoint_addresses[0]
    if running is not None:
        return None  # a name that does not resolve now: keep what it resolved to before
    raise SpecError(f"peer {peer.name}: endpoint {peer.endpoint} does not resolve to an address")


def expected(running: RunningState, wanted: WantedState) -> RunningState:
    """The running state after :func:`diff`'s changes (what diff mode shows as "after")."""
    peers = {}
    for key, peer in wanted.peers.items():
        current = running.peers.get(key)
        endpoint = _endpoint_change(peer, None if current is None else current.endpoint)
        peers[key] = PeerState(
            allowed_ips=peer.allowed_ips,
            endpoint=endpoint or (None if current is None else current.endpoint),
            keepalive=peer.keepalive,
            preshared_digest=peer.preshared_digest,
        )
    return RunningState(
        public_key=wanted.public_key or running.public_key,
        listen_port=wanted.listen_port,
        addresses=wanted.addresses,
        mtu=running.mtu if wanted.mtu is None else wanted.mtu,
        peers=peers,
    )


def render(state: RunningState, names: Mapping[str, str], pending: Sequence[str] = ()) -> str:
    """A stable text of a state's public data, for diff mode; peers by name."""
    lines = [
        f"public_key: {state.public_key or '(none)'}",
        f"listen_port: {state.listen_port}",
        f"mtu: {state.mtu or '(unknown)'}",
        f"addresses: {', '.join(map(str, state.addresses)) or '(none)'}",
    ]
    for key in sorted(state.peers, key=lambda k: (names.get(k, "~"), k)):
        peer = state.peers[key]
        lines += [
            f"peer {names.get(key, '(not desired)')} {key}",
            f"  allowed_ips: {', '.join(map(str, peer.allowed_ips)) or '(none)'}",
            f"  endpoint: {peer.endpoint or '(none)'}",
            f"  keepalive: {peer.keepalive or 'off'}",
            f"  preshared_key: {'set' if peer.preshared_digest else '(none)'}",
        ]
    lines += [f"peer {name} (its key is not made yet)" for name in pending]
    return "\n".join(lines) + "\n"
