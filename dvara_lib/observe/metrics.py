"""Thread-safe counters, gauges and latency histograms per replica-set member."""

# design: one MemberMetrics per member. The hot path never takes a lock: each
# thread that records anything for a member gets a shard of its own (found through a
# threading.local) holding its counter totals, gauge deltas and, per histogram, a
# ring of its last RESERVOIR_SIZE observations; only that thread writes it.
# snapshot() sums the shards (under a lock the writers never take), computes rates
# against the counter totals it kept at the last interval reset, and merges the rings'
# observations since then into percentiles. A reset starts a new interval epoch; a
# shard's interval max belongs to the epoch it was written in. Gauges such as the
# pools' open and in-use connections are read live at snapshot time.

from __future__ import annotations

import math
import threading
import time
from array import array
from typing import Callable, NamedTuple, Optional, Sequence, Union

PREFIX = "mongoproxy"
DEFAULT_PORT_SUFFIX = ":27017"
RESERVOIR_SIZE = 4096
PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0))

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


class Measure(NamedTuple):
    """One declared measure: name, kind, units of one count/value, help text."""

    name: str
    kind: str
    units: str
    help: str


# The one table of every measure dvara records.  Counter units are the unit
# of one count (Ganglia shows them per second); histogram units are those of
# the emitted percentiles (observe() takes seconds).
MEASURES: tuple[Measure, ...] = (
    # clients
    Measure("clients.connected", GAUGE, "clients", "Client connections open now"),
    Measure("clients.connects", COUNTER, "conns", "Client connections accepted"),
    Measure("clients.disconnects", COUNTER, "conns", "Client connections closed, for any reason"),
    Measure("clients.rejected", COUNTER, "conns",
            "Client connections refused at --max-client-connections or "
            "--max-per-client-connections"),
    Measure("clients.idle_timeouts", COUNTER, "conns",
            "Client connections closed for being idle too long"),
    # messages
    Measure("requests", COUNTER, "req", "Client messages proxied"),
    Measure("requests.with_reply", COUNTER, "req", "Client messages that expect a reply"),
    Measure("requests.mutations", COUNTER, "req",
            "Client messages that write (insert/update/delete/findAndModify, legacy writes)"),
    Measure("replies.streamed", COUNTER, "replies",
            "Extra replies relayed for exhaust/moreToCome streams"),
    Measure("bytes.in", COUNTER, "bytes", "Bytes read from clients"),
    Measure("bytes.out", COUNTER, "bytes", "Bytes written to clients"),
    Measure("latency", HISTOGRAM, "ms", "Time from a relayed request's start (incl. the wait for a server connection) to its last reply written"),
    Measure("errors.proxy", COUNTER, "errors",
            "Requests that failed while proxied (client closed)"),
    Measure("errors.timeout", COUNTER, "errors",
            "Requests that timed out: no server answer in --message-timeout or no server "
            "connection in --pool-wait-timeout"),
    Measure("errors.bad_frame", COUNTER, "errors",
            "Client messages that were not valid wire frames"),
    # server connections
    Measure("server.open", GAUGE, "conns", "Server connections open now (idle + in use)"),
    Measure("server.in_use", GAUGE, "conns", "Server connections checked out now"),
    Measure("server.created", COUNTER, "conns", "Server connections opened"),
    Measure("server.closed", COUNTER, "conns", "Server connections closed or discarded"),
    Measure("server.checkout_wait", HISTOGRAM, "ms",
            "Time waited to check out a server connection"),
    Measure("server.checkout_timeouts", COUNTER, "errors",
            "Checkouts that gave up after --pool-wait-timeout"),
    Measure("server.held", HISTOGRAM, "ms", "Time a server connection stayed checked out"),
    # legacy getLastError
    Measure("gle.pinned", GAUGE, "conns",
            "Server connections pinned to a client for getLastError now"),
    Measure("gle.pins", COUNTER, "pins", "Server connections pinned after a legacy write"),
    Measure("gle.pin_timeouts", COUNTER, "pins",
            "Pins released because no getLastError came in time"),
    Measure("gle.answered_by_proxy", COUNTER, "calls",
            "getLastError calls answered by dvara itself"),
    Measure("legacy.writes", COUNTER, "writes", "Legacy OP_INSERT/OP_UPDATE/OP_DELETE messages"),
    Measure("gle.calls", COUNTER, "calls", "getLastError commands seen"),
    # topology
    Measure("hello.answered", COUNTER, "replies", "hello/isMaster commands answered by dvara"),
    Measure("hello.parked", GAUGE, "calls", "Awaitable hellos parked now"),
    Measure("topology.changes", COUNTER, "changes",
            "Changes seen in the replica set's members or states"),
    Measure("member.up", GAUGE, "bool", "1 when the member answers, 0 when it is down"),
)

