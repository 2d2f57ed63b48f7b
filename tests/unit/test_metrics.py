"""Counter, gauge and histogram math of dvara_lib.observe.metrics, snapshots and thread safety."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dvara_lib.observe.metrics import (COUNTER, GAUGE, HISTOGRAM, MEASURE_BY_NAME, MEASURES,
                               RESERVOIR_SIZE, Metrics, Sample, metric_name, percentile)

A, B = "127.0.0.1:27017", "127.0.0.1:27018"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def by_key(samples: list[Sample]) -> dict[tuple[str, str | None], Sample]:
    return {(s.name, s.member): s for s in samples}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> Metrics:
    return Metrics(clock=clock)


def test_table_declares_every_required_measure():
    required = {
        "clients.connected", "clients.connects", "clients.disconnects", "clients.rejected",
        "clients.idle_timeouts", "requests", "requests.with_reply", "requests.mutations",
        "replies.streamed", "bytes.in", "bytes.out", "latency", "errors.proxy", "errors.timeout",
        "errors.bad_frame", "server.open", "server.in_use", "server.created", "server.closed",
        "server.checkout_wait", "server.checkout_timeouts", "server.held", "gle.pinned",
        "gle.pins", "gle.pin_timeouts", "gle.answered_by_proxy", "legacy.writes", "gle.calls",
        "hello.answered", "hello.parked", "topology.changes", "member.up",
    }
    names = [m.name for m in MEASURES]
    assert len(names) == len(set(names)) >= 25
    assert required <= set(names)
    for m in MEASURES:
        assert m.kind in (COUNTER, GAUGE, HISTOGRAM) and m.units and m.help
    gauges = {"clients.connected", "server.open", "server.in_use", "gle.pinned", "hello.parked",
              "member.up"}
    assert {m.name for m in MEASURES if m.kind == GAUGE} == gauges
    assert {m.name for m in MEASURES if m.kind == HISTOGRAM} == {
        "latency", "server.checkout_wait", "server.held"}


def test_every_measure_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for m in MEASURES:
        assert f"| `{m.name}` | {m.kind} | {m.units} |" in doc, m.name


def test_counter_rate_and_total(metrics, clock):
    mm = metrics.member(A)
    mm.incr("requests")
    mm.incr("requests", n=9)
    clock.now += 5.0
    s = by_key(metrics.snapshot(reset_interval=True))[("requests", A)]
    assert (s.kind, s.value, s.total, s.units, s.type_, s.slope) == (
        COUNTER, 2.0, 10, "req/s", "float", "both")
    mm.incr("requests", n=30)
    clock.now += 10.0
    s = by_key(metrics.snapshot(reset_interval=False))[("requests", A)]
    assert (s.value, s.total) == (3.0, 40)
    clock.now += 5.0  # not reset: the interval is now 15 s long with 30 requests
    s = by_key(metrics.snapshot(reset_interval=True))[("requests", A)]
    assert (s.value, s.total) == (2.0, 40)
    clock.now += 1.0
    s = by_key(metrics.snapshot(reset_interval=True))[("requests", A)]
    assert (s.value, s.total) == (0.0, 40)
    assert mm.value("requests") == 40


def test_gauges_add_set_and_sum_over_members(metrics):
    a, b = metrics.member(A), metrics.member(B)
    a.gauge_add("clients.connected", +1)
    a.gauge_add("clients.connected", +1)
    a.gauge_add("clients.connected", -1)
    b.gauge_add("clients.connected", 5)
    a.gauge_set("member.up", 1)
    b.gauge_set("member.up", 0)
    got = by_key(metrics.snapshot(reset_interval=True))
    assert got[("clients.connected", A)].value == 1
    assert got[("clients.connected", B)].value == 5
    assert got[("clients.connected", None)].value == 6
    assert got[("member.up", None)].value == 1
    assert got[("clients.connected", None)].type_ == "int32"
    # Gauges are not reset by an interval.
    assert by_key(metrics.snapshot(reset_interval=True))[("clients.connected", A)].value == 1


def test_counters_sum_over_members(metrics, clock):
    metrics.member(A).incr("bytes.in", 100)
    metrics.member(B).incr("bytes.in", 300)
    clock.now += 4.0
    s = by_key(metrics.snapshot(reset_interval=True))[("bytes.in", None)]
    assert (s.value, s.total, s.units) == (100.0, 400, "bytes/s")


def test_histogram_percentiles_in_ms(metrics, clock):
    mm = metrics.member(A)
    for ms in range(100, 0, -1):
        mm.observe("latency", ms / 1000.0)
    clock.now += 2.0
    got = by_key(metrics.snapshot(reset_interval=True))
    values = {k: got[(f"latency.{k}", A)].value for k in ("p50", "p95", "p99", "max")}
    assert values == pytest.approx({"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0})
    count, total = got[("latency.count", A)], got[("latency.sum", A)]
    assert (count.value, count.total) == (50.0, 100)
    assert total.total == pytest.approx(5050.0) and total.value == pytest.approx(2525.0)
    assert got[("latency.p50", A)].units == "ms"
    # After the reset the interval is empty, but the running totals stay.
    clock.now += 1.0
    got = by_key(metrics.snapshot(reset_interval=True))
    assert got[("latency.p99", A)].value == 0.0 and got[("latency.max", A)].value == 0.0
    assert (got[("latency.count", A)].value, got[("latency.count", A)].total) == (0.0, 100)


def test_histogram_keeps_last_reservoir_but_exact_max(metrics):
    mm = metrics.member(A)
    mm.observe("server.held", 10.0)  # overwritten in the ring, but still the interval max
    for i in range(RESERVOIR_SIZE + 10):
        mm.observe("server.held", 0.001 if i < 10 else 0.002)
    got = by_key(metrics.snapshot(reset_interval=False))
    assert got[("server.held.p50", A)].value == pytest.approx(2.0)
    assert got[("server.held.max", A)].value == pytest.approx(10000.0)
    assert got[("server.held.count", A)].total == RESERVOIR_SIZE + 11


def test_histogram_percentiles_merge_members(metrics):
    for ms in range(1, 51):
        metrics.member(A).observe("server.checkout_wait", ms / 1000.0)
    for ms in range(51, 101):
        metrics.member(B).observe("server.checkout_wait", ms / 1000.0)
    got = by_key(metrics.snapshot(reset_interval=True))
    assert got[("server.checkout_wait.p50", None)].value == pytest.approx(50.0)
    assert got[("server.checkout_wait.p95", None)].value == pytest.approx(95.0)
    assert got[("server.checkout_wait.max", None)].value == pytest.approx(100.0)
    assert got[("server.checkout_wait.p50", A)].value == pytest.approx(25.0)
    assert got[("server.checkout_wait.count", None)].total == 100


def test_percentile_nearest_rank():
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 75) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_names_trim_default_port():
    assert metric_name("requests") == "mongoproxy.requests"
    assert metric_name("requests", "db1.example:27017") == "mongoproxy.db1.example.requests"
    assert metric_name("latency.p95", "10.0.0.5:27018") == "mongoproxy.10.0.0.5_27018.latency.p95"
    assert metric_name("requests", "[::1]:27017") == "mongoproxy.[__1].requests"
    assert Sample("x", 1, "", "int32", "both", A).full_name == "mongoproxy.127.0.0.1.x"


def test_snapshot_covers_every_measure_for_every_member(metrics):
    metrics.member(B)
    metrics.member(A)
    samples = metrics.snapshot(reset_interval=False)
    expected_names = set()
    for m in MEASURES:
        if m.kind == HISTOGRAM:
            suffixes = ("p50", "p95", "p99", "max", "count", "sum")
            expected_names |= {f"{m.name}.{k}" for k in suffixes}
        else:
            expected_names.add(m.name)
    for member in (None, A, B):
        assert {s.name for s in samples if s.member == member} == expected_names
    assert len(samples) == 3 * len(expected_names)
    assert metrics.members() == [A, B]


def test_unknown_names_raise_key_error(metrics):
    mm = metrics.member(A)
    with pytest.raises(KeyError):
        mm.incr("no.such.counter")
    with pytest.raises(KeyError):
        mm.gauge_add("requests", 1)  # a counter, not a gauge
    with pytest.raises(KeyError):
        mm.observe("requests", 0.1)
    assert "requests" in MEASURE_BY_NAME


def test_member_is_created_once_even_when_racing():
    metrics = Metrics()
    seen: list[object] = []
    barrier = threading.Barrier(8, timeout=10)

    def grab() -> None:
        barrier.wait()
        seen.append(metrics.member("db:27017"))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 8 and all(mm is seen[0] for mm in seen)


def test_forgotten_member_is_no_longer_reported(metrics):
    gone = metrics.member(B)
    metrics.member(A).gauge_add("clients.connected", 2)
    gone.gauge_add("clients.connected", 5)
    metrics.forget(B)
    metrics.forget("never:1")                       # unknown: nothing happens
    gone.gauge_add("clients.connected", -1)         # its last clients closing: harmless
    samples = by_key(metrics.snapshot(reset_interval=True))
    assert metrics.members() == [A]
    assert {member for _, member in samples} == {A, None}
    assert samples["clients.connected", None].value == 2
    assert metrics.member(B) is not gone and metrics.member(B).value("clients.connected") == 0


def _race_with_snapshots(metrics: Metrics, work, n_threads: int,
                         seen=lambda samples: None) -> None:
    """Run work(i) in n_threads threads while another takes snapshots (each resetting the
    interval) and shows them to seen, until the workers are done."""
    start = threading.Barrier(n_threads + 1, timeout=10)
    done = threading.Event()

    def worker(i: int) -> None:
        start.wait()
        work(i)

    def snapshotter() -> None:
        start.wait()
        for _ in range(10_000):
            seen(metrics.snapshot(reset_interval=True))
            if done.is_set():
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    snap = threading.Thread(target=snapshotter)
    for t in threads + [snap]:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    snap.join(60)
    assert not any(t.is_alive() for t in threads + [snap])


def test_concurrent_updates_give_exact_totals():
    metrics = Metrics()
    n_threads, n_ops = 8, 5000
    deltas: list[float] = []

    def work(i: int) -> None:
        mm = metrics.member(A if i % 2 else B)
        for _ in range(n_ops):
            mm.incr("requests")
            mm.incr("bytes.in", 3)
            mm.gauge_add("clients.connected", +1)
            mm.observe("latency", 0.001)
            mm.gauge_add("clients.connected", -1)

    def seen(samples: list[Sample]) -> None:
        deltas.extend(s.total for s in samples
                      if s.name == "latency.count" and s.member is None)

    _race_with_snapshots(metrics, work, n_threads, seen)
    got = by_key(metrics.snapshot(reset_interval=False))
    assert got[("requests", None)].total == n_threads * n_ops
    assert got[("bytes.in", None)].total == 3 * n_threads * n_ops
    assert got[("requests", A)].total == n_threads * n_ops // 2
    assert got[("clients.connected", None)].value == 0
    assert got[("latency.count", None)].total == n_threads * n_ops
    assert deltas == sorted(deltas)  # running totals never go backwards


def _relayed_by_hand(mm, bytes_in, bytes_out, seconds, held) -> None:
    """What relayed(..., held) stands for, one measure at a time."""
    for name, n in (("requests", 1), ("requests.with_reply", 1), ("bytes.in", bytes_in),
                    ("bytes.out", bytes_out)):
        mm.incr(name, n)
    mm.observe("latency", seconds)
    mm.observe("server.checkout_wait", 0.0)
    mm.observe("server.held", held)


@pytest.mark.parametrize("requests", [1, 255, 256, 257, RESERVOIR_SIZE + 300])
def test_relayed_requests_read_as_if_counted_one_by_one(requests, clock):
    """The fast path logs its requests and folds them later; every reader sees them
    counted, with the same totals, percentiles and maxima as measures updated one by
    one, interval resets included."""
    logged, by_hand = Metrics(clock=clock), Metrics(clock=clock)
    for metrics, record in ((logged, lambda mm, *a: mm.relayed(a[0], a[1], False, a[2], a[3])),
                            (by_hand, _relayed_by_hand)):
        mm = metrics.member(A)
        for i in range(requests):
            record(mm, 10 + i % 7, 100 + i % 5, (i % 97) / 1000.0, (i % 89) / 2000.0)
            if i == requests // 2:
                metrics.snapshot(reset_interval=True)    # an interval ends midway
    # A request that waited for its connection is counted at once (the pool timed it).
    logged.member(A).relayed(1, 2, True, 0.5, None)
    for name, n in (("requests", 1), ("requests.with_reply", 1), ("bytes.in", 1),
                    ("bytes.out", 2), ("requests.mutations", 1)):
        by_hand.member(A).incr(name, n)
    by_hand.member(A).observe("latency", 0.5)
    assert logged.member(A).value("requests") == requests + 1
    assert logged.member(A).value("server.held") == requests
    got, want = (by_key(m.snapshot(reset_interval=False)) for m in (logged, by_hand))
    for name in ("requests", "requests.with_reply", "bytes.in", "bytes.out",
                 "requests.mutations"):
        assert got[(name, A)].total == want[(name, A)].total, name
    for name in ("latency", "server.held", "server.checkout_wait"):
        for part in ("p50", "p99", "max", "count", "sum"):
            assert got[(f"{name}.{part}", A)].value == pytest.approx(
                want[(f"{name}.{part}", A)].value), (name, part)


def test_relayed_and_snapshots_racing_give_exact_totals():
    """Workers log requests while a reader folds and resets: nothing lost or counted twice."""
    metrics = Metrics()
    n_threads, n_ops = 4, 3000

    def work(i: int) -> None:
        mm = metrics.member(A)
        for _ in range(n_ops):
            mm.relayed(3, 5, False, 0.001, 0.0005)

    _race_with_snapshots(metrics, work, n_threads)
    got = by_key(metrics.snapshot(reset_interval=False))
    total = n_threads * n_ops
    assert (got[("requests", A)].total, got[("bytes.in", A)].total,
            got[("bytes.out", A)].total) == (total, 3 * total, 5 * total)
    assert got[("latency.count", A)].total == total
    assert got[("server.held.sum", A)].total == pytest.approx(0.5 * total)
