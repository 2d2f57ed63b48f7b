"""Command-line, environment and config-file settings for dvara, parsed into one frozen Settings."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import configargparse

from dvara_lib.address import (MONGODB_PORT, Address, format_address, parse_address, parse_host,
                               parse_port)
from dvara_lib import wire
from dvara_lib.errors import ConfigError

__all__ = [
    "Settings",
    "build_parser",
    "check_port_range",
    "describe",
    "parse_args",
    "parse_duration",
    "parse_size",
]



GANGLIA_PORT = 8649
ENV_PREFIX = "DVARA_"
LOG_LEVELS = ("debug", "info", "warning", "error")
_WILDCARD_HOSTS = ("0.0.0.0", "::")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class Settings:
    """Every dvara setting, resolved and validated. Durations are seconds (float)."""

    config_file: str | None
    addrs: tuple[Address, ...]
    listen_host: str
    advertise_host: str
    port_start: int
    port_end: int
    max_connections: int
    min_idle_connections: int
    max_client_connections: int
    max_per_client_connections: int
    workers: int
    processes: int
    cpu_affinity: str | tuple[int, ...]
    max_buffered_bytes: int
    worker_linger: float
    message_timeout: float
    client_idle_timeout: float
    server_idle_timeout: float
    pool_wait_timeout: float
    discovery_interval: float
    get_last_error_timeout: float
    metrics_interval: float
    graceful_timeout: float
    pidfile: str | None
    log_level: str
    log_file: str | None
    state_file: str | None
    tee_file: str | None
    member_map: tuple[tuple[Address, int], ...]
    ganglia: tuple[Address, ...]
    admin_addr: Address | None
    demo: bool
    demo_port: int
    demo_data_dir: str
    # authentication and TLS (dvara_lib.proxy.gate, dvara_lib.security)
    username: str | None
    password: str | None = dataclasses.field(repr=False)
    password_file: str | None
    auth_source: str
    auth_mechanism: str
    client_auth_file: str | None
    auth_failure_limit: int
    tls_mode: str
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_ca_file: str | None
    tls_require_client_cert: bool
    backend_tls: bool
    backend_tls_ca_file: str | None
    backend_tls_cert_file: str | None
    backend_tls_key_file: str | None
    # compression between the proxy and the servers (dvara_lib.backend.connect)
    backend_compressors: tuple[str, ...] = ()
    # one listener for all mongos routers, for loadBalanced=true drivers (dvara_lib.process.server)
    load_balanced: bool = False
    # SCRAM pass-through: server connections logged in as each client's user
    auth_passthrough: bool = False
    max_user_connections: int = 0
    # verifiers of users not in --client-auth-file, looked up on the servers (usersInfo)
    auth_query: bool = False
    auth_query_cache: float = 60.0


# ---------------------------------------------------------------- value parsers


def parse_duration(text: str) -> float:
    """Parse "500ms", "30s", "2m", "1h", "1m30s" or plain seconds ("12", "1.5") into seconds.

    Can raise ValueError. The sign is kept ("-5s" == -5.0); callers check the range.
    """
    s = text.strip().lower()
    if _PLAIN_NUMBER.fullmatch(s):
        return float(s)
    sign = -1.0 if s.startswith("-") else 1.0
    body = s[1:] if s[:1] in "+-" else s
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"expected a duration such as 500ms, 30s, 2m, 1h or plain seconds, got {text!r}")
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _split_list(text: str) -> list[str]:
    """Split a comma-separated list, dropping blanks."""
    return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------- argparse converters
# Each raises argparse.ArgumentTypeError; argparse prefixes the option's name.


def _type_error(exc: Exception) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(str(exc))


def _int_at_least(low: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    convert.__name__ = "integer"
    return convert


def _port(text: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise _type_error(exc) from None


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise _type_error(exc) from None
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text.strip()!r}")
    return seconds


def _duration_or_zero(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise _type_error(exc) from None
    if not seconds >= 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text.strip()!r}")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmg]?b?)")


def parse_size(text: str) -> int:
    """Parse "64MB", "1GB", "512KB", "1.5GB" or plain bytes into bytes (units of 1024).

    Can raise ValueError.
    """
    match = _SIZE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"expected a size such as 64MB, 1GB, 512KB or plain bytes, got {text!r}")
    number, unit = match.groups()
    if unit in ("k", "m", "g"):
        unit += "b"
    return int(float(number) * _SIZE_UNITS[unit])


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise _type_error(exc) from None
    if size < 1024 * 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1MB, got {text.strip()!r}")
    return size


def _processes(text: str) -> int:
    if text.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return _int_at_least(1)(text)


def _cpu_affinity(text: str) -> str | tuple[int, ...]:
    value = text.strip().lower()
    if value in ("auto", "none"):
        return value
    try:
        cpus = tuple(int(item) for item in _split_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, none or CPU numbers like 0,1, got {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"expected CPU numbers like 0,1, got {text!r}")
    return cpus


def _host(text: str) -> str:
    try:
        return parse_host(text)
    except ValueError as exc:
        raise _type_error(exc) from None


def _address_list(default_port: int | None) -> Callable[[str], tuple[Address, ...]]:
    def convert(text: str) -> tuple[Address, ...]:
        try:
            addrs = [parse_address(item, default_port) for item in _split_list(text)]
        except ValueError as exc:
            raise _type_error(exc) from None
        return tuple(dict.fromkeys(addrs))  # de-duplicate, keep order

    convert.__name__ = "address list"
    return convert


_ganglia_addresses = _address_list(GANGLIA_PORT)
_mongo_addresses = _address_list(MONGODB_PORT)


def _mongo_addresses_required(text: str) -> tuple[Address, ...]:
    addrs = _mongo_addresses(text)
    if not addrs:
        raise argparse.ArgumentTypeError("needs at least one host[:port]")
    return addrs


def _admin_addr(text: str) -> Address | None:
    if not text.strip():
        return None
    try:
        return parse_address(text, default_port=None)
    except ValueError as exc:
        raise _type_error(exc) from None


def _member_map_entry(item: str) -> tuple[Address, int]:
    real, sep, proxy = item.rpartition("=")
    if not sep or not real.strip():
        raise ValueError(f"expected real-host:port=proxy-port, got {item!r}")
    return parse_address(real), parse_port(proxy, f"proxy port in {item!r}")


def _member_map(text: str) -> tuple[tuple[Address, int], ...]:
    try:
        entries = [_member_map_entry(item) for item in _split_list(text)]
    except ValueError as exc:
        raise _type_error(exc) from None
    members = [format_address(*real) for real, _ in entries]
    proxies = [str(proxy) for _, proxy in entries]
    for kind, values in (("member", members), ("proxy port", proxies)):
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise argparse.ArgumentTypeError(f"{kind} mapped twice: {', '.join(dupes)}")
    return tuple(entries)


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def _optional_path(text: str) -> str | None:
    return text.strip() or None


def _choice(*choices: str) -> Callable[[str], str]:
    """A converter accepting one of choices (case-insensitive), returned as spelled here."""
    def convert(text: str) -> str:
        for choice in choices:
            if text.strip().lower() == choice.lower():
                return choice
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")

    convert.__name__ = "choice"
    return convert


def _compressors(text: str) -> tuple[str, ...]:
    """A comma list of snappy, zstd, zlib (or none), each installed here."""
    names = [n.lower() for n in _split_list(text)]
    if names in (["none"], []):
        return ()
    for name in names:
        if name not in ("snappy", "zstd", "zlib"):
            raise argparse.ArgumentTypeError(
                f"expected a comma list of snappy, zstd, zlib (or none), got {text!r}")
        if name not in wire.SUPPORTED_COMPRESSORS:
            raise argparse.ArgumentTypeError(
                f"{name} needs the {wire.COMPRESSOR_PACKAGES[name]} package: "
                "pip install 'dvara[compression]'")
    return tuple(dict.fromkeys(names))


def _optional_text(text: str) -> str | None:
    return text.strip() or None


def _db_name(text: str) -> str:
    name = text.strip()
    if not name or any(c in name for c in '/\\. "$'):
        raise argparse.ArgumentTypeError(f"expected a database name, got {text!r}")
    return name


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


# ---------------------------------------------------------------- the option table


@dataclass(frozen=True)
class _Option:
    """One long option: flag --name, config key name, env var DVARA_NAME."""

    name: str
    convert: Callable[[str], Any] | None
    default: str | None  # as a user would type it; converted by argparse
    group: str
    metavar: str | None
    help: str
    action: str = "store"
    default_text: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.dest.upper()


# fmt: off
_OPTIONS: tuple[_Option, ...] = (
    # replica set
    _Option("addrs", _mongo_addresses_required, "localhost:27017", "backend", "HOST:PORT[,...]",
            "seed list of replica-set members (or of mongos routers); the port defaults "
            "to 27017"),
    _Option("member-map", _member_map, "", "backend", "HOST:PORT=PORT[,...]",
            "pin members to proxy ports: real-host:port=proxy-port", default_text="empty"),
    _Option("discovery-interval", _duration, "5s", "backend", "DURATION",
            "how often the replica set is re-discovered"),
    _Option("backend-compressors", _compressors, "", "backend", "NAME[,...]",
            "compress what the proxy and the servers send each other on pooled "
            "connections (snappy, zstd, zlib, in order of preference; the server picks; "
            "restart to change)", default_text="none"),
    # listeners
    _Option("listen-host", _host, "127.0.0.1", "listen", "HOST",
            "interface the per-member proxy listeners bind to"),
    _Option("advertise-host", _host, None, "listen", "HOST",
            "host name the proxy reports to clients in isMaster",
            default_text="listen-host, or this machine's host name when that is 0.0.0.0 or ::"),
    _Option("port-start", _port, "6000", "listen", "PORT", "first proxy port (inclusive)"),
    _Option("port-end", _port, "6010", "listen", "PORT", "last proxy port (inclusive)"),
    _Option("load-balanced", None, None, "listen", None,
            "mongos routers only: one listener on --port-start for all of them, for drivers "
            "connected with loadBalanced=true (each client connection stays on one router); "
            "the routers' own ports follow it", action="store_true", default_text="false"),
    # connection pools
    _Option("max-connections", _int_at_least(1), "100", "pool", "N",
            "maximum server connections per member"),
    _Option("min-idle-connections", _int_at_least(0), "0", "pool", "N",
            "idle server connections kept open per member"),
    _Option("max-client-connections", _int_at_least(1), "20000", "pool", "N",
            "maximum client connections in total"),
    _Option("max-per-client-connections", _int_at_least(1), "10000", "pool", "N",
            "maximum client connections from one client IP"),
    _Option("workers", _int_at_least(1), "32", "pool", "N",
            "threads that forward messages (in each process)"),
    _Option("processes", _processes, "1", "pool", "N",
            "processes that serve clients (auto: one per core); together they keep every "
            "limit, --max-connections included"),
    _Option("cpu-affinity", _cpu_affinity, "auto", "pool", "auto|none|CPU[,...]",
            "run each serving process on one CPU: auto takes the allowed CPUs in turn "
            "(process i on the i-th), a list names them, none leaves it to the kernel"),
    _Option("max-buffered-bytes", _size, "1GB", "pool", "SIZE",
            "bytes held for clients' incomplete messages, in all; above it clients in the "
            "middle of a message are read no further until the buffers drain"),
    _Option("worker-linger", _duration_or_zero, "1ms", "pool", "DURATION",
            "how long a worker waits for a client's next message before giving the client "
            "back to the acceptor, when no other message waits (0: never)"),
    # timeouts
    _Option("message-timeout", _duration, "2m", "timeouts", "DURATION",
            "how long a server may take to answer one message"),
    _Option("client-idle-timeout", _duration, "60m", "timeouts", "DURATION",
            "close client connections idle this long"),
    _Option("server-idle-timeout", _duration, "60m", "timeouts", "DURATION",
            "close pooled server connections idle this long"),
    _Option("pool-wait-timeout", _duration, "10s", "timeouts", "DURATION",
            "how long a client waits for a free server connection"),
    _Option("get-last-error-timeout", _duration, "1m", "timeouts", "DURATION",
            "how long a server connection stays pinned after a legacy write"),
    _Option("graceful-timeout", _duration, "30s", "timeouts", "DURATION",
            "how long shutdown waits for busy connections"),
    # process
    _Option("pidfile", _optional_path, None, "process", "PATH",
            "write the process id to this file", default_text="none"),
    _Option("log-level", _log_level, "info", "process", "LEVEL",
            "one of debug, info, warning, error"),
    _Option("log-file", _optional_path, None, "process", "PATH",
            "log to this file", default_text="stderr"),
    _Option("state-file", _optional_path, None, "process", "PATH",
            "remember the member-to-port assignment in this file", default_text="none"),
    _Option("tee-file", _optional_path, None, "process", "PATH",
            "debugging: append every byte sent to clients to this file (slow)",
            default_text="none"),
    # metrics
    _Option("admin-addr", _admin_addr, None, "metrics", "HOST:PORT",
            "serve metrics and status over HTTP on host:port", default_text="off"),
    _Option("ganglia", _ganglia_addresses, None, "metrics", "HOST[:PORT]",
            "send metrics to this gmond (port 8649); repeatable or comma-separated",
            action="append", default_text="none"),
    _Option("metrics-interval", _duration, "10s", "metrics", "DURATION",
            "how often metrics are sent"),
    # authentication: the proxy's own account, and its clients' logins
    _Option("username", _optional_text, None, "auth", "NAME",
            "the proxy's own user: every server connection logs in as it", default_text="none"),
    _Option("password", _optional_text, None, "auth", "PASSWORD",
            "its password (prefer --password-file: a flag shows in ps)", default_text="none"),
    _Option("password-file", _optional_path, None, "auth", "PATH",
            "read the proxy's password from the first line of this file", default_text="none"),
    _Option("auth-source", _db_name, "admin", "auth", "DB", "database the proxy's user is defined in"),
    _Option("auth-mechanism", _choice("SCRAM-SHA-256", "SCRAM-SHA-1"), "SCRAM-SHA-256", "auth",
            "MECHANISM", "SCRAM-SHA-256 or SCRAM-SHA-1"),
    _Option("client-auth-file", _optional_path, None, "auth", "PATH",
            "clients must log in as a user of this file (made with: dvara adduser)",
            default_text="none: clients are trusted"),
    _Option("auth-failure-limit", _int_at_least(1), "10", "auth", "N",
            "failed client logins per client IP per minute before its logins are refused"),
    _Option("auth-passthrough", None, None, "auth", None,
            "relay each logged-in client over server connections logged in as its own user "
            "(SCRAM pass-through; needs --client-auth-file made with adduser --from-server, "
            "or --auth-query)",
            action="store_true", default_text="false"),
    _Option("auth-query", None, None, "auth", None,
            "look users not in --client-auth-file up on the servers (usersInfo with "
            "showCredentials, as --username; needs --auth-passthrough)",
            action="store_true", default_text="false"),
    _Option("auth-query-cache", _duration, "60s", "auth", "DURATION",
            "with --auth-query: how long a looked-up user's verifier is trusted before it "
            "is fetched again"),
    _Option("max-user-connections", _int_at_least(0), "0", "auth", "N",
            "with --auth-passthrough: server connections per member one user may hold "
            "(0: up to --max-connections)"),
    # TLS: on the listeners, and on server connections
    _Option("tls-mode", _choice("disabled", "allow", "require"), None, "tls", "MODE",
            "TLS for clients: disabled, allow (TLS and plain on one port) or require",
            default_text="require with --tls-cert-file, else disabled"),
    _Option("tls-cert-file", _optional_path, None, "tls", "PATH",
            "the proxy's certificate (PEM; may hold the key too)", default_text="none"),
    _Option("tls-key-file", _optional_path, None, "tls", "PATH",
            "the proxy's private key (PEM)", default_text="in --tls-cert-file"),
    _Option("tls-ca-file", _optional_path, None, "tls", "PATH",
            "CA certificates that client certificates are checked against", default_text="none"),
    _Option("tls-require-client-cert", None, None, "tls", None,
            "refuse clients without a certificate signed by --tls-ca-file",
            action="store_true", default_text="false"),
    _Option("backend-tls", None, None, "tls", None,
            "use TLS on every server connection", action="store_true", default_text="false"),
    _Option("backend-tls-ca-file", _optional_path, None, "tls", "PATH",
            "CA certificates the servers' certificates are checked against",
            default_text="the system's CAs"),
    _Option("backend-tls-cert-file", _optional_path, None, "tls", "PATH",
            "client certificate the proxy shows servers that require one", default_text="none"),
    _Option("backend-tls-key-file", _optional_path, None, "tls", "PATH",
            "its private key", default_text="in --backend-tls-cert-file"),
    # demo mode
    _Option("demo", None, None, "demo", None,
            "start an embedded SecantusDB backend as a child process",
            action="store_true", default_text="false"),
    _Option("demo-port", _port, "27017", "demo", "PORT",
            "port of the embedded SecantusDB backend"),
    _Option("demo-data-dir", _path, ".demo-data", "demo", "PATH",
            "data directory of the embedded SecantusDB backend"),
)
# fmt: on

_GROUP_TITLES = {
    "backend": "replica set",
    "listen": "listeners",
    "pool": "connection pools",
    "timeouts": "timeouts (durations: 500ms, 30s, 2m, 1h or plain seconds)",
    "process": "process",
    "metrics": "metrics",
    "auth": "authentication",
    "tls": "TLS",
    "demo": "demo mode",
}


# ---------------------------------------------------------------- the parser


class _StrictConfigFileParser(configargparse.DefaultConfigFileParser):
    """key = value syntax; rejects unknown and duplicated keys, naming the file and line."""

    def __init__(self, known: Iterable[str], repeatable: Iterable[str]) -> None:
        super().__init__()
        self._known = frozenset(known)
        self._repeatable = frozenset(repeatable)

    def parse(self, stream: Any) -> dict[str, Any]:
        name = getattr(stream, "name", "config file")
        items: dict[str, Any] = {}
        for lineno, line in enumerate(stream, 1):
            try:
                parsed = super().parse([line])
            except configargparse.ConfigFileParserException:
                raise configargparse.ConfigFileParserException(
                    f"{name} line {lineno}: cannot parse {line.strip()!r}, expected key = value"
                ) from None
            for key, value in parsed.items():
                self._add(items, key.lstrip("-"), value, f"{name} line {lineno}")
        return items

    def _add(self, items: dict[str, Any], key: str, value: Any, where: str) -> None:
        if key not in self._known:
            close = difflib.get_close_matches(key, self._known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise configargparse.ConfigFileParserException(f"{where}: unknown key {key!r}{hint}")
        if key in self._repeatable:
            items.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        elif key in items:
            raise configargparse.ConfigFileParserException(f"{where}: key {key!r} is set twice")
        else:
            items[key] = value


class _Parser(configargparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: "dvara: error: --option: problem"."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            message = message[len("argument ") :]
            option, sep, rest = message.partition(": ")
            message = f"{option}{self._source_of(option)}{sep}{rest}"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _source_of(self, option: str) -> str:
        """Say where a bad value came from when it was not the command line."""
        flags = option.split("/")
        sources = getattr(self, "_source_to_settings", {})
        command_line = sources.get("command_line", {}).get("", (None, []))[1]
        if configargparse.already_on_command_line(command_line, flags, self.prefix_chars):
            return ""
        for source, settings in sources.items():
            for key, (action, _value) in settings.items():
                if action is not None and set(flags) & set(action.option_strings):
                    if source == "environment_variables":
                        return f" (from environment variable {key})"
                    if source.startswith("config_file|"):
                        return f" (from config file {source.split('|', 1)[1]})"
        return ""


def _help_text(opt: _Option) -> str:
    shown = opt.default_text if opt.default_text is not None else opt.default
    return f"{opt.help} [default: {shown}]"


def build_parser() -> configargparse.ArgumentParser:
    """Build the dvara argument parser from the option table (no parsing, no I/O)."""
    repeatable = [o.name for o in _OPTIONS if o.action == "append"]
    parser = _Parser(
        prog="dvara",
        description="dvara: a connection-pooling proxy for MongoDB replica sets.",
        allow_abbrev=False,
        config_file_parser_class=_StrictConfigFileParser([o.name for o in _OPTIONS], repeatable),
        add_env_var_help=True,
    )
    parser.add_argument(
        "-c", "--config", is_config_file=True, metavar="PATH", env_var=ENV_PREFIX + "CONFIG",
        help="read settings from this file (key = value lines, # comments) [default: none]",
    )  # fmt: skip
    groups = {key: parser.add_argument_group(title) for key, title in _GROUP_TITLES.items()}
    for opt in _OPTIONS:
        kwargs: dict[str, Any] = {"dest": opt.dest, "help": _help_text(opt), "env_var": opt.env_var}
        if opt.action == "store_true":
            kwargs.update(action="store_true", default=False)
        else:
            kwargs.update(action=opt.action, type=opt.convert, default=opt.default, metavar=opt.metavar)
        groups[opt.group].add_argument("--" + opt.name, **kwargs)
    return parser


# ---------------------------------------------------------------- parse + validate


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Parse the command line, DVARA_* environment and config file into Settings.

    Precedence: flag > environment > config file > default. On a bad value it
    prints one line naming the option to stderr and raises SystemExit(2).
    """
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args, env_vars=os.environ if env is None else env)
    problem = _cross_check(ns)
    if problem:
        parser.error(problem)
    return _to_settings(ns)


