"""The Ganglia dashboards drawn by a real Ganglia-web.

pymongo -> dvara -> gmond -> gmetad (RRDs) -> Ganglia-web (Debian's ganglia-webfrontend
under apache2 + mod_php), with conf/ganglia installed by running the install steps of
conf/ganglia/README.md. Every report must draw data (its series' colours plotted, which
an empty graph of the same report does not have), and headless Chromium takes a
screenshot of the dvara view.

DVARA_GANGLIA_SCREENSHOT=docs/ganglia-dvara-view.png writes the screenshot there too:
that is how the README's picture is made.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from tests.ganglia_harness import CHROMIUM, GangliaWeb, Gmetad, Gmond
from tests.helpers import ROOT, Dvara, LoadThread, RawClient, Secantus, wait_until

CLUSTER = "dvara-test"              # the cluster of the harness's gmond
REPORTS = sorted((ROOT / "conf/ganglia/graph.d").glob("dvara_*_report.json"))
#: Points (seconds: gmetad polls every second) each report needs before it is drawn.
POINTS = 8
#: Pixels of a report's series colours that a graph with data has beyond an empty one.
PLOTTED = 40
#: The view in the screenshot: two columns of graphs, all of them in the picture.
WINDOW = "1280,2100"


class Load(LoadThread):
    """Inserts, finds and pings through dvara, plus what the quieter reports show:
    a legacy getLastError (getLastError report) and a bad frame (errors report)."""

    def __init__(self, proxy: Dvara) -> None:
        super().__init__(proxy.uri(), "gweb-load")
        self.proxy = proxy
        self.n = 0

    def step(self) -> None:
        coll = self.client.gweb.things
        coll.insert_one({"n": self.n})
        assert coll.find_one({"n": self.n}) is not None
        self.client.admin.command("ping")
        if self.n % 20 == 0:
            self._legacy_and_bad_frame()
        self.n += 1
        self._stop.wait(0.01)

    def _legacy_and_bad_frame(self) -> None:
        with RawClient(self.proxy.port) as raw:
            assert raw.legacy_command({"getLastError": 1})["ok"] == 1.0
        with RawClient(self.proxy.port) as bad:
            bad.send(b"\x05\x00\x00\x00" + b"\x00" * 12)   # a 5-byte message: not a frame
            assert bad.closed_by_peer()


def readme_install(gweb: GangliaWeb, host: str) -> str:
    """Run conf/ganglia/README.md's install block with the test's copies for its paths."""
    readme = (ROOT / "conf/ganglia/README.md").read_text()
    block = re.search(r"## Install\n.*?```sh\n(.*?)```", readme, re.S)
    assert block, "conf/ganglia/README.md has no sh block under '## Install'"
    script = (block.group(1).replace("sudo ", "")
              .replace("/usr/share/ganglia-webfrontend", str(gweb.app))
              .replace("/var/lib/ganglia-web", str(gweb.confdir))
              .replace("db-proxy1.example.com", host))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the README's install steps failed:\n{script}\n{done.stderr}"
    return script


def colours(report: Path) -> list[tuple[int, int, int]]:
    """The colours of a report's series."""
    return [(int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))
            for c in (s["color"] for s in json.loads(report.read_text())["series"])]


def coloured_pixels(png: bytes, wanted: list[tuple[int, int, int]]) -> int:
    """Pixels close to one of the wanted colours (lines are anti-aliased)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    histogram = image.getcolors(maxcolors=1 << 24) or []
    return sum(count for count, pixel in histogram
               if any(sum(abs(a - b) for a, b in zip(pixel, c)) <= 30 for c in wanted))


@dataclass
class Dashboards:
    gweb: GangliaWeb
    rrds: Path                      # gmetad's rrd_rootdir
    host: str
    start: int                      # first second with data in the RRDs
    end: int                        # when the load stopped

    def query(self, report: str, start: int, end: int, **extra: str) -> str:
        return urllib.parse.urlencode({"c": CLUSTER, "h": self.host, "g": report,
                                       "z": "medium", "r": "custom", "cs": str(start),
                                       "ce": str(end), **extra})

    def series(self, report: str) -> list[dict[str, Any]]:
        """graph.php's JSON of a report over the load: one entry per series."""
        ctype, body = self.gweb.get("graph.php?" + self.query(report, self.start, int(time.time()),
                                                              json="1"))
        assert ctype.startswith("application/json"), body[:500]
        return json.loads(body)

    def png(self, report: str, start: int, end: int) -> bytes:
        ctype, body = self.gweb.get("graph.php?" + self.query(report, start, end))
        assert ctype == "image/png", f"{report}: {ctype}: {body[:500]!r}\n{self.gweb.logs()[-2000:]}"
        return body


