"""The README's quick start runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_quick_start_runs_as_written(tmp_path):
    text = README.read_text()
    quick_start = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    script = tmp_path / "quick_start.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2000 elements delivered" in result.stdout