def _cross_check(ns: argparse.Namespace) -> str | None:
    """Return a message for the first setting that conflicts with another one."""
    if ns.port_start > ns.port_end:
        return f"--port-start/--port-end: start {ns.port_start} is above end {ns.port_end}"
    if ns.processes > ns.max_connections:
        return (
            f"--processes: each process needs at least one server connection per member: "
            f"{ns.processes} processes need --max-connections >= {ns.processes}, "
            f"got {ns.max_connections}"
        )
    if ns.load_balanced and ns.processes != 1:
        return (f"--load-balanced: runs in one process only (--processes 1), "
                f"got --processes {ns.processes}")
    if ns.min_idle_connections > ns.max_connections:
        return (
            f"--min-idle-connections: must be <= --max-connections ({ns.max_connections}), "
            f"got {ns.min_idle_connections}"
        )
    return _cross_check_security(ns)


def _cross_check_security(ns: argparse.Namespace) -> str | None:
    """Authentication and TLS settings that need or exclude one another."""
    needs = [
        (ns.password and ns.password_file, "--password/--password-file: give one, not both"),
        (ns.username and not (ns.password or ns.password_file),
         "--username: needs --password or --password-file"),
        ((ns.password or ns.password_file) and not ns.username,
         "--password/--password-file: needs --username"),
        (_tls_mode(ns) != "disabled" and not ns.tls_cert_file,
         f"--tls-mode: {_tls_mode(ns)} needs --tls-cert-file"),
        (ns.tls_require_client_cert and not ns.tls_ca_file,
         "--tls-require-client-cert: needs --tls-ca-file"),
        ((ns.tls_key_file or ns.tls_ca_file) and not ns.tls_cert_file,
         "--tls-key-file/--tls-ca-file: need --tls-cert-file"),
        ((ns.backend_tls_ca_file or ns.backend_tls_cert_file) and not ns.backend_tls,
         "--backend-tls-ca-file/--backend-tls-cert-file: need --backend-tls"),
        (ns.backend_tls_key_file and not ns.backend_tls_cert_file,
         "--backend-tls-key-file: needs --backend-tls-cert-file"),
        (ns.auth_passthrough and not (ns.client_auth_file or ns.auth_query),
         "--auth-passthrough: needs --client-auth-file or --auth-query"),
        (ns.auth_query and not ns.username,
         "--auth-query: needs --username (the account that looks users up)"),
        (ns.auth_query and not ns.auth_passthrough,
         "--auth-query: needs --auth-passthrough (the servers' roles then decide what "
         "each user may do)"),
        (ns.max_user_connections and not ns.auth_passthrough,
         "--max-user-connections: needs --auth-passthrough"),
    ]
    return next((message for broken, message in needs if broken), None)


