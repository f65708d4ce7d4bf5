"""The limits of this machine, reported beside the contenders (docs/benchmarks.md, "Limits to report
beside them"): one core's rate of the work alone, the memcpy of one element into new memory (and into
memory allocated beforehand), and which limit bounds each workload. The fourth, `from_generator` over an
in-memory list, needs TensorFlow, so it lives with the contenders (`contenders.ceiling`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .workloads import IO_SLEEP_S, Workload, calls_per_second, leaves

MEMCPY_MIN_SPAN_BYTES = 64 * 2**20  # the memcpy limits rotate over at least this, and 4x the last-level cache
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial mmap threshold, before it adapts to freed blocks


def one_core(workload: Workload, duration: float) -> float:
    """Elements per second of the work alone, no pipeline, in a fresh interpreter (like a worker's, and
    untouched by TensorFlow's threads or this process' heap)."""
    command = [sys.executable, "-m", "benchlib.workloads", str(duration), workload.name]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=scripts_on_path()).stdout
    return json.loads(output)[workload.name]


def scripts_on_path(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process') with the scripts folder, which holds `benchlib`, on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    scripts = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (scripts, env.get("PYTHONPATH")) if p)
    return env


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine, from sysfs (32 MiB where it says nothing)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip()
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 * 2**20)


def memcpy_span(element_bytes: int) -> int:
    """How many distinct arrays the memcpy limits rotate over: together far larger than the last-level
    cache, so that every copy reads (and, preallocated, writes) memory, not cache."""
    span = max(MEMCPY_MIN_SPAN_BYTES, 4 * last_level_cache_bytes())
    return max(2, span // element_bytes)


# Run by `memcpy` in a fresh interpreter, with the scripts folder on its path: argv is seconds, count,
# dtype, shape...; prints copies per second.
MEMCPY_NEW_ARRAY = """
import sys
import numpy as np
seconds, count, dtype, *shape = sys.argv[1:]
from benchlib.workloads import calls_per_second
sources = [np.ones(tuple(map(int, shape)), dtype) for _ in range(int(count))]
for source in sources:
    np.copy(source)
print(calls_per_second(lambda i: np.copy(sources[i % len(sources)]), float(seconds)))
"""


def memcpy(workload: Workload, duration: float) -> float:
    """Elements per second of one thread running ``np.copy(element)``: a copy into a new array, freshly
    allocated memory each time, which is what a feeder that hands out new arrays pays per element (the
    kernel's page faults and zeroing of the new pages included, numpy's transparent huge pages too).

    It runs in a fresh interpreter whose glibc mmap threshold stays at its initial 128 KiB, so that every
    new 8 MiB array is mapped from the kernel and unmapped when freed. Left to adapt, glibc raises the
    threshold after the first free and hands the same block back on every copy, still in cache: that
    measures the cache, not a feeder (about 33 GB/s on the 2-core EPYC, faster even than the
    `memcpy-preallocated` row). The sources rotate over a span far larger than the last-level cache."""
    source = np.asarray(leaves(workload.item(0))[0])
    shape = [str(n) for n in source.shape]
    command = [sys.executable, "-c", MEMCPY_NEW_ARRAY, str(duration), str(memcpy_span(source.nbytes))]
    command += [source.dtype.str, *shape]
    env = scripts_on_path({**os.environ, "MALLOC_MMAP_THRESHOLD_": str(GLIBC_MMAP_THRESHOLD)})
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(output)


def memcpy_preallocated(workload: Workload, duration: float) -> float:
    """Elements per second of one thread running ``np.copyto(target, source)`` into arrays allocated
    beforehand: copy bandwidth alone, with no new memory. Sources and targets each rotate over a span far
    larger than the last-level cache, so that both are memory, not cache. Shown beside `memcpy` for
    reference; no ratio is taken against it."""
    source = np.asarray(leaves(workload.item(0))[0])
    count = memcpy_span(source.nbytes)
    sources = [source.copy() for _ in range(count)]
    targets = [np.empty_like(source) for _ in range(count)]
    for target, origin in zip(targets, sources):
        np.copyto(target, origin)
    return calls_per_second(lambda i: np.copyto(targets[i % count], sources[i % count]), duration)


LIMIT_ROWS = {"ideal", "one-core", "memcpy", "memcpy-preallocated", "from_generator-ceiling"}


def limit_of(workload: Workload, rows: dict, workers: int, cores: int) -> tuple[str, float | None]:
    def rate(name: str) -> float | None:
        return rows.get(name, {}).get("rate")

    if workload.limit == "ideal-io":
        return "ideal", workers / IO_SLEEP_S
    if workload.limit == "ideal-cpu":
        one = rate("one-core")
        return "ideal", one * cores if one else None
    if workload.limit == "memcpy":
        return "memcpy", rate("memcpy")
    return "from_generator-ceiling", rate("from_generator-ceiling")