def points(series: dict[str, Any]) -> int:
    return sum(1 for value, _ in series["datapoints"]
               if value is not None and not (isinstance(value, float) and math.isnan(value)))


def filled(d: Dashboards) -> bool:
    """Every report's metrics have their RRDs, with POINTS values in each."""
    host_dir = d.rrds / CLUSTER / d.host
    metrics = {s["metric"] for r in REPORTS for s in json.loads(r.read_text())["series"]}
    if not all((host_dir / f"{m}.rrd").exists() for m in metrics):
        return False  # graph.php's JSON fails (HTTP 500) for a report without RRDs
    return all(all(points(s) >= POINTS for s in d.series(r.stem)) for r in REPORTS)


@pytest.fixture(scope="module")
def dashboards(secantus: Secantus, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Dashboards]:
    tmp = tmp_path_factory.mktemp("gweb")
    gmond = Gmond(tmp)
    try:
        with Gmetad(tmp, gmond.tcp_port) as gmetad, \
                GangliaWeb(gmetad.rrds, gmetad.interactive_port) as gweb, \
                Dvara(tmp, secantus.address, "--metrics-interval", "1s",
                      "--ganglia", f"127.0.0.1:{gmond.udp_port}",
                      "--discovery-interval", "5s") as proxy:
            start = int(time.time()) - 1
            with Load(proxy) as load:
                hosts = wait_until(lambda: [h.get("NAME") for h in
                                            ET.fromstring(gmond.xml()).iter("HOST")],
                                   "gmond to show dvara's host", 20)
                readme_install(gweb, hosts[0])
                d = Dashboards(gweb, gmetad.rrds, hosts[0], start, 0)
                wait_until(lambda: filled(d), f"{POINTS} points in every report's series",
                           60, step=1.0)
                assert not load.errors, load.errors[:3]
            d.end = int(time.time())
            yield d
    finally:
        gmond.close()


# -- the tests ----------------------------------------------------------------------------
@pytest.mark.parametrize("report", REPORTS, ids=[r.stem for r in REPORTS])
def test_every_report_draws_the_load(dashboards: Dashboards, report: Path):
    d = dashboards
    data = d.png(report.stem, d.start, d.end)
    # the same report over an hour before gmetad ran: axes and legend, no data
    empty = d.png(report.stem, d.start - 3600, d.start - 600)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.width >= 300 and image.height >= 95
    plotted = coloured_pixels(data, colours(report)) - coloured_pixels(empty, colours(report))
    assert plotted >= PLOTTED, f"{report.stem}: only {plotted} pixels of its series drawn"
    # and every series has values: a series whose metric is missing has none
    for series in d.series(report.stem):
        assert points(series) >= POINTS, series["metric_name"]


def test_the_dvara_view_in_chromium(dashboards: Dashboards, tmp_path: Path):
    d = dashboards
    all_colours = sorted({c for r in REPORTS for c in colours(r)})

    def screenshot(name: str, start: int, end: int) -> bytes:
        out = tmp_path / name
        url = d.gweb.url(f"?tab=v&vn=dvara&r=custom&cs={start}&ce={end}")
        done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                               "--hide-scrollbars", f"--window-size={WINDOW}",
                               "--virtual-time-budget=10000", f"--screenshot={out}", url],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HOME": str(tmp_path)})
        assert done.returncode == 0 and out.exists(), done.stderr[-2000:]
        return out.read_bytes()

    shot = screenshot("view.png", d.start, d.end)
    empty = screenshot("empty.png", d.start - 3600, d.start - 600)
    plotted = coloured_pixels(shot, all_colours) - coloured_pixels(empty, all_colours)
    assert plotted >= len(REPORTS) * PLOTTED, f"the view shows only {plotted} plotted pixels"
    target = os.environ.get("DVARA_GANGLIA_SCREENSHOT")
    if target:
        shutil.copyfile(tmp_path / "view.png", ROOT / target)
