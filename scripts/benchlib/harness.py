"""The harness: build one pipeline, consume it and time it; run every row of every workload in interleaved
repetitions, with progress.

`measure` consumes a pipeline as docs/benchmarks.md says training does: a Python loop that touches every
element or, for a workload of large elements (`transfer`), inside the `tf.data` graph; it reports three
things apart: start-up (building the pipeline: processes, pools, datasets), time to the first element
(from the start of building), and the steady-state rate (the elements that arrive after a warm-up, over a
fixed time). `run_schedule` makes every repetition run every row once, in an order rotated between
repetitions. Nothing here imports TensorFlow at module level: the contenders bring it (`contenders.py`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .workloads import Workload, leaves

SETTLE_S = 10  # longest wait for one pipeline's processes to exit before the next measurement
HANG_S = 180  # a measurement that takes longer than this dumps every stack and ends the run
PYTHON_LOOP = "python loop"  # how a row was consumed, as the report says it
IN_GRAPH = "in graph"


@dataclass
class Pipeline:
    """What a contender built: something to iterate, how to stop it, and what to add to the report."""

    elements: Iterable[Any]
    batched: bool = False
    close: Callable[[], None] = lambda: None
    notes: Callable[[], dict] = dict


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[Workload, int], Pipeline]
    workloads: tuple[str, ...] | None = None  # None: every workload
    batch_size: int | None = None  # items a worker makes at a time, when not the workload's batch_size

    def round_items(self, workload: Workload, workers: int) -> int:
        """Items in one delivery of every worker: what `measure` counts its warm-up and window in."""
        return workers * (self.batch_size or workload.batch_size or 1)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def touch(element: Any, batched: bool) -> int:
    """Read one value of every element (every row of a batch); returns how many elements that was."""
    count = 1
    for leaf in leaves(element):
        array = leaf.numpy() if hasattr(leaf, "numpy") else np.asarray(leaf)
        if batched:
            count = len(array)
            array.reshape(count, -1)[:, :1].sum()
        else:
            array.reshape(-1)[:1].sum()
    return count


def touch_in_graph(batched: bool) -> Callable[..., Any]:
    """`touch` for `Dataset.map`: reads one value of every element (every row of a batch) in the graph.
    Gives how many elements that was, and the sum of the values read, which keeps the reads in the graph."""
    import tensorflow as tf

    def touch(*element: Any) -> tuple[Any, Any]:
        count = tf.constant(1, tf.int64)
        read = tf.constant(0, tf.float64)
        for leaf in tf.nest.flatten(element):
            if batched:
                count = tf.shape(leaf, out_type=tf.int64)[0]
                values = tf.reshape(leaf, tf.stack([count, -1]))[:, :1]
            else:
                values = tf.reshape(leaf, [-1])[:1]
            read += tf.reduce_sum(tf.cast(values, tf.float64))
        return count, read

    return touch


def consume(pipeline: Pipeline, in_graph: bool) -> tuple[Iterator[int], str, float]:
    """The consumer's loop over ``pipeline``: an iterator of how many elements each step took in; which way
    it consumes them; and the seconds it spent tracing a graph before the first step.

    A Python loop over a `tf.data.Dataset` gets each element as an `EagerTensor` and reads it through
    ``.numpy()``, which copies it (1.4 ms per 8 MiB on the 2-core EPYC): fine for small elements, but not
    how training consumes large ones. With ``in_graph``, a dataset is consumed inside its own graph, as a
    training step does: `touch_in_graph` maps over it, and the loop receives only the counts. Pipelines
    that are not datasets (`mpfeed-direct`, numpy views) are always a Python loop."""
    elements = pipeline.elements
    tf = sys.modules.get("tensorflow")  # loaded wherever a pipeline is a dataset
    if in_graph and tf is not None and isinstance(elements, tf.data.Dataset):
        started = time.perf_counter()
        counts = elements.map(touch_in_graph(pipeline.batched))
        return (int(count) for count, _ in counts), IN_GRAPH, time.perf_counter() - started
    return (touch(element, pipeline.batched) for element in elements), PYTHON_LOOP, 0.0


# -- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    duration_s: float  # steady-state window, at least
    warmup_s: float  # after the first element, before the window opens, at least
    warmup_rounds: int = 2  # the warm-up also lasts this many rounds (see measure)
    window_rounds: int = 4  # and the window this many
    rounds_cap_s: float = 30.0  # rounds stretch a warm-up or a window at most this long


def measure(
    build: Callable[[], Pipeline], timing: Timing, round_items: int = 0, in_graph: bool = False
) -> dict:
    """Start-up, time to first element and steady-state rate of one pipeline, consumed as `consume` says
    (``in_graph`` for a workload of large elements).

    ``round_items`` is one round: every worker delivering once (workers x the items one worker makes at a
    time: 1, or its batch). The warm-up lasts ``timing.warmup_s`` and ``timing.warmup_rounds`` rounds after
    the first element, so that the window opens only once every worker has started and delivered (a
    worker may take seconds to start, while the first element comes from the fastest); the window lasts
    ``timing.duration_s`` and ``timing.window_rounds`` rounds, so that it spans several of each worker's
    batches however long one worker needs for a batch. Rounds stretch neither beyond
    ``timing.rounds_cap_s``. The trace of an in-graph consumer (milliseconds, the harness's own cost)
    stays out of the time to first element."""
    started = time.perf_counter()
    pipeline = build()
    built = time.perf_counter()

    def over(elapsed: float, items: int, seconds: float, rounds: int) -> bool:
        return elapsed >= seconds and (items >= rounds * round_items or elapsed >= timing.rounds_cap_s)

    try:
        iterator, consumed, trace_s = consume(pipeline, in_graph)
        count = first_count = next(iterator)
        first = now = time.perf_counter()
        window_start, window_count = None, 0
        for delivered in iterator:
            count += delivered
            now = time.perf_counter()
            if window_start is None:
                if over(now - first, count - first_count, timing.warmup_s, timing.warmup_rounds):
                    window_start, window_count = now, count
            elif over(now - window_start, count - window_count, timing.duration_s, timing.window_rounds):
                break
        if window_start is None:
            raise RuntimeError(f"the pipeline ended after {count} elements, before the warm-up was over")
        rate = (count - window_count) / (now - window_start)
        del iterator
        notes = pipeline.notes()
    finally:
        pipeline.close()
    return {
        "rate": rate,
        "startup_s": built - started,
        "first_s": first - started - trace_s,
        "elements": count,
        "window": [window_count, count],  # the elements the rate was measured over, in delivery order
        "consumed": consumed,
        **({"trace_s": trace_s} if consumed == IN_GRAPH else {}),
        **notes,
    }


def settle(timeout_s: float = SETTLE_S) -> None:
    """Wait until the processes a pipeline started have exited, so that they cannot slow the next one
    (Keras closes its pool without joining it)."""
    import psutil

    def running(child: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in str(child.cmdline())
        return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(map(running, psutil.Process().children(recursive=True))):
        time.sleep(0.02)


def run_schedule(
    schedule: dict[str, list[tuple[str, Callable[[], dict]]]],
    reps: int,
    results: dict,
    desc: str = "bench",
    between: Callable[[], None] | None = None,
) -> list[float]:
    """Run every row of ``schedule`` (group -> [(row name, thunk)]) once per repetition, the rows of each
    group in an order rotated between repetitions, with progress; ``results[group][row]`` collects one
    measurement per repetition. ``between`` runs after each row (default `settle`: wait for the row's
    processes to exit). Gives the seconds each repetition took."""
    from tqdm import tqdm

    durations = []
    total = reps * sum(len(rows) for rows in schedule.values())
    with tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True) as progress:
        for rep in range(reps):
            started = time.perf_counter()
            for group, rows in schedule.items():
                shift = rep % len(rows)
                for name, thunk in rows[shift:] + rows[:shift]:
                    progress.set_postfix_str(f"rep {rep + 1}/{reps} {group} {name}")
                    faulthandler.dump_traceback_later(HANG_S, exit=True)
                    try:
                        result = thunk()
                    except Exception as error:  # one broken contender must not hide the others
                        result = {"error": f"{type(error).__name__}: {error}"}
                        progress.write(f"{group} / {name}: {result['error']}", file=sys.stderr)
                    finally:
                        (between or settle)()
                        faulthandler.cancel_dump_traceback_later()
                    results.setdefault(group, {}).setdefault(name, []).append(result)
                    progress.update()
            durations.append(time.perf_counter() - started)
    return durations
