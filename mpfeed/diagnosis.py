"""What limits training: the consumer's time split into waiting for input, mpfeed's own work and the time
between its calls (the training step), over the feeder's life and a recent window; and `verdict`, a few
plain lines with what to do, by TF Profiler's thresholds (input-bound above 20% of the step waiting,
moderately above 5%, else bound by the consumer)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import CacheSummary

INPUT_BOUND = 0.20
MODERATELY_INPUT_BOUND = 0.05
RECENT_S = 10.0  # the recent window
_MARK_EVERY_S = 0.5
_MOSTLY = 0.8
_IO_BOUND_CPU = 0.5
_COSTLY_CALLS = 0.1  # mpfeed's share of the consumer's busy time above which batches pay
_HEAD_OF_LINE_SHARE = 0.3


class CallClock:
    """Times the consumer's calls for elements: one `note` per call, from whichever thread made it. Only
    running totals per call; every half second they are also kept aside, for the recent window."""

    def __init__(self) -> None:
        self.calls = 0
        self.between_s = 0.0  # between one call's return and the next call: the consumer's own work
        self.inside_s = 0.0  # inside the calls, waiting included
        self.waited_s = 0.0  # waiting for workers
        self._last_return: float | None = None
        self._next_mark = 0.0
        self._marks: deque[tuple[float, float, float, float]] = deque()  # (at, between, inside, waited)

    def note(self, entered: float, returned: float, waited: float) -> None:
        last = self._last_return
        if last is not None and entered > last:
            self.between_s += entered - last
        self._last_return = returned
        self.calls += 1
        self.inside_s += returned - entered
        self.waited_s += waited
        if returned >= self._next_mark:
            self._next_mark = returned + _MARK_EVERY_S
            marks = self._marks
            marks.append((returned, self.between_s, self.inside_s, self.waited_s))
            while len(marks) > 1 and marks[1][0] <= returned - RECENT_S:
                marks.popleft()

    def begin_iteration(self) -> None:
        """The consumer begins iterating: the time since its last call (the peek that infers a dataset's
        signature, then the model being built) is not its step."""
        self._last_return = None

    def wait_fraction(self) -> float:
        """The share of the consumer's time (its own work plus its calls) spent waiting for input."""
        total = self.between_s + self.inside_s
        return self.waited_s / total if total > 0 else 0.0

    def recent_wait_fraction(self) -> float:
        """The same since the mark nearest to `RECENT_S` seconds ago (the whole life, early on)."""
        marks = list(self._marks)
        _, between, inside, waited = marks[0] if marks and len(marks) > 1 else (0.0, 0.0, 0.0, 0.0)
        total = self.between_s - between + self.inside_s - inside
        return (self.waited_s - waited) / total if total > 0 else 0.0


@dataclass(frozen=True)
class Picture:
    """What `verdict` reads: the figures of `FeederStats` it needs."""

    calls: int
    wait_fraction: float
    recent_wait_fraction: float
    step_s: float
    overhead_s: float
    head_of_line_s: float
    wait_s: float
    workers: int
    cores: int
    ordered: bool
    batched: bool
    busy: float  # the workers' shares of their time since the first element, summed over workers
    blocked: float
    idle: float
    cpu_while_busy: float  # the workers' CPU time over their busy time: well below 1 when they wait on I/O


def verdict(picture: Picture) -> list[str]:
    """The diagnosis as a few plain lines: the verdict first, then what to do."""
    if picture.calls < 2:
        return ["not enough elements yet to say what limits training"]
    share = picture.recent_wait_fraction if picture.recent_wait_fraction > 0 else picture.wait_fraction
    waited = (
        f"the consumer waited for input {share:.0%} of its time (over the feeder's life "
        f"{picture.wait_fraction:.0%}); per call for an element (or a batch) it spent "
        f"{picture.step_s / picture.calls * 1e3:.2f} ms of its own between calls and "
        f"{picture.overhead_s / picture.calls * 1e3:.3f} ms in mpfeed"
    )
    workers = (
        f"{_the_workers(picture.workers)} busy {picture.busy:.0%}, blocked on a full ring "
        f"{picture.blocked:.0%} and idle {picture.idle:.0%} of {'its' if picture.workers == 1 else 'their'} "
        "time since the first element"
    )
    if share > INPUT_BOUND:
        lines = [f"input-bound: {waited}", workers]
    elif share > MODERATELY_INPUT_BOUND:
        lines = [f"moderately input-bound: {waited}", workers]
    else:
        lines = [f"bound by the consumer (the model is the limit): {waited}", workers]
        if picture.idle > 0.5 and picture.workers > 1:
            lines.append("fewer workers would do: they wait for work most of the time")
        return lines
    if picture.ordered and picture.head_of_line_s > _HEAD_OF_LINE_SHARE * picture.wait_s:
        lines.append(
            f"slow elements hold the line: {picture.head_of_line_s / picture.wait_s:.0%} of the wait was for "
            "the next element in order while others were ready; ordered=False delivers first ready"
        )
    if picture.busy >= _MOSTLY:
        if picture.cpu_while_busy < _IO_BOUND_CPU:
            lines.append(
                "the workers are the limit, and they wait on I/O (busy, they use "
                f"{picture.cpu_while_busy:.0%} of a core): add workers, beyond the {picture.cores} cores "
                f"({picture.workers} now)"
            )
        elif picture.workers < picture.cores:
            lines.append(
                f"the workers are the limit: add workers ({picture.workers} now, "
                f"{picture.cores} usable cores)"
            )
        else:
            lines.append(
                "the workers are the limit and every core has one: make the source cheaper, or spread the "
                "work over more machines"
            )
    elif picture.overhead_s > _COSTLY_CALLS * (picture.overhead_s + picture.step_s):
        lines.append(
            "the workers are not the limit: mpfeed's cost per element is; use batch_size (or a larger one) "
            "so that each call moves a whole batch"
        )
    return lines


def _the_workers(count: int) -> str:
    return "the worker was" if count == 1 else f"the {count} workers were"


def cache_verdict(cache: CacheSummary, served: int) -> list[str]:
    """What the cache of loaded samples saves, and, when it is too small for the ``served`` elements it is
    asked for over epochs, about how many more bytes would hold them all."""
    loads = cache.hits + cache.misses
    if not loads:
        return [f"the cache ({_mib(cache.budget)}) has served nothing yet"]
    per_load = cache.load_s / cache.misses if cache.misses else 0.0
    lines = [
        f"the cache served {cache.hits:,} of {loads:,} samples from memory ({cache.hits / loads:.0%}), "
        f"skipping load() for them: about {cache.hits * per_load:.1f} s of the workers' time saved "
        f"({per_load * 1e3:.2f} ms per load)"
    ]
    held = (
        f"{cache.entries:,} of the {served:,} samples it serves "
        f"({_mib(cache.used)} of its {_mib(cache.budget)})"
    )
    if not cache.refused:
        lines.append(f"it holds {held}" + (": all of them" if cache.entries >= served else " so far"))
        return lines
    known = cache.entries + cache.refused
    known_bytes = cache.held_bytes + cache.refused_bytes
    wanted = known_bytes + known_bytes / known * max(served - known, 0)
    needed = (cache.used - cache.held_bytes) + wanted
    lines.append(
        f"the cache is too small: it holds {held}; {cache.refused:,} did not fit and are loaded again every "
        f"epoch. About {_mib(needed - cache.budget)} more (cache_bytes={int(needed):,}) would hold them all"
    )
    return lines


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
