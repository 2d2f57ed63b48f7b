"""GangliaSink: send every sample as gmetric packets over UDP to each gmond target."""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from typing import Optional, Sequence

from dvara_lib.observe.gmetric import encode_metric
from dvara_lib.observe.metrics import MEASURE_BY_NAME, Sample
from dvara_lib.address import format_address

log = logging.getLogger("dvara.metrics")

GROUP = "dvara"
# Packets go out in bursts of PACE_BURST with PACE_PAUSE seconds between
# them, so a gmond (default 208 KiB receive buffer) is not flooded: one
# interval with 7 members is ~750 packets.
PACE_BURST = 32
PACE_PAUSE = 0.002


def _description(sample_name: str) -> Optional[str]:
    measure = (MEASURE_BY_NAME.get(sample_name)
               or MEASURE_BY_NAME.get(sample_name.rpartition(".")[0]))
    return measure.help if measure else None


class _Target:
    """One gmond address and its connected UDP socket (opened on first use)."""

    def __init__(self, host: str, port: int, multicast_ttl: int) -> None:
        self.host, self.port = host, port
        self.multicast_ttl = multicast_ttl
        self.sock: Optional[socket.socket] = None

    def __str__(self) -> str:
        return format_address(self.host, self.port)

    def open(self) -> socket.socket:
        """Resolve, create and connect the socket.  Can raise OSError."""
        if self.sock is None:
            family, type_, proto, _, addr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, type_, proto)
            try:
                if ipaddress.ip_address(addr[0].split("%")[0]).is_multicast:
                    self._set_ttl(sock, family)
                sock.connect(addr)
            except OSError:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def _set_ttl(self, sock: socket.socket, family: int) -> None:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, self.multicast_ttl)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.multicast_ttl)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class GangliaSink:
    """Send samples to gmond (unicast or multicast) the way gmetric does.

    Each sample becomes a metadata packet and a value packet (as gmetric
    sends them, so a restarted gmond learns every metric again at once), sent
    to every target on each emit(), paced in bursts of PACE_BURST packets.
    Metric names are Sample.full_name, GROUP "dvara", tmax about twice the
    interval, dmax ten intervals (so a removed member's metrics expire).
    emit() never raises; failures are logged at most once per emit() call
    (once per interval).
    """

    def __init__(self, targets: Sequence[str], interval: float, group: str = GROUP,
                 dmax: Optional[int] = None, hostname: Optional[str] = None,
                 spoof: Optional[str] = None, multicast_ttl: int = 1) -> None:
        self.targets = [_Target(host, port, multicast_ttl) for host, port in targets]
        self.group = group
        self.tmax = max(1, math.ceil(2 * interval))
        self.dmax = max(1, math.ceil(10 * interval)) if dmax is None else dmax
        self.hostname, self.spoof = hostname, spoof

    def encode(self, samples: Sequence[Sample]) -> list[bytes]:
        """Return the packets for ``samples``; a sample that cannot be encoded is skipped."""
        packets: list[bytes] = []
        for s in samples:
            try:
                packets.extend(encode_metric(
                    s.full_name, s.value, s.type_, units=s.units, slope=s.slope,
                    tmax=self.tmax, dmax=self.dmax, group=self.group, hostname=self.hostname,
                    spoof=self.spoof, desc=_description(s.name)))
            except ValueError as exc:
                log.debug("ganglia: skipping %s: %s", s.full_name, exc)
        return packets

    def emit(self, samples: Sequence[Sample]) -> None:
        """Send every sample to every target.  Never raises."""
        try:
            packets = self.encode(samples)
            failures = [f for f in (self._send(t, packets) for t in self.targets) if f]
            if failures:
                log.warning("ganglia: sending metrics failed this interval: %s",
                            "; ".join(failures))
        except Exception:
            log.exception("ganglia: emitting metrics failed")

    def _send(self, target: _Target, packets: list[bytes]) -> Optional[str]:
        """Send packets to one target; return a description of failures or None."""
        failed, first = 0, None
        try:
            sock = target.open()
        except OSError as exc:
            return f"{target}: {exc}"
        for i, packet in enumerate(packets):
            if i and not i % PACE_BURST:
                time.sleep(PACE_PAUSE)
            try:
                sock.send(packet)
            except OSError as exc:
                failed += 1
                first = first or exc
        if failed:
            return f"{target}: {failed} of {len(packets)} packets failed ({first})"
        return None

    def close(self) -> None:
        """Close the sockets."""
        for target in self.targets:
            target.close()


def open_sink(targets: list[tuple[str, int]], interval: float) -> GangliaSink:
    """Build the sink from the --ganglia addresses (host, port)."""
    return GangliaSink(targets, interval)
