"""The admin HTTP server (/metrics, /status, /healthz) and `dvara status`."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from dvara_lib.observe import status_cli
from dvara_lib.observe.admin import AdminServer, prometheus_name
from dvara_lib.observe.metrics import COUNTER, GAUGE, MEASURES, Metrics
from tests.helpers import accepts, free_port

A, B = "127.0.0.1:27017", "127.0.0.1:27018"

STATUS = {
    "version": "0.1.0",
    "uptime_s": 3725.4,
    "members": [
        {"member": A, "proxy": "127.0.0.1:6000", "state": "PRIMARY", "up": True,
         "pool": {"open": 5, "in_use": 2, "waiting": 1, "max": 100}, "clients": 12},
        {"member": B, "proxy": "127.0.0.1:6001", "state": "SECONDARY", "up": False,
         "pool": {"open": 0, "in_use": 0, "waiting": 0, "max": 100}, "clients": 3},
    ],
    "clients": {"connected": 15, "max": 1000},
    "config": {"message_timeout": "2m", "max_per_client_connections": 100},
}


def busy_metrics() -> Metrics:
    metrics = Metrics()
    for i, addr in enumerate((A, B), start=1):
        mm = metrics.member(addr)
        mm.incr("requests", 10 * i)
        mm.incr("bytes.in", 1000 * i)
        mm.gauge_add("server.open", 4 * i)
        mm.gauge_set("member.up", i % 2)
        for ms in range(1, 101):
            mm.observe("latency", ms * i / 1000.0)
        mm.observe("server.checkout_wait", 0.25)
    return metrics


@pytest.fixture
def metrics() -> Metrics:
    return busy_metrics()


@pytest.fixture
def admin(metrics: Metrics) -> Iterator[AdminServer]:
    server = AdminServer("127.0.0.1:0", metrics, lambda: STATUS)
    server.open()
    yield server
    server.close()


def get(server: AdminServer, path: str) -> tuple[int, str, bytes]:
    url = "http://%s:%d%s" % (*server.address, path)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def scrape(server: AdminServer) -> dict[tuple[str, tuple], float]:
    code, ctype, body = get(server, "/metrics")
    assert (code, ctype) == (200, CONTENT_TYPE_LATEST)
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_agree_with_snapshot(admin, metrics):
    scraped = scrape(admin)
    snap = {(s.name, s.member): s for s in metrics.snapshot(reset_interval=False)}
    for m in MEASURES:
        base = prometheus_name(m.name)
        for member in (A, B):
            labels = (("member", member),)
            if m.kind == COUNTER:
                assert scraped[(base + "_total", labels)] == snap[(m.name, member)].total
            elif m.kind == GAUGE:
                assert scraped[(base, labels)] == snap[(m.name, member)].value
            else:
                for q, label in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
                    key = (base + "_seconds", (("member", member), ("quantile", q)))
                    expected = snap[(f"{m.name}.{label}", member)].value / 1000
                    assert scraped[key] == pytest.approx(expected)
                assert scraped[(base + "_seconds_count", labels)] == \
                    snap[(f"{m.name}.count", member)].total
                assert scraped[(base + "_seconds_sum", labels)] == \
                    pytest.approx(snap[(f"{m.name}.sum", member)].total / 1000)
                assert scraped[(base + "_max_seconds", labels)] == \
                    pytest.approx(snap[(f"{m.name}.max", member)].value / 1000)


def test_metrics_values(admin):
    scraped = scrape(admin)
    assert scraped[("mongoproxy_requests_total", (("member", B),))] == 20
    assert scraped[("mongoproxy_bytes_in_total", (("member", A),))] == 1000
    assert scraped[("mongoproxy_server_open", (("member", B),))] == 8
    assert scraped[("mongoproxy_member_up", (("member", B),))] == 0
    assert scraped[("mongoproxy_latency_seconds", (("member", A), ("quantile", "0.99")))] == \
        pytest.approx(0.099)
    assert scraped[("mongoproxy_latency_seconds_count", (("member", B),))] == 100
    assert scraped[("mongoproxy_server_checkout_wait_max_seconds", (("member", A),))] == 0.25


def test_scrape_does_not_reset_the_interval(admin, metrics):
    scrape(admin)
    scrape(admin)
    snap = {(s.name, s.member): s for s in metrics.snapshot(reset_interval=True)}
    assert snap[("latency.max", A)].value == pytest.approx(100.0)
    assert snap[("latency.count", None)].total == 200


def test_status_is_the_status_fn_json(admin):
    code, ctype, body = get(admin, "/status")
    assert (code, ctype) == (200, "application/json")
    assert json.loads(body) == STATUS


def test_status_fn_failure_is_a_500(metrics):
    def broken() -> dict:
        raise RuntimeError("not ready")

    server = AdminServer(("127.0.0.1", 0), metrics, broken)
    server.open()
    try:
        code, _, body = get(server, "/status")
    finally:
        server.close()
    assert code == 500 and "not ready" in json.loads(body)["error"]


def test_healthz_and_404(admin):
    assert get(admin, "/healthz")[::2] == (200, b"ok\n")
    assert get(admin, "/nope")[0] == 404


def test_close_is_prompt_and_frees_the_port(metrics):
    server = AdminServer("127.0.0.1:0", metrics)
    server.open()
    port = server.address[1]
    assert accepts(port)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 2.0
    assert not accepts(port)
    server.close()  # twice is harmless


def test_status_cli_prints_tables(admin):
    out, err = io.StringIO(), io.StringIO()
    addr = "%s:%d" % admin.address
    assert status_cli.main(["status", "--admin-addr", addr], out=out, err=err) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("dvara 0.1.0  up 01:02:05  clients 15/1000  members 2")
    header = next(line for line in lines if line.startswith("MEMBER "))
    assert header.split() == ["MEMBER", "PROXY", "STATE", "UP", "OPEN", "IN_USE", "WAITING",
                              "MAX", "CLIENTS"]
    row_a = next(line for line in lines if line.startswith(A))
    assert row_a.split() == [A, "127.0.0.1:6000", "PRIMARY", "yes", "5", "2", "1", "100", "12"]
    row_b = next(line for line in lines if line.startswith(B))
    assert row_b.split()[2:4] == ["SECONDARY", "no"]
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert total.split() == ["TOTAL", "5", "2", "1", "200", "15"]
    assert "CONFIG" in lines
    assert any(line.split() == ["message_timeout", "2m"] for line in lines)
    assert err.getvalue() == ""


def test_status_cli_json(admin):
    out = io.StringIO()
    assert status_cli.main(["--admin-addr", "%s:%d" % admin.address, "--json"], out=out) == 0
    assert json.loads(out.getvalue()) == STATUS


def test_status_cli_unreachable_and_bad_address():
    out, err = io.StringIO(), io.StringIO()
    port = free_port()  # nothing listens there
    assert status_cli.main(["status", "--admin-addr", f"127.0.0.1:{port}", "--timeout", "5"],
                           out=out, err=err) == 1
    assert "cannot read" in err.getvalue() and out.getvalue() == ""
    err = io.StringIO()
    assert status_cli.main(["status", "--admin-addr", "nonsense"], out=out, err=err) == 2
    assert "--admin-addr" in err.getvalue()


def test_render_status_shows_set_name_and_busy_clients():
    doc = {**STATUS, "set_name": "rs0", "clients": {"connected": 15, "busy": 4, "max": 1000}}
    first = status_cli.render_status(doc).splitlines()[0]
    assert first == "dvara 0.1.0  set rs0  up 01:02:05  clients 15/1000 (busy 4)  members 2"


def test_render_status_tolerates_a_sparse_document():
    text = status_cli.render_status({"members": [{"member": "db:27017"}]})
    assert "dvara ?  up ?  clients -/-  members 1" in text
    assert "db:27017" in text
