"""Helpers for the Ganglia tests: a private gmond on loopback and gmetric packet capture."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
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


# -- gmetad and Ganglia-web, for the dashboards test --------------------------------------
GMETAD = shutil.which("gmetad") or "/usr/sbin/gmetad"
APACHE2 = shutil.which("apache2") or "/usr/sbin/apache2"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Where Debian's ganglia-webfrontend puts the app, and its conf directory (gweb_confdir).
GWEB_APP = Path("/usr/share/ganglia-webfrontend")
GWEB_CONFDIR = Path("/var/lib/ganglia-web")
GWEB_INSTALL_HINT = ("apt-get update && apt-get install -y gmetad ganglia-webfrontend "
                     "chromium patch")

_GMETAD_CONF = """\
data_source "{cluster}" {interval} 127.0.0.1:{gmond_port}
gridname "dvara-grid"
setuid off
xml_port {xml_port}
interactive_port {interactive_port}
rrd_rootdir "{rrds}"
server_threads 2
case_sensitive_hostnames 1
"""


def require_gweb() -> None:
    """Fail (never skip) when a piece of the gmetad + Ganglia-web chain is missing."""
    for path in (GMETAD, APACHE2, CHROMIUM, str(GWEB_APP / "graph.php"),
                 shutil.which("patch") or "/usr/bin/patch"):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: the dashboards test needs Debian's gmetad, "
                        f"ganglia-webfrontend, chromium and patch (run: {GWEB_INSTALL_HINT})",
                        pytrace=False)


class Gmetad:
    """A foreground gmetad (-d 1) polling one gmond every ``interval`` s into ``rrds``.

    ``rrds`` is a temporary directory of its own that anyone can read (Ganglia-web's
    workers run as www-data), removed by close().
    """

    def __init__(self, workdir: Path, gmond_port: int, cluster: str = "dvara-test",
                 interval: int = 1) -> None:
        require_gweb()
        self.rrds = Path(tempfile.mkdtemp(prefix="dvara-rrds-"))
        self.rrds.chmod(0o755)
        self.proc: Optional[subprocess.Popen] = None
        for _ in range(5):  # a free port can be taken before gmetad binds it
            self.xml_port, self.interactive_port = free_port(), free_port()
            conf = workdir / "gmetad.conf"
            conf.write_text(_GMETAD_CONF.format(
                cluster=cluster, interval=interval, gmond_port=gmond_port,
                xml_port=self.xml_port, interactive_port=self.interactive_port,
                rrds=self.rrds))
            with open(workdir / "gmetad.log", "ab") as logf:
                self.proc = subprocess.Popen([GMETAD, "-d", "1", "-c", str(conf)],
                                             stdout=logf, stderr=logf,
                                             stdin=subprocess.DEVNULL)
            if _serving(self.proc, self.interactive_port):
                return
            _kill(self.proc)
        self.close()
        pytest.fail("gmetad did not start; see " + str(workdir / "gmetad.log"))

    def __enter__(self) -> "Gmetad":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _kill(self.proc)
        shutil.rmtree(self.rrds, ignore_errors=True)


_GWEB_CONF = """\
<?php
// Debian's own overrides (paths of the JavaScript libraries), then the test's dirs.
include "{debian_conf}";
$conf['gweb_confdir'] = "{confdir}";
$conf['rrds'] = "{rrds}";
$conf['dwoo_compiled_dir'] = "{confdir}/dwoo/compiled";
$conf['dwoo_cache_dir'] = "{confdir}/dwoo/cache";
$conf['views_dir'] = $conf['conf_dir'] = "{confdir}/conf";
$conf['cachedata'] = 0;
$conf['cachefile'] = "{confdir}/conf/ganglia_metrics.cache";
$conf['nagios_cache_file'] = "{confdir}/conf/nagios_ganglia.cache";
$conf['overlay_events_file'] = "{confdir}/conf/events.json";
$conf['overlay_events_color_map_file'] = "{confdir}/conf/event_color.json";
$conf['ganglia_ip'] = "127.0.0.1";
$conf['ganglia_port'] = {gmetad_port};
"""

_APACHE_CONF = """\
ServerRoot /etc/apache2
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {root}/apache2.pid
DefaultRuntimeDir {root}
Mutex file:{root} default
ErrorLog {root}/apache2-error.log
LogLevel warn
{user}
LoadModule mpm_prefork_module /usr/lib/apache2/modules/mod_mpm_prefork.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule mime_module /usr/lib/apache2/modules/mod_mime.so
LoadModule dir_module /usr/lib/apache2/modules/mod_dir.so
LoadModule alias_module /usr/lib/apache2/modules/mod_alias.so
Include /etc/apache2/mods-available/php*.load
Include /etc/apache2/mods-available/php*.conf
StartServers 2
MaxRequestWorkers 16
TypesConfig /etc/mime.types
DirectoryIndex index.php index.html
DocumentRoot {root}/www
# As Debian's apache.conf and javascript-common set them up:
Alias /ganglia {root}/www/ganglia
Alias /javascript /usr/share/javascript
<Directory />
    Require all granted
