"""Installing from a clone into one's own environment: the extras exist, and a missing one is named."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def test_dataset_without_tensorflow_says_which_extra_to_install():
    """Before, `dataset()` without TensorFlow gave a bare "No module named 'tensorflow'"."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tensorflow"] = None  # as if TensorFlow were not installed
        import mpfeed, sources
        with mpfeed.Feeder(sources.Numbers(4), workers=1) as feeder:
            assert [int(e["i"]) for e in feeder] == [0, 1, 2, 3]  # the feeder itself needs no TensorFlow
            try:
                feeder.dataset()
            except ModuleNotFoundError as error:
                print("error:", error)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error:" in result.stdout, result.stdout
    assert "[tf]" in result.stdout and "pip install" in result.stdout, result.stdout


def test_the_extras_a_user_installs_from_a_clone_are_declared():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {name: value.split() for name, value in config["options.extras_require"].items()}
    assert extras["tf"] == ["tensorflow"]
    assert extras["keras"] == ["keras"]
    assert extras["jax"] == ["jax[cpu]"]
    assert extras["ray"]
    makefile = (ROOT / "Makefile").read_text()
    assert "keras" in makefile.split("pip install --quiet -e '.[")[1].split("]")[0]
    assert "jax" in makefile.split("pip install --quiet -e '.[")[1].split("]")[0]
