"""Synthetic meshes for benchmarks and tests: seeded, any size, realistic mixes of NAT classes."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import random
from collections.abc import Iterable
from typing import Any

from .model import DEFAULT_LINK_KINDS, RELAY_KINDS, Mesh, Policy, Relay, Site

__all__ = ["REALISTIC_MIX", "public_key", "synthetic_mesh", "synthetic_site"]

# open, easy, hard, blocked
REALISTIC_MIX = (0.15, 0.45, 0.30, 0.10)


def public_key(name: str) -> str:
    """A well-formed (not a real) WireGuard public key, derived from the name."""
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


def synthetic_site(name: str, nat: str | None = "open", number: int = 1, **kw: Any) -> Site:
    """A site numbered ``number``; an ``open`` site gets an endpoint unless one is given."""
    if nat == "open" and "endpoint" not in kw:
        kw["endpoint"] = f"203.0.113.{number}:51820"
    kw.setdefault("public_key", public_key(name))
    kw.setdefault("overlay_address", f"10.99.0.{number}")
    return Site(name=name, nat_class=nat, **kw)


def synthetic_mesh(
    count: int,
    *,
    seed: int = 0,
    mix: tuple[float, float, float, float] = REALISTIC_MIX,
    link_kinds: Iterable[str] = DEFAULT_LINK_KINDS,
    relays: int = 0,
    lans_per_site: int = 1,
    spokes: float = 0.0,
    hq_count: int = 3,
    no_direct: float = 0.0,
    no_relay: float = 0.0,
    prefix: str = "s",
    relay_rtts: bool = False,
) -> Mesh:
    """``count`` sites with NAT classes drawn from ``mix``.

    ``spokes``: the fraction of NATed sites whose policy names hubs (one or two of the first
    ``hq_count`` open sites). ``no_direct``/``no_relay``: fractions of sites with that policy flag
    false. ``relay_rtts``: every site that can send UDP has a probe round trip to each relay
    (2-150 ms, as distinct as real ones). Sites that may end up without a path (blocked sites
    when relay-tcp is not usable, and sites with a policy flag off) are not required.
    """
    rng = random.Random(seed)
    kinds = frozenset(link_kinds)
    tcp_ok = "relay-tcp" in kinds and relays > 0
    overlay = ipaddress.ip_network("100.64.0.0/10")
    lan_base = int(ipaddress.ip_address("10.0.0.0"))
    classes = ("open", "easy", "hard", "blocked")
    drawn = rng.choices(classes, weights=mix, k=count)
    names = [f"{prefix}{i:05d}" for i in range(count)]
    hqs = [name for name, c in zip(names, drawn, strict=True) if c == "open"][:hq_count]
    sites = []
    opens = 0
    for i, (name, nat_class) in enumerate(zip(names, drawn, strict=True)):
        endpoint = None
        if nat_class == "open":
            endpoint = f"203.0.113.{opens % 254 + 1}:{51820 + opens // 254}"
            opens += 1
        hubs = None
        if nat_class != "open" and hqs and rng.random() < spokes:
            hubs = tuple(sorted(rng.sample(hqs, min(len(hqs), rng.choice((1, 2))))))
        allow_direct = rng.random() >= no_direct
        allow_relay = rng.random() >= no_relay
        required = (nat_class != "blocked" or tcp_ok) and allow_direct and allow_relay
        rtts: tuple[tuple[str, float], ...] = ()
        if relay_rtts and nat_class != "blocked":
            rtts = tuple((f"relay{k}", round(rng.uniform(2.0, 150.0), 1)) for k in range(relays))
        lans = tuple(
            str(ipaddress.ip_network((lan_base + ((i * lans_per_site + k) << 8), 24)))
            for k in range(lans_per_site)
        )
        sites.append(
            Site(
                name=name,
                public_key=public_key(name),
                overlay_address=str(overlay.network_address + i + 1),
                lan_prefixes=lans,
                nat_class=nat_class,
                endpoint=endpoint,
                policy=Policy(allow_direct=allow_direct, allow_relay=allow_relay, hubs=hubs),
                required=required,
                relay_rtt_ms=rtts,
            )
        )
    relay_nodes = tuple(
        Relay(name=f"relay{k}", addresses=(f"198.51.100.{k + 1}",)) for k in range(relays)
    )
    return Mesh(
        sites=tuple(sites),
        relays=relay_nodes if relays or not (kinds & RELAY_KINDS) else (),
        overlay_network=str(overlay),
        link_kinds=kinds,
    )
