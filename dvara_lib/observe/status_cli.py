"""`dvara status`: fetch /status from a running dvara's admin server and print it as tables;
with --watch SECONDS, redraw them every SECONDS with per-second rates, like top."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.request
from typing import Any, Callable, Optional, Sequence, TextIO

from dvara_lib.errors import ConfigError
from dvara_lib.address import parse_option

# The document's shape is described in dvara_lib/observe/admin.py.
_MEMBER_COLUMNS = ("MEMBER", "PROXY", "STATE", "UP", "OPEN", "IN_USE", "WAITING", "MAX", "CLIENTS")
# --watch: the gauges, then one rate per second per column: the counters summed.
_WATCH_COLUMNS = ("MEMBER", "STATE", "UP", "CLIENTS", "OPEN", "IN_USE", "WAITING", "MAX")
RATE_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("REQ/S", ("requests",)),
    ("IN_B/S", ("bytes.in",)),
    ("OUT_B/S", ("bytes.out",)),
    ("ERR/S", ("errors.proxy", "errors.timeout", "errors.bad_frame")),
)
_BYTE_UNITS = ("K", "M", "G", "T")
CLEAR = "\x1b[H\x1b[2J"          # cursor home, clear the screen


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def _frames(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dvara status", description="Show a running dvara's members, pools and clients.")
    parser.add_argument("--admin-addr", required=True, metavar="HOST:PORT",
                        help="the --admin-addr the dvara was started with")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="print the raw /status JSON (with --watch: one line per interval)")
    parser.add_argument("--watch", type=_seconds, metavar="SECONDS",
                        help="redraw every SECONDS with rates per second, until Ctrl-C")
    parser.add_argument("--count", type=_frames, metavar="N",
                        help="with --watch: stop after N frames")
    args = list(argv)
    if args and args[0] == "status":
        args = args[1:]
    parsed = parser.parse_args(args)
    if parsed.count is not None and parsed.watch is None:
        parser.error("--count needs --watch")
    return parsed


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


def _head(status: dict) -> str:
    """The first line: version, set, uptime, clients, members."""
    clients = status.get("clients") or {}
    members = status.get("members") or []
    head = f"dvara {status.get('version', '?')}"
    if status.get("set_name"):
        head += f"  set {status['set_name']}"
    elif status.get("routers"):
        head += "  mongos routers"
    head += (f"  up {_uptime(status.get('uptime_s'))}  "
             f"clients {_cell(clients.get('connected'))}/{_cell(clients.get('max'))}")
    if "busy" in clients:
        head += f" (busy {_cell(clients['busy'])})"
    return head + f"  members {len(members)}"


def render_status(status: dict) -> str:
    """Return the /status document as a header line and MEMBERS and CONFIG tables."""
    members = status.get("members") or []
    parts = [_head(status), "", "MEMBERS", format_table(_MEMBER_COLUMNS, _member_rows(members))]
    config = status.get("config") or {}
    if config:
        parts += ["", "CONFIG", format_table(("OPTION", "VALUE"), sorted(config.items()))]
    return "\n".join(parts) + "\n"


# -- --watch --------------------------------------------------------------------------------
def _counter(member: dict, names: Sequence[str]) -> Optional[float]:
    """The sum of the named counters' totals in a member of /status (None if one is missing)."""
    counters = member.get("counters") or {}
    values = [counters.get(name) for name in names]
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        return None
    return float(sum(values))


def member_rates(before: Optional[dict], after: dict,
                 elapsed: float) -> dict[str, list[Optional[float]]]:
    """Per member of ``after``, one rate per second per RATE_COLUMNS over ``elapsed`` seconds
    since ``before`` (two /status documents). None where it cannot be told: no earlier
    document, a member new since then, a counter missing, or one that went down (dvara
    restarted)."""
    earlier = {m.get("member"): m for m in (before or {}).get("members") or []}
    rates: dict[str, list[Optional[float]]] = {}
    for m in after.get("members") or []:
        old = earlier.get(m.get("member"))
        row: list[Optional[float]] = []
        for _, names in RATE_COLUMNS:
            now = _counter(m, names)
            then = _counter(old, names) if old is not None else None
            ok = now is not None and then is not None and now >= then and elapsed > 0
            row.append((now - then) / elapsed if ok else None)  # type: ignore[operator]
        rates[str(m.get("member"))] = row
    return rates


def _rate(value: Optional[float], column: str) -> str:
    if value is None:
        return "-"
    if "_B/" not in column:
        return f"{value:.1f}"
    if value < 1024:
        return f"{value:.0f}"
    for unit in _BYTE_UNITS:
        value /= 1024
        if value < 1024 or unit == _BYTE_UNITS[-1]:
            break
    return f"{value:.1f}{unit}"