</Directory>
"""


class GangliaWeb:
    """Debian's Ganglia-web under a foreground apache2 (mod_php) on a free loopback port.

    The app is a copy of /usr/share/ganglia-webfrontend (it reads conf.php from its own
    directory) with a conf.php pointing at the test's directories; its conf directory is
    a copy of /var/lib/ganglia-web. ``app`` and ``confdir`` stand for those two paths.
    The workers run as www-data when we are root, so the tree is world-readable.
    The caller installs dvara's files into it (conf/ganglia/README.md's steps).
    """

    def __init__(self, rrds: Path, gmetad_port: int) -> None:
        require_gweb()
        self.root = Path(tempfile.mkdtemp(prefix="dvara-gweb-"))
        self.proc: Optional[subprocess.Popen] = None
        try:
            self._prepare(rrds, gmetad_port)
            self._start()
        except BaseException:
            self.close()
            raise

    def _prepare(self, rrds: Path, gmetad_port: int) -> None:
        self.root.chmod(0o755)
        self.app = self.root / "www" / "ganglia"
        self.confdir = self.root / "ganglia-web"
        shutil.copytree(GWEB_APP, self.app, symlinks=True)
        shutil.copytree(GWEB_CONFDIR, self.confdir, symlinks=True)
        (self.app / "conf.php").write_text(_GWEB_CONF.format(
            debian_conf=GWEB_APP / "conf.php", confdir=self.confdir, rrds=rrds,
            gmetad_port=gmetad_port))
        if os.geteuid() == 0:  # as the package leaves it: the workers' template cache
            for path in [self.confdir / "dwoo", *(self.confdir / "dwoo").rglob("*")]:
                shutil.chown(path, "www-data", "www-data")

    def _start(self) -> None:
        user = "User www-data\nGroup www-data" if os.geteuid() == 0 else ""
        for _ in range(5):
            self.port = free_port()
            conf = self.root / "apache2.conf"
            conf.write_text(_APACHE_CONF.format(port=self.port, root=self.root, user=user))
            with open(self.root / "apache2.log", "ab") as logf:
                self.proc = subprocess.Popen([APACHE2, "-f", str(conf), "-DFOREGROUND"],
                                             stdout=logf, stderr=logf,
                                             stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            if _serving(self.proc, self.port):
                return
            self._stop()
        pytest.fail("apache2 did not start: " + self.logs())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/ganglia/{path}"

    def get(self, path: str) -> tuple[str, bytes]:
        """(Content-Type, body) of a page of the app; fails on an HTTP error."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=30) as resp:
                return resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"GET {path}: {exc}\n{exc.read()[:2000]!r}\n"
                                 f"{self.logs()[-3000:]}") from None

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in (self.root / "apache2.log", self.root / "apache2-error.log")
                         if p.exists())

    def __enter__(self) -> "GangliaWeb":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop(self) -> None:
        """SIGTERM (apache2 stops its workers), then SIGKILL to its process group."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: workers left
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def _serving(proc: subprocess.Popen, port: int, timeout: float = 15.0) -> bool:
    """Wait until proc accepts on port; False if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if accepts(port):
            return True
        time.sleep(0.02)
    return False


def _kill(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
