"""The site sidecar (`meshwright sidecar`): one service per site, beside WireGuard.

Today it carries a UDP-blocked site's WireGuard datagrams to its relays over TLS
(:mod:`.carrier`, configured by :mod:`.config`).
"""

from __future__ import annotations

from .carrier import Sidecar, main
from .config import Config, PeerSpec, SidecarConfigError, TlsRelay, load_config

__all__ = ["Config", "PeerSpec", "Sidecar", "SidecarConfigError", "TlsRelay", "load_config", "main"]
