"""Prometheus metrics of the relay service and the traversal sidecar (docs/relays.md and
docs/sidecar.md, "Metrics", list every metric).

The decisions are pure: :func:`relay_families` and :func:`sidecar_families` turn the state each
daemon already keeps (the relay's :meth:`~meshwright.relay.server.RelayServer.snapshot` and
its TLS counters; the sidecar's status, as in its state file) into metric families, at scrape
time. Nothing counts twice and no loop is touched per packet: each daemon's loop publishes a
fresh state dict about once a second (one reference, never changed afterwards, so the HTTP
thread reads it without a lock), and a scrape renders whatever was published last.

:class:`MetricsEndpoint` serves them with ``prometheus_client``'s WSGI app from a thread of its
own, on one address and port (the ``metrics`` entry of the daemon's configuration: absent is
off). It is not ``start_http_server`` because of two things that function does on a node: it
cannot bind an overlay address before WireGuard has put it on its interface (we set
``IP_FREEBIND``, as the sidecar's control socket does), and it asks DNS for the address's name
(``HTTPServer.server_bind``), which on a node without DNS would hold the daemon's start.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector

from meshwright.relay.sites import DROP_REASONS
from meshwright.wire.endpoint import format_endpoint

__all__ = [
    "MetricsEndpoint",
    "MetricsSetting",
    "parse_setting",
    "relay_families",
    "sidecar_families",
]

IP_FREEBIND = 15
# Drop reasons shown from the start (at 0), so that rate() and increase() see the first drop:
# the per-site core's, and the relay service's own send errors.
RELAY_DROP_REASONS = (*DROP_REASONS, "send_error")
TLS_DROP_REASONS = ("no_connection", "bad_size", "buffer_full", "port_not_allowed")
# The traversal core's and the daemon's counters of dropped messages (dropped_<reason>).
SIDECAR_DROP_REASONS = (
    "control_malformed",
    "control_stranger",
    "control_unexpected",
    "probe_unknown",
    "probe_forged",
    "probe_replay",
    "probe_rate",
    "probe_unexpected",
    "probe_tunnel",
    "stun",
)
PATHS = ("direct", "relay")


@dataclass(frozen=True)
class MetricsSetting:
    """Where a daemon serves its metrics."""

    address: str
    port: int


def parse_setting(value: object, where: str = "metrics") -> MetricsSetting | None:
    """The ``metrics`` entry of a daemon's configuration, ``{"address": ..., "port": ...}``;
    absent (None) is off. ValueError names the entry and the value. Both are required: the
    roles own the defaults. An unspecified address (0.0.0.0, ::) is refused: metrics go on a
    local or overlay address only, never on a public one."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {value!r} is not an object")
    unknown = sorted(set(value) - {"address", "port"}, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    text = value.get("address")
    try:
        address = ipaddress.ip_address(text if isinstance(text, str) else "")
    except ValueError:
        raise ValueError(f"{where}.address: {text!r} is not an IP address") from None
    if address.is_unspecified:
        raise ValueError(
            f"{where}.address: {text!r} listens on every address; give a local or overlay one"
        )
    port = value.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise ValueError(f"{where}.port: {port!r} is not a port")
    return MetricsSetting(str(address), port)


# --- the relay ---------------------------------------------------------------------------------


def _reasons(counters: Mapping[str, Any], known: Iterable[str], prefix: str) -> list[str]:
    """Known reasons first (always shown), then any other the counters hold."""
    found = {key.removeprefix(prefix) for key in counters if key.startswith(prefix)}
    known = list(known)
    return known + sorted(found - set(known))


def _by_reason(
    name: str, text: str, counters: Mapping[str, Any], known: Iterable[str], prefix: str
) -> CounterMetricFamily:
    """A counter family labelled ``reason``: one sample per ``<prefix><reason>`` counter,
    the ``known`` reasons always (zero when not counted yet)."""
    family = CounterMetricFamily(name, text, labels=["reason"])
    for reason in _reasons(counters, known, prefix):
        family.add_metric([reason], counters.get(f"{prefix}{reason}", 0))
    return family


def relay_families(state: Mapping[str, Any]) -> list[Metric]:
    """The relay's metrics from its published state: ``sites`` as
    :meth:`~meshwright.relay.server.RelayServer.snapshot` gives them, ``stats``
    (:meth:`meshwright.relay.sites.Relay.stats`) and ``tls`` (None without the TLS service):
    ``{"sites": {site: connected}, "counters": TlsClients.counters}``."""
    sites: Mapping[str, Any] = state.get("sites") or {}
    stats: Mapping[str, int] = state.get("stats") or {}
    labels = ["site"]
    count = GaugeMetricFamily(
        "meshwright_relay_sites", "Sites this relay serves (one port each).", value=len(sites)
    )
    sessions = GaugeMetricFamily(
        "meshwright_relay_sessions",
        "WireGuard session indices the relay routes by (proven or tentative).",
        value=stats.get("sessions", 0),
    )
    per_site = {
        "forwarded": CounterMetricFamily(
            "meshwright_relay_forwarded_packets_total",
            "Datagrams the site sent that the relay forwarded (its code and the kernel).",
            labels=labels,
        ),
        "forwarded_bytes": CounterMetricFamily(
            "meshwright_relay_forwarded_bytes_total",
            "Bytes (UDP payload) the site sent that the relay forwarded.",
            labels=labels,
        ),
        "kernel_forwarded": CounterMetricFamily(
            "meshwright_relay_kernel_forwarded_packets_total",
            "Of the site's forwarded datagrams, those the kernel forwarded.",
            labels=labels,
        ),
        "delivered": CounterMetricFamily(
            "meshwright_relay_delivered_packets_total",
            "Datagrams the relay sent to the site.",
            labels=labels,
        ),
        "delivered_bytes": CounterMetricFamily(
            "meshwright_relay_delivered_bytes_total",
            "Bytes (UDP payload) the relay sent to the site.",
            labels=labels,
        ),
        "keepalives": CounterMetricFamily(
            "meshwright_relay_mapping_keepalives_total",
            "Mapping keepalives the site's sidecar sent while its pairs were direct (not"
            " forwarded).",
            labels=labels,
        ),
    }
    dropped = CounterMetricFamily(
        "meshwright_relay_dropped_packets_total",
        "Datagrams the site sent that the relay dropped, by reason (docs/relays.md).",
        labels=[*labels, "reason"],
    )
    confirmed = GaugeMetricFamily(
        "meshwright_relay_site_confirmed",
        "1 when the relay has proven the site's address (data can be sent to it), else 0.",
        labels=labels,
    )
    for site, entry in sorted(sites.items()):
        counters: Mapping[str, int] = entry.get("counters") or {}
        for key, family in per_site.items():
            family.add_metric([site], counters.get(key, 0))
        for reason in _reasons(counters, RELAY_DROP_REASONS, "dropped_"):
            dropped.add_metric([site, reason], counters.get(f"dropped_{reason}", 0))
        confirmed.add_metric([site], 1.0 if entry.get("confirmed") else 0.0)
    families: list[Metric] = [count, sessions, *per_site.values(), dropped, confirmed]
    tls = state.get("tls")
    if tls is not None:
        families += _tls_families(tls)
    return families


def _tls_families(tls: Mapping[str, Any]) -> list[Metric]:
    counters: Mapping[str, int] = tls.get("counters") or {}
    connected = GaugeMetricFamily(
        "meshwright_relay_tls_connected",
        "1 while the UDP-blocked site has a TLS session with the relay, else 0.",
        labels=["site"],
    )
    for site, up in sorted((tls.get("sites") or {}).items()):
        connected.add_metric([site], 1.0 if up else 0.0)
    frames = CounterMetricFamily(
        "meshwright_relay_tls_frames_total",
        "Frames (WireGuard datagrams) carried over the TLS sessions, by direction.",
        labels=["direction"],
    )
    frames.add_metric(["received"], counters.get("frames_in", 0))
    frames.add_metric(["sent"], counters.get("frames_out", 0))
    received = CounterMetricFamily(
        "meshwright_relay_tls_received_bytes_total",
        "Bytes received over the TLS sessions (after decryption).",
        value=counters.get("bytes_in", 0),
    )
    dropped = _by_reason(
        "meshwright_relay_tls_dropped_frames_total",
        "Frames dropped by the TLS relay, by reason.",
        counters,
        TLS_DROP_REASONS,
        "dropped_",
    )
    closed = _by_reason(
        "meshwright_relay_tls_closed_connections_total",
        "TLS connections the relay closed, by reason (idle, handshake_failed, superseded, ...).",
        counters,
        (),
        "closed_",
    )
    rejected = _by_reason(
        "meshwright_relay_tls_rejected_connections_total",
        "Connections to the TLS port closed at once: their source held too many unproven"
        " connections (source_limit), or the relay held too many in all (too_many).",
        counters,
        ("source_limit", "too_many"),
        "rejected_",
    )
    return [connected, frames, received, dropped, closed, rejected]


# --- the sidecar ---------------------------------------------------------------------------


def sidecar_families(state: Mapping[str, Any], wall: float) -> list[Metric]:
    """The traversal sidecar's metrics from its published status: the core's ``peers`` and
    ``counters``, and what the daemon adds (``wireguard``: per peer ``rx_bytes``,
    ``tx_bytes``, ``latest_handshake`` in wall-clock seconds or None; ``daemon_counters``).
    ``wall`` is the time now, for the handshake's age."""
    peers: Mapping[str, Any] = state.get("peers") or {}
    wireguard: Mapping[str, Any] = state.get("wireguard") or {}
    labels = ["peer"]
    path = GaugeMetricFamily(
        "meshwright_sidecar_peer_path",
        "1 for the punch peer's path in use (direct or relay), 0 for the other.",
        labels=[*labels, "path"],
    )
    rtt = GaugeMetricFamily(
        "meshwright_sidecar_peer_rtt_seconds",
        "Round trip of the peer's direct path, from the last authenticated probe.",
        labels=labels,
    )
    suspect = GaugeMetricFamily(
        "meshwright_sidecar_peer_suspect",
        "1 while the direct path sends data and hears nothing (being checked), else 0.",
        labels=labels,
    )
    failures = GaugeMetricFamily(
        "meshwright_sidecar_peer_failures",
        "Failed attempts and fallbacks in a row (the backoff's step; 0 after 60 s direct).",
        labels=labels,
    )
    counted = {
        name: CounterMetricFamily(f"meshwright_sidecar_peer_{name}_total", text, labels=labels)
        for name, text in (
            ("attempts", "Upgrade attempts (offers made or answered)."),
            ("upgrades", "Moves from the relay to a direct path."),
            ("fallbacks", "Moves from a direct path back to the relay."),
        )
    }
    age = GaugeMetricFamily(
        "meshwright_sidecar_peer_handshake_age_seconds",
        "Seconds since WireGuard's latest handshake with the peer (+Inf: none yet).",
        labels=labels,
    )
    received = CounterMetricFamily(
        "meshwright_sidecar_peer_received_bytes_total",
        "Bytes WireGuard received from the peer (its transfer counter).",
        labels=labels,
    )
    sent = CounterMetricFamily(
        "meshwright_sidecar_peer_sent_bytes_total",
        "Bytes WireGuard sent to the peer (its transfer counter).",
        labels=labels,
    )
    for name, peer in sorted(peers.items()):
        for each in PATHS:
            path.add_metric([name, each], 1.0 if peer.get("path") == each else 0.0)
        if peer.get("rtt_ms") is not None:
            rtt.add_metric([name], round(peer["rtt_ms"] / 1000, 6))  # the status's 0.01 ms
        suspect.add_metric([name], 1.0 if peer.get("suspect") else 0.0)
        failures.add_metric([name], peer.get("failures", 0))
        for key, family in counted.items():
            family.add_metric([name], peer.get(key, 0))
        device = wireguard.get(name)
        if device is None:
            continue  # WireGuard not read yet: no value rather than a wrong one
        handshake = device.get("latest_handshake")
        age.add_metric([name], max(0.0, wall - handshake) if handshake else math.inf)
        received.add_metric([name], device.get("rx_bytes", 0))
        sent.add_metric([name], device.get("tx_bytes", 0))
    counters = {**(state.get("counters") or {}), **(state.get("daemon_counters") or {})}
    dropped = _by_reason(
        "meshwright_sidecar_dropped_messages_total",
        "Control messages, probes and WG-STUN answers dropped, by reason.",
        counters,
        SIDECAR_DROP_REASONS,
        "dropped_",
    )
    errors = CounterMetricFamily(
        "meshwright_sidecar_errors_total",
        "Operations that failed (reading WireGuard, setting an endpoint, nftables, sockets).",
        labels=["operation"],
    )
    for key, value in sorted(counters.items()):
        if key.endswith("_errors"):
            errors.add_metric([key.removesuffix("_errors")], value)
    return [path, rtt, suspect, failures, *counted.values(), age, received, sent, dropped, errors]


# --- serving -----------------------------------------------------------------------------------


class _Families:
    """A collector (``prometheus_client``'s protocol) that renders families at scrape time."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is no news for the journal."""


class _Server(ThreadingWSGIServer):
    address_family = socket.AF_INET

    def server_bind(self) -> None:
        # Before WireGuard's address exists (the service starts before wg-quick), and no DNS
        # lookup of our own address (HTTPServer's getfqdn).
        self.socket.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsEndpoint:
    """One daemon's metrics listener, started, moved or stopped as its setting changes
    (:meth:`update`, on start and on every reload). A port that cannot be bound is logged and
    tried again at the next update; it never stops the daemon."""

    def __init__(
        self,
        families: Callable[[], Iterable[Metric]],
        name: str,
        log: Callable[[str], None] = print,
    ) -> None:
        self.name, self.log = name, log
        self.registry = CollectorRegistry()
        self.registry.register(_Families(families))
        # The daemon's own memory, CPU and open files (process_*): cheap, read from /proc.
        ProcessCollector(registry=self.registry)
        self.setting: MetricsSetting | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port listened on (the bound one, for port 0), or None."""
        return None if self._server is None else int(self._server.server_address[1])

    def update(self, setting: MetricsSetting | None) -> None:
        if setting == self.setting and (setting is None or self._server is not None):
            return
        self.close()
        self.setting = setting
        if setting is None:
            return
        server_class = _Server6 if ":" in setting.address else _Server
        try:
            server = make_server(
                setting.address,
                setting.port,
                make_wsgi_app(self.registry),
                server_class=server_class,
                handler_class=_Quiet,
            )
        except OSError as exc:
            where = format_endpoint(setting.address, setting.port)
            self.log(f"{self.name}: metrics not served on {where}: {exc}")
            return
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.log(f"{self.name}: metrics on {format_endpoint(setting.address, self.port or 0)}")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._server = self._thread = None
