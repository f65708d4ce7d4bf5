"""`scripts/results.py` (`make results`) writes a results page whose every table carries its command,
commit and machine. The whole quick mode takes minutes, so this runs one short step of it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_results_page_gives_each_table_its_command_commit_and_machine(tmp_path):
    out = tmp_path / "results.md"
    command = [sys.executable, "scripts/results.py", "--quick", "--only", "resume-latency", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    page = out.read_text()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert page.startswith("# Results\n")
    assert "## Resume latency" in page
    assert "- command: `python scripts/resume_latency.py" in page
    assert f"- commit: {commit}" in page
    assert re.search(r"- machine: .+, \d+ usable cores of \d+ logical", page)
    table = re.search(r"```\n(.*?)```", page, re.S)
    assert table and "first element after" in table.group(1), page
