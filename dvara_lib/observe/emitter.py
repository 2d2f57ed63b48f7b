"""MetricsEmitter: a thread that hands a metrics snapshot to each sink every interval."""

# design: one daemon thread "dvara-metrics".  It waits on an Event with the
# interval as timeout (so close() wakes it at once), takes
# metrics.snapshot(reset_interval=True) and calls each sink's emit().  It
# never holds a metrics lock while a sink does I/O (snapshot() copies first),
# and it swallows and logs sink errors so metrics can never stop the proxy.

from __future__ import annotations

import logging
import threading
from typing import Optional, Sequence

from dvara_lib.errors import ConfigError
from dvara_lib.observe.metrics import Metrics
from dvara_lib.observe.sinks import Sink

log = logging.getLogger("dvara.metrics")


class MetricsEmitter(threading.Thread):
    """Emit metrics every ``interval`` seconds until close().

    Can raise ConfigError (at construction) for an interval that is not positive.
    Methods for callers: start(), close(timeout), emit_once().
    """

    def __init__(self, metrics: Metrics, sinks: Sequence[Sink], interval: float) -> None:
        super().__init__(name="dvara-metrics", daemon=True)
        if interval <= 0:
            raise ConfigError(f"metrics interval must be > 0 seconds, not {interval!r}")
        self.metrics = metrics
        self.sinks = list(sinks)
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        log.debug("metrics emitter started: every %ss to %d sink(s)",
                  self.interval, len(self.sinks))
        while not self._stop_event.wait(self.interval):
            self.emit_once()
        log.debug("metrics emitter stopped")

    def emit_once(self) -> None:
        """Take one snapshot (starting a new interval) and pass it to every sink."""
        try:
            samples = self.metrics.snapshot(reset_interval=True)
        except Exception:
            log.exception("metrics snapshot failed")
            return
        for sink in self.sinks:
            try:
                sink.emit(samples)
            except Exception:
                log.exception("metrics sink %r failed", sink)

    def close(self, timeout: Optional[float] = 5.0) -> None:
        """Stop the thread, wait up to ``timeout`` for it, then close the sinks."""
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing metrics sink %r failed", sink)