MEASURE_BY_NAME = {m.name: m for m in MEASURES}
_COUNTERS = tuple(m.name for m in MEASURES if m.kind == COUNTER)
_GAUGES = tuple(m.name for m in MEASURES if m.kind == GAUGE)
_HISTOGRAMS = tuple(m.name for m in MEASURES if m.kind == HISTOGRAM)
_COUNTER_INDEX = {name: i for i, name in enumerate(_COUNTERS)}
_REQUESTS, _WITH_REPLY, _BYTES_IN, _BYTES_OUT, _MUTATIONS = (_COUNTER_INDEX[name] for name in (
    "requests", "requests.with_reply", "bytes.in", "bytes.out", "requests.mutations"))
_GAUGE_INDEX = {name: i for i, name in enumerate(_GAUGES)}
_HISTOGRAM_INDEX = {name: i for i, name in enumerate(_HISTOGRAMS)}
_LATENCY, _CHECKOUT_WAIT, _HELD = (_HISTOGRAM_INDEX[name] for name in (
    "latency", "server.checkout_wait", "server.held"))

Number = Union[int, float]


class Sample(NamedTuple):
    """One value ready for a sink.

    ``name`` is the measure name, with ``.p50``/``.p95``/``.p99``/``.max``/
    ``.count``/``.sum`` appended for histograms; ``member`` is the member's
    address or None for the sum over members.  ``value`` is what Ganglia
    shows: the per-second rate over the interval for counters, the current
    value for gauges, milliseconds for histogram percentiles.  ``total`` is
    the running total since start for counters (and ``.count``/``.sum``).
    """

    name: str
    value: Number
    units: str
    type_: str
    slope: str
    member: Optional[str]
    kind: str = GAUGE
    total: Optional[Number] = None

    @property
    def full_name(self) -> str:
        """The dotted name sent to Ganglia: mongoproxy.[member.]name."""
        return metric_name(self.name, self.member)


def metric_name(name: str, member: Optional[str] = None) -> str:
    """Return ``mongoproxy.<name>`` or ``mongoproxy.<member>.<name>``.

    As in dvara, ":27017" is trimmed from the member; any other ":" becomes
    "_" (gmond itself rewrites ":" in metric names that way, since rrdtool
    cannot have it), so "db2:27018" gives "mongoproxy.db2_27018.<name>".
    """
    if member is None:
        return f"{PREFIX}.{name}"
    if member.endswith(DEFAULT_PORT_SUFFIX):
        member = member[: -len(DEFAULT_PORT_SUFFIX)]
    return f"{PREFIX}.{member.replace(':', '_')}.{name}"


class _Hist:
    """One thread's observations of one histogram: a ring of the last RESERVOIR_SIZE
    observations (filled before it wraps), the observations and seconds since start,
    and the largest observation of the interval epoch ``epoch`` (the snapshot side
    starts epochs). Attributes, not lists indexed per histogram: the relay records
    three observations per message, and each index costs bytecodes."""

    __slots__ = ("ring", "count", "sum", "max", "epoch")

    def __init__(self) -> None:
        self.ring = array("d")
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self.epoch = 0

    def since(self, base: int) -> array:
        """Copy of the retained observations made after the base-th."""
        ring, count = self.ring, self.count
        kept = min(count - base, len(ring))
        if kept <= 0:
            return array("d")
        end = count % RESERVOIR_SIZE if len(ring) == RESERVOIR_SIZE else len(ring)
        if end >= kept:
            return ring[end - kept:end]
        return ring[len(ring) - (kept - end):] + ring[:end]


