"""`meshwright relay`: the relay's forwarding service, the I/O around :mod:`.forward`.

It reads the plan's allocations for this relay from a JSON file (the relay role writes it):

    {"allocations": [{"a": "hard1", "b": "hard2", "address": "198.51.100.10",
                      "ports": [40000, 40001], "public_keys": ["<a's>", "<b's>"]}, ...],
     "limits": {"packets_per_second": 50000, "bytes_per_second": 100000000}}

and binds one UDP socket per allocation port. A datagram on a's port goes, unchanged, out of
b's port to b's confirmed address, and the other way round; :class:`.forward.Allocation`
decides what is accepted. SIGHUP re-reads the file: new allocations are opened, removed ones
closed, and unchanged ones keep their sockets and learned addresses, so a new relayed pair never
disturbs the others. The learned addresses and counters are written to the state file every
second when they changed (and at exit), and read back at start: after a restart, relayed pairs
carry traffic again at once. The standard library and, for its metrics, prometheus_client
(pure Python, in the node artifact): it runs on Debian's python3.

With a ``"tls"`` section the service also listens on TCP 443 (``"port"``) for sites that
cannot send UDP (:mod:`.tls`: mutual TLS, each site known by its pinned certificate and allowed
only its own allocation ports; :mod:`meshwright.site.sidecar` is the other end). Such a site's side
of an allocation is the pseudo-address ``("tls:<site>", <port>)``: what it sends goes through
:class:`.forward.Allocation` like any datagram, and what is sent to it becomes a frame on its
connection. Port 443 is shared with STUN over TCP: a connection that does not start a TLS
handshake is served as STUN (``"stun"``: the STUN service's addresses and ports), so that a
UDP-blocked site can still tell "UDP blocked" from "relay down"::

    "tls": {"port": 443, "listen": ["198.51.100.10"], "sites": {"blocked": "<PEM>"},
            "certificate": "/etc/meshwright/relay-tls.crt", "key": "/etc/meshwright/relay-tls.key",
            "stun": {"addresses": ["198.51.100.10"], "port": 3478, "alt_port": 3479}}

With ``"metrics": {"address": "10.99.0.254", "port": 9588}`` it serves Prometheus metrics there
(:mod:`meshwright.metrics`; absent is off), from the state the loop publishes once a second.

With ``"kernel": true`` the kernel forwards the transport data of confirmed sessions
(:mod:`.kernel`: nftables rules that this service installs, follows and removes; it needs
CAP_NET_ADMIN and ``net.ipv4.ip_forward`` on, and stays on the code's path, saying why, when it
has neither). Handshakes still come here; the rules' counters are folded into the allocations'.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from meshwright.metrics import MetricsEndpoint, parse_setting, relay_families
from meshwright.relay.stun_server import StunResponder, StunStreams, StunTcpClient
from meshwright.wire.endpoint import format_endpoint
from meshwright.wire.stream import widen_buffers

from . import kernel
from .forward import FORWARDED, FORWARDED_BYTES, Address, Allocation, Limits
from .tls import TlsClients

__all__ = ["RelayServer", "main"]

_BATCH = 256  # datagrams read from one socket per wake-up, so one busy pair cannot starve others
_MAX_DATAGRAM = 65535
_TRANSPORT = 4  # a WireGuard transport data message's type byte
KERNEL_FORWARDED = "kernel_forwarded"  # of "forwarded": the packets the kernel forwarded


@dataclass
class _Open:
    """One allocation in service: its forwarding state and its two sockets."""

    key: str  # "a--b"
    spec: tuple[str, tuple[int, int], tuple[str, str]]  # address, ports, public keys
    allocation: Allocation
    sockets: tuple[socket.socket, socket.socket]


class RelayConfigError(ValueError):
    """The allocation file is unusable; the message names the entry and the value."""


def _parse(data: Any) -> tuple[dict[str, tuple[str, tuple[int, int], tuple[str, str]]], Limits]:
    if not isinstance(data, dict):
        raise RelayConfigError("the allocation file is not a JSON object")
    limits = Limits(**(data.get("limits") or {}))
    specs: dict[str, tuple[str, tuple[int, int], tuple[str, str]]] = {}
    for position, entry in enumerate(data.get("allocations") or []):
        try:
            key = f"{entry['a']}--{entry['b']}"
            ports = (int(entry["ports"][0]), int(entry["ports"][1]))
            keys = (str(entry["public_keys"][0]), str(entry["public_keys"][1]))
            for text in keys:
                if len(base64.b64decode(text, validate=True)) != 32:
                    raise ValueError("a public key is not 32 bytes")
            specs[key] = (str(entry["address"]), ports, keys)
        except (KeyError, IndexError, TypeError, ValueError, binascii.Error) as exc:
            raise RelayConfigError(f"allocations[{position}]: {exc!r}") from None
    return specs, limits


class RelayServer:
    """Forwards for every allocation in ``config``; one thread, one selector."""

    def __init__(
        self, config: Path, state: Path | None = None, log: Callable[[str], None] = print
    ) -> None:
        self.config, self.state, self.log = config, state, log
        self.selector = selectors.DefaultSelector()
        self.open: dict[str, _Open] = {}
        self.limits = Limits()
        self.saved_counters: dict[str, Counter[str]] = {}
        self.tls: TlsClients | None = None
        self.stun: StunStreams | None = None
        self.by_port: dict[int, tuple[_Open, int]] = {}
        self.stats: dict[str, int] = {}
        self.tls_sites: tuple[str, ...] = ()
        # What a scrape reads (from the metrics thread): replaced whole, never changed.
        self.published: dict[str, Any] = {}
        self.metrics = MetricsEndpoint(lambda: relay_families(self.published), "relay", log)
        self._reload = True
        self._stop = False
        self._dirty = False
        # Kernel forwarding (None: off): the routes installed, by arrival port, and the last
        # reading of their counters.
        self.kernel: dict[int, kernel.Route] | None = None
        self.kernel_counts: dict[int, tuple[int, int, int]] = {}
        self._restored = self._read_state()

    # --- configuration --------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        if self.state is None or not self.state.exists():
            return {}
        try:
            allocations: dict[str, Any] = json.loads(self.state.read_text()).get("allocations", {})
            return allocations
        except (ValueError, AttributeError):
            return {}  # a damaged state file costs one handshake per pair, nothing more

    def reload(self) -> None:
        """Bring the open allocations to the file's; keep the unchanged ones untouched."""
        try:
            data = json.loads(self.config.read_text())
            specs, limits = _parse(data)
            metrics = parse_setting(data.get("metrics"))
        except (OSError, ValueError) as exc:
            self.log(f"relay: keeping the current allocations: {self.config}: {exc}")
            return
        self.limits = limits
        self._kernel_switch(bool(data.get("kernel")) if isinstance(data, dict) else False)
        for key, opened in list(self.open.items()):
            spec = specs.get(key)
            if spec == opened.spec:
                continue
            if spec is not None and spec[:2] == opened.spec[:2] and self._rekey(opened, spec):
                continue  # a key rotation: same ports, what was learned stays
            self._close(key)
        for key, spec in sorted(specs.items()):
            if key not in self.open:
                try:
                    self._open(key, spec)
                except OSError as exc:
                    where = " and ".join(format_endpoint(spec[0], port) for port in spec[1])
                    self.log(f"relay: cannot open {key} on {where}: {exc}")
        self.by_port = {o.spec[1][s]: (o, s) for o in self.open.values() for s in (0, 1)}
        tls = data.get("tls") if isinstance(data, dict) else None
        if tls:
            try:
                self._serve_tls(tls)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.log(f"relay: TLS service not (re)configured: {exc!r}")
        self.metrics.update(metrics)
        self.publish()
        self.log(f"relay: {len(self.open)} allocations")

    def _serve_tls(self, tls: dict[str, Any]) -> None:
        ports: dict[str, set[int]] = {}
        for key, opened in self.open.items():
            a, b = key.split("--")
            ports.setdefault(a, set()).add(opened.spec[1][0])
            ports.setdefault(b, set()).add(opened.spec[1][1])
        sites = {str(k): str(v) for k, v in (tls.get("sites") or {}).items()}
        self.tls_sites = tuple(sorted(sites))
        if self.tls is not None:
            self.tls.update(sites, ports)
            return
        stun = tls.get("stun")
        if stun and self.stun is None:
            responder = StunResponder(
                list(stun["addresses"]),
                int(stun.get("port", 3478)),
                int(stun.get("alt_port", 3479)),
            )
            self.stun = StunStreams(responder, self.selector, self.stats)
        self.tls = TlsClients(
            tls["certificate"],
            tls["key"],
            sites,
            ports,
            self._from_tls,
            on_other=self.stun.adopt if self.stun is not None else None,
            log=self.log,
        )
        self.tls.register(self.selector)
        for address in tls.get("listen") or []:
            self.tls.listen(str(address), int(tls.get("port", 443)))

    def _from_tls(self, site: str, port: int, payload: bytes) -> None:
        entry = self.by_port.get(port)
        if entry is None:
            return
        opened, side = entry
        source = ("tls:" + site, port)
        destination = opened.allocation.receive(side, source, payload, time.monotonic())
        if destination is not None:
            self._send(opened, 1 - side, payload, destination)
            if opened.allocation.also is not None:
                self._send(opened, 1 - side, payload, opened.allocation.also)

    def _send(self, opened: _Open, out_side: int, datagram: bytes, destination: Address) -> None:
        if destination[0].startswith("tls:"):
            if self.tls is not None:
                self.tls.send(destination[0][4:], destination[1], datagram)  # drops counted
            return
        try:
            opened.sockets[out_side].sendto(datagram, destination)
        except OSError:
            opened.allocation.counters["dropped_send_error"] += 1

    def _open(self, key: str, spec: tuple[str, tuple[int, int], tuple[str, str]]) -> None:
        address, ports, _ = spec
        restored = self._restored.get(key, {})
        # A pair when the state file is sound; Allocation rejects any other length.
        confirmed = cast(
            tuple[Address | None, Address | None],
            tuple(
                (str(c[0]), int(c[1])) if isinstance(c, list) and len(c) == 2 else None
                for c in restored.get("confirmed", [None, None])
            ),
        )
        allocation = Allocation(
            _public_keys(spec),
            self.limits,
            confirmed=confirmed if restored.get("spec") == _spec_json(spec) else (None, None),
        )
        sockets = []
        try:
            for port in ports:
                sock = socket.socket(
                    socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM
                )
                sockets.append(sock)
                widen_buffers(sock)
                sock.bind((address, port))
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        opened = _Open(key, spec, allocation, (sockets[0], sockets[1]))
        for side, sock in enumerate(sockets):
            self.selector.register(sock, selectors.EVENT_READ, (opened, side))
        self.open[key] = opened
        self._dirty = True

    def _rekey(self, opened: _Open, spec: tuple[str, tuple[int, int], tuple[str, str]]) -> bool:
        try:
            opened.allocation.rekey(_public_keys(spec))
        except ValueError:
            return False
        opened.spec = spec
        self._dirty = True
        return True

    def _close(self, key: str) -> None:
        opened = self.open.pop(key)
        self._kernel_withdraw(opened, {})
        for sock in opened.sockets:
            self.selector.unregister(sock)
            sock.close()
        self._dirty = True

    # --- state ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "allocations": {
                key: {
                    "spec": _spec_json(o.spec),
                    "confirmed": [list(c) if c else None for c in o.allocation.confirmed],
                    "counters": dict(sorted(o.allocation.counters.items())),
                }
                for key, o in sorted(self.open.items())
            }
        }

    def publish(self) -> None:
        """Hand the metrics thread a fresh copy of the counters (when metrics are on)."""
        if self.metrics.setting is None:
            return
        tls = None
        if self.tls is not None:
            connected = set(self.tls.connected)
            tls = {
                "sites": {
                    site: site in connected for site in sorted({*self.tls_sites, *connected})
                },
                "counters": dict(self.tls.counters),
            }
        self.published = {**self.snapshot(), "tls": tls}

    def save(self) -> None:
        if self.state is None:
            return
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.state)

    # --- the loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload", True))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "_stop", True))
        next_save = 0.0
        last_counts: dict[str, int] = {}
        try:
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self.reload()
                for key, mask in self.selector.select(timeout=1.0):
                    if self.tls is not None and self.tls.owns(key):
                        self.tls.handle(key, mask)
                    elif isinstance(key.data, StunTcpClient):
                        if self.stun is not None:
                            self.stun.read(key.data)
                    else:
                        opened, side = key.data
                        self._drain(opened, side)
                now = time.monotonic()
                if self.tls is not None:
                    self.tls.close_idle(now)
                if self.stun is not None:
                    self.stun.close_idle()
                if now >= next_save:
                    next_save = now + 1.0
                    self._kernel_tick(now)
                    self.publish()
                    counts = {k: sum(o.allocation.counters.values()) for k, o in self.open.items()}
                    if self._dirty or counts != last_counts:
                        self._dirty, last_counts = False, counts
                        self.save()
        finally:
            self.metrics.close()
            self.save()
            for open_key in list(self.open):
                self._close(open_key)
            self._kernel_switch(False)
            if self.tls is not None:
                self.tls.close()
            if self.stun is not None:
                self.stun.close_all()

    def _drain(self, opened: _Open, side: int) -> None:
        sock = opened.sockets[side]
        receive = opened.allocation.receive
        for _ in range(_BATCH):
            try:
                datagram, source = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to forward
            now = time.monotonic()
            destination: Address | None = receive(side, source[:2], datagram, now)
            if self.kernel is not None and datagram[:1] != b"\x04":
                # A handshake may have started waiting for an answer, or moved an address:
                # what the kernel forwards must change before that answer is forwarded.
                self._kernel_withdraw(opened, self._kernel_routes(opened, now))
            if destination is not None:
                self._send(opened, 1 - side, datagram, destination)
                if opened.allocation.also is not None:  # an initiation, to a moved site too
                    self._send(opened, 1 - side, datagram, opened.allocation.also)

    # --- kernel forwarding (:mod:`.kernel`) ---------------------------------------------------

    def _nft(self, script: str) -> str:
        """Run an nft script (or, with a leading "-j", a listing); OSError/CalledProcessError."""
        if script.startswith("-j"):
            command = ["nft", *script.split()]
            done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=10)
        else:
            done = subprocess.run(
                ["nft", "-f", "-"],
                input=script,
                check=True,
                capture_output=True,
                text=True,
                timeout=10,
            )
        return done.stdout

    def _kernel_switch(self, on: bool) -> None:
        """Turn kernel forwarding on or off; on stays off, logged, when it cannot be."""
        if on == (self.kernel is not None):
            return
        if on:
            try:
                forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
                if forwarding != "1":
                    raise OSError("net.ipv4.ip_forward is not 1")
                self._nft(kernel.setup())
            except (OSError, subprocess.SubprocessError) as exc:
                self.log(f"relay: kernel forwarding off, forwarding in the relay's code: {exc}")
                return
            self.kernel, self.kernel_counts = {}, {}
            self.log("relay: kernel forwarding on for confirmed sessions")
            return
        self.kernel = None
        try:
            self._nft(kernel.teardown())
        except (OSError, subprocess.SubprocessError) as exc:
            self.log(f"relay: could not remove the kernel forwarding rules: {exc}")

    def _kernel_routes(self, opened: _Open, now: float) -> dict[int, kernel.Route]:
        return kernel.routes(opened.spec[0], opened.spec[1], opened.allocation, now)

    def _kernel_apply(self, script: str) -> bool:
        try:
            self._nft(script)
        except (OSError, subprocess.SubprocessError) as exc:
            # The code's path forwards everything the rules would have: nothing is lost.
            said = getattr(exc, "stderr", None) or ""
            self.log(f"relay: kernel forwarding off after a failed change: {exc} {said}".strip())
            self._kernel_switch(False)
            return False
        return True

    def _kernel_withdraw(self, opened: _Open, wanted: dict[int, kernel.Route]) -> None:
        """Remove, now, the installed routes of ``opened`` that ``wanted`` does not hold."""
        installed = self.kernel
        if installed is None:
            return
        stale = [
            installed[port]
            for port in opened.spec[1]
            if port in installed and wanted.get(port) != installed[port]
        ]
        if stale and self._kernel_apply("".join(kernel.withdraw(route) for route in stale)):
            for route in stale:
                del installed[route.port]

    def _kernel_tick(self, now: float) -> None:
        """Fold the rules' counters into the allocations, then bring the routes up to date."""
        if self.kernel is None:
            return
        try:
            counts = kernel.counters(self._nft(f"-j list counters table ip {kernel.TABLE}"))
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            self.log(f"relay: cannot read the kernel forwarding counters: {exc}")
            counts = self.kernel_counts
        for port, (packets, octets, limited) in counts.items():
            last = self.kernel_counts.get(port, (0, 0, 0))
            # A counter below its last reading was made anew: all of it is new.
            delta = [
                now_ - last_ if now_ >= last_ else now_
                for now_, last_ in zip((packets, octets, limited), last, strict=True)
            ]
            entry = self.by_port.get(port)
            if entry is None or not any(delta):
                continue
            opened, side = entry
            tally = opened.allocation.counters
            tally[FORWARDED] += delta[0]
            tally[KERNEL_FORWARDED] += delta[0]
            tally[FORWARDED_BYTES] += delta[1]
            tally["dropped_rate_limited"] += delta[2]
            if delta[0]:
                opened.allocation.heard(side, now)
        self.kernel_counts = counts
        added: list[kernel.Route] = []
        for opened in self.open.values():
            wanted = self._kernel_routes(opened, now)
            self._kernel_withdraw(opened, wanted)
            if self.kernel is None:
                return  # a failed change turned it off
            added += [route for port, route in wanted.items() if port not in self.kernel]
        script = "".join(kernel.install(route, self.limits) for route in added)
        if added and self._kernel_apply(script) and self.kernel is not None:
            self.kernel.update((route.port, route) for route in added)


def _public_keys(spec: tuple[str, tuple[int, int], tuple[str, str]]) -> tuple[bytes, bytes]:
    """An allocation spec's two public keys, as the forwarding core takes them."""
    return (base64.b64decode(spec[2][0]), base64.b64decode(spec[2][1]))


def _spec_json(spec: tuple[str, tuple[int, int], tuple[str, str]]) -> list[Any]:
    address, ports, keys = spec
    return [address, list(ports), list(keys)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshwright relay", description="forward WireGuard datagrams for the plan's pairs"
    )
    parser.add_argument("--config", type=Path, default=Path("/etc/meshwright/relay.json"))
    parser.add_argument("--state", type=Path, default=None, help="learned addresses, counters")
    args = parser.parse_args(argv)
    server = RelayServer(args.config, args.state, log=lambda m: print(m, file=sys.stderr))
    server.serve_forever()
    return 0
