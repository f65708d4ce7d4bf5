"""`scripts/consumer_costs.py` gives the `consumer-cpu` and `consumer-memory` rows of docs/benchmarks.md:
a table on stdout and the same as JSON under bench-results/. A short smoke run of it; no timing asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_consumer_costs_script_reports_both_rows_and_writes_its_json():
    command = [sys.executable, "scripts/consumer_costs.py", "--quick", "--records", "5000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for kind in ("generator", "random-access"):
        row = next(line for line in lines if line.startswith("consumer-cpu ") and f" {kind} " in line)
        assert "error" not in row, row
    assert any(
        line.startswith("consumer-memory: random-access tiny, ordered, 5,000 records") for line in lines
    )
    assert any(line.strip().startswith("100%") for line in lines), result.stdout
    written = Path(lines[-1].removeprefix("results: "))
    try:
        document = json.loads(written.read_text())
        assert document["consumer_cpu"]["rows"] and document["consumer_memory"]["points"]
        mpfeed_row = next(iter(document["consumer_cpu"]["rows"].values()))
        assert mpfeed_row["cpu_us"] > 0 and mpfeed_row["reps"] == 1
    finally:
        written.unlink()