def _record(h: _Hist, seconds: float, epoch: int) -> None:
    """Record one duration in h (by the thread that owns it), in interval epoch."""
    n = h.count
    if n < RESERVOIR_SIZE:
        h.ring.append(seconds)
    else:
        h.ring[n % RESERVOIR_SIZE] = seconds
    h.count = n + 1
    h.sum += seconds
    if h.epoch != epoch:
        h.epoch = epoch
        h.max = seconds
    elif seconds > h.max:
        h.max = seconds


def _record_many(h: _Hist, values: array, epoch: int) -> None:
    """_record of each of values in turn, in C-level steps (the ring's order is kept:
    it fills before it wraps, then the oldest are overwritten)."""
    k = len(values)
    if not k:
        return
    n, ring = h.count, h.ring
    h.count, h.sum = n + k, h.sum + sum(values)
    top = max(values)
    if h.epoch != epoch:
        h.epoch, h.max = epoch, top
    elif top > h.max:
        h.max = top
    # Observation number m (from 0) is at position m % RESERVOIR_SIZE, as _record has it.
    total = n + k
    if len(ring) < RESERVOIR_SIZE:
        ring.frombytes(bytes(8 * (min(total, RESERVOIR_SIZE) - len(ring))))
    if k > RESERVOIR_SIZE:
        values, n = values[-RESERVOIR_SIZE:], total - RESERVOIR_SIZE
    pos = n % RESERVOIR_SIZE
    first = min(len(values), RESERVOIR_SIZE - pos)
    ring[pos:pos + first] = values[:first]
    if first < len(values):
        ring[:len(values) - first] = values[first:]


class _Shard:
    """One thread's numbers for one member, written by that thread only (no lock).

    ``log`` holds the requests the relay's fast path relayed with a connection taken
    without a wait, four numbers each (latency, time held, bytes in, bytes out), not
    yet counted: ``MemberMetrics.relayed`` appends them, which costs a fraction of
    updating four counters and three histograms per message. Under the member's lock
    they are folded, in C-level steps, into ``folded`` (a shard of its own, written
    under that lock only): by the writer when the log is full, and by any reader
    before it reads, so that readers never see a request that is not counted.
    """

    __slots__ = ("counters", "gauges", "hists", "log", "folded")

    def __init__(self, with_log: bool = True) -> None:
        self.counters = [0] * len(_COUNTERS)
        self.gauges: list[Number] = [0] * len(_GAUGES)
        self.hists = [_Hist() for _ in _HISTOGRAMS]
        self.log = array("d")
        self.folded = _Shard(with_log=False) if with_log else None


#: Fold a shard's log once it holds this many requests (4 numbers each).
_LOG_REQUESTS = 256


class _HistState(NamedTuple):
    """A copy of one histogram: this interval's values and max, totals, totals at reset."""

    values: Sequence[float]
    max: float
    count: int
    sum: float
    base_count: int
    base_sum: float


class _MemberState(NamedTuple):
    """A copy of one member's numbers."""

    counters: list[int]
    baselines: list[int]
    gauges: list[Number]
    hist: list[_HistState]


