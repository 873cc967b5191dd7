"""Endpoints (``ip:port``, ``[ipv6]:port``): the one parser and formatter of the project.

Standard library only, like the rest of :mod:`meshwright.wire`: the planner on the controller
and node code (modules, relays, sidecars) share it. IPv6 is always written in brackets, as
WireGuard, wireguard-go's UAPI and ``wg`` write it; an unbracketed IPv6 address with a port is
refused rather than guessed at (``2001:db8::1:51820`` is also a valid address without a port).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["Endpoint", "EndpointError", "format_endpoint", "parse_endpoint"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class EndpointError(ValueError):
    """A text is not an endpoint. ``value`` is that text; ``reason`` says what is wrong."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__(f"endpoint {value!r} is not valid: {reason}")
        self.value = value
        self.reason = reason


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """A host and a UDP/TCP port. ``host`` is an IP address in its canonical text form, or a
    DNS name when the parser was asked to accept names."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)

    @property
    def address(self) -> IPAddress | None:
        """The host as an IP address; None for a DNS name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @classmethod
    def of(cls, host: str | IPAddress, port: int) -> Endpoint:
        """An endpoint of an IP address (any text form) and a port; EndpointError otherwise."""
        return parse_endpoint(format_endpoint(host, port))


def format_endpoint(host: str | IPAddress, port: int) -> str:
    """``ip:port``, ``[ipv6]:port`` (canonical address text) or ``name:port``. Never raises,
    so that it is safe in log and error messages."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def parse_endpoint(text: str, *, names: bool = False) -> Endpoint:
    """``ip:port``, ``[ipv6]:port``, and with ``names`` also ``name:port``; the port 1-65535.

    Raises :class:`EndpointError` naming the text and what is wrong with it.
    """
    if not isinstance(text, str) or not text:
        raise EndpointError(text, "want ip:port, or [ipv6]:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise EndpointError(text, "want [ipv6]:port")
        port_text = rest[1:]
        try:
            address: IPAddress = ipaddress.IPv6Address(host)
        except ValueError:
            raise EndpointError(text, f"{host!r} in brackets is not an IPv6 address") from None
        canonical = str(address)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise EndpointError(text, "no port: want ip:port, or [ipv6]:port")
        if ":" in host:
            raise EndpointError(text, "an IPv6 address needs brackets: [ipv6]:port")
        try:
            canonical = str(ipaddress.IPv4Address(host))
        except ValueError:
            if not names:
                raise EndpointError(text, f"{host!r} is not an IP address") from None
            if not _is_host_name(host):
                raise EndpointError(
                    text, f"{host!r} is neither an IP address nor a host name"
                ) from None
            canonical = host.lower()
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise EndpointError(text, f"port {port_text!r} is not 1-65535")
    return Endpoint(canonical, int(port_text))


def _is_host_name(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    # An all-digit last label would be a mistyped IPv4 address, never a name.
    return (
        0 < len(name) <= 253
        and not labels[-1].isdigit()
        and all(_LABEL.match(label) for label in labels)
    )
