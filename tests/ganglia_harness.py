"""Helpers for the Ganglia tests: a private gmond on loopback and gmetric packet capture."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import pytest

from dvara_lib.observe.metrics import HISTOGRAM, MEASURES, PERCENTILES, metric_name
from tests.helpers import accepts, free_port, wait_until

GMOND = shutil.which("gmond") or "/usr/sbin/gmond"
GMETRIC = shutil.which("gmetric") or "/usr/bin/gmetric"
INSTALL_HINT = "apt-get update && apt-get install -y ganglia-monitor"

_GMOND_CONF = """\
globals {{ daemonize = no  setuid = no  debug_level = 0  max_udp_msg_len = 1472
          mute = no  deaf = no  host_dmax = 0  cleanup_threshold = 300  gexec = no
          send_metadata_interval = 0 }}
cluster {{ name = "dvara-test" }}
udp_recv_channel {{ port = {udp}  bind = 127.0.0.1 }}
tcp_accept_channel {{ port = {tcp}  bind = 127.0.0.1 }}
"""


#: What each histogram becomes in Ganglia: <name>.p50 .p95 .p99 .max .count .sum.
HISTOGRAM_SUFFIXES = tuple(label for label, _ in PERCENTILES) + ("max", "count", "sum")


def sample_names() -> list[str]:
    """Every sample name the Ganglia sink sends, without prefix (histograms expanded)."""
    names = []
    for m in MEASURES:
        if m.kind == HISTOGRAM:
            names.extend(f"{m.name}.{suffix}" for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.append(m.name)
    return names


def ganglia_names(member: Optional[str] = None) -> set[str]:
    """The Ganglia metric names of every measure: mongoproxy.[<member>.]<sample name>."""
    return {metric_name(name, member) for name in sample_names()}


def require(path: str) -> str:
    """Fail (never skip) when a Ganglia binary is missing."""
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: the Ganglia tests need Debian's ganglia-monitor "
                    f"(run: {INSTALL_HINT})", pytrace=False)
    return path


def free_udp_port() -> int:
    """Return a loopback UDP port that was free a moment ago (bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gmond:
    """A foreground gmond on free loopback ports; read its XML with metrics().

    ``udp_port`` pins the UDP port (to start a gmond again where a stopped one was).
    """

    def __init__(self, workdir: Path, udp_port: Optional[int] = None) -> None:
        require(GMOND)
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen] = None
        for _ in range(5):  # a port picked with bind(0) can be taken before gmond binds it
            if self._try_start(udp_port):
                return
        pytest.fail("gmond did not start; see " + str(workdir / "gmond.log"))

    def _try_start(self, udp_port: Optional[int]) -> bool:
        self.udp_port, self.tcp_port = udp_port or free_udp_port(), free_port()
        conf = self.workdir / "gmond.conf"
        conf.write_text(_GMOND_CONF.format(udp=self.udp_port, tcp=self.tcp_port))
        with open(self.workdir / "gmond.log", "ab") as logf:
            self.proc = subprocess.Popen([GMOND, "-c", str(conf)], stdout=logf, stderr=logf)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            if accepts(self.tcp_port):
                return True
            time.sleep(0.02)
        self.close()
        return False

    @property
    def udp_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.udp_port)

    def xml(self) -> bytes:
        """Return gmond's whole XML dump."""
        chunks = []
        with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=5) as conn:
            for _ in range(10_000):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    def metrics(self) -> dict[str, dict[str, object]]:
        """Return {metric name: its attributes, plus "EXTRA": {name: val}} over all hosts."""
        out: dict[str, dict[str, object]] = {}
        for elem in ET.fromstring(self.xml()).iter("METRIC"):
            attrs: dict[str, object] = dict(elem.attrib)
            attrs["EXTRA"] = {e.get("NAME"): e.get("VAL") for e in elem.iter("EXTRA_ELEMENT")}
            out[elem.get("NAME", "")] = attrs
        return out

    def wait_for(self, names: set[str], timeout: float = 10.0) -> dict[str, dict[str, object]]:
        """Wait until every name is in the XML; return metrics()."""
        def ready() -> Optional[dict[str, dict[str, object]]]:
            found = self.metrics()
            return found if names <= set(found) else None
        try:
            return wait_until(ready, "gmond to show every metric", timeout)
        except BaseException:
            missing = sorted(names - set(self.metrics()))
            print(f"gmond is missing {len(missing)} metrics: {missing[:10]}")
            raise

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)


def capture_gmetric(workdir: Path, args: list[str]) -> tuple[bytes, bytes]:
    """Run /usr/bin/gmetric against a UDP socket of ours; return (metadata, value) packets."""
    require(GMETRIC)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        conf = workdir / "gmetric.conf"
        conf.write_text("globals { }\nudp_send_channel { host = 127.0.0.1  port = %d }\n"
                        % sock.getsockname()[1])
        done = subprocess.run([GMETRIC, "-c", str(conf)] + args, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, f"gmetric {args} failed: {done.stderr}"
        return sock.recv(65536), sock.recv(65536)
