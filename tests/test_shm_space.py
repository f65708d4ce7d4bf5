"""A /dev/shm as small as Docker's default, for real: a private mount namespace with a 32 MiB tmpfs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, numpy as np, mpfeed, psutil, sources

    def outcome(**options):
        try:
            with mpfeed.Feeder(sources.sizes, args=([8 << 20] * 8,), **options) as feeder:
                count = sum(1 for _ in feeder)
            return {"ok": count}
        except mpfeed.ShmSpaceError as error:
            return {"error": str(error), "children": len(psutil.Process().children())}

    results = {
        "explicit": outcome(workers=4, depth=4, slot_bytes=9 << 20),
        "sized_from_first_element": outcome(workers=4, depth=4),
        "fits": outcome(workers=2, depth=1),
        "left_in_dev_shm": os.listdir("/dev/shm"),
    }
    print(json.dumps(results))
    """
)


def _can_mount_a_private_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_a_private_tmpfs(), reason="needs root and unshare -m to mount a small tmpfs"
)
def test_a_32_mib_dev_shm_gives_clear_errors_and_no_sigbus():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = f'mount -t tmpfs -o size=32m tmpfs /dev/shm && exec "{sys.executable}" -c "$0"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", command, SCRIPT], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    explicit = results["explicit"]
    assert "needs 150,994,944 bytes" in explicit["error"] and "are free" in explicit["error"]
    assert "--shm-size" in explicit["error"]
    assert explicit["children"] == 0, "refused before any worker started"
    sized = results["sized_from_first_element"]
    assert "--shm-size" in sized["error"] and sized["children"] == 0
    assert results["fits"] == {"ok": 8}
    assert results["left_in_dev_shm"] == []
