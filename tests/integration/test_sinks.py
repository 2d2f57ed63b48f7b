"""GangliaSink against a real gmond, its failure logging, open_sinks() and MetricsEmitter."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from dvara_lib.observe.emitter import MetricsEmitter
from dvara_lib.errors import ConfigError
from dvara_lib.observe.gmetric import format_value
from dvara_lib.observe.metrics import Metrics, Sample
from dvara_lib.observe.sinks import Sink, open_sinks
from dvara_lib.observe.sinks.ganglia import GangliaSink, _Target
from tests.ganglia_harness import Gmond, free_udp_port
from tests.helpers import wait_until

A, B = "127.0.0.1:27017", "127.0.0.1:27018"


def busy_metrics() -> Metrics:
    metrics = Metrics()
    for i, addr in enumerate((A, B), start=1):
        mm = metrics.member(addr)
        mm.incr("requests", 100 * i)
        mm.incr("bytes.out", 12345 * i)
        mm.gauge_add("clients.connected", 3 * i)
        mm.gauge_set("member.up", 1)
        for ms in range(1, 21):
            mm.observe("latency", ms * i / 1000.0)
    return metrics


class RecordingSink:
    def __init__(self) -> None:
        self.batches: list[list[Sample]] = []
        self.closed = False

    def emit(self, samples) -> None:
        self.batches.append(list(samples))

    def close(self) -> None:
        self.closed = True


class BrokenSink(RecordingSink):
    def emit(self, samples) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def gmond(tmp_path):
    server = Gmond(tmp_path)
    yield server
    server.close()


def test_ganglia_sink_samples_all_reach_gmond(gmond):
    samples = busy_metrics().snapshot(reset_interval=True)
    sink = GangliaSink([("127.0.0.1", gmond.udp_port)], interval=10)
    try:
        sink.emit(samples)
        found = gmond.wait_for({s.full_name for s in samples})
    finally:
        sink.close()
    assert len(samples) > 100
    for s in samples:
        metric = found[s.full_name]
        assert metric["VAL"] == format_value(s.value, s.type_), s.full_name
        assert (metric["TYPE"], metric["UNITS"], metric["SLOPE"]) == (s.type_, s.units, s.slope)
        assert (metric["TMAX"], metric["DMAX"]) == ("20", "100")
        assert metric["EXTRA"]["GROUP"] == "dvara"
    assert found["mongoproxy.clients.connected"]["VAL"] == "9"
    assert found["mongoproxy.127.0.0.1.clients.connected"]["VAL"] == "3"
    assert found["mongoproxy.127.0.0.1_27018.latency.max"]["VAL"] == "40.0"
    assert found["mongoproxy.latency.p50"]["EXTRA"]["DESC"].startswith("Time from")


def test_emitter_feeds_gmond(gmond):
    metrics = busy_metrics()
    sinks = open_sinks({"ganglia": [("127.0.0.1", gmond.udp_port)]}, interval=0.05)
    emitter = MetricsEmitter(metrics, sinks, interval=0.05)
    emitter.start()
    try:
        found = gmond.wait_for({"mongoproxy.requests", "mongoproxy.127.0.0.1.latency.p99"})
    finally:
        emitter.close()
    assert found["mongoproxy.requests"]["UNITS"] == "req/s"


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "dvara.metrics" and r.levelno >= logging.WARNING]


def test_closed_port_never_raises_and_logs_once_per_interval(caplog):
    caplog.set_level(logging.DEBUG, logger="dvara.metrics")
    samples = busy_metrics().snapshot(reset_interval=True)
    sink = GangliaSink([("127.0.0.1", free_udp_port())], interval=10)
    try:
        for emits in range(1, 51):  # the refusal (ICMP) shows up from the second packet on
            before = len(_warnings(caplog))
            sink.emit(samples)
            assert len(_warnings(caplog)) - before <= 1
            if _warnings(caplog):
                break
    finally:
        sink.close()
    assert len(_warnings(caplog)) == 1
    assert "packets failed" in _warnings(caplog)[0].getMessage()


def test_unreachable_target_never_raises_and_logs_once(caplog):
    """Broadcast without SO_BROADCAST is refused by the kernel (EACCES): nothing is sent."""
    caplog.set_level(logging.DEBUG, logger="dvara.metrics")
    samples = busy_metrics().snapshot(reset_interval=True)
    sink = GangliaSink([("255.255.255.255", 8649), ("127.0.0.1", 9)], interval=10)
    try:
        sink.emit(samples)
        assert len(_warnings(caplog)) == 1
        assert "255.255.255.255:8649" in _warnings(caplog)[0].getMessage()
        sink.emit(samples)
        assert len(_warnings(caplog)) == 2
    finally:
        sink.close()


def test_sink_survives_unencodable_sample(caplog):
    caplog.set_level(logging.DEBUG, logger="dvara.metrics")
    sink = GangliaSink([("127.0.0.1", 9)], interval=10)
    try:
        bad = Sample("x", float("nan"), "", "float", "both", None)
        good = Sample("y", 1, "", "int32", "both", None)
        assert len(sink.encode([bad, good])) == 2
        sink.emit([bad, good])
    finally:
        sink.close()


def test_multicast_target_sets_ttl():
    target = _Target("239.2.11.71", 8649, multicast_ttl=3)
    try:
        sock = target.open()  # connect() on UDP sends nothing
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 3
    finally:
        target.close()


def test_sink_options_tmax_dmax():
    sink = GangliaSink([("127.0.0.1", 8649)], interval=15)
    assert (sink.tmax, sink.dmax, sink.group) == (30, 150, "dvara")
    assert GangliaSink([("h", 8649)], interval=0.4, dmax=0).tmax == 1
    assert isinstance(sink, Sink)


def test_open_sinks_and_targets():
    sinks = open_sinks({"ganglia": [("127.0.0.1", 8649), ("gmond.example", 8649),
                                    ("::1", 8650)]}, interval=10)
    assert len(sinks) == 1 and isinstance(sinks[0], GangliaSink)
    assert [str(t) for t in sinks[0].targets] == ["127.0.0.1:8649", "gmond.example:8649",
                                                  "[::1]:8650"]
    assert open_sinks({"ganglia": []}, interval=10) == []
    with pytest.raises(ConfigError):
        open_sinks({"graphite": ["h:1"]}, interval=10)


def test_emitter_emits_each_interval_and_closes_promptly():
    metrics = Metrics()
    metrics.member(A).incr("requests", 7)
    good, broken = RecordingSink(), BrokenSink()
    emitter = MetricsEmitter(metrics, [broken, good], interval=0.02)
    assert (emitter.name, emitter.daemon) == ("dvara-metrics", True)
    emitter.start()
    try:
        wait_until(lambda: len(good.batches) >= 3, "three emissions", 10)
    finally:
        emitter.close()
    assert not emitter.is_alive() and good.closed and broken.closed
    first = {(s.name, s.member): s for s in good.batches[0]}
    assert first[("requests", A)].total == 7
    later = {(s.name, s.member): s for s in good.batches[-1]}
    assert later[("requests", A)].value == 0.0  # each emission starts a new interval


def test_emitter_close_does_not_wait_for_the_interval():
    emitter = MetricsEmitter(Metrics(), [RecordingSink()], interval=3600)
    emitter.start()
    started = time.monotonic()
    emitter.close()
    assert time.monotonic() - started < 1.0
    assert not emitter.is_alive()


def test_emitter_close_waits_for_the_emission_in_progress():
    class BlockingSink(RecordingSink):
        def __init__(self) -> None:
            super().__init__()
            self.entered, self.release = threading.Event(), threading.Event()

        def emit(self, samples) -> None:
            self.batches.append(list(samples))
            self.entered.set()
            self.release.wait(10)

    sink = BlockingSink()
    emitter = MetricsEmitter(Metrics(), [sink], interval=0.01)
    emitter.start()
    assert sink.entered.wait(10)
    closer = threading.Thread(target=emitter.close)
    closer.start()
    wait_until(lambda: emitter._stop_event.is_set(), "close() to signal the emitter", 10)
    assert emitter.is_alive() and not sink.closed  # still inside emit()
    sink.release.set()
    closer.join(10)
    assert not closer.is_alive() and not emitter.is_alive() and sink.closed
    assert len(sink.batches) == 1  # no further emission after close()


def test_emitter_rejects_bad_interval():
    with pytest.raises(ConfigError):
        MetricsEmitter(Metrics(), [], interval=0)
