"""host:port, parsed and written in one place (members, listeners, gmond, the admin address)."""

from __future__ import annotations

from typing import Optional

from dvara_lib.errors import ConfigError

Address = tuple[str, int]      # (host, port); host lower-cased, IPv6 without brackets

MONGODB_PORT = 27017


def parse_port(text: str, what: str = "port", lowest: int = 1) -> int:
    """A TCP port lowest-65535 (0 lets the system pick). Can raise ValueError."""
    try:
        port = int(text.strip())
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {text!r}") from None
    if not lowest <= port <= 65535:
        raise ValueError(f"{what} must be {lowest}-65535, got {port}")
    return port


def parse_host(text: str) -> str:
    """A host name or IP literal, lower-cased, brackets stripped. Can raise ValueError."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() or c in "[]/," for c in host):
        raise ValueError(f"invalid host {text!r}")
    return host.lower()


def parse_address(text: str, default_port: Optional[int] = MONGODB_PORT,
                  lowest_port: int = 1) -> Address:
    """(host, port) from "host", "host:port", "[::1]:port" or a bare IPv6 literal.

    default_port=None makes the port mandatory. Can raise ValueError.
    """
    s = text.strip()
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid address {text!r}, expected [ipv6]:port")
        port_text: Optional[str] = rest[1:] if rest else None
    elif s.count(":") > 1:
        host, port_text = s, None  # bare IPv6 literal, no port
    else:
        host, sep, port_text = s.partition(":")
        port_text = port_text if sep else None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"address {text!r} needs a port (host:port)")
        return parse_host(host), default_port
    return parse_host(host), parse_port(port_text, f"port in {text!r}", lowest_port)


def parse_option(text: str, option: str, default_port: Optional[int] = None,
                 lowest_port: int = 1) -> Address:
    """parse_address for a command-line value. Can raise ConfigError naming option."""
    try:
        return parse_address(text, default_port, lowest_port)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def format_address(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize(text: str) -> str:
    """The one spelling of a member address ("DB1" and "db1:27017" alike)."""
    return format_address(*parse_address(text))
