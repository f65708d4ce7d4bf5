"""The README's quick start runs as written, and the pages it links to exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MOST_LINES = 300  # a newcomer reads it whole; reference material goes to docs/


def quick_start_files(text: str) -> dict[str, str]:
    """The quick start's code blocks, by the file name each names on its first line (``# train.py``)."""
    section = text[text.index("## Quick start") :]
    section = section[: section.index("\n## ")]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        name = re.fullmatch(r"# (\w+\.py)", block.splitlines()[0])
        assert name, f"a quick-start block must name its file on its first line: {block.splitlines()[0]!r}"
        files[name.group(1)] = block
    return files


def test_the_quick_start_runs_as_written(tmp_path):
    files = quick_start_files(README.read_text())
    assert list(files) == ["points.py", "train.py"]
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 3/3" in result.stdout, result.stdout[-3000:]


def test_the_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MOST_LINES, f"README.md has {lines} lines: move reference material to docs/"


def anchors(page: Path) -> set[str]:
    """The anchors a code host gives a Markdown page's headings (GitHub's rule)."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_page_and_heading():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    dead = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                dead.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not dead, dead
