"""Preemption-safe training for real: `scripts/resumable_fit.py` is killed with SIGKILL mid-epoch, run again,
and must end with exactly the weights of a run that was never interrupted: the same elements, in the
same order, from the same model state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "resumable_fit.py"


def _train(tmp_path: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, str(SCRIPT), "--dir", str(tmp_path / run), "--epochs", "3", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def test_a_killed_fit_resumes_mid_epoch_with_the_very_same_stream(tmp_path):
    pytest.importorskip("tensorflow")
    whole = _train(tmp_path, "whole", "--weights", str(tmp_path / "whole.npz"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _train(tmp_path, "killed", "--kill-at", "1:37")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _train(tmp_path, "killed", "--weights", str(tmp_path / "resumed.npz"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch 1, after 960 elements" in resumed.stdout  # the last save before the kill
    # The resumed run made only the rest: 2048 - 960 of epoch 1, and all of epoch 2.
    assert "3136 elements from the feeder" in resumed.stdout
    expected, got = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "resumed.npz")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
