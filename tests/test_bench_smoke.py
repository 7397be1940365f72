"""A short run of the benchmark harness: every relay forwards without loss and the report is written.
Speed itself is measured by `make bench`, never asserted here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the load generator is compiled with gcc")
def test_bench_smoke(tmp_path):
    if os.environ.get("CI") and shutil.which("rtpengine") is None:
        pytest.fail("rtpengine is not installed: .ci/run must apt-get install rtpengine-daemon")
    r = subprocess.run([sys.executable, "run.py", "--smoke", "--out", str(tmp_path)], cwd=BENCH,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "latest.json").read_text())
    relays = {row["relay"] for row in rows}
    assert {"ours-c-1w", "ours-py"} <= relays
    if shutil.which("rtpengine"):
        assert "rtpengine-1t" in relays
    for row in rows:
        assert row["loss_pct"] == 0 and row["received"] == row["sent"] > 0, row
    report = (tmp_path / "latest.md").read_text()
    assert "| ours-c-1w | 20 |" in report and "Summary:" in report
    if os.geteuid() == 0:                     # the kernel-tier rows need network namespaces
        assert {"ns-ours-kernel", "ns-ours-c-1w"} <= relays and "## Kernel tier" in report
        kernel = next(row for row in rows if row["relay"] == "ns-ours-kernel")
        assert kernel["system_cpu_s"] > 0
