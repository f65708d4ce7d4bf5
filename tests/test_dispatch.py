"""Tasks travel several to a message: the TASK message's framing, and what the dispatcher sends, with real
workers."""

from __future__ import annotations

import pytest
import sources

import mpfeed
from mpfeed import protocol


def test_a_task_message_carries_tasks_of_any_length_in_order():
    batch = [(7, [3]), (8, [9, 1, 2**40]), (9, []), (12, [0, 5])]
    run, got = protocol.read_tasks(protocol.tasks(5, batch))
    assert run == 5
    assert [(seq, list(indices)) for seq, indices in got] == batch
    assert protocol.read_tasks(protocol.tasks(2**32 - 1, [])) == (2**32 - 1, [])


def test_first_ready_sends_a_worker_several_tasks_at_once():
    """A worker is topped up once half of what it may hold is free, so a message carries two tasks or
    more (fewer only when the epoch runs out of tasks): about half as many messages as tasks."""
    n, workers = 300, 3
    with mpfeed.Feeder(sources.Numbers(n), workers=workers, depth=4, ordered=False) as feeder:
        assert sorted(e["i"] for e in feeder) == list(range(n))
        sent = feeder._consumer.supervisor.task_messages
    assert sent <= n // 2 + workers, sent


@pytest.mark.parametrize("ordered", [True, False])
def test_batched_tasks_sent_together_keep_their_positions(ordered):
    """Tasks of several elements, several to a message, shuffled: each record is its own batch of
    consecutive positions of the order, whichever way they are delivered."""
    n, batch = 103, 4
    with mpfeed.Feeder(sources.Numbers(n), workers=1, shuffle=True, seed=3) as plain:
        orders = [[e["i"] for e in plain] for _ in range(2)]
    with mpfeed.Feeder(
        sources.Numbers(n), workers=3, batch_size=batch, shuffle=True, seed=3, ordered=ordered
    ) as feeder:
        for order in orders:  # the next epoch is a new run of the same workers
            expected = [order[k : k + batch] for k in range(0, n, batch)]
            got = [b["i"].tolist() for b in feeder]
            if not ordered:
                got.sort(key=expected.index)
            assert got == expected
