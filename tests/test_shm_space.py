"""A /dev/shm smaller than Docker's default, for real: a private mount namespace with a 32 MiB tmpfs. Forced
into /dev/shm, rings are refused with a clear error; by default they move to memfd memory and just work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import can_mount_a_private_tmpfs

SCRIPT = textwrap.dedent(
    """
    import json, os, numpy as np, mpfeed, psutil, sources

    def outcome(**options):
        try:
            with mpfeed.Feeder(sources.sizes, args=([8 << 20] * 8,), **options) as feeder:
                count = sum(1 for k, (data, index) in enumerate(feeder) if index == k and (data == k).all())
                return {"ok": count, "ring_memory": feeder.stats().ring_memory}
        except mpfeed.ShmSpaceError as error:
            return {"error": str(error), "children": len(psutil.Process().children())}

    results = {
        "explicit": outcome(workers=4, depth=4, slot_bytes=9 << 20, ring_memory="posix"),  # 8 slots a ring
        "sized_from_first_element": outcome(workers=4, depth=4, ring_memory="posix"),
        "fits": outcome(workers=1, depth=1),  # one ring of 2 slots of 10 MiB
        "auto_explicit": outcome(workers=4, depth=4, slot_bytes=9 << 20),
        "auto_sized": outcome(workers=4, depth=4),
        "left_in_dev_shm": os.listdir("/dev/shm"),
    }
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(
    not can_mount_a_private_tmpfs(), reason="needs root and unshare -m to mount a small tmpfs"
)
def test_a_32_mib_dev_shm_refuses_posix_rings_clearly_and_moves_the_rest_to_memfd():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = f'mount -t tmpfs -o size=32m tmpfs /dev/shm && exec "{sys.executable}" -c "$0"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", command, SCRIPT], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    explicit = results["explicit"]
    assert "needs 301,989,888 bytes" in explicit["error"] and "are free" in explicit["error"]
    assert "--shm-size" in explicit["error"]
    assert explicit["children"] == 0, "refused before any worker started"
    sized = results["sized_from_first_element"]
    assert "--shm-size" in sized["error"] and sized["children"] == 0
    assert results["fits"] == {"ok": 8, "ring_memory": "posix"}
    assert results["auto_explicit"] == {"ok": 8, "ring_memory": "memfd"}
    assert results["auto_sized"] == {"ok": 8, "ring_memory": "memfd"}
    assert results["left_in_dev_shm"] == []
