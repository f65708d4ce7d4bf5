"""`scripts/results.py` (`make results`) writes a results page whose every table carries its command,
commit and machine, keeps each step's data, and rewrites from that data every figure other pages quote.
The whole quick mode takes minutes, so this runs two short steps of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import figures  # noqa: E402

DATA = ROOT / "docs" / "results-data"


def test_the_results_page_gives_each_table_its_command_commit_and_machine(tmp_path):
    out = tmp_path / "results.md"
    steps = "resume-latency,consumer-costs"
    command = [sys.executable, "scripts/results.py", "--quick", "--only", steps, "--out", str(out)]
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
    stored = json.loads((tmp_path / "results-data" / "consumer-costs.json").read_text())
    assert stored["machine"]["mpfeed_commit"] == commit, "the step's JSON is kept beside the page"


def test_every_figure_quoted_outside_the_results_page_is_rendered_from_the_stored_data():
    """A figure typed by hand into README.md or docs/ would go stale unseen; each lives in a block that
    `make results` rewrites from docs/results-data, so a block that differs was edited by hand."""
    quoted = {page.name: figures.blocks(page.read_text()) for page in figures.pages(ROOT)}
    assert quoted["README.md"] == ["headline", "decode-once"]
    assert quoted["cache.md"] == ["cache-report", "cache-measured"]
    for page in figures.pages(ROOT):
        text = page.read_text()
        assert figures.render(text, DATA) == text, f"{page.name}: run `python scripts/results.py --render`"
    readme = (ROOT / "README.md").read_text()
    bench = json.loads((DATA / "bench.json").read_text())
    assert f"at commit {bench['machine']['mpfeed_commit']}" in readme


def test_the_quoted_figures_follow_the_data_and_refuse_data_that_lacks_them(tmp_path):
    data = tmp_path / "results-data"
    shutil.copytree(DATA, data)
    bench = json.loads((data / "bench.json").read_text())
    bench["summary"]["python"]["rows"]["mpfeed"]["rate"] = 123456.0
    bench["machine"]["mpfeed_commit"] = "abcdef0"
    (data / "bench.json").write_text(json.dumps(bench))
    readme = figures.render((ROOT / "README.md").read_text(), data)
    row = next(line for line in readme.splitlines() if line.startswith("| `python`"))
    assert "| 123,456 |" in row and "at commit abcdef0" in readme

    del bench["summary"]["io"]
    (data / "bench.json").write_text(json.dumps(bench))
    with pytest.raises(figures.ResultsDataError, match="no `io` workload"):
        figures.render((ROOT / "README.md").read_text(), data)
    (data / "decode-cached.json").unlink()
    with pytest.raises(figures.ResultsDataError, match="decode-cached.json is missing"):
        figures.render((ROOT / "docs" / "cache.md").read_text(), data)
