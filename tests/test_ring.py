"""One ring with real POSIX shared memory: names that vanish once attached, and unmapping that waits for
the last view."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpfeed.errors import ShmSpaceError
from mpfeed.ring import Ring, slot_size_for


def test_attaching_removes_the_name_and_both_sides_share_the_memory():
    ring = Ring.create(depth=3, slot_bytes=4096)
    name = ring.name.lstrip("/")
    assert name in os.listdir("/dev/shm")
    worker_side = Ring.attach(ring.name, 3, 4096)
    assert name not in os.listdir("/dev/shm")
    worker_side.slot(2)[:4] = [1, 2, 3, 4]
    view = ring.slot_view(2)
    assert view[:4].tolist() == [1, 2, 3, 4]
    assert not view.flags.writeable
    worker_side.close()
    ring.close()


def test_closing_while_a_view_is_held_keeps_the_view_valid():
    ring = Ring.create(depth=2, slot_bytes=4096)
    ring.slot(1)[:3] = 9
    view = ring.slot_view(1)
    ring.close()  # must not raise BufferError
    ring.close()
    assert view[:3].tolist() == [9, 9, 9]
    assert ring.name.lstrip("/") not in os.listdir("/dev/shm")


def test_a_ring_larger_than_dev_shm_is_refused_before_anything_is_created():
    before = set(os.listdir("/dev/shm"))
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    with pytest.raises(ShmSpaceError, match="--shm-size"):
        Ring.create(depth=2, slot_bytes=(free // 64 + 1) * 64)
    assert set(os.listdir("/dev/shm")) == before


def test_slot_sizes_leave_headroom_in_whole_pages():
    for record in (1, 4000, 100_000, 8 << 20):
        size = slot_size_for(record)
        assert size >= record * 1.25 and size % 4096 == 0
    assert np.all(np.diff([slot_size_for(n) for n in range(0, 1 << 20, 4099)]) >= 0)
