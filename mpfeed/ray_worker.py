"""The worker side of the Ray backend: an actor that runs the source and answers each call with one record.

The consumer calls ``next`` (generator sources: the shard's next record) or ``task`` (random access: the
record of these indices), at most ``depth`` calls in flight per actor, so the actor makes at most that many
records ahead. Each answer is a tuple whose record is a 64-byte-aligned uint8 array in mpfeed's record
format: Ray stores it as one object, and the consumer maps it read-only without a copy. A failure is an
answer too (`FAILED` with a `protocol.Failure`), never a raised exception, so Ray has nothing to retry.

Runs in Ray's worker processes: it never imports TensorFlow (the guard of `mpfeed.tfguard` is installed
before the user's code is unpickled), and it imports Ray only for the node's identity.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import numpy as np

from . import protocol, tfguard
from .conform import conform_items
from .layout import Encoder, aligned_empty
from .shard import Shard, shard_seed
from .worker import ShardEpoch, SourceFailed, describe_failure, refused_element, task_items

RECORD, END, FAILED, STALE = "record", "end", "failed", "stale"
_USAGE_S = 0.5  # how often an answer carries the process's CPU time and memory


class ActorWorker:
    """One worker of a feeder, as a Ray actor: the same source, shard and seeds as a local worker."""

    def __init__(self, work: bytes, setup: protocol.WorkerSetup) -> None:
        tfguard.install()
        self.setup = setup
        self.encoder = Encoder()
        self.run = -1
        self.newest_run = 0  # the newest run the consumer began (see `begin_run`)
        self.epoch = 0
        self.production: ShardEpoch | None = None
        self.steps: Any = None
        self.failure: protocol.Failure | None = None
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.reported = 0.0
        try:
            self.source, self.args, self.kwargs = pickle.loads(work)
        except BaseException as error:
            self.failure = describe_failure("start", error, element=None, epoch=0)

    def where(self) -> tuple[str, str, int]:
        """The node's id and address, and this process's pid: for errors and stats."""
        import ray

        context = ray.get_runtime_context()
        return context.get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def begin_run(self, run: int) -> None:
        """Called in the "control" concurrency group, beside the queued calls: the consumer began run
        ``run``, so calls of older runs still queued are answered `STALE` without any work."""
        self.newest_run = max(self.newest_run, run)

    # -- generator sources ---------------------------------------------------------------------------

    def next(self, run: int, epoch: int, start: int) -> tuple:
        """The next record of this shard in run ``run`` (epoch ``epoch``, from element ``start``); a newer
        run closes the old one and begins the epoch; an older one is answered `STALE`."""
        began = time.monotonic()
        try:
            if run < self.run or run < self.newest_run:
                return (STALE,)
            if self.failure is None and run > self.run:
                self._begin(run, epoch, start)
            if self.failure is not None:
                return (FAILED, self.failure)
            assert self.production is not None
            for step in self.steps:
                if step is not None:
                    items, key, first, batched = step
                    return (RECORD, key, self._encode(items, first, batched), self._usage())
            return (END, self.production.produced, self._usage())
        except SourceFailed as failed:
            return self._failed("source", failed.error, failed.element)
        except _Refused as refused:
            return self._failed("element", refused.error, refused.element)
        finally:
            self.busy_s += time.monotonic() - began

    def _begin(self, run: int, epoch: int, start: int) -> None:
        self._close_steps()
        if self.failure is not None:
            return  # the old run's clean-up failed: that is the answer now
        self.run, self.epoch = run, epoch
        setup = self.setup
        shard = Shard(setup.index, setup.count, epoch, shard_seed(setup.seed, setup.index, epoch), start)
        self.production = ShardEpoch(
            self.source, self.args, self.kwargs, shard, setup.batch_size, setup.drop_remainder
        )
        self.steps = self.production.steps()

    def _close_steps(self) -> None:
        """Close the shard's generator; an exception from the source's own clean-up (a ``finally`` that
        raises, or exits) is its failure, as in a local worker."""
        steps, self.steps = self.steps, None
        if steps is None:
            return
        try:
            steps.close()
        except BaseException as error:
            if self.failure is None:
                produced = self.production.produced if self.production is not None else 0
                self.failure = describe_failure("source", error, element=produced, epoch=self.epoch)

    # -- random-access sources -----------------------------------------------------------------------

    def task(self, run: int, epoch: int, seq: int, indices: list[int]) -> tuple:
        """The record of ``source[i]`` for these indices (one element, or one batch): task ``seq``."""
        began = time.monotonic()
        try:
            if run < self.newest_run:
                return (STALE,)
            if self.failure is not None:
                return (FAILED, self.failure)
            self.run, self.epoch = run, epoch
            setup = self.setup
            items = task_items(self.source, setup.seed, epoch, indices, seq * (setup.batch_size or 1))
            record = self._encode(items, seq, setup.batch_size is not None, indices)
            return (RECORD, seq, record, self._usage())
        except SourceFailed as failed:
            return self._failed("source", failed.error, failed.element, failed.position)
        except _Refused as refused:
            return self._failed("element", refused.error, refused.element, refused.position)
        finally:
            self.busy_s += time.monotonic() - began

    # -- records and reports -------------------------------------------------------------------------

    def _encode(self, items: list, first: int, batched: bool, indices: list[int] | None = None) -> np.ndarray:
        """The record as a 64-byte-aligned uint8 array; `_Refused` for an element mpfeed cannot carry
        (``indices``: a random-access task's, whose number ``first`` is)."""
        try:
            if self.setup.dtypes is not None:
                items = conform_items(items, self.setup.dtypes)
            record = self.encoder.prepare(items, first, batched)
        except (TypeError, ValueError) as error:
            raise _Refused(error, *refused_element(error, first, indices, self.setup.batch_size)) from None
        buffer = aligned_empty(record.nbytes)
        record.write(buffer)
        return buffer

    def _failed(self, where: str, error: BaseException, element: int, position: int | None = None) -> tuple:
        """Remember the failure (every later call answers with it) and answer with it."""
        self.failure = describe_failure(where, error, element=element, epoch=self.epoch, position=position)
        self._close_steps()
        return (FAILED, self.failure)

    def _usage(self) -> tuple | None:
        """Now and then: busy, blocked and idle seconds, CPU seconds and resident bytes."""
        now = time.monotonic()
        if now - self.reported < _USAGE_S:
            return None
        self.reported = now
        import psutil

        process = psutil.Process()
        with process.oneshot():
            cpu = process.cpu_times()
            rss = process.memory_info().rss
        idle = now - self.started - self.busy_s
        return (self.busy_s, 0.0, idle, cpu.user + cpu.system, rss)


class _Refused(Exception):
    """An element mpfeed cannot carry: ``error`` from the encoder, for element ``element``."""

    def __init__(self, error: BaseException, element: int, position: int | None = None) -> None:
        self.error = error
        self.element = element
        self.position = position
