"""conf/ganglia: the Ganglia-web reports parse and name only metrics dvara sends."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from dvara_lib.observe.metrics import HISTOGRAM, MEASURES, metric_name
from tests.ganglia_harness import HISTOGRAM_SUFFIXES, ganglia_names
from tests.helpers import ROOT

GANGLIA = ROOT / "conf" / "ganglia"
REPORTS = sorted((GANGLIA / "graph.d").glob("*.json"))
SERIES_TYPES = {"line", "stack", "percent", "percentile"}
#: The views the issue asks for, each with a report.
VIEWS = ("clients", "ops", "latency", "pool", "gle", "topology")


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def report_metrics() -> dict[str, set[str]]:
    return {p.stem: {s["metric"] for s in load(p)["series"]} for p in REPORTS}


def test_there_is_a_report_per_view():
    assert {f"dvara_{view}_report" for view in VIEWS} <= {p.stem for p in REPORTS}


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.name)
def test_report_is_a_ganglia_web_json_report(path: Path):
    report = load(path)
    assert report["report_name"] == path.stem         # graph.php loads graph.d/<g>.json
    assert report["report_type"] == "standard"
    assert report["title"] and report["vertical_label"]
    assert report["series"]
    for series in report["series"]:
        assert set(series) <= {"metric", "color", "label", "type", "line_width"}, series
        assert re.fullmatch(r"[0-9a-f]{6}", series["color"]), series
        assert series["label"] and series.get("type", "line") in SERIES_TYPES
        assert series.get("line_width", "1") in ("1", "2", "3")


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.name)
def test_report_names_only_metrics_dvara_sends(path: Path):
    unknown = {s["metric"] for s in load(path)["series"]} - ganglia_names()
    assert not unknown, f"{path.name} names metrics dvara does not send: {sorted(unknown)}"


def test_every_measure_is_on_some_dashboard():
    graphed = set().union(*report_metrics().values())
    def names(m: Any) -> set[str]:
        if m.kind == HISTOGRAM:
            return {metric_name(f"{m.name}.{suffix}") for suffix in HISTOGRAM_SUFFIXES}
        return {metric_name(m.name)}

    missing = [m.name for m in MEASURES if not names(m) & graphed]
    assert not missing, f"measures on no dashboard: {missing}"


def test_view_and_host_files_name_the_reports():
    reports = {p.stem for p in REPORTS}
    view = load(GANGLIA / "view_dvara.json")
    assert view["view_name"] == "dvara" and view["view_type"] == "standard"
    assert {item["graph"] for item in view["items"]} == reports
    assert {item["hostname"] for item in view["items"]} == {"DVARA_HOST"}
    assert set(load(GANGLIA / "host_dvara.json")["included_reports"]) == reports


def test_readme_lists_every_report():
    readme = (GANGLIA / "README.md").read_text()
    assert all(f"`{p.stem}`" in readme for p in REPORTS)