class MemberMetrics:
    """The measures of one member; every method is safe from any thread.

    Methods for callers: incr(), gauge_add(), gauge_set(), live_gauge(), observe(),
    value() (for tests and /status). Names must be in MEASURES (KeyError if not).
    """

    def __init__(self, member: str) -> None:
        self.member = member
        self._local = threading.local()
        self._lock = threading.Lock()          # guards the shard list and the bases
        self._shards: list[_Shard] = []
        self._set: list[Optional[Number]] = [None] * len(_GAUGES)
        self._live: list[Optional[Callable[[], Number]]] = [None] * len(_GAUGES)
        self._epoch = 0
        self._baselines = [0] * len(_COUNTERS)
        self._hist_base: dict[_Shard, list[tuple[int, float]]] = {}

    def _shard(self) -> _Shard:
        try:
            return self._local.shard
        except AttributeError:
            shard = self._local.shard = _Shard()
            with self._lock:
                self._shards.append(shard)
            return shard

    def incr(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``."""
        self._shard().counters[_COUNTER_INDEX[name]] += n

    def gauge_add(self, name: str, delta: Number) -> None:
        """Move the gauge ``name`` up or down by ``delta``."""
        self._shard().gauges[_GAUGE_INDEX[name]] += delta

    def gauge_set(self, name: str, value: Number) -> None:
        """Set the gauge ``name`` to ``value``."""
        self._set[_GAUGE_INDEX[name]] = value

    def live_gauge(self, name: str, read: Callable[[], Number]) -> None:
        """Read the gauge ``name`` from ``read()`` whenever it is reported."""
        self._live[_GAUGE_INDEX[name]] = read

    def observe(self, name: str, seconds: float) -> None:
        """Record one duration, in seconds, in the histogram ``name``."""
        _record(self._shard().hists[_HISTOGRAM_INDEX[name]], seconds, self._epoch)

    def relayed(self, bytes_in: int, bytes_out: int, mutation: bool, seconds: float,
                held: Optional[float] = None) -> None:
        """One request relayed and its reply written, in one call (the relay's fast path):
        requests, requests.with_reply, bytes.in, bytes.out, requests.mutations, latency;
        with held, also a checkout that did not wait (the caller took an idle connection
        with Pool.checkout_idle, which records nothing) held for that long."""
        try:
            shard = self._local.shard   # _shard's usual case, inline (once per message)
        except AttributeError:
            shard = self._shard()
        if mutation:
            shard.counters[_MUTATIONS] += 1
        if held is not None:            # the usual case: logged, folded later (_Shard)
            log = shard.log
            log.extend((seconds, held, bytes_in, bytes_out))
            if len(log) >= 4 * _LOG_REQUESTS:
                with self._lock:
                    self._fold(shard)
            return
        counters = shard.counters
        counters[_REQUESTS] += 1
        counters[_WITH_REPLY] += 1
        counters[_BYTES_IN] += bytes_in
        counters[_BYTES_OUT] += bytes_out
        _record(shard.hists[_LATENCY], seconds, self._epoch)

    def _fold(self, shard: _Shard) -> None:
        """Count the requests in shard's log into shard.folded (the caller holds the lock)."""
        log, into = shard.log, shard.folded
        n = len(log) // 4 * 4           # whole records (a writer may append meanwhile)
        if not n or into is None:
            return
        batch = log[:n]
        del log[:n]
        counters, k = into.counters, n // 4
        counters[_REQUESTS] += k
        counters[_WITH_REPLY] += k
        counters[_BYTES_IN] += int(sum(batch[2::4]))
        counters[_BYTES_OUT] += int(sum(batch[3::4]))
        epoch = self._epoch
        _record_many(into.hists[_LATENCY], batch[0::4], epoch)
        _record_many(into.hists[_CHECKOUT_WAIT], array("d", bytes(8 * k)), epoch)
        _record_many(into.hists[_HELD], batch[1::4], epoch)

    def _settled(self) -> list[_Shard]:
        """Every shard, logs folded, with the folded ones (the caller holds the lock)."""
        out = list(self._shards)
        for shard in out[:]:
            self._fold(shard)
            if shard.folded is not None:
                out.append(shard.folded)
        return out

    def value(self, name: str) -> Number:
        """Return a counter's running total, a gauge's value or a histogram's count."""
        with self._lock:
            shards = self._settled()
        if name in _COUNTER_INDEX:
            i = _COUNTER_INDEX[name]
            return sum(s.counters[i] for s in shards)
        if name in _GAUGE_INDEX:
            return self._gauges(shards)[_GAUGE_INDEX[name]]
        i = _HISTOGRAM_INDEX[name]
        return sum(s.hists[i].count for s in shards)

    def _gauges(self, shards: list[_Shard]) -> list[Number]:
        out: list[Number] = []
        for i in range(len(_GAUGES)):
            live, fixed = self._live[i], self._set[i]
            if live is not None:
                out.append(live())
            else:
                out.append((fixed or 0) + sum(s.gauges[i] for s in shards))
        return out

    def _take(self, reset_interval: bool) -> _MemberState:
        """Copy this member's numbers, resetting the interval if asked."""
        with self._lock:
            shards = self._settled()
            counters = [sum(s.counters[i] for s in shards) for i in range(len(_COUNTERS))]
            state = _MemberState(counters, list(self._baselines), self._gauges(shards),
                                 [self._hist_state(shards, i) for i in range(len(_HISTOGRAMS))])
            if reset_interval:
                self._baselines = counters
                self._hist_base = {s: [(h.count, h.sum) for h in s.hists] for s in shards}
                self._epoch += 1
        return state

    def _hist_state(self, shards: list[_Shard], i: int) -> _HistState:
        values: list[float] = []
        count = base_count = 0
        total = base_sum = top = 0.0
        for shard in shards:
            base = self._hist_base.get(shard)
            b_count, b_sum = base[i] if base else (0, 0.0)
            h = shard.hists[i]
            values.extend(h.since(b_count))
            count += h.count
            total += h.sum
            base_count += b_count
            base_sum += b_sum
            if h.epoch == self._epoch and h.count > b_count:
                top = max(top, h.max)
        return _HistState(values, top, count, total, base_count, base_sum)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Return the nearest-rank percentile of already sorted values (0.0 if empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


class Metrics:
    """All members' measures for one process.

    Methods for callers: member(addr) -> MemberMetrics (created once, cached),
    forget(addr), members(), snapshot(reset_interval) -> list[Sample], counter_totals().
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: Other processes' numbers (--processes N): called with reset_interval, each
        #: returns (member address, state) pairs merged into every snapshot.
        self.sources: list[Callable[[bool], list[tuple[str, "_MemberState"]]]] = []
        self._lock = threading.Lock()
        self._members: dict[str, MemberMetrics] = {}
        self._interval_start = clock()
        self._snapshot_lock = threading.Lock()

    def member(self, addr: str) -> MemberMetrics:
        """Return the MemberMetrics for ``addr`` ("host:port"), creating it once."""
        mm = self._members.get(addr)
        if mm is None:
            with self._lock:
                mm = self._members.setdefault(addr, MemberMetrics(addr))
        return mm

    def forget(self, addr: str) -> None:
        """Stop reporting a member that left the set (a later member(addr) starts afresh).

        Its Ganglia metrics then expire after dmax and its Prometheus series go away;
        whoever still holds its MemberMetrics may keep recording into it harmlessly.
        """
        with self._lock:
            self._members.pop(addr, None)

    def members(self) -> list[str]:
        """Return the member addresses seen so far, sorted."""
        with self._lock:
            return sorted(self._members)

    def take(self, reset_interval: bool) -> list[tuple[str, _MemberState]]:
        """Every member's raw numbers (what a worker process sends its parent)."""
        with self._lock:
            members = sorted(self._members.items())
        return [(addr, mm._take(reset_interval)) for addr, mm in members]

    def counter_totals(self) -> dict[str, dict[str, Number]]:
        """Every counter's running total per member ({member: {name: total}}), summed over
        processes; the interval is not reset."""
        totals: dict[str, dict[str, Number]] = {}
        for s in self.snapshot(reset_interval=False):
            if s.member is not None and s.name in _COUNTER_INDEX:
                totals.setdefault(s.member, {})[s.name] = s.total or 0
        return totals

    def snapshot(self, reset_interval: bool) -> list[Sample]:
        """Return every measure, per member and summed over members.

        Counters report their per-second rate since the last reset (and their
        running total); histograms their percentiles since the last reset.
        With ``reset_interval`` a new interval starts (the Ganglia emitter
        does this; /metrics does not).
        """
        with self._snapshot_lock:
            now = self._clock()
            elapsed = max(now - self._interval_start, 1e-3)
            if reset_interval:
                self._interval_start = now
            states = self.take(reset_interval)
            for source in self.sources:
                states = _merge(states, source(reset_interval))
        samples = _aggregate(states, elapsed)
        for addr, state in states:
            samples.extend(_member_samples(addr, state, elapsed))
        return samples


def _merge(ours: list[tuple[str, _MemberState]],
           theirs: list[tuple[str, _MemberState]]) -> list[tuple[str, _MemberState]]:
    """Two processes' numbers for the members ``ours`` knows, added up."""
    by_addr = dict(theirs)
    out = []
    for addr, a in ours:
        b = by_addr.get(addr)
        if b is not None:
            a = merge_states(a, b)
        out.append((addr, a))
    return out


def merge_states(a: _MemberState, b: _MemberState) -> _MemberState:
    """The sum of two states of one member (counters, gauges, histograms merged)."""
    def add(x: list, y: list) -> list:
        return [p + q for p, q in zip(x, y)]

    hist = [_HistState(list(h.values) + list(k.values), max(h.max, k.max), h.count + k.count,
                       h.sum + k.sum, h.base_count + k.base_count, h.base_sum + k.base_sum)
            for h, k in zip(a.hist, b.hist)]
    return _MemberState(add(a.counters, b.counters), add(a.baselines, b.baselines),
                        add(a.gauges, b.gauges), hist)


def thin(state: _MemberState, most: int) -> _MemberState:
    """state with at most ``most`` observations kept per histogram (evenly spread), to
    send it to another process."""
    hist = [h._replace(values=list(h.values)[::max(1, -(-len(h.values) // most))])
            for h in state.hist]
    return state._replace(hist=hist)


def _counter_samples(member: Optional[str], counters: list[int], baselines: list[int],
                     elapsed: float) -> list[Sample]:
    out = []
    for i, name in enumerate(_COUNTERS):
        rate = (counters[i] - baselines[i]) / elapsed
        units = MEASURE_BY_NAME[name].units + "/s"
        out.append(Sample(name, rate, units, "float", "both", member, COUNTER, counters[i]))
    return out


def _gauge_samples(member: Optional[str], gauges: list[Number]) -> list[Sample]:
    out = []
    for i, name in enumerate(_GAUGES):
        value = gauges[i]
        type_ = "int32" if isinstance(value, int) else "double"
        out.append(Sample(name, value, MEASURE_BY_NAME[name].units, type_, "both", member, GAUGE))
    return out


def _histogram_samples(member: Optional[str], name: str, h: _HistState,
                       elapsed: float) -> list[Sample]:
    """Return name.p50/.p95/.p99/.max in ms, name.count and name.sum (ms) as counters."""
    values = sorted(h.values)
    out = [Sample(f"{name}.{label}", percentile(values, pct) * 1000.0, "ms", "float", "both",
                  member, HISTOGRAM) for label, pct in PERCENTILES]
    out.append(Sample(f"{name}.max", h.max * 1000.0, "ms", "float", "both", member, HISTOGRAM))
    out.append(Sample(f"{name}.count", (h.count - h.base_count) / elapsed, "obs/s", "float",
                      "both", member, COUNTER, h.count))
    out.append(Sample(f"{name}.sum", (h.sum - h.base_sum) * 1000.0 / elapsed, "ms/s", "float",
                      "both", member, COUNTER, h.sum * 1000.0))
    return out


def _member_samples(addr: str, s: _MemberState, elapsed: float) -> list[Sample]:
    out = _counter_samples(addr, s.counters, s.baselines, elapsed)
    out.extend(_gauge_samples(addr, s.gauges))
    for name, h in zip(_HISTOGRAMS, s.hist):
        out.extend(_histogram_samples(addr, name, h, elapsed))
    return out


def _aggregate(states: list[tuple[str, _MemberState]], elapsed: float) -> list[Sample]:
    """Return the samples summed (or, for percentiles, merged) over all members."""
    n_c, n_g = len(_COUNTERS), len(_GAUGES)
    counters = [sum(s.counters[i] for _, s in states) for i in range(n_c)]
    baselines = [sum(s.baselines[i] for _, s in states) for i in range(n_c)]
    gauges = [sum(s.gauges[i] for _, s in states) for i in range(n_g)]
    out = _counter_samples(None, counters, baselines, elapsed)
    out.extend(_gauge_samples(None, gauges))
    for j, name in enumerate(_HISTOGRAMS):
        hs = [s.hist[j] for _, s in states]
        merged = _HistState([v for h in hs for v in h.values],
                            max((h.max for h in hs), default=0.0),
                            sum(h.count for h in hs), sum(h.sum for h in hs),
                            sum(h.base_count for h in hs), sum(h.base_sum for h in hs))
        out.extend(_histogram_samples(None, name, merged, elapsed))
    return out
