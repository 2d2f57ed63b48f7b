"""The optional services around the relay: the metrics emitter, the admin endpoint, /status."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from dvara_lib import __version__
from dvara_lib.observe.admin import AdminServer
from dvara_lib.observe.emitter import MetricsEmitter
from dvara_lib.observe.metrics import Metrics
from dvara_lib.observe.sinks import open_sinks

if TYPE_CHECKING:
    from dvara_lib.backend.topology import Topology
    from dvara_lib.config import Settings

log = logging.getLogger("dvara.services")

_SECRET_WORDS = ("password", "secret", "key")


def start_services(settings: "Settings", metrics: Metrics,
                   status_fn: Callable[[], dict[str, Any]],
                   skip_admin: bool = False) -> list[Any]:
    """Start what the settings ask for; each returned object has close().

    Can raise ConfigError or OSError (e.g. the admin address is taken); then whatever
    this call started is closed again.
    """
    services: list[Any] = []
    try:
        sinks = open_sinks({"ganglia": list(settings.ganglia)},
                           settings.metrics_interval)
        if sinks:
            emitter = MetricsEmitter(metrics, sinks, settings.metrics_interval)
            emitter.start()
            services.append(emitter)
        if settings.admin_addr is not None and not skip_admin:
            admin = AdminServer(settings.admin_addr, metrics, status_fn)
            admin.open()
            services.append(admin)
    except BaseException:
        for service in services:
            service.close()
        raise
    return services


def status_document(settings: "Settings", started: float, topology: Optional["Topology"],
                    plane: dict[str, Any],
                    counters: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """Members, pools, clients, uptime, version and config (secrets hidden); plane is
    what the data plane says of its members, clients and workers; counters the running
    totals per member (Metrics.counter_totals())."""
    totals = counters or {}
    counts = plane.get("clients", {"clients": 0, "busy": 0})
    served = plane.get("members", {})
    members = []
    for m in topology.members() if topology else []:
        mine = served.get(m.real, {})
        members.append({
            "member": m.real, "proxy": m.proxy, "state": m.state, "up": m.up,
            "pool": {key: mine.get(key, 0) for key in ("open", "in_use", "waiting", "max")},
            "clients": mine.get("clients", 0),
            "counters": totals.get(m.real, {}),
        })
        if "users" in mine:                     # --auth-passthrough: pools per user
            members[-1]["pool"]["users"] = mine["users"]
    return {
        "version": __version__,
        "uptime_s": round(time.time() - started, 1),
        "set_name": topology.set_name if topology else None,
        "routers": topology.routers if topology else False,
        "processes": settings.processes,
        "workers": plane.get("workers", []),
        "members": members,
        "clients": {"connected": counts["clients"], "busy": counts["busy"],
                    "max": settings.max_client_connections},
        "config": _public_config(settings),
    }


def _public_config(settings: "Settings") -> dict[str, Any]:
    out = {}
    for key, value in dataclasses.asdict(settings).items():
        if any(word in key for word in _SECRET_WORDS) and value:
            value = "***"
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return out
