"""The README's first command: dvara with its embedded SecantusDB demo backend."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pymongo import MongoClient

from tests.helpers import ROOT, Process, accepts, free_port, free_port_range, wait_until


def test_demo_config_runs_a_backend_and_stops_it(tmp_path):
    backend_port, base = free_port(), free_port_range(3)
    demo = Process([sys.executable, str(ROOT / "dvara.py"), "-c", "conf/demo.conf",
                    "--demo-port", str(backend_port), "--demo-data-dir", str(tmp_path / "data"),
                    "--port-start", str(base), "--port-end", str(base + 2)],
                   tmp_path / "demo.log")
    try:
        line = wait_until(lambda: next((l for l in demo.log().splitlines()
                                        if "connect with:" in l), None) or demo.proc.poll(),
                          "the demo to print its connection string", 90)
        assert isinstance(line, str), demo.log()
        uri = line.split("connect with: ", 1)[1]
        assert uri == f"mongodb://127.0.0.1:{base}/?replicaSet=secantus"
        with MongoClient(uri, serverSelectionTimeoutMS=10000) as client:
            client.demo.c.insert_one({"hello": "dvara"})
            assert client.demo.c.find_one({"hello": "dvara"}) is not None
        assert accepts(backend_port)
    finally:
        status = demo.stop(signal.SIGTERM, timeout=30)
    assert status == 0, demo.log()
    assert not accepts(backend_port), "the demo backend outlived dvara"
    assert (tmp_path / "data").is_dir()


def test_console_script_and_help():
    console = shutil.which("dvara") or str(Path(sys.executable).with_name("dvara"))
    assert Path(console).exists(), "pip install -e . installs a `dvara` command"
    assert subprocess.run([console, "--help"], capture_output=True, text=True,
                          timeout=60).returncode == 0
    out = subprocess.run([sys.executable, str(ROOT / "dvara.py"), "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0
    for option in ("--addrs", "--max-connections", "--pool-wait-timeout", "--message-timeout",
                   "--min-idle-connections", "--workers", "--port-start", "--state-file"):
        assert option in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "dvara.py"), "--max-connections", "-1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "--max-connections" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
