"""`dvara status`: fetch /status from a running dvara's admin server and print it as tables."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any, Optional, Sequence, TextIO

from dvara_lib.errors import ConfigError
from dvara_lib.address import parse_option

# The document's shape is described in dvara_lib/admin.py.
_MEMBER_COLUMNS = ("MEMBER", "PROXY", "STATE", "UP", "OPEN", "IN_USE", "WAITING", "MAX", "CLIENTS")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dvara status", description="Show a running dvara's members, pools and clients.")
    parser.add_argument("--admin-addr", required=True, metavar="HOST:PORT",
                        help="the --admin-addr the dvara was started with")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    parser.add_argument("--json", action="store_true", help="print the raw /status JSON")
    args = list(argv)
    if args and args[0] == "status":
        args = args[1:]
    return parser.parse_args(args)


def fetch_status(admin_addr: str, timeout: float = 5.0) -> dict:
    """GET http://<admin_addr>/status and return the decoded JSON.

    Can raise ConfigError for a malformed address, OSError (URLError) if the
    server cannot be reached and ValueError if the answer is not JSON.
    """
    host, port = parse_option(admin_addr, "--admin-addr")
    if ":" in host:
        host = f"[{host}]"
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return rows as a left-aligned text table with a header rule."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _uptime(seconds: Any) -> str:
    try:
        total = int(float(seconds))
    except (TypeError, ValueError):
        return "?"
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _member_rows(members: Sequence[dict]) -> list[list[Any]]:
    """One row per member, then a TOTAL row when there is more than one."""
    rows = []
    for m in members:
        pool = m.get("pool") or {}
        rows.append([m.get("member"), m.get("proxy"), m.get("state"), m.get("up"),
                     pool.get("open"), pool.get("in_use"), pool.get("waiting"), pool.get("max"),
                     m.get("clients")])
    if len(rows) > 1:
        rows.append(["TOTAL", "", "", ""] + [_sum(r[i] for r in rows) for i in range(4, 9)])
    return rows


def _sum(values: Any) -> Any:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) if numbers else None


def render_status(status: dict) -> str:
    """Return the /status document as a header line and MEMBERS and CONFIG tables."""
    clients = status.get("clients") or {}
    members = status.get("members") or []
    head = f"dvara {status.get('version', '?')}"
    if status.get("set_name"):
        head += f"  set {status['set_name']}"
    head += (f"  up {_uptime(status.get('uptime_s'))}  "
             f"clients {_cell(clients.get('connected'))}/{_cell(clients.get('max'))}")
    if "busy" in clients:
        head += f" (busy {_cell(clients['busy'])})"
    head += f"  members {len(members)}"
    parts = [head, "", "MEMBERS", format_table(_MEMBER_COLUMNS, _member_rows(members))]
    config = status.get("config") or {}
    if config:
        parts += ["", "CONFIG", format_table(("OPTION", "VALUE"), sorted(config.items()))]
    return "\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """Run `dvara status --admin-addr host:port`; return 0, or 1 if /status could not be read."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        status = fetch_status(args.admin_addr, args.timeout)
    except ConfigError as exc:
        print(f"dvara status: {exc}", file=err)
        return 2
    except (OSError, ValueError) as exc:
        print(f"dvara status: cannot read http://{args.admin_addr}/status: {exc}", file=err)
        return 1
    if args.json:
        out.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render_status(status))
    return 0