def _tls_mode(ns: argparse.Namespace) -> str:
    if ns.tls_mode:
        return ns.tls_mode
    return "require" if ns.tls_cert_file else "disabled"


def _advertise_host(listen_host: str, advertise_host: str | None) -> str:
    if advertise_host:
        return advertise_host
    if listen_host in _WILDCARD_HOSTS:
        return socket.gethostname().lower()
    return listen_host


def _to_settings(ns: argparse.Namespace) -> Settings:
    values = {f.name: getattr(ns, f.name, None) for f in dataclasses.fields(Settings)}
    values["config_file"] = ns.config
    values["advertise_host"] = _advertise_host(ns.listen_host, ns.advertise_host)
    values["ganglia"] = tuple(dict.fromkeys(a for group in ns.ganglia or () for a in group))
    values["demo"] = bool(ns.demo)
    values["tls_mode"] = _tls_mode(ns)
    values["tls_require_client_cert"] = bool(ns.tls_require_client_cert)
    values["backend_tls"] = bool(ns.backend_tls)
    values["load_balanced"] = bool(ns.load_balanced)
    values["auth_passthrough"] = bool(ns.auth_passthrough)
    values["auth_query"] = bool(ns.auth_query)
    return Settings(**values)


# ---------------------------------------------------------------- helpers for callers


def check_port_range(settings: Settings, members_needed: int) -> None:
    """Check the proxy port range holds one port per member.

    Can raise ConfigError.
    """
    size = settings.port_end - settings.port_start + 1
    if size < members_needed:
        raise ConfigError(
            f"--port-start/--port-end: range {settings.port_start}-{settings.port_end} holds "
            f"{size} port(s) but the replica set has {members_needed} members"
        )


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "none"
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], str):
        return format_address(*value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{format_address(*value[0])}={value[1]}"  # a member-map entry
    if isinstance(value, tuple):
        return ",".join(_format_value(item) for item in value) or "none"
    return str(value)


def describe(settings: Settings) -> str:
    """Return one "option = value" line per setting, masking anything named *password*."""
    lines = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        shown = "***" if "password" in f.name and value is not None else _format_value(value)
        lines.append(f"{f.name.replace('_', '-')} = {shown}")
    return "\n".join(lines)
