"""Which worker's record the consumer takes next: for generator sources, round-robin over the shards
(`RoundRobin`, ordered) or whichever is ready first (`FirstReady`); for random-access sources, by task
(`Window`). Policies only: they read and pop the supervisor's inboxes and never talk to processes.

``take`` returns ``(handle, record)`` to deliver, ``(handle, None)`` when the consumer must wait (for that
worker when ordered; for anyone when not), and ``(None, None)`` at the end of the epoch. A worker's failure
is raised where the order meets it; with ``strict``, also as soon as the consumer would have to wait, so
that it never waits once a worker has failed. Without ``strict`` (inferring a signature from the first
element), only a failure that stands in the way of an element is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .dispatch import Dispatcher
from .supervisor import End, Record, Supervisor, WorkerHandle

Taken = tuple[WorkerHandle | None, Record | None]


def _head(handle: WorkerHandle):
    """The first entry of the inbox after any End (which marks the worker's epoch as ended)."""
    inbox = handle.inbox
    while inbox and type(inbox[0]) is End:
        inbox.popleft()
        handle.ended = True
    return inbox[0] if inbox else None


def _unended_head(handle: WorkerHandle):
    head = _head(handle)
    return None if handle.ended else head


def _unended(handle: WorkerHandle) -> bool:
    return not handle.ended


def _next_entry(handle: WorkerHandle):
    return handle.inbox[0] if handle.inbox else None


def _has_tasks(handle: WorkerHandle) -> bool:
    return handle.pending_tasks > 0


def _raise_any_failure(supervisor: Supervisor) -> None:
    for handle in supervisor.handles:
        if handle.failed:
            raise supervisor.error(handle, handle.inbox[-1])


class _Rotation:
    """A policy that looks at the workers in turn, from ``cursor`` on."""

    def __init__(self) -> None:
        self.cursor = 0

    def reset(self) -> None:
        self.cursor = 0

    def _first_ready(
        self,
        supervisor: Supervisor,
        strict: bool,
        head_of: Callable[[WorkerHandle], Any],
        may_wait: Callable[[WorkerHandle], bool],
    ) -> Taken | None:
        """The first ready record from ``cursor`` on: ``(handle, record)``; else ``(handle, None)`` to wait
        for any worker that ``may_wait`` for; else None. ``head_of`` gives a worker's next entry (None
        when it has none to give). A failure in the way is raised at once with ``strict``, otherwise
        only when no worker has a record or is worth waiting for."""
        handles = supervisor.handles
        count = len(handles)
        waiting_for = failed = None
        for step in range(count):
            handle = handles[(self.cursor + step) % count]
            head = head_of(handle)
            if head is None:
                if waiting_for is None and may_wait(handle):
                    waiting_for = handle
                continue
            if type(head) is not Record:
                if strict:
                    raise supervisor.error(handle, head)
                failed = failed or handle
                continue
            handle.inbox.popleft()
            self.cursor = (handle.index + 1) % count
            return handle, head
        if waiting_for is not None:
            if strict:
                _raise_any_failure(supervisor)
            return waiting_for, None
        if failed is not None:
            raise supervisor.error(failed, failed.inbox[0])
        return None


class RoundRobin(_Rotation):
    """Ordered: worker 0's next record, then worker 1's, ...; with strided shards that is source order."""

    def take(self, supervisor: Supervisor, strict: bool = True) -> Taken:
        handles = supervisor.handles
        count = len(handles)
        for step in range(count):
            handle = handles[(self.cursor + step) % count]
            head = _head(handle)
            if handle.ended:
                continue
            if head is None:
                self.cursor = handle.index
                if strict:
                    _raise_any_failure(supervisor)
                return handle, None
            if type(head) is not Record:
                raise supervisor.error(handle, head)
            handle.inbox.popleft()
            self.cursor = (handle.index + 1) % count
            return handle, head
        return None, None


class FirstReady(_Rotation):
    """Unordered: the next ready record, looking at the workers round-robin so none is starved."""

    def take(self, supervisor: Supervisor, strict: bool = True) -> Taken:
        taken = self._first_ready(supervisor, strict, _unended_head, _unended)
        return (None, None) if taken is None else taken


class Window(_Rotation):
    """Random access: records by task, in task order (ordered: the reorder window is every worker's ring)
    or first ready; the epoch ends when its dispatcher has every task delivered."""

    def __init__(self, dispatcher: Dispatcher, ordered: bool) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.ordered = ordered

    def take(self, supervisor: Supervisor, strict: bool = True) -> Taken:
        dispatcher = self.dispatcher
        if dispatcher.remaining <= 0:
            return None, None
        handles = supervisor.handles
        if self.ordered:
            worker = dispatcher.assigned.get(dispatcher.next_delivery)
            if worker is None:  # not sent: every worker is gone
                _raise_any_failure(supervisor)
                raise AssertionError("a task was never sent, yet no worker failed")
            handle = handles[worker]
            head = _next_entry(handle)
            if head is None:
                if strict:
                    _raise_any_failure(supervisor)
                return handle, None
            if type(head) is not Record:
                raise supervisor.error(handle, head)
            handle.inbox.popleft()
            dispatcher.delivered(head.key)
            return handle, head
        taken = self._first_ready(supervisor, strict, _next_entry, _has_tasks)
        if taken is not None:
            if taken[1] is not None:
                dispatcher.delivered(taken[1].key)
            return taken
        _raise_any_failure(supervisor)
        return handles[0], None  # tasks not yet sent: wait for room
