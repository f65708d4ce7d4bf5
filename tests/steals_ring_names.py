"""A source module that, when a worker imports it, removes every mpfeed ring name from /dev/shm: the
worker's own attach then fails inside mpfeed's code, not the source's."""

from __future__ import annotations

import os

for _name in os.listdir("/dev/shm"):
    if _name.startswith("mpfeed-"):
        os.unlink(os.path.join("/dev/shm", _name))


def source(shard):
    yield 1
