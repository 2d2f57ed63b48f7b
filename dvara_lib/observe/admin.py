"""The admin HTTP server: /metrics (Prometheus), /status (JSON) and /healthz."""

# design: one http.server.ThreadingHTTPServer whose serve_forever() runs in a
# daemon thread "dvara-admin"; each request gets its own daemon thread.
# Handlers only read: metrics.snapshot(reset_interval=False) (so scrapes never
# disturb the Ganglia interval) and status_fn().  close() shuts it down.

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional, Union

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dvara_lib.observe.metrics import COUNTER, GAUGE, MEASURES, PERCENTILES, Metrics, Sample
from dvara_lib.address import parse_option

log = logging.getLogger("dvara.admin")

StatusFn = Callable[[], dict]

# The /status document the core's status_fn() returns (status_cli prints it):
#
#   {
#     "version": "0.1.0",
#     "uptime_s": 3601.5,
#     "members": [
#       {"member": "db1:27017",          # the real member address
#        "proxy": "127.0.0.1:6000",      # where dvara listens for it
#        "state": "PRIMARY",             # PRIMARY / SECONDARY / ARBITER / ROUTER / DOWN / ...
#        "up": true,
#        "pool": {"open": 5, "in_use": 2, "waiting": 0, "max": 100},
#        "clients": 12,                   # client connections on this proxy
#        "counters": {"requests": 1234,   # every counter of MEASURES: its running
#                     "bytes.in": 56789,  # total since start for this member
#                     ...}},              # ({} before the member has any)
#       ...
#     ],
#     "set_name": "rs0",                  # optional
#     "routers": false,                   # optional: true when the members are mongos routers
#     "clients": {"connected": 12, "max": 1000,
#                 "busy": 3},             # optional: clients with a request in flight
#     "config": {"option": value, ...}    # the resolved configuration
#   }
#
# Any extra keys are passed through to the JSON untouched.


def prometheus_name(name: str) -> str:
    """Return the Prometheus family name for a measure: mongoproxy_<name with _ for .>."""
    return "mongoproxy_" + name.replace(".", "_")


class MetricsCollector:
    """A prometheus_client collector over Metrics.snapshot(reset_interval=False).

    Counters become ``mongoproxy_<name>_total``, gauges ``mongoproxy_<name>``,
    histograms a summary ``mongoproxy_<name>_seconds`` (quantiles 0.5/0.95/0.99
    over the current interval, _count and _sum since start) plus a gauge
    ``mongoproxy_<name>_max_seconds``; every series has a ``member`` label.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        by_key: dict[tuple[str, str], Sample] = {
            (s.name, s.member): s for s in self.metrics.snapshot(reset_interval=False)
            if s.member is not None
        }
        members = sorted({member for _, member in by_key})
        for m in MEASURES:
            if m.kind == COUNTER:
                family = CounterMetricFamily(prometheus_name(m.name), m.help, labels=["member"])
                for member in members:
                    family.add_metric([member], by_key[m.name, member].total)
                yield family
            elif m.kind == GAUGE:
                family = GaugeMetricFamily(prometheus_name(m.name), m.help, labels=["member"])
                for member in members:
                    family.add_metric([member], by_key[m.name, member].value)
                yield family
            else:
                yield from _histogram_families(m.name, m.help, members, by_key)


def _histogram_families(name: str, help_text: str, members: list[str],
                        by_key: dict[tuple[str, str], Sample]) -> Iterator[Metric]:
    base = prometheus_name(name) + "_seconds"
    summary = Metric(base, help_text + " (seconds)", "summary")
    top = GaugeMetricFamily(base.replace("_seconds", "_max_seconds"),
                            help_text + ": largest in the current interval (seconds)",
                            labels=["member"])
    for member in members:
        for label, pct in PERCENTILES:
            value = by_key[f"{name}.{label}", member].value / 1000.0
            summary.add_sample(base, {"member": member, "quantile": str(pct / 100.0)}, value)
        summary.add_sample(base + "_count", {"member": member},
                           by_key[f"{name}.count", member].total)
        summary.add_sample(base + "_sum", {"member": member},
                           by_key[f"{name}.sum", member].total / 1000.0)
        top.add_metric([member], by_key[f"{name}.max", member].value / 1000.0)
    yield summary
    yield top


class _Handler(BaseHTTPRequestHandler):
    """Answers GET /metrics, /status and /healthz."""

    server: "_HTTPServer"
    server_version = "dvara-admin"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path == "/status":
            self._status()
        elif path == "/healthz":
            self._reply(200, "text/plain; charset=utf-8", b"ok\n")
        else:
            self._reply(404, "text/plain; charset=utf-8",
                        b"not found: try /metrics, /status, /healthz\n")

    def _status(self) -> None:
        try:
            body = json.dumps(self.server.status_fn(), indent=2, sort_keys=True, default=str)
        except Exception as exc:
            log.exception("admin: building /status failed")
            body = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
            self._reply(500, "application/json", body.encode())
            return
        self._reply(200, "application/json", body.encode() + b"\n")

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature)
        log.debug("admin %s: " + format, self.address_string(), *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    registry: CollectorRegistry
    status_fn: StatusFn


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _no_status() -> dict:
    return {}


class AdminServer:
    """Serve /metrics, /status and /healthz on ``addr`` ("host:port" or a tuple; port 0 picks one).

    Methods for callers: open() (bind and start the thread; can raise
    ConfigError for a malformed address and OSError if it cannot bind),
    address (the bound (host, port)), close().
    """

    def __init__(self, addr: Union[str, tuple[str, int]], metrics: Metrics,
                 status_fn: Optional[StatusFn] = None) -> None:
        self.addr = parse_option(addr, "--admin-addr", lowest_port=0) if isinstance(addr, str) else addr
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(metrics))
        self.status_fn = status_fn or _no_status
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server is bound to (after open())."""
        assert self._httpd is not None, "open() first"
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def open(self) -> None:
        """Bind and start serving in a daemon thread.  Can raise OSError."""
        server_class = _HTTPServer6 if ":" in self.addr[0] else _HTTPServer
        httpd = server_class(self.addr, _Handler)
        httpd.registry, httpd.status_fn = self.registry, self.status_fn
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="dvara-admin", daemon=True)
        self._thread.start()
        log.info("admin server on http://%s:%d (/metrics /status /healthz)", *self.address)

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and close the listening socket."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._httpd = None