def _watch_rows(status: dict, rates: dict[str, list[Optional[float]]]) -> list[list[Any]]:
    """One row per member (gauges, then rates), then a TOTAL row when there is more than one."""
    rows: list[list[Any]] = []
    for m in status.get("members") or []:
        pool = m.get("pool") or {}
        rows.append([m.get("member"), m.get("state"), m.get("up"), m.get("clients"),
                     pool.get("open"), pool.get("in_use"), pool.get("waiting"), pool.get("max")]
                    + rates.get(str(m.get("member")), [None] * len(RATE_COLUMNS)))
    if len(rows) > 1:
        width = len(_WATCH_COLUMNS) + len(RATE_COLUMNS)
        rows.append(["TOTAL", "", ""] + [_sum(r[i] for r in rows) for i in range(3, width)])
    gauges = len(_WATCH_COLUMNS)
    for row in rows:
        row[gauges:] = [_rate(v, c) for v, (c, _) in zip(row[gauges:], RATE_COLUMNS)]
    return rows


def render_frame(status: dict, rates: dict[str, list[Optional[float]]], when: str,
                 interval: float, elapsed: Optional[float]) -> str:
    """One --watch frame: the header line, when and how often, and the members' gauges and
    rates per second (elapsed None: the first frame, no rates yet)."""
    over = f"rates per second over {elapsed:.1f}s" if elapsed else "rates from the next frame"
    headers = _WATCH_COLUMNS + tuple(c for c, _ in RATE_COLUMNS)
    return "\n".join([_head(status), f"{when}  every {interval:g}s  {over}", "",
                      format_table(headers, _watch_rows(status, rates))]) + "\n"


def render_failure(when: str, interval: float, url: str, exc: BaseException) -> str:
    """The frame shown when one fetch fails while watching."""
    return (f"{when}  every {interval:g}s\n"
            f"dvara status: cannot read {url}: {exc} (trying again in {interval:g}s)\n")


class Watcher:
    """The --watch loop: fetch /status every interval and write one frame per fetch.

    fetch, clock (monotonic), sleep and stamp (the wall-clock time shown) can be replaced
    for tests. A failed fetch shows the error in its frame; the next one tries again and
    its rates cover the time since the last good fetch.
    """

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO,
                 fetch: Callable[[str, float], dict] = fetch_status,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 stamp: Callable[[], str] = lambda: time.strftime("%H:%M:%S")) -> None:
        self.args, self.out, self.err = args, out, err
        self.fetch, self.clock, self.sleep, self.stamp = fetch, clock, sleep, stamp
        self.terminal = out.isatty()
        self.last: Optional[tuple[dict, float]] = None    # the last good document, when

    def run(self, first: dict) -> None:
        """Write frames from ``first`` on until --count frames (or forever)."""
        interval, frames = self.args.watch, 0
        deadline = self.clock()
        while self.args.count is None or frames < self.args.count:  # else Ctrl-C ends it
            if frames:
                deadline = max(deadline + interval, self.clock())   # late: no catching up
                self.sleep(max(0.0, deadline - self.clock()))
            self._write(self._frame(first if not frames else None), frames)
            frames += 1

    def _frame(self, given: Optional[dict]) -> str:
        args = self.args
        try:
            status = given if given is not None else self.fetch(args.admin_addr, args.timeout)
        except (OSError, ValueError) as exc:
            url = f"http://{args.admin_addr}/status"
            text = render_failure(self.stamp(), args.watch, url, exc)
            if args.json:
                self.err.write(text.splitlines()[-1] + "\n")
                return ""
            return text
        now = self.clock()
        if args.json:
            return json.dumps(status, sort_keys=True) + "\n"
        before, then = self.last if self.last is not None else (None, now)
        self.last = (status, now)
        elapsed = now - then if before is not None else None
        rates = member_rates(before, status, elapsed or 0.0)
        return render_frame(status, rates, self.stamp(), args.watch, elapsed)

    def _write(self, text: str, frames: int) -> None:
        if self.args.json:
            self.out.write(text)
        elif self.terminal:
            self.out.write(CLEAR + text)
        else:
            self.out.write(("\n" if frames else "") + text)
        self.out.flush()


def _first_fetch(args: argparse.Namespace, err: TextIO) -> tuple[Optional[dict], int]:
    """(the /status document, 0), or (None, the exit status) after one line on err."""
    try:
        return fetch_status(args.admin_addr, args.timeout), 0
    except ConfigError as exc:
        print(f"dvara status: {exc}", file=err)
        return None, 2
    except (OSError, ValueError) as exc:
        print(f"dvara status: cannot read http://{args.admin_addr}/status: {exc}", file=err)
        return None, 1


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """Run `dvara status --admin-addr host:port [--watch SECONDS [--count N]]`; return 0, 1
    if /status could not be read (the first time, with --watch), 2 for a bad address."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    status, code = _first_fetch(args, err)
    if status is None:
        return code
    if args.watch is not None:
        try:
            Watcher(args, out, err).run(status)
        except KeyboardInterrupt:
            out.write("\n")
        return 0
    if args.json:
        out.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render_status(status))
    return 0
