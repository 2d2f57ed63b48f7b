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


# -- dvara status --watch -------------------------------------------------------------------
def counted(requests_a: int, requests_b: int) -> dict:
    """STATUS with counter totals: per request, 100 bytes in; A 3000 bytes out, B 100."""
    def counters(requests: int, out_per: int, timeouts: int) -> dict:
        return {"requests": requests, "bytes.in": requests * 100,
                "bytes.out": requests * out_per, "errors.proxy": 0,
                "errors.timeout": timeouts, "errors.bad_frame": 0}

    a, b = (dict(m) for m in STATUS["members"])
    a["counters"] = counters(requests_a, 3000, requests_a // 100)
    b["counters"] = counters(requests_b, 100, 0)
    return {**STATUS, "set_name": "rs0", "members": [a, b],
            "clients": {"connected": 15, "busy": 4, "max": 1000}}


BEFORE, AFTER = counted(1000, 10), counted(3500, 30)

SECOND_FRAME = """\
dvara 0.1.0  set rs0  up 01:02:05  clients 15/1000 (busy 4)  members 2
12:00:02  every 2s  rates per second over 2.0s

MEMBER           STATE      UP   CLIENTS  OPEN  IN_USE  WAITING  MAX  REQ/S   IN_B/S  OUT_B/S  ERR/S
---------------  ---------  ---  -------  ----  ------  -------  ---  ------  ------  -------  -----
127.0.0.1:27017  PRIMARY    yes  12       5     2       1        100  1250.0  122.1K  3.6M     12.5
127.0.0.1:27018  SECONDARY  no   3        0     0       0        100  10.0    1000    1000     0.0
TOTAL                            15       5     2       1        200  1260.0  123.0K  3.6M     12.5
"""


def test_member_rates_are_differences_over_elapsed_time():
    rates = status_cli.member_rates(BEFORE, AFTER, 2.0)
    assert rates == {A: [1250.0, 125000.0, 3750000.0, 12.5], B: [10.0, 1000.0, 1000.0, 0.0]}
    assert status_cli.member_rates(None, AFTER, 0.0) == {A: [None] * 4, B: [None] * 4}


def test_member_rates_are_unknown_after_a_restart_for_a_new_member_or_without_counters():
    restarted = counted(5, 30)                          # A's totals went down: a new dvara
    assert status_cli.member_rates(AFTER, restarted, 1.0)[A] == [None] * 4
    assert status_cli.member_rates(AFTER, restarted, 1.0)[B] == [0.0] * 4
    only_a = {**BEFORE, "members": BEFORE["members"][:1]}
    assert status_cli.member_rates(only_a, AFTER, 1.0)[B] == [None] * 4
    assert status_cli.member_rates(STATUS, STATUS, 1.0) == {A: [None] * 4, B: [None] * 4}


def test_render_frame_exact_text():
    first = status_cli.render_frame(BEFORE, status_cli.member_rates(None, BEFORE, 0.0),
                                    "12:00:00", 2, None).splitlines()
    assert first[1] == "12:00:00  every 2s  rates from the next frame"
    assert first[6].split() == [B, "SECONDARY", "no", "3", "0", "0", "0", "100",
                                "-", "-", "-", "-"]
    text = status_cli.render_frame(AFTER, status_cli.member_rates(BEFORE, AFTER, 2.0),
                                   "12:00:02", 2, 2.0)
    assert text == SECOND_FRAME


class FakeWatch:
    """Scripted /status answers (an exception is raised), a clock that sleep() moves."""

    def __init__(self, answers: list) -> None:
        self.answers, self.now, self.slept = list(answers), 100.0, []

    def fetch(self, addr: str, timeout: float) -> dict:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def run(self, argv: list[str], out: io.StringIO, err: io.StringIO) -> None:
        args = status_cli._parse_args(["--admin-addr", "127.0.0.1:1", *argv])
        watcher = status_cli.Watcher(args, out, err, self.fetch, lambda: self.now, self.sleep,
                                     lambda: "12:00:%02d" % (self.now - 100))
        watcher.run(self.fetch("", 0))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_on_a_terminal_clears_and_redraws_each_frame():
    out, fake = Terminal(), FakeWatch([BEFORE, AFTER])
    fake.run(["--watch", "2", "--count", "2"], out, io.StringIO())
    frames = out.getvalue().split(status_cli.CLEAR)
    assert frames[0] == "" and len(frames) == 3 and fake.slept == [2.0]
    assert frames[2] == SECOND_FRAME


def test_watch_to_a_file_writes_blocks_separated_by_a_blank_line():
    out, fake = io.StringIO(), FakeWatch([BEFORE, AFTER, AFTER])
    fake.run(["--watch", "2", "--count", "3"], out, io.StringIO())
    text = out.getvalue()
    assert "\x1b" not in text and fake.slept == [2.0, 2.0]
    blocks = text.split("\n\ndvara ")
    assert len(blocks) == 3 and "dvara " + blocks[1] + "\n" == SECOND_FRAME
    assert blocks[2].splitlines()[5].split()[-4:] == ["0.0", "0", "0", "0.0"]


def test_watch_shows_a_failed_fetch_and_carries_on():
    out, err, fake = io.StringIO(), io.StringIO(), FakeWatch([BEFORE, OSError("refused"), AFTER])
    fake.run(["--watch", "1", "--count", "3"], out, err)
    blocks = out.getvalue().split("\n\n")
    assert blocks[2] == ("12:00:01  every 1s\ndvara status: cannot read "
                         "http://127.0.0.1:1/status: refused (trying again in 1s)")
    third = blocks[3] + "\n\n" + blocks[4]
    assert "rates per second over 2.0s" in third        # since the last good fetch
    assert third.splitlines()[-3].split()[-4:] == ["1250.0", "122.1K", "3.6M", "12.5"]
    assert err.getvalue() == ""


def test_watch_json_prints_one_document_per_line():
    out, err, fake = io.StringIO(), io.StringIO(), FakeWatch([BEFORE, ValueError("no"), AFTER])
    fake.run(["--watch", "1", "--count", "3", "--json"], out, err)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [BEFORE, AFTER]
    assert err.getvalue().startswith("dvara status: cannot read") and "no" in err.getvalue()


def test_watch_does_not_catch_up_after_a_slow_frame():
    out, fake = io.StringIO(), FakeWatch([BEFORE, AFTER, AFTER])
    slow = fake.fetch

    def fetch(addr: str, timeout: float) -> dict:
        fake.now += 5.0                                 # each fetch takes 5 s
        return slow(addr, timeout)

    argv = ["--admin-addr", "127.0.0.1:1", "--watch", "1", "--count", "3"]
    watcher = status_cli.Watcher(status_cli._parse_args(argv), out, io.StringIO(), fetch,
                                 lambda: fake.now, fake.sleep)
    watcher.run(BEFORE)
    assert fake.slept == [1.0, 0.0]             # the second fetch ended 4 s late


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", ""])
def test_watch_rejects_seconds_that_are_not_positive(value, capsys):
    with pytest.raises(SystemExit) as exc:
        status_cli.main(["status", "--admin-addr", "127.0.0.1:1", "--watch", value])
    assert exc.value.code == 2
    assert "--watch: must be a number of seconds > 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--count", "3"], "--count needs --watch"),
    (["--watch", "1", "--count", "0"], "--count: must be a whole number >= 1"),
])
def test_count_needs_watch_and_a_positive_number(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        status_cli.main(["--admin-addr", "127.0.0.1:1", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_watch_against_the_admin_server_shows_rates():
    answers = iter([counted(1000, 10), counted(1100, 10), counted(1300, 10)])
    server = AdminServer("127.0.0.1:0", Metrics(), lambda: next(answers))
    server.open()
    out, err = io.StringIO(), io.StringIO()
    try:
        code = status_cli.main(["status", "--admin-addr", "%s:%d" % server.address,
                                "--watch", "0.05", "--count", "3"], out=out, err=err)
    finally:
        server.close()
    assert (code, err.getvalue()) == (0, "")
    frames = out.getvalue().split("\n\ndvara ")
    assert len(frames) == 3
    rows = [next(line for line in f.splitlines() if line.startswith(A)) for f in frames]
    assert rows[0].split()[-4:] == ["-"] * 4
    assert all(float(row.split()[-4]) > 0 for row in rows[1:])


def test_watch_unreachable_at_start_is_one_line_and_status_1():
    out, err = io.StringIO(), io.StringIO()
    argv = ["--admin-addr", f"127.0.0.1:{free_port()}", "--watch", "1", "--count", "2"]
    assert status_cli.main(argv, out=out, err=err) == 1
    assert out.getvalue() == "" and len(err.getvalue().splitlines()) == 1
    assert err.getvalue().startswith("dvara status: cannot read http://127.0.0.1:")


def test_watch_ends_cleanly_on_ctrl_c(admin, monkeypatch):
    def interrupted(self, first: dict) -> None:
        self.out.write("a frame")
        raise KeyboardInterrupt

    monkeypatch.setattr(status_cli.Watcher, "run", interrupted)
    out, err = io.StringIO(), io.StringIO()
    argv = ["--admin-addr", "%s:%d" % admin.address, "--watch", "1"]
    assert status_cli.main(argv, out=out, err=err) == 0
    assert out.getvalue() == "a frame\n" and err.getvalue() == ""


def test_counter_totals_per_member(metrics):
    totals = metrics.counter_totals()
    assert set(totals) == {A, B}
    assert totals[B]["requests"] == 20 and totals[A]["bytes.in"] == 1000
    assert set(totals[A]) == {m.name for m in MEASURES if m.kind == COUNTER}
