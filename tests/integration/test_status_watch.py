"""`dvara status --watch` against a real dvara in front of SecantusDB, under a pymongo load."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.helpers import ROOT, Dvara, Secantus, free_port, wait_until
from tests.integration.test_metrics_e2e import PingLoad

RATES = ("REQ/S", "IN_B/S", "OUT_B/S", "ERR/S")


@pytest.fixture()
def watched(secantus: Secantus, start_dvara: Callable[..., Dvara]) -> Iterator[str]:
    """A dvara with --admin-addr (returned) under a pymongo ping load for the test's length."""
    admin = f"127.0.0.1:{free_port()}"
    proxy = start_dvara(secantus.address, "--admin-addr", admin)
    with PingLoad(proxy.uri()) as load:
        wait_until(lambda: len(load.done) >= 10, "the load to get going", 20)
        yield admin
    assert not load.errors, load.errors[:3]


def member_row(frame: str, member: str) -> dict[str, str]:
    lines = frame.splitlines()
    header = next(line for line in lines if line.startswith("MEMBER ")).split()
    row = next(line for line in lines if line.startswith(member + " ")).split()
    return dict(zip(header, row))


def test_watch_shows_rates_for_the_member_under_load(watched: str, secantus: Secantus):
    admin = watched
    with urllib.request.urlopen(f"http://{admin}/status", timeout=10) as resp:
        [member] = json.loads(resp.read())["members"]
    assert member["member"] == secantus.address and member["counters"]["requests"] > 0
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "dvara.py"), "status", "--admin-addr",
                          admin, "--watch", "0.5", "--count", "3"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started >= 1.0            # two intervals between three frames
    assert "\x1b" not in run.stdout and run.stderr == ""
    frames = run.stdout.split("\n\ndvara ")
    assert len(frames) == 3, run.stdout
    rows = [member_row(frame, secantus.address) for frame in frames]
    assert [rows[0][c] for c in RATES] == ["-"] * 4
    assert "rates from the next frame" in frames[0]
    for frame, row in zip(frames[1:], rows[1:]):
        assert "rates per second over 0." in frame, frame
        assert float(row["REQ/S"]) > 0 and float(row["ERR/S"]) == 0, frame
        assert row["IN_B/S"] not in ("-", "0") and row["OUT_B/S"] not in ("-", "0"), frame
        assert (row["STATE"], row["UP"]) == ("PRIMARY", "yes") and int(row["CLIENTS"]) >= 1


def test_watch_ends_with_status_0_on_ctrl_c(watched: str, tmp_path: Path):
    admin = watched
    out = tmp_path / "watch.out"
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(ROOT / "dvara.py"), "status",
                                 "--admin-addr", admin, "--watch", "0.2"],
                                stdout=sink, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: out.read_text().count("MEMBER ") >= 2, "two frames", 30)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0 and err == ""
