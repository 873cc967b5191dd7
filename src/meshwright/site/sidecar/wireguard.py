"""The sidecar's view of WireGuard: every peer's endpoint and counters, and endpoint changes.

Reading is the library's (``wireguard-tools``: UAPI for wireguard-go, netlink for the kernel,
through :class:`meshwright.site.wgdevice.LiveInterface`). Changing one peer's endpoint is ours:
the library's ``set_config`` replaces every peer, which would cut every tunnel for a moment;
one ``update_only`` UAPI transaction (or one netlink peer update) changes that endpoint alone.
A broken connection to wireguard-go (restarted) is reopened on the next call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from meshwright.site.wgdevice import DeviceError, LiveInterface
from meshwright.wire.endpoint import format_endpoint

__all__ = ["LiveWireGuard"]

Address = tuple[str, int]


class LiveWireGuard:
    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._live: LiveInterface | None = None

    def _open(self) -> LiveInterface:
        if self._live is None:
            self._live = LiveInterface.open(self.interface)
        return self._live

    def _reset(self) -> None:
        if self._live is not None:
            with contextlib.suppress(Exception):
                self._live.close()
        self._live = None

    def sample(self) -> Mapping[str, tuple[Address | None, int, int, float | None]]:
        """Public key -> (endpoint, bytes received, bytes sent, latest handshake in wall-clock
        seconds or None) of every peer."""
        try:
            config = self._open().device.get_config()
        except (OSError, RuntimeError, AssertionError) as exc:
            self._reset()
            raise DeviceError(f"{self.interface}: {exc}") from None
        found: dict[str, tuple[Address | None, int, int, float | None]] = {}
        for key, peer in config.peers.items():
            endpoint = None
            if peer.endpoint_host is not None and peer.endpoint_port is not None:
                endpoint = (str(peer.endpoint_host), int(peer.endpoint_port))
            # WireGuard reports 0 for "never" (the kernel and wireguard-go alike).
            handshake = float(peer.last_handshake) if peer.last_handshake else None
            found[str(key)] = (
                endpoint,
                int(peer.rx_bytes or 0),
                int(peer.tx_bytes or 0),
                handshake,
            )
        return found

    def set_endpoint(self, public_key: str, endpoint: Address) -> None:
        from wireguard_tools import WireguardKey

        key = WireguardKey(public_key)
        try:
            live = self._open()
            if live.netlink is not None:
                live.netlink.set(
                    self.interface,
                    peer={
                        "public_key": str(key),
                        "endpoint_addr": endpoint[0],
                        "endpoint_port": endpoint[1],
                    },
                )
                return
            lines = [
                f"public_key={key.hex}",
                "update_only=true",
                f"endpoint={format_endpoint(*endpoint)}",
            ]
            errno = live.uapi_set(lines)
        except (OSError, RuntimeError) as exc:
            self._reset()
            raise DeviceError(f"{self.interface}: set endpoint: {exc}") from None
        if errno != 0:
            raise DeviceError(
                f"{self.interface}: wireguard-go refused the endpoint (errno {errno})"
            )

    def reset_session(self, public_key: str) -> None:
        """Have WireGuard start the peer's session anew (remove it, add it back as it was)."""
        try:
            self._open().restart_session(public_key)
        except DeviceError:
            self._reset()
            raise
        except (OSError, RuntimeError) as exc:
            self._reset()
            raise DeviceError(f"{self.interface}: restart the session: {exc}") from None

    def close(self) -> None:
        self._reset()
