"""``workers="auto"``: how many workers a random-access source's tasks go to, adjusted while the feeder runs.

It aims for the fewest workers that keep the consumer from waiting, from what it measures every second:
the consumer's wait (`mpfeed.diagnosis.CallClock`), the elements delivered, and the workers' busy time
and CPU time (are they computing, or waiting on I/O?).
- The consumer waits (over 5% of its time) and the workers are busy: more workers. Workers that wait on
  I/O grow by half again, up to ``max_workers``; workers that compute grow one at a time, and not past
  the usable cores + 1.
- The consumer does not wait (under 1%) and the workers idle: one fewer.
- Every change is a trial, judged two intervals later (the first one pays for starting processes): more
  workers that deliver no more than 5% more, or fewer that make the consumer wait, are undone, and that
  direction rests for a while.
Only which worker makes a task changes, never what is delivered: the order belongs to the dispatcher.
Policy only: the dispatcher sends to the first ``active`` workers; the supervisor starts the processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psutil

from .diagnosis import CallClock
from .dispatch import Dispatcher
from .supervisor import Supervisor

logger = logging.getLogger("mpfeed")

INTERVAL_S = 1.0
_WAITS = 0.05  # the consumer waits for input more than this share of its time: grow
_FED = 0.01  # it waits less than this: try shrinking
_BUSY = 0.7  # workers busy more than this share of their time are the limit
_IDLE = 0.3  # workers idle (or blocked) more than this share could be fewer
_IO_BOUND_CPU = 0.5  # busy workers using less CPU than this wait on I/O: more of them than cores pay
_MACHINE_BUSY = 0.85  # the machine's CPUs busy more than this share: no CPU to spare
_GAIN = 1.05  # more workers must deliver at least this much more
_REST_S = 5.0  # how long a direction rests after a trial in it was undone


@dataclass(frozen=True)
class Change:
    """One adjustment of the worker count."""

    at_s: float
    """Seconds since the feeder started."""
    before: int
    after: int
    reason: str


class Autotuner:
    """Adjusts ``dispatcher.active`` from the feeder's measurements, at most once a second."""

    def __init__(
        self, supervisor: Supervisor, dispatcher: Dispatcher, clock: CallClock, cores: int, max_workers: int
    ) -> None:
        self.supervisor = supervisor
        self.dispatcher = dispatcher
        self.clock = clock
        self.cores = cores
        self.max_workers = max_workers
        self.history: list[Change] = []
        self.active = dispatcher.active or len(supervisor.handles)
        self._cpu: dict[int, float] = {}
        self._started = time.monotonic()
        self._next = self._started + INTERVAL_S
        self._mark = self._measure_totals()
        self._trial: tuple[int, float, float] | None = None  # (count before, its rate, its wait share)
        self._settle = 0  # intervals to let pass before judging a trial
        self._rest_until = {"up": 0.0, "down": 0.0}

    def tick(self) -> None:
        """Called by the consumer as it takes elements; does anything only once an interval has passed."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + INTERVAL_S
        totals = self._measure_totals()
        rate, wait_share, busy, idle, cpu, machine_busy = self._interval(self._mark, totals)
        self._mark = totals
        if self._settle:
            self._settle -= 1
            return
        active = self.active
        if self._trial is not None:
            before, before_rate, before_wait = self._trial
            self._trial = None
            if active > before and rate < before_rate * _GAIN:
                return self._undo(
                    before, "up", f"{active} workers delivered {rate:,.0f}/s, no more than {before}"
                )
            if active < before and wait_share > max(_WAITS, before_wait * 2):
                return self._undo(before, "down", f"with {active} the consumer waited {wait_share:.0%}")
        if wait_share > _WAITS and busy > _BUSY and now >= self._rest_until["up"]:
            # Busy workers that use little CPU while the machine has CPU to spare wait on I/O; busy workers
            # on a machine with no CPU to spare only oversubscribe it, however little each one gets.
            io_bound = cpu < _IO_BOUND_CPU and machine_busy < _MACHINE_BUSY
            limit = self.max_workers if io_bound else min(self.max_workers, self.cores + 1)
            if not io_bound and machine_busy >= _MACHINE_BUSY:
                limit = min(limit, active)
            grown = max(active + 1, int(active * 1.5)) if io_bound else active + 1
            grown = min(grown, limit)
            if grown > active:
                why = "waiting on I/O" if io_bound else "computing"
                self._change(grown, f"the consumer waited {wait_share:.0%}; workers busy {busy:.0%}, {why}")
                self._trial = (active, rate, wait_share)
        elif wait_share < _FED and idle > _IDLE and active > 1 and now >= self._rest_until["down"]:
            self._change(active - 1, f"the consumer waited {wait_share:.1%}; workers idle {idle:.0%}")
            self._trial = (active, rate, wait_share)

    def _undo(self, count: int, direction: str, reason: str) -> None:
        self._rest_until[direction] = time.monotonic() + _REST_S
        self._change(count, f"undone: {reason}")

    def _change(self, count: int, reason: str) -> None:
        before = self.active
        missing = count - len(self.supervisor.handles)
        if missing > 0:
            try:
                self.supervisor.add_workers(missing)
            except OSError as error:  # a limit on processes, files or memory: the workers it has go on
                self.max_workers = len(self.supervisor.handles)
                logger.warning(
                    "mpfeed autotune: workers stay at most %d, since no more could start: %s",
                    self.max_workers,
                    error,
                )
                count = min(count, self.max_workers)
                if count == before:
                    return
        self.active = self.dispatcher.active = count
        self._settle = 1
        change = Change(round(time.monotonic() - self._started, 3), before, count, reason)
        self.history.append(change)
        logger.info("mpfeed autotune: workers %d -> %d (%s)", before, count, reason)

    def _measure_totals(self) -> tuple[float, int, float, float, list, float, tuple[float, float]]:
        clock = self.clock
        handles = self.supervisor.handles[: self.active]
        times = [h.times for h in handles]
        cpu = 0.0
        for handle in handles:
            cpu += self._cpu_of(handle.pid)
        items = sum(h.items for h in self.supervisor.handles)
        machine = psutil.cpu_times()
        idle = machine.idle + getattr(machine, "iowait", 0.0)
        return (
            time.monotonic(),
            items,
            clock.waited_s,
            clock.between_s + clock.inside_s,
            times,
            cpu,
            (sum(machine) - idle, sum(machine)),
        )

    def _cpu_of(self, pid: int) -> float:
        try:
            cpu = psutil.Process(pid).cpu_times()
            self._cpu[pid] = cpu.user + cpu.system
        except psutil.Error:
            pass
        return self._cpu.get(pid, 0.0)

    @staticmethod
    def _interval(before: tuple, after: tuple) -> tuple[float, float, float, float, float, float]:
        """``(rate, consumer wait share, workers busy share, idle share, CPU per busy second, the share of
        the machine's CPU time in use)``."""
        t0, items0, waited0, total0, times0, cpu0, (used0, all0) = before
        t1, items1, waited1, total1, times1, cpu1, (used1, all1) = after
        machine_busy = (used1 - used0) / (all1 - all0) if all1 > all0 else 0.0
        rate = (items1 - items0) / max(t1 - t0, 1e-9)
        consumer = total1 - total0
        wait_share = (waited1 - waited0) / consumer if consumer > 0 else 0.0
        busy = blocked = idle = 0.0
        for index, (b1, bl1, i1) in enumerate(times1):
            b0, bl0, i0 = times0[index] if index < len(times0) else (0.0, 0.0, 0.0)
            busy, blocked, idle = busy + b1 - b0, blocked + bl1 - bl0, idle + i1 - i0
        spent = busy + blocked + idle
        cpu = (cpu1 - cpu0) / busy if busy > 0 else 1.0
        if spent <= 0:
            return rate, wait_share, 0.0, 0.0, cpu, machine_busy
        return rate, wait_share, busy / spent, (idle + blocked) / spent, cpu, machine_busy
